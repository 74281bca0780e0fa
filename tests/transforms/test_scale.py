"""scale / scale_ (src/transforms/scale.rs, kernels::scale_in_place) against NumPy.

Reference (SPEC §6.1, kernels docs): computed in f32 (f64 for F64) with ``by`` rounded to f32,
then rounded to nearest even back to the dtype: ``(x.astype(f32) * f32(by)).astype(dtype)``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import raw_bytes, read, tensor_names

FLOAT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def reference(x: np.ndarray, by: float) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        if x.dtype == np.float64:
            return x * np.float64(by)
        return (x.astype(np.float32) * np.float32(by)).astype(x.dtype)


def assert_bits_equal(got: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    nan = np.isnan(expected.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float64)), nan, err_msg=what)
    u = UINT[expected.dtype.itemsize]
    g, e = got.view(u)[~nan], expected.view(u)[~nan]
    bad = np.flatnonzero(g != e)
    assert bad.size == 0, f"{what}: {bad.size} differ; got {got[~nan][bad[:4]]} want {expected[~nan][bad[:4]]}"


def _values(dtype: np.dtype, n: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A spread of magnitudes (incl. subnormal results for halves), signed zeros and non-finite values.
    x = rng.standard_normal(n) * np.exp2(rng.integers(-20, 12, n))
    x[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 65504.0]
    with np.errstate(over="ignore"):
        return x.astype(dtype)


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("by", [0.5, 2.0, -3.0, 0.1, 1.0 / 3.0, 1e-3, 0.0, 1234.5678])
def test_scale_matches_numpy_reference(write, tmp_path, dtype, by):
    x = _values(FLOAT_DTYPES[dtype])
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale": {"from": "x", "to": "y", "by": by}}], "output": str(out)})
    got = read(out)
    assert_bits_equal(got["y"], reference(x, by), f"{dtype} * {by}")
    assert got["x"].tobytes() == x.tobytes()


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_scale_inplace_matches_numpy_reference(write, tmp_path, dtype):
    x = _values(FLOAT_DTYPES[dtype], n=1 << 13, seed=5)  # long enough for any vectorised path
    other = np.arange(3, dtype=np.int64)
    path = write({"ids": other, "x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale_": {"target": "x", "by": 0.7}}], "output": str(out)})
    got = read(out)
    assert_bits_equal(got["x"], reference(x, 0.7), dtype)
    assert tensor_names(out) == ["ids", "x"]
    np.testing.assert_array_equal(got["ids"], other)


def test_scale_f64_uses_f64_factor(write, tmp_path):
    # 0.1 is not representable in f32; an F64 tensor must be scaled by the f64 value.
    x = np.array([1.0, 3.0, 1e10], np.float64)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale_": {"target": "x", "by": 0.1}}], "output": str(out)})
    np.testing.assert_array_equal(read(out)["x"], x * 0.1)


def test_scale_odd_lengths_and_sizes(write, tmp_path):
    # Lengths around SIMD widths, so tail handling is exercised.
    tensors = {f"t{n}": (np.arange(n, dtype=np.float32) - n / 2).astype(np.float16) / 3 for n in (1, 7, 8, 9, 15, 16, 17, 33)}
    path = write(tensors)
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale_": {"target": "t.*", "by": 1.5}}], "output": str(out)})
    got = read(out)
    for name, x in tensors.items():
        assert_bits_equal(got[name], reference(x, 1.5), name)


@pytest.mark.parametrize(
    ("slice_text", "index"),
    [("[:8]", np.s_[:8]), ("[:, 2:5]", np.s_[:, 2:5]), ("[::2]", np.s_[::2]), ("[::-1, 1]", np.s_[::-1, 1]), ("[1]", np.s_[1]), ("[-2:, ::-3]", np.s_[-2:, ::-3])],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scale_inplace_through_slice_changes_only_the_region(write, tmp_path, slice_text, index, dtype):
    x = (np.random.default_rng(1).standard_normal((10, 6))).astype(FLOAT_DTYPES[dtype])
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale_": {"target": f"x::{slice_text}", "by": -2.5}}], "output": str(out)})
    got = read(out)
    expected = x.copy()
    expected[index] = reference(np.ascontiguousarray(x[index]), -2.5)
    assert_bits_equal(got["x"], expected, slice_text)


def test_scale_from_slice_creates_tensor_of_the_region(write, tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(4, 5)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale": {"from": "x::[1:3, ::2]", "to": "y", "by": 3.0}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["y"], x[1:3, ::2] * np.float32(3.0))
    np.testing.assert_array_equal(got["x"], x)


def test_scale_twice_composes(write, tmp_path):
    x = np.linspace(-4, 4, 17, dtype=np.float32).astype(ml_dtypes.bfloat16)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale_": {"target": "x", "by": 0.3}}, {"scale_": {"target": "x", "by": 7.0}}], "output": str(out)})
    assert_bits_equal(read(out)["x"], reference(reference(x, 0.3), 7.0))


def test_scale_regex_many_and_rewrite(write, tmp_path):
    tensors = {f"h.{i}.w": np.full(4, i + 1, np.float32) for i in range(3)}
    path = write(tensors)
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale": {"from": r"h\.(\d)\.w", "to": r"s.\1", "by": 0.25}}], "output": str(out)})
    got = read(out)
    for i in range(3):
        np.testing.assert_array_equal(got[f"s.{i}"], np.full(4, (i + 1) * 0.25, np.float32))
    assert tensor_names(out) == [*tensors, "s.0", "s.1", "s.2"]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint8, np.bool_])
@pytest.mark.parametrize("transform", ["scale", "scale_"])
def test_scale_on_int_tensor_raises(write, tmp_path, dtype, transform):
    path = write({"w": np.ones(3, np.float32), "ids": np.ones(3, dtype)})
    body = {"from": ".*", "to": r"s.\g<0>", "by": 2.0} if transform == "scale" else {"target": ".*", "by": 2.0}
    out = tmp_path / "out.safetensors"
    with pytest.raises(bs.TransformError) as info:
        bs.run({"inputs": [str(path)], "transforms": [{transform: body}], "output": str(out)})
    assert "ids" in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize("by", [float("inf"), float("nan"), "abc"])
def test_scale_factor_must_be_a_finite_number(write, tmp_path, by):
    path = write({"w": np.ones(3, np.float32)})
    with pytest.raises(bs.PlanError):
        bs.run({"inputs": [str(path)], "transforms": [{"scale_": {"target": "w", "by": by}}], "output": str(tmp_path / "o.safetensors")})


def test_scale_bf16_raw_bytes(write, tmp_path):
    x = np.array([1.0, 3.0, -0.0078125, 255.0], np.float32).astype(ml_dtypes.bfloat16)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"scale_": {"target": "x", "by": 1.0 / 3.0}}], "output": str(out)})
    dtype, shape, data = raw_bytes(out, "x")
    assert dtype == "BF16"
    assert data == reference(x, 1.0 / 3.0).tobytes()
