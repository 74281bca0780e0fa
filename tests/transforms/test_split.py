"""split (src/transforms/split.rs) against NumPy ``np.split``; split + concat round trips bit-exact."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import raw_bytes, read, tensor_names


def _run(path, transforms, out):
    return bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)})


@pytest.mark.parametrize(("dim", "sizes"), [(0, [1, 3, 2]), (1, [4, 0, 4]), (-1, [2, 2, 4]), (2, [3, 2, 0])])
def test_split_matches_numpy(write, tmp_path, dim, sizes):
    shape = [6, 8, 5]
    shape[dim] = sum(sizes)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"split": {"from": "x", "to": ["p0", "p1", "p2"], "sizes": sizes, "dim": dim}}], out)
    got = read(out)
    for i, part in enumerate(np.split(x, np.cumsum(sizes)[:-1], axis=dim)):
        assert got[f"p{i}"].shape == part.shape
        np.testing.assert_array_equal(got[f"p{i}"], part)
    assert tensor_names(out) == ["x", "p0", "p1", "p2"]


def test_split_equal_parts_by_default_with_templates(write, tmp_path):
    tensors = {f"h.{i}.qkv": np.arange(36, dtype=np.float16).reshape(9, 4) + i for i in range(2)}
    out = tmp_path / "out.safetensors"
    _run(write(tensors), [{"split": {"from": r"h\.(\d+)\.qkv", "to": [r"h.\1.q", r"h.\1.k", r"h.\1.v"]}}], out)
    got = read(out)
    for i in range(2):
        q, k, v = np.split(tensors[f"h.{i}.qkv"], 3)
        np.testing.assert_array_equal(got[f"h.{i}.q"], q)
        np.testing.assert_array_equal(got[f"h.{i}.k"], k)
        np.testing.assert_array_equal(got[f"h.{i}.v"], v)


def test_split_sliced_source(write, tmp_path):
    x = np.arange(10 * 6, dtype=np.int32).reshape(10, 6)
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"split": {"from": "x::[::-2, 1:]", "to": ["a", "b"], "sizes": [2, 3], "dim": 1}}], out)
    got = read(out)
    a, b = np.split(x[::-2, 1:], [2], axis=1)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


@pytest.mark.parametrize("dim", [0, 1])
def test_split_concat_round_trip_bit_exact(write, tmp_path, dim):
    x = np.random.default_rng(3).standard_normal((8, 12)).astype(ml_dtypes.bfloat16)
    x[0, :4] = [np.nan, -0.0, np.inf, -np.inf]
    out = tmp_path / "out.safetensors"
    transforms = [
        {"split": {"from": "x", "to": ["a", "b", "c"], "sizes": [1, 5, 2] if dim == 0 else [6, 3, 3], "dim": dim}},
        {"concat": {"from": ["a", "b", "c"], "to": "y", "dim": dim}},
        {"assert": {"equal": {"left": "x", "right": "y"}}},
    ]
    _run(write({"x": x}), transforms, out)
    assert raw_bytes(out, "y")[2] == x.tobytes()


def test_split_sizes_not_summing(write, tmp_path):
    path = write({"x": np.zeros((4, 6), np.float32)})
    with pytest.raises(bs.TransformError) as e:
        _run(path, [{"split": {"from": "x", "to": ["a", "b"], "sizes": [2, 3], "dim": 1}}], tmp_path / "out.safetensors")
    text = str(e.value)
    assert "transforms[0]" in text and "split" in text and "x" in text and "add up to 5" in text and "is 6" in text
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(bs.TransformError, match="add up to"):
        _run(path, [{"split": {"from": "x", "to": ["a", "b", "c"]}}], tmp_path / "out.safetensors")


def test_split_bad_dim_and_destinations(write, tmp_path):
    path = write({"x": np.zeros((4, 6), np.float32), "a": np.zeros(1, np.float32)})
    with pytest.raises(bs.TransformError, match="dimension 2 is out of range for `model::x`"):
        _run(path, [{"split": {"from": "x", "to": ["p", "q"], "dim": 2}}], tmp_path / "out.safetensors")
    with pytest.raises(bs.TransformError, match="already exists"):
        _run(path, [{"split": {"from": "x", "to": ["a", "q"]}}], tmp_path / "out.safetensors")
    with pytest.raises(bs.TransformError, match="both rewrite"):
        _run(path, [{"split": {"from": "x", "to": ["p", "p"]}}], tmp_path / "out.safetensors")


@pytest.mark.parametrize(
    ("payload", "key"),
    [({"to": "a", "sizes": [4]}, "split.to"), ({"to": ["a", "b"], "sizes": 3}, "split.sizes"), ({"to": ["a", "b"], "sizes": [4]}, "split.sizes"), ({"to": ["a", "b"], "dim": "x"}, "split.dim")],
)
def test_split_wrong_types(write, tmp_path, payload, key):
    path = write({"x": np.zeros((4, 6), np.float32)})
    with pytest.raises(bs.PlanError) as e:
        _run(path, [{"split": {"from": "x", **payload}}], tmp_path / "out.safetensors")
    assert f"transforms[0].{key}" in str(e.value)
