"""Write a small GPT-2-shaped safetensors checkpoint for the demo and the tests.

Only NumPy is needed (the safetensors layout is written by hand: an 8-byte little-endian header
length, a JSON header, then the tensors back to back). The weights are seeded, so the file is the
same on every machine.

    python examples/make_tiny_gpt2.py [OUT_DIR] [--layers N] [--width D]
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np

try:
    import ml_dtypes
except ImportError:  # bf16 fixtures need ml_dtypes; the float32 demo does not
    ml_dtypes = None

_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
}


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in dict order) as a safetensors file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    blobs = []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def tiny_gpt2(layers: int = 2, width: int = 64, vocab: int = 256, positions: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 tensor names and shapes (``h.{i}.attn.c_attn.weight`` is fused QKV) with seeded values."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"wte.weight": normal(vocab, width), "wpe.weight": normal(positions, width)}
    for i in range(layers):
        p = f"h.{i}"
        tensors[f"{p}.ln_1.weight"] = np.ones(width, np.float32)
        tensors[f"{p}.ln_1.bias"] = np.zeros(width, np.float32)
        tensors[f"{p}.attn.c_attn.weight"] = normal(width, 3 * width)
        tensors[f"{p}.attn.c_attn.bias"] = np.zeros(3 * width, np.float32)
        tensors[f"{p}.attn.c_proj.weight"] = normal(width, width)
        tensors[f"{p}.attn.c_proj.bias"] = np.zeros(width, np.float32)
        tensors[f"{p}.ln_2.weight"] = np.ones(width, np.float32)
        tensors[f"{p}.ln_2.bias"] = np.zeros(width, np.float32)
        tensors[f"{p}.mlp.c_fc.weight"] = normal(width, 4 * width)
        tensors[f"{p}.mlp.c_fc.bias"] = np.zeros(4 * width, np.float32)
        tensors[f"{p}.mlp.c_proj.weight"] = normal(4 * width, width)
        tensors[f"{p}.mlp.c_proj.bias"] = np.zeros(width, np.float32)
    tensors["ln_f.weight"] = np.ones(width, np.float32)
    tensors["ln_f.bias"] = np.zeros(width, np.float32)
    tensors["attn.position_ids"] = np.arange(positions, dtype=np.int64)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).parent / "tiny-gpt2"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    save_safetensors(out / "model.safetensors", tiny_gpt2(args.layers, args.width), {"format": "pt"})
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": args.layers, "n_embd": args.width}, indent=2) + "\n")
    print(f"wrote {out}/model.safetensors and config.json")


if __name__ == "__main__":
    main()
