"""concat (src/transforms/concat.rs) against NumPy ``np.concatenate``; pairing of multi-match references."""

from __future__ import annotations

import numpy as np
import pytest

import brainsurgery as bs
from conftest import read


def _run(path, transforms, out):
    return bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)})


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_concat_matches_numpy(write, tmp_path, dim):
    rng = np.random.default_rng(0)
    shapes = []
    for extra in (1, 3, 2):
        s = [2, 3, 4]
        s[dim] = extra
        shapes.append(s)
    parts = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    out = tmp_path / "out.safetensors"
    _run(write(parts), [{"concat": {"from": ["p0", "p1", "p2"], "to": "y", "dim": dim}}], out)
    np.testing.assert_array_equal(read(out)["y"], np.concatenate(list(parts.values()), axis=dim))


def test_concat_of_slices_and_large_parts(write, tmp_path):
    a = np.arange(600 * 500, dtype=np.float32).reshape(600, 500)  # over a chunk: rows cross boundaries
    b = np.arange(600 * 7, dtype=np.float32).reshape(600, 7) * -1
    out = tmp_path / "out.safetensors"
    _run(write({"a": a, "b": b}), [{"concat": {"from": ["a::[:, ::-1]", "b", "a::[:, :3]"], "to": "y", "dim": 1}}], out)
    np.testing.assert_array_equal(read(out)["y"], np.concatenate([a[:, ::-1], b, a[:, :3]], axis=1))


def test_concat_pairs_matches_in_order(write, tmp_path):
    tensors = {}
    for i in range(3):
        tensors[f"l.{i}.q"] = np.full((2, 4), i, np.float16)
        tensors[f"l.{i}.k"] = np.full((1, 4), 10 + i, np.float16)
    out = tmp_path / "out.safetensors"
    _run(write(tensors), [{"concat": {"from": [r"l\.(\d+)\.q", r"l\.\d+\.k"], "to": r"l.\1.qk"}}], out)
    got = read(out)
    for i in range(3):
        np.testing.assert_array_equal(got[f"l.{i}.qk"], np.concatenate([tensors[f"l.{i}.q"], tensors[f"l.{i}.k"]]))


def test_concat_mismatched_shapes(write, tmp_path):
    path = write({"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 4), np.float32)})
    with pytest.raises(bs.TransformError) as e:
        _run(path, [{"concat": {"from": ["a", "b"], "to": "y", "dim": 0}}], tmp_path / "out.safetensors")
    text = str(e.value)
    assert "transforms[0]" in text and "concat" in text and "`model::a` is (2, 3)" in text and "`model::b` is (2, 4)" in text
    assert not (tmp_path / "out.safetensors").exists()
    # Joining along dim 1 is fine.
    _run(path, [{"concat": {"from": ["a", "b"], "to": "y", "dim": 1}}], tmp_path / "out.safetensors")
    assert read(tmp_path / "out.safetensors")["y"].shape == (2, 7)


def test_concat_mismatched_dtypes_ranks_and_counts(write, tmp_path):
    path = write({"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 3), np.float16), "c": np.zeros(3, np.float32), "d.0": np.zeros(3, np.float32), "d.1": np.zeros(3, np.float32)})
    out = tmp_path / "out.safetensors"
    with pytest.raises(bs.TransformError, match="dtype mismatch"):
        _run(path, [{"concat": {"from": ["a", "b"], "to": "y"}}], out)
    with pytest.raises(bs.TransformError, match="concat along dimension 0"):
        _run(path, [{"concat": {"from": ["a", "c"], "to": "y"}}], out)
    with pytest.raises(bs.TransformError, match=r"`c` matches 1 tensor but `d\\\.\.\*` matches 2 tensors"):
        _run(path, [{"concat": {"from": ["c", r"d\..*"], "to": "y"}}], out)
    with pytest.raises(bs.TransformError, match="out of range"):
        _run(path, [{"concat": {"from": ["a", "a"], "to": "y", "dim": 2}}], out)


@pytest.mark.parametrize(("payload", "key"), [({"from": "a", "to": "y"}, "concat.from"), ({"from": [], "to": "y"}, "concat.from"), ({"from": ["a"], "to": "y", "dim": 0.5}, "concat.dim")])
def test_concat_wrong_types(write, tmp_path, payload, key):
    path = write({"a": np.zeros((2, 3), np.float32)})
    with pytest.raises(bs.PlanError) as e:
        _run(path, [{"concat": payload}], tmp_path / "out.safetensors")
    assert f"transforms[0].{key}" in str(e.value)
