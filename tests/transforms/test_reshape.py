"""reshape / reshape_ (src/transforms/reshape.rs) against NumPy ``reshape``: same elements in row-major
order, one ``-1`` inferred; sliced sources are reshaped as their (contiguous) NumPy copy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import raw_bytes, read, tensor_names


def _run(path, transforms, out):
    return bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)})


@pytest.mark.parametrize(
    ("shape", "new"),
    [((4, 6), [24]), ((4, 6), [2, -1]), ((4, 6), [-1, 4, 3]), ((2, 3, 4), [6, 4]), ((24,), [2, 3, 2, 2]), ((1,), [])],
)
def test_reshape_matches_numpy(write, tmp_path, shape, new):
    n = int(np.prod(shape))
    x = np.arange(n, dtype=np.float32).reshape(shape) * 1.5
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"reshape": {"from": "x", "to": "y", "shape": new}}], out)
    got = read(out)
    expected = x.reshape(new)
    assert got["y"].shape == expected.shape
    np.testing.assert_array_equal(got["y"], expected)
    np.testing.assert_array_equal(got["x"], x)


def test_reshape_inplace_keeps_place_and_bytes(write, tmp_path):
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(ml_dtypes.bfloat16)
    ids = np.arange(3, dtype=np.int64)
    out = tmp_path / "out.safetensors"
    _run(write({"x": x, "ids": ids}), [{"reshape_": {"target": "x", "shape": [2, -1, 8]}}], out)
    dtype, shape, data = raw_bytes(out, "x")
    assert (dtype, shape) == ("BF16", [2, 2, 8])
    assert data == x.tobytes()
    assert tensor_names(out) == ["x", "ids"]


@pytest.mark.parametrize(("index", "text"), [(np.s_[1:3, ::2], "[1:3, ::2]"), (np.s_[::-1], "[::-1]"), (np.s_[:, 1], "[:, 1]")])
def test_reshape_of_sliced_source(write, tmp_path, index, text):
    x = np.arange(48, dtype=np.int32).reshape(6, 8)
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"reshape": {"from": f"x::{text}", "to": "y", "shape": [-1]}}], out)
    np.testing.assert_array_equal(read(out)["y"], np.ascontiguousarray(x[index]).reshape(-1))


def test_slice_of_reshaped_tensor(write, tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(4, 6)
    out = tmp_path / "out.safetensors"
    transforms = [
        {"reshape": {"from": "x", "to": "y", "shape": [3, 8]}},
        {"copy": {"from": "y::[1:, ::3]", "to": "z"}},
        {"scale": {"from": "x", "to": "s", "by": 2.0}},
        {"reshape": {"from": "s", "to": "t", "shape": [2, 12]}},
    ]
    _run(write({"x": x}), transforms, out)
    got = read(out)
    np.testing.assert_array_equal(got["z"], x.reshape(3, 8)[1:, ::3])
    np.testing.assert_array_equal(got["t"], (x * 2).reshape(2, 12))


def test_reshape_wrong_element_count(write, tmp_path):
    path = write({"x": np.zeros((4, 6), np.float32)})
    with pytest.raises(bs.TransformError) as e:
        _run(path, [{"reshape": {"from": "x", "to": "y", "shape": [5, 5]}}], tmp_path / "out.safetensors")
    text = str(e.value)
    assert "transforms[0]" in text and "reshape" in text and "x" in text and "(4, 6)" in text and "(5, 5)" in text
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(bs.TransformError, match="-1"):
        _run(path, [{"reshape_": {"target": "x", "shape": [5, -1]}}], tmp_path / "out.safetensors")


@pytest.mark.parametrize("bad", [3, "3, 4", [2, -2], [-1, -1], [1.5, 16]])
def test_reshape_wrong_shape_types(write, tmp_path, bad):
    path = write({"x": np.zeros((4, 6), np.float32)})
    with pytest.raises(bs.PlanError) as e:
        _run(path, [{"reshape": {"from": "x", "to": "y", "shape": bad}}], tmp_path / "out.safetensors")
    assert "transforms[0].reshape.shape" in str(e.value)


def test_reshape_inplace_refuses_a_slice(write, tmp_path):
    path = write({"x": np.zeros((4, 6), np.float32)})
    with pytest.raises(bs.TransformError, match="slice"):
        _run(path, [{"reshape_": {"target": "x::[:2]", "shape": [-1]}}], tmp_path / "out.safetensors")
