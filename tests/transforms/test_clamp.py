"""clamp / clamp_ (src/transforms/clamp.rs) against NumPy.

Reference: computed in f32 with the bounds rounded to f32 (f64 for F64), rounded to nearest even
back: ``np.clip(x.astype(f32), f32(min), f32(max)).astype(dtype)``; NaN stays NaN.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import read

FLOAT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}


def reference(x: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    wide = np.float64 if x.dtype == np.float64 else np.float32
    y = x.astype(wide)
    if lo is not None:
        y = np.where(y < wide(lo), wide(lo), y)
    if hi is not None:
        y = np.where(y > wide(hi), wide(hi), y)
    return y.astype(x.dtype)


def assert_same(got: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    g, e = got.astype(np.float64), expected.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(e), err_msg=what)
    np.testing.assert_array_equal(g[~np.isnan(e)], e[~np.isnan(e)], err_msg=what)


def _values(dtype: np.dtype, n: int = 2000) -> np.ndarray:
    x = np.random.default_rng(3).standard_normal(n) * 3
    x[:5] = [np.nan, np.inf, -np.inf, 0.1, -0.1]
    return x.astype(dtype)


def run(path, tmp_path, transforms):
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)})
    return read(out)


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize(("lo", "hi"), [(-1.0, 1.0), (0.1, None), (None, -0.3), (0.5, 0.5)])
def test_clamp_matches_numpy(write, tmp_path, dtype, lo, hi):
    x = _values(FLOAT_DTYPES[dtype])
    body = {"from": "x", "to": "y"} | ({"min": lo} if lo is not None else {}) | ({"max": hi} if hi is not None else {})
    got = run(write({"x": x}), tmp_path, [{"clamp": body}])
    assert_same(got["y"], reference(x, lo, hi), f"{dtype} [{lo}, {hi}]")
    assert got["x"].tobytes() == x.tobytes()


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_clamp_inplace_matches_numpy(write, tmp_path, dtype):
    x = _values(FLOAT_DTYPES[dtype])
    got = run(write({"x": x}), tmp_path, [{"clamp_": {"target": "x", "min": -0.5, "max": 2.0}}])
    assert_same(got["x"], reference(x, -0.5, 2.0), dtype)


def test_clamp_keeps_nan(write, tmp_path):
    x = np.array([np.nan, 5.0, -5.0], np.float32)
    got = run(write({"x": x}), tmp_path, [{"clamp_": {"target": "x", "min": 0.0, "max": 1.0}}])["x"]
    assert np.isnan(got[0]) and got[1] == 1.0 and got[2] == 0.0


@pytest.mark.parametrize(("slice_text", "index"), [("[:3]", np.s_[:3]), ("[:, 1:4]", np.s_[:, 1:4]), ("[::-2, 2]", np.s_[::-2, 2])])
def test_clamp_inplace_through_slice_changes_only_the_region(write, tmp_path, slice_text, index):
    x = np.random.default_rng(1).standard_normal((7, 5)).astype(ml_dtypes.bfloat16)
    got = run(write({"x": x}), tmp_path, [{"clamp_": {"target": f"x::{slice_text}", "min": -0.25, "max": 0.25}}])
    expected = x.copy()
    expected[index] = reference(np.ascontiguousarray(x[index]), -0.25, 0.25)
    assert_same(got["x"], expected, slice_text)


def test_clamp_from_slice_and_regex_rewrite(write, tmp_path):
    tensors = {f"h.{i}.w": np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4) * (i + 1) for i in range(2)}
    got = run(write(tensors), tmp_path, [{"clamp": {"from": r"h\.(\d)\.w::[1:]", "to": r"c.\1", "min": -2, "max": 2}}])
    for i in range(2):
        np.testing.assert_array_equal(got[f"c.{i}"], np.clip(tensors[f"h.{i}.w"][1:], -2, 2))


def _fails(write, tmp_path, body, exc, needles, transform="clamp_"):
    path = write({"w": np.ones(3, np.float32), "ids": np.arange(3, dtype=np.int64)})
    out = tmp_path / "out.safetensors"
    with pytest.raises(exc) as info:
        bs.run({"inputs": [str(path)], "transforms": [{"copy": {"from": "w", "to": "w2"}}, {transform: body}], "output": str(out)})
    text = str(info.value)
    for needle in needles:
        assert needle in text, text
    assert not out.exists()


def test_clamp_wrong_key_suggests(write, tmp_path):
    _fails(write, tmp_path, {"targte": "w", "min": 0}, bs.PlanError, ("transforms[1].clamp_", "targte", "did you mean `target`"))


def test_clamp_bound_must_be_a_number(write, tmp_path):
    _fails(write, tmp_path, {"target": "w", "min": "abc"}, bs.PlanError, ("transforms[1].clamp_.min", "abc"))


def test_clamp_needs_a_bound(write, tmp_path):
    _fails(write, tmp_path, {"target": "w"}, bs.PlanError, ("transforms[1].clamp_", "min"))


def test_clamp_min_above_max(write, tmp_path):
    _fails(write, tmp_path, {"target": "w", "min": 2, "max": 1}, bs.PlanError, ("transforms[1].clamp_", "greater"))


@pytest.mark.parametrize("transform", ["clamp", "clamp_"])
def test_clamp_on_int_tensor_raises(write, tmp_path, transform):
    body = {"from": "ids", "to": "c", "max": 1} if transform == "clamp" else {"target": "ids", "max": 1}
    _fails(write, tmp_path, body, bs.TransformError, (f"transforms[1] ({transform})", "ids", "floating-point"), transform)
