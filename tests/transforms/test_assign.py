"""assign (src/transforms/assign.rs): whole tensors and writes through slices, vs NumPy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import read, tensor_names


def _run(src, transforms, tmp_path):
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(src)], "transforms": transforms, "output": str(out)})
    return out


def test_assign_whole_tensor(write, tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 5)).astype(np.float32)
    b = rng.standard_normal((4, 5)).astype(np.float32)
    src = write({"a": a, "b": b})
    out = _run(src, [{"assign": {"from": "b", "to": "a"}}], tmp_path)
    got = read(out)
    assert got["a"].tobytes() == b.tobytes()
    assert got["b"].tobytes() == b.tobytes()
    assert tensor_names(out) == ["a", "b"]


def test_assign_keeps_every_other_tensor(write, tmp_path):
    x = np.arange(6, dtype=np.int32)
    y = np.arange(6, 12, dtype=np.int32)
    z = np.full(3, 7, np.int32)
    src = write({"x": x, "y": y, "z": z})
    got = read(_run(src, [{"assign": {"from": "y", "to": "x"}}], tmp_path))
    np.testing.assert_array_equal(got["x"], y)
    np.testing.assert_array_equal(got["z"], z)


# (destination shape, destination slice, source shape, NumPy index)
SLICE_CASES = [
    ((16,), "[:8]", (8,), np.s_[:8]),
    ((16,), "[-4:]", (4,), np.s_[-4:]),
    ((6, 7), "[:, 2:5]", (6, 3), np.s_[:, 2:5]),
    ((10,), "[::2]", (5,), np.s_[::2]),
    ((10,), "[1::3]", (3,), np.s_[1::3]),
    ((9,), "[::-1]", (9,), np.s_[::-1]),
    ((9,), "[7:2:-2]", (3,), np.s_[7:2:-2]),
    ((4, 5), "[1]", (5,), np.s_[1]),
    ((4, 5), "[-1]", (5,), np.s_[-1]),
    ((4, 5), "[:, -2]", (4,), np.s_[:, -2]),
    ((3, 4, 5), "[1, :, ::2]", (4, 3), np.s_[1, :, ::2]),
    ((3, 4, 5), "[:, 1:3, 4]", (3, 2), np.s_[:, 1:3, 4]),
    ((3, 4, 5), "[::-1, ::2, 1:4]", (3, 2, 3), np.s_[::-1, ::2, 1:4]),
    ((3, 4, 5), "[2]", (4, 5), np.s_[2]),
]


@pytest.mark.parametrize(("shape", "slice_text", "src_shape", "index"), SLICE_CASES, ids=[c[1] for c in SLICE_CASES])
def test_assign_through_slice(write, tmp_path, shape, slice_text, src_shape, index):
    rng = np.random.default_rng(abs(hash(slice_text)) % 2**32)
    dest = rng.standard_normal(shape).astype(np.float32)
    values = rng.standard_normal(src_shape).astype(np.float32)
    src = write({"dest": dest, "values": values})
    got = read(_run(src, [{"assign": {"from": "values", "to": f"dest::{slice_text}"}}], tmp_path))
    expected = dest.copy()
    expected[index] = values
    assert got["dest"].shape == shape
    assert got["dest"].tobytes() == expected.tobytes()
    assert got["values"].tobytes() == values.tobytes()


@pytest.mark.parametrize(
    ("from_slice", "to_slice", "from_index", "to_index"),
    [
        ("[2:6]", "[:4]", np.s_[2:6], np.s_[:4]),
        ("[::-2]", "[::2]", np.s_[::-2], np.s_[::2]),
        ("[0]", "[-1]", np.s_[0], np.s_[-1]),
    ],
)
def test_assign_sliced_source_into_sliced_destination(write, tmp_path, from_slice, to_slice, from_index, to_index):
    a = np.arange(40, dtype=np.float64).reshape(8, 5) if from_slice == "[0]" else np.arange(8, dtype=np.float64)
    b = -np.arange(40, dtype=np.float64).reshape(8, 5) if from_slice == "[0]" else -np.arange(8, dtype=np.float64)
    src = write({"a": a, "b": b})
    got = read(_run(src, [{"assign": {"from": f"a::{from_slice}", "to": f"b::{to_slice}"}}], tmp_path))
    expected = b.copy()
    expected[to_index] = a[from_index]
    np.testing.assert_array_equal(got["b"], expected)
    np.testing.assert_array_equal(got["a"], a)


def test_assign_self_overlapping_reversal(write, tmp_path):
    # a[::-1] assigned into a: the result must equal NumPy's copy semantics (read before write).
    a = np.arange(10, dtype=np.float32)
    src = write({"a": a})
    got = read(_run(src, [{"assign": {"from": "a::[::-1]", "to": "a"}}], tmp_path))
    np.testing.assert_array_equal(got["a"], a[::-1].copy())


def test_assign_regex_rewrite_many(write, tmp_path):
    rng = np.random.default_rng(3)
    tensors = {}
    for i in range(3):
        tensors[f"base.{i}"] = rng.standard_normal((2, 4)).astype(np.float32)
    for i in range(3):
        tensors[f"ft.{i}"] = rng.standard_normal((2, 4)).astype(np.float32)
    src = write(tensors)
    got = read(_run(src, [{"assign": {"from": r"ft\.(\d)::[:, 2:]", "to": r"base.\1::[:, :2]"}}], tmp_path))
    for i in range(3):
        expected = tensors[f"base.{i}"].copy()
        expected[:, :2] = tensors[f"ft.{i}"][:, 2:]
        np.testing.assert_array_equal(got[f"base.{i}"], expected)


def test_assign_across_aliases(write, tmp_path):
    a = np.zeros((2, 3), np.float32)
    b = np.ones((2, 3), np.float32)
    pa = write({"w": a}, "a.safetensors")
    pb = write({"w": b}, "b.safetensors")
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [f"base::{pa}", f"ft::{pb}"], "transforms": [{"assign": {"from": "ft::w::[1]", "to": "base::w::[0]"}}], "output": {"path": str(out), "alias": "base"}})
    got = read(out)
    expected = a.copy()
    expected[0] = b[1]
    np.testing.assert_array_equal(got["w"], expected)


def test_assign_bf16_through_slice(write, tmp_path):
    rng = np.random.default_rng(4)
    dest = rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16)
    values = rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    src = write({"dest": dest, "values": values})
    got = read(_run(src, [{"assign": {"from": "values", "to": "dest::[:, 1::2]"}}], tmp_path))
    expected = dest.copy()
    expected[:, 1::2] = values
    assert got["dest"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert got["dest"].tobytes() == expected.tobytes()


def test_assign_then_read_back_is_visible_to_later_transforms(write, tmp_path):
    a = np.zeros(4, np.float32)
    b = np.arange(4, dtype=np.float32)
    src = write({"a": a, "b": b})
    got = read(_run(src, [{"assign": {"from": "b::[:2]", "to": "a::[2:]"}}, {"copy": {"from": "a", "to": "c"}}], tmp_path))
    np.testing.assert_array_equal(got["c"], np.array([0, 0, 0, 1], np.float32))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("to", "values_shape"),
    [("dest", (4, 4)), ("dest::[:8]", (8, 5)), ("dest::[:, 0]", (5,)), ("dest::[1]", (1, 5))],
)
def test_assign_shape_mismatch_raises(write, tmp_path, to, values_shape):
    src = write({"dest": np.zeros((4, 5), np.float32), "values": np.zeros(values_shape, np.float32)})
    with pytest.raises(bs.TransformError, match="shape"):
        _run(src, [{"assign": {"from": "values", "to": to}}], tmp_path)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("other", [np.float16, np.float64, np.int32, ml_dtypes.bfloat16])
def test_assign_dtype_mismatch_raises(write, tmp_path, other):
    src = write({"dest": np.zeros(4, np.float32), "values": np.zeros(4, other)})
    with pytest.raises(bs.TransformError, match="dtype"):
        _run(src, [{"assign": {"from": "values", "to": "dest"}}], tmp_path)


def test_assign_to_missing_destination_raises(write, tmp_path):
    src = write({"values": np.zeros(4, np.float32)})
    with pytest.raises(bs.TransformError):
        _run(src, [{"assign": {"from": "values", "to": "nope"}}], tmp_path)


def test_assign_slice_out_of_range_raises(write, tmp_path):
    src = write({"dest": np.zeros((4, 5), np.float32), "values": np.zeros(5, np.float32)})
    with pytest.raises(bs.BrainSurgeryError):
        _run(src, [{"assign": {"from": "values", "to": "dest::[4]"}}], tmp_path)


def test_assign_checks_each_match_in_full_before_the_next(write, tmp_path):
    """Issue 8: with one destination helper, the first match's shape error still comes before the
    second match's collision; a sliced missing destination is named with its slice."""
    src = write({"w.0": np.ones((2, 3), np.float32), "w.1": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)})
    with pytest.raises(bs.TransformError, match=r"shape mismatch: `model::w.0` is \(2, 3\) but `model::b` is \(3,\)"):
        _run(src, [{"assign": {"from": r"w\.(\d)", "to": "b"}}], tmp_path)
    with pytest.raises(bs.TransformError, match=r"destination `model::nope::\[\.\.\.\]` does not exist"):
        _run(src, [{"assign": {"from": "b", "to": "nope::[0]"}}], tmp_path)
