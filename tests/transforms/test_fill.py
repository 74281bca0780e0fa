"""fill / fill_ and zeroes / ones / rand (src/transforms/fill.rs) against NumPy.

Constant, tensor (broadcast) and zeroes/ones results are compared exactly with NumPy arrays built
here; random results statistically (100k elements) and for determinism: the same plan twice,
and with 1 vs 2 threads, gives byte-identical output.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import raw_bytes, read, read_header, tensor_names


def run(path, tmp_path, transforms, threads=0, name="out.safetensors"):
    out = tmp_path / name
    bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)}, threads=threads)
    return read(out)


X = np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.uint8, np.int8])
def test_fill_constant(write, tmp_path, dtype):
    x = X.astype(dtype)
    got = run(write({"x": x}), tmp_path, [{"fill": {"from": "x", "to": "y", "value": 3}}, {"fill_": {"target": "x", "mode": "constant", "value": -1 if dtype != np.uint8 else 7}}])
    np.testing.assert_array_equal(got["y"], np.full_like(x, 3))
    assert got["y"].dtype == x.dtype
    np.testing.assert_array_equal(got["x"], np.full_like(x, -1 if dtype != np.uint8 else 7))


def test_fill_constant_rounds_like_astype(write, tmp_path):
    x = X.astype(ml_dtypes.bfloat16)
    got = run(write({"x": x}), tmp_path, [{"fill_": {"target": "x", "value": 0.1}}])
    np.testing.assert_array_equal(got["x"].view(np.uint16), np.full(x.shape, 0.1).astype(ml_dtypes.bfloat16).view(np.uint16))


@pytest.mark.parametrize(("slice_text", "index"), [("[1]", np.s_[1]), ("[:, ::3]", np.s_[:, ::3]), ("[::-1, 1:3]", np.s_[::-1, 1:3])])
def test_fill_inplace_through_slice_changes_only_the_region(write, tmp_path, slice_text, index):
    got = run(write({"x": X}), tmp_path, [{"fill_": {"target": f"x::{slice_text}", "value": 9.5}}])
    expected = X.copy()
    expected[index] = 9.5
    np.testing.assert_array_equal(got["x"], expected)


def test_fill_from_slice_has_region_shape(write, tmp_path):
    got = run(write({"x": X}), tmp_path, [{"fill": {"from": "x::[:2, 1:]", "to": "y", "value": 2}}])
    np.testing.assert_array_equal(got["y"], np.full((2, 3), 2, np.float32))


@pytest.mark.parametrize(
    "values",
    [[[1], [2], [3]], [1, 2, 3, 4], 5, [[[1, 2, 3, 4]]], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]],
)
def test_fill_tensor_broadcasts_like_numpy(write, tmp_path, values):
    x = np.zeros((2, 3, 4), np.float16)
    got = run(write({"x": x}), tmp_path, [{"fill_": {"target": "x", "mode": "tensor", "values": values}}])
    np.testing.assert_array_equal(got["x"], np.broadcast_to(np.array(values, np.float16), x.shape))


def test_fill_tensor_into_integer_and_slice(write, tmp_path):
    x = np.zeros((4, 3), np.int32)
    got = run(write({"x": x}), tmp_path, [{"fill_": {"target": "x::[1:3]", "mode": "tensor", "values": [7, -8, 9]}}])
    expected = x.copy()
    expected[1:3] = [7, -8, 9]
    np.testing.assert_array_equal(got["x"], expected)


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16", "float64", "int64", "bool"])
def test_zeroes_and_ones(write, tmp_path, dtype):
    extra = {"dtype": dtype} if dtype else {}
    got = run(write({"x": X}), tmp_path, [{"zeroes": {"target": "z", "shape": [2, 5]} | extra}, {"ones": {"target": "o", "shape": [3]} | extra}])
    npd = {None: np.float32, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64, "int64": np.int64, "bool": np.bool_}[dtype]
    np.testing.assert_array_equal(got["z"], np.zeros((2, 5), npd))
    np.testing.assert_array_equal(got["o"], np.ones(3, npd))
    assert got["z"].dtype == np.dtype(npd) and got["o"].dtype == np.dtype(npd)


def test_zeroes_into_new_alias_and_scalar(write, tmp_path):
    path = write({"x": X})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [f"model::{path}"], "transforms": [{"zeroes": {"target": "model::router", "shape": [4, 2]}}, {"ones": {"target": "s", "shape": []}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["router"], np.zeros((4, 2), np.float32))
    assert got["s"].shape == () and got["s"] == 1
    assert tensor_names(out) == ["x", "router", "s"]


# ---- randomness ----

N = 100_000


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_rand_uniform_statistics(write, tmp_path, dtype):
    got = run(write({"x": X}), tmp_path, [{"rand": {"target": "r", "shape": [N], "dtype": dtype, "low": -0.5, "high": 2.0, "seed": 3}}])
    r = got["r"].astype(np.float64)
    assert r.min() >= -0.5 and r.max() < 2.0
    assert abs(r.mean() - 0.75) < 0.02
    assert abs(r.std() - 2.5 / np.sqrt(12)) < 0.02
    assert len(np.unique(r)) > 100


def test_rand_uniform_default_is_unit_interval(write, tmp_path):
    r = run(write({"x": X}), tmp_path, [{"rand": {"target": "r", "shape": [N]}}])["r"]
    assert r.dtype == np.float32 and r.min() >= 0 and r.max() < 1 and abs(r.mean() - 0.5) < 0.01


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_rand_normal_statistics(write, tmp_path, dtype):
    got = run(write({"x": X}), tmp_path, [{"rand": {"target": "r", "shape": [400, 250], "dtype": dtype, "distribution": "normal", "mean": 1.5, "std": 0.5}}])
    r = got["r"].astype(np.float64)
    assert r.shape == (400, 250)
    assert abs(r.mean() - 1.5) < 0.01 and abs(r.std() - 0.5) < 0.01
    # Roughly normal: ~68% within one std.
    assert abs(np.mean(np.abs(r - 1.5) < 0.5) - 0.6827) < 0.01


def test_fill_rand_gives_each_matched_tensor_different_noise(write, tmp_path):
    tensors = {"a": np.zeros((100, 100), np.float32), "b": np.zeros((100, 100), np.float32)}
    got = run(write(tensors), tmp_path, [{"fill_": {"target": "a|b", "mode": "rand", "distribution": "normal", "seed": 1}}])
    assert not np.array_equal(got["a"], got["b"])
    assert abs(np.corrcoef(got["a"].ravel(), got["b"].ravel())[0, 1]) < 0.05
    assert abs(got["a"].std() - 1) < 0.03


def test_seed_changes_noise(write, tmp_path):
    path = write({"x": X})
    r0 = run(path, tmp_path, [{"rand": {"target": "r", "shape": [64], "seed": 0}}], name="o0.safetensors")["r"]
    r1 = run(path, tmp_path, [{"rand": {"target": "r", "shape": [64], "seed": 1}}], name="o1.safetensors")["r"]
    assert not np.array_equal(r0, r1)


def test_rand_is_deterministic_across_runs_and_threads(write, tmp_path):
    # Several tensors of more than one 1 MiB chunk, so threads split the work differently.
    tensors = {f"w.{i}": np.zeros((700, 500), np.float32) for i in range(3)}
    path = write(tensors)
    plan = [
        {"fill_": {"target": r"w\.[01]", "mode": "rand", "low": -1, "high": 1, "seed": 42}},
        {"fill": {"from": "w.2", "to": "n", "mode": "rand", "distribution": "normal", "std": 0.02, "seed": 42}},
        {"rand": {"target": "r", "shape": [1000, 600], "dtype": "bf16", "seed": 42}},
        {"fill_": {"target": "w.2::[100:200]", "mode": "rand"}},
    ]
    outs = []
    for i, threads in enumerate([1, 2, 0, 2]):
        out = tmp_path / f"o{i}.safetensors"
        bs.run({"inputs": [str(path)], "transforms": plan, "output": str(out)}, threads=threads)
        # Tensor bytes only: the header's plan hash covers the (different) output path.
        outs.append({name: raw_bytes(out, name) for name in tensor_names(out)})
    assert list(outs[0]) == ["w.0", "w.1", "w.2", "n", "r"]
    assert all(o == outs[0] for o in outs[1:])
    got = read(tmp_path / "o0.safetensors")
    np.testing.assert_array_equal(got["w.2"][:100], 0)
    np.testing.assert_array_equal(got["w.2"][200:], 0)
    assert (got["w.2"][100:200] != 0).mean() > 0.99


# ---- bad input ----


def _fails(write, tmp_path, transform, body, exc, needles):
    path = write({"a": np.ones((2, 3), np.float32), "ids": np.arange(3, dtype=np.int64)})
    out = tmp_path / "out.safetensors"
    with pytest.raises(exc) as info:
        bs.run({"inputs": [str(path)], "transforms": [{"copy": {"from": "a", "to": "a2"}}, {transform: body}], "output": str(out)})
    text = str(info.value)
    for needle in needles:
        assert needle in text, text
    assert not out.exists()


def test_fill_wrong_key_suggests(write, tmp_path):
    _fails(write, tmp_path, "fill_", {"targte": "a", "value": 1}, bs.PlanError, ("transforms[1].fill_", "targte", "did you mean `target`"))


def test_shape_must_be_a_list(write, tmp_path):
    _fails(write, tmp_path, "zeroes", {"target": "z", "shape": 3}, bs.PlanError, ("transforms[1].zeroes.shape", "3"))


def test_value_must_be_a_number(write, tmp_path):
    _fails(write, tmp_path, "fill_", {"target": "a", "value": "abc"}, bs.PlanError, ("transforms[1].fill_.value", "abc"))


def test_key_of_another_mode(write, tmp_path):
    _fails(write, tmp_path, "fill_", {"target": "a", "value": 1, "low": 0}, bs.PlanError, ("transforms[1].fill_.low", "mode `constant`"))


def test_unknown_mode_and_distribution(write, tmp_path):
    _fails(write, tmp_path, "fill_", {"target": "a", "mode": "random"}, bs.PlanError, ("transforms[1].fill_.mode", "random"))
    _fails(write, tmp_path, "rand", {"target": "r", "shape": [2], "distribution": "gauss"}, bs.PlanError, ("transforms[1].rand.distribution", "gauss"))


def test_empty_uniform_range(write, tmp_path):
    _fails(write, tmp_path, "rand", {"target": "r", "shape": [2], "low": 1, "high": 1}, bs.PlanError, ("transforms[1].rand", "low"))


def test_rand_on_integer_tensor(write, tmp_path):
    _fails(write, tmp_path, "fill_", {"target": "ids", "mode": "rand"}, bs.TransformError, ("transforms[1] (fill_)", "model::ids", "floating-point"))
    _fails(write, tmp_path, "rand", {"target": "r", "shape": [2], "dtype": "int32"}, bs.TransformError, ("transforms[1] (rand)", "model::r", "floating-point"))


def test_fractional_constant_into_integer_tensor(write, tmp_path):
    _fails(write, tmp_path, "fill_", {"target": "ids", "value": 2.5}, bs.TransformError, ("transforms[1] (fill_)", "model::ids", "2.5"))


def test_values_do_not_broadcast(write, tmp_path):
    _fails(write, tmp_path, "fill_", {"target": "a", "mode": "tensor", "values": [1, 2]}, bs.TransformError, ("model::a", "(2,)", "(2, 3)"))


def test_values_not_rectangular(write, tmp_path):
    _fails(write, tmp_path, "fill_", {"target": "a", "mode": "tensor", "values": [[1, 2], [3]]}, bs.PlanError, ("transforms[1].fill_.values", "rectangular"))


def test_new_tensor_exists(write, tmp_path):
    _fails(write, tmp_path, "ones", {"target": "a", "shape": [2, 3]}, bs.TransformError, ("transforms[1] (ones)", "model::a", "already exists"))


def test_target_must_be_plain(write, tmp_path):
    _fails(write, tmp_path, "zeroes", {"target": r"x.\1", "shape": [2]}, bs.PlanError, ("transforms[1].zeroes.target",))


def test_shape_too_large_to_address_is_refused(write, tmp_path):
    # 2**61 float64 elements are 2**64 bytes: the size wrapped to 0 once, and an assertion on the
    # tensor passed without reading anything.
    _fails(write, tmp_path, "ones", {"target": "z", "shape": [2**61], "dtype": "float64"}, bs.PlanError, ("transforms[1].ones.shape", "too large to address"))
    _fails(write, tmp_path, "zeroes", {"target": "z", "shape": [2**32, 2**32]}, bs.PlanError, ("transforms[1].zeroes.shape", "too large to address"))


def test_cast_to_a_size_too_large_to_address_is_refused(write, tmp_path):
    path = write({"a": np.ones((2, 3), np.float32)})
    plan = {"inputs": [str(path)], "transforms": [{"zeroes": {"target": "z", "shape": [2**62], "dtype": "uint8"}}, {"cast_": {"target": "z", "to": "float64"}}]}
    with pytest.raises(bs.TransformError, match="too large to address"):
        bs.check(plan)


def test_concat_whose_length_overflows_is_refused(write, tmp_path):
    # Each part is addressable; their joined length wrapped to a small number once.
    path = write({"a": np.ones((2, 3), np.float32)})
    big = 2**63 - 1
    plan = {
        "inputs": [str(path)],
        "transforms": [
            {"zeroes": {"target": "z1", "shape": [big], "dtype": "uint8"}},
            {"zeroes": {"target": "z2", "shape": [big], "dtype": "uint8"}},
            {"zeroes": {"target": "w", "shape": [3], "dtype": "uint8"}},
            {"concat": {"from": ["z1", "z2", "w"], "to": "c", "dim": 0}},
        ],
    }
    with pytest.raises(bs.TransformError, match="too large to address") as info:
        bs.check(plan)
    assert info.value.transform_index == 3


def test_a_shape_with_a_zero_holds_nothing_whatever_its_other_dimensions(write, tmp_path):
    transforms = [{"zeroes": {"target": "e", "shape": [0, 2**40, 2**40]}}, {"permute": {"from": "e", "to": "p", "order": [1, 2, 0]}}]
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(write({"a": np.ones((2, 3), np.float32)}))], "transforms": transforms, "output": str(out)})
    # The official reader multiplies in order and overflows on `p`; the header is read here.
    header, _ = read_header(out)
    assert header["e"]["shape"] == [0, 2**40, 2**40]
    assert header["p"]["shape"] == [2**40, 2**40, 0]
    assert header["p"]["data_offsets"][0] == header["p"]["data_offsets"][1]
