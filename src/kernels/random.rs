//! Counter-based randomness: value `i` of a stream is a SplitMix64 hash of `(seed, i)`, so any
//! element can be produced alone, in any order, on any thread, with the same result. `fill`
//! draws tensor noise from it and `linalg` the test matrices of the randomized SVD.

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function (a bijective 64-bit mixer).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of one tensor: the plan's seed mixed with the tensor's name (FNV-1a), so two
/// tensors of one match never draw identical noise (SPEC §4).
pub fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(mix(seed) ^ h)
}

/// The `counter`-th output of the SplitMix64 stream started at `seed`, computed directly.
pub fn bits(seed: u64, counter: u64) -> u64 {
    mix(seed.wrapping_add(counter.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// A 53-bit fraction in [0, 1).
pub fn unit(b: u64) -> f64 {
    (b >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The `i`-th standard normal value of stream `seed` (Box–Muller on counters 2i and 2i+1; the
/// first uniform lies in (0, 1] so its logarithm is finite).
pub fn normal(seed: u64, i: u64) -> f64 {
    let u1 = ((bits(seed, 2 * i) >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
    let u2 = unit(bits(seed, 2 * i + 1));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
