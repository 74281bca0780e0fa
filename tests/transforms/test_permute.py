"""permute (src/transforms/permute.rs) against NumPy ``transpose``: every streaming mode (whole
rows, tiled batched transposes, the general gather), sliced sources, dtypes, and bad orders."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import raw_bytes, read


def _run(path, transforms, out):
    return bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)})


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_permute_3d_every_order(write, tmp_path, order):
    x = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"permute": {"from": "x", "to": "y", "order": list(order)}}], out)
    np.testing.assert_array_equal(read(out)["y"], np.transpose(x, order))


@pytest.mark.parametrize("order", [[0, 2, 1, 3], [3, 2, 1, 0], [1, 3, 0, 2], [0, 1, 3, 2], [-1, 0, 1, 2]])
def test_permute_4d_with_unit_dims(write, tmp_path, order):
    x = np.arange(2 * 1 * 6 * 7, dtype=np.int16).reshape(2, 1, 6, 7)
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"permute": {"from": "x", "to": "y", "order": order}}], out)
    np.testing.assert_array_equal(read(out)["y"], np.transpose(x, order))


@pytest.mark.parametrize("shape", [(700, 600), (3, 2000), (2000, 3), (1, 9)])
def test_permute_large_2d_bf16_spans_chunks(write, tmp_path, shape):
    # 700 x 600 BF16 is 820 KiB: several tiles, rows split across chunk boundaries.
    x = np.random.default_rng(1).standard_normal(shape).astype(ml_dtypes.bfloat16)
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"permute": {"from": "x", "to": "y", "order": [1, 0]}}], out)
    dtype, got_shape, data = raw_bytes(out, "y")
    assert (dtype, got_shape) == ("BF16", [shape[1], shape[0]])
    assert data == np.ascontiguousarray(x.T).tobytes()


def test_permute_2d_over_a_mebibyte(write, tmp_path):
    x = np.random.default_rng(2).standard_normal((1024, 300)).astype(np.float32)  # 1.2 MiB
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"permute": {"from": "x", "to": "y", "order": [1, 0]}}], out)
    np.testing.assert_array_equal(read(out)["y"], x.T)


@pytest.mark.parametrize(("text", "index"), [("[1:5, ::2]", np.s_[1:5, ::2]), ("[::-1, 2:]", np.s_[::-1, 2:]), ("[:, ::-3]", np.s_[:, ::-3])])
def test_permute_sliced_source(write, tmp_path, text, index):
    x = np.arange(6 * 9, dtype=np.float64).reshape(6, 9)
    out = tmp_path / "out.safetensors"
    _run(write({"x": x}), [{"permute": {"from": f"x::{text}", "to": "y", "order": [1, 0]}}], out)
    np.testing.assert_array_equal(read(out)["y"], x[index].T)


def test_permute_many_matches_and_identity(write, tmp_path):
    tensors = {f"l.{i}.w": np.arange(12, dtype=np.float32).reshape(3, 4) + i for i in range(3)}
    out = tmp_path / "out.safetensors"
    _run(write(tensors), [{"permute": {"from": r"l\.(\d+)\.w", "to": r"l.\1.wt", "order": [1, 0]}},
                          {"permute": {"from": r"l\.0\.w", "to": "same", "order": [0, 1]}}], out)
    got = read(out)
    for i in range(3):
        np.testing.assert_array_equal(got[f"l.{i}.wt"], tensors[f"l.{i}.w"].T)
    np.testing.assert_array_equal(got["same"], tensors["l.0.w"])


@pytest.mark.parametrize("order", [[0, 1], [0, 0, 1], [0, 1, 3], [1, 2, -4]])
def test_permute_non_permutation(write, tmp_path, order):
    path = write({"x": np.zeros((2, 3, 4), np.float32)})
    with pytest.raises(bs.TransformError) as e:
        _run(path, [{"permute": {"from": "x", "to": "y", "order": order}}], tmp_path / "out.safetensors")
    text = str(e.value)
    assert "transforms[0]" in text and "permute" in text and "x" in text and "not a permutation" in text
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("bad", [1, "0,1", [0, "a"], [0.5, 1]])
def test_permute_wrong_order_types(write, tmp_path, bad):
    path = write({"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(bs.PlanError) as e:
        _run(path, [{"permute": {"from": "x", "to": "y", "order": bad}}], tmp_path / "out.safetensors")
    assert "transforms[0].permute.order" in str(e.value)
