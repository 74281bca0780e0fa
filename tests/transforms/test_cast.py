"""cast / cast_ (src/transforms/cast.rs, kernels::convert) against NumPy / ml_dtypes ``astype``."""

from __future__ import annotations

import itertools
import struct

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import raw_bytes, read, tensor_names

DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
FLOATS = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
INTS = {"int8", "int16", "int32", "int64", "uint8"}
UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
FLOAT_MAX = {"float64": 1e300, "float32": 3e38, "float16": 65504.0, "bfloat16": 3e38, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def _source_values(src: str, dst: str) -> np.ndarray:
    """Values of dtype ``src`` whose conversion to ``dst`` NumPy defines."""
    rng = np.random.default_rng(sorted(DTYPES).index(src) * 100 + sorted(DTYPES).index(dst))
    if src == "bool":
        return np.array([True, False, True, True, False])
    if src in INTS:
        info = np.iinfo(DTYPES[src])
        special = [0, 1, -1, 2, 7, 100, 127, -128, 200, 255, 1000, -1000, 32767, -32768, 70000, -70000, 2**24, -(2**24), 2**31 - 1, -(2**31), 2**40 + 3]
        values = np.array([v for v in special if info.min <= v <= info.max], dtype=np.int64)
        values = np.concatenate([values, rng.integers(max(info.min, -300), min(info.max, 300), 40)])
        if dst in FLOATS:
            # int -> float: nearest value; stay below 2^24 (ml_dtypes rounds i64 -> bf16 via f32) and in range.
            values = values[np.abs(values) <= min(2**24, FLOAT_MAX[dst])]
        return values.astype(DTYPES[src])
    # floating source
    special = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1.75, -2.25, 3.9, -3.9, 15.0, 100.5, -100.5, 127.0, -128.0, 200.0, 255.0, 1e-3, -1e-3])
    values = np.concatenate([special, rng.standard_normal(60) * 4, rng.standard_normal(20) * 60, rng.standard_normal(20) * 1e-3])
    if dst in FLOATS:
        values = np.concatenate([values, [np.inf, -np.inf, np.nan]])
    # Keep what the source can hold (finite values in range).
    values = values[~np.isfinite(values) | (np.abs(values) <= min(FLOAT_MAX[src], FLOAT_MAX.get(dst, np.inf)) * 0.9)]
    array = values.astype(DTYPES[src])
    as64 = array.astype(np.float64)
    if dst in INTS:
        info = np.iinfo(DTYPES[dst])
        keep = np.isfinite(as64) & (np.trunc(as64) >= info.min) & (np.trunc(as64) <= info.max)
        if dst == "uint8":
            keep &= as64 >= 0
        array = array[keep]
    return array


def _assert_same(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.dtype == expected.dtype, what
    assert got.shape == expected.shape, what
    if expected.dtype.kind == "b" or expected.dtype.kind in "iu":
        np.testing.assert_array_equal(got, expected, err_msg=what)
        return
    # Floating: NaN-ness must agree; everything else bit for bit (so -0.0 and subnormals count).
    nan_got = np.isnan(got.astype(np.float64))
    nan_exp = np.isnan(expected.astype(np.float64))
    np.testing.assert_array_equal(nan_got, nan_exp, err_msg=f"{what}: NaN positions")
    bits = UINT_OF_SIZE[expected.dtype.itemsize]
    g, e = got.view(bits)[~nan_exp], expected.view(bits)[~nan_exp]
    bad = np.flatnonzero(g != e)
    assert bad.size == 0, f"{what}: {bad.size} elements differ, e.g. got bits {g[bad[:5]]} want {e[bad[:5]]}"


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(DTYPES, DTYPES)))
def test_cast_every_pair_matches_numpy(write, tmp_path, src, dst):
    values = _source_values(src, dst)
    assert values.size > 0
    path = write({"x": values})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "x", "to": "y", "dtype": dst}}], "output": str(out)})
    got = read(out)
    _assert_same(got["y"], values.astype(DTYPES[dst]), f"{src} -> {dst}")
    # The source is untouched.
    assert got["x"].tobytes() == values.tobytes()


# ---------------------------------------------------------------- documented differences from NumPy


def test_float_to_int_truncates_saturates_and_nan_is_zero(write, tmp_path):
    x = np.array([2.9, -2.9, 1e10, -1e10, np.nan, np.inf, -np.inf, 300.0, -300.0], np.float32)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    transforms = [{"cast": {"from": "x", "to": f"x.{d}", "dtype": d}} for d in ("int32", "int8", "uint8", "int64")]
    bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)})
    got = read(out)
    i32 = np.iinfo(np.int32)
    i64 = np.iinfo(np.int64)
    np.testing.assert_array_equal(got["x.int32"], np.array([2, -2, i32.max, i32.min, 0, i32.max, i32.min, 300, -300], np.int32))
    np.testing.assert_array_equal(got["x.int8"], np.array([2, -2, 127, -128, 0, 127, -128, 127, -128], np.int8))
    np.testing.assert_array_equal(got["x.uint8"], np.array([2, 0, 255, 0, 0, 255, 0, 255, 0], np.uint8))
    np.testing.assert_array_equal(got["x.int64"], np.array([2, -2, 10**10, -(10**10), 0, i64.max, i64.min, 300, -300], np.int64))


def test_f64_to_bf16_rounds_once(write, tmp_path):
    # 1 + 2^-8 is the exact midpoint of bf16 1.0 (0x3f80) and 1+2^-7 (0x3f81); + 2^-40 lies above it.
    # Rounded once it is 0x3f81; going through f32 (as ml_dtypes does) first rounds away the 2^-40.
    x = np.array([1 + 2**-8 + 2**-40, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-40)], np.float64)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "x", "to": "y", "dtype": "bfloat16"}}], "output": str(out)})
    dtype, shape, data = raw_bytes(out, "y")
    assert dtype == "BF16" and shape == [4]
    # ties go to even: 1+2^-8 -> 0x3f80, 1+3*2^-8 -> 0x3f82
    assert struct.unpack("<4H", data) == (0x3F81, 0x3F80, 0x3F82, 0xBF81)


def test_int64_to_bf16_rounds_once(write, tmp_path):
    # 2^24 + 2^16 + 1: bf16 spacing at 2^24 is 2^17, so this is just above the midpoint -> rounds up.
    x = np.array([2**24 + 2**16 + 1, 2**24 + 2**16, 2**24 + 3 * 2**16], np.int64)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "x", "to": "y", "dtype": "bf16"}}], "output": str(out)})
    got = bs.open(out)["y"].astype(np.float64)
    np.testing.assert_array_equal(got, [2**24 + 2**17, 2**24, 2**24 + 2**18])


def test_int_to_int_wraps_like_numpy(write, tmp_path):
    x = np.array([300, -129, 65535, -1, 2**40 + 5], np.int64)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "x", "to": f"x.{d}", "dtype": d}} for d in ("int8", "uint8", "int16", "int32")], "output": str(out)})
    got = read(out)
    for d in ("int8", "uint8", "int16", "int32"):
        np.testing.assert_array_equal(got[f"x.{d}"], x.astype(d), err_msg=d)


# ---------------------------------------------------------------- cast options


def test_cast_to_same_dtype_is_a_bit_exact_copy(write, tmp_path):
    x = np.array([np.nan, -0.0, 1e-45, 3.0], np.float32)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "x", "to": "y", "dtype": "float32"}}], "output": str(out)})
    assert raw_bytes(out, "y")[2] == x.tobytes()


def test_cast_sliced_source(write, tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "x::[1:3, ::-2]", "to": "y", "dtype": "float16"}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["y"], x[1:3, ::-2].astype(np.float16))


def test_cast_only_float_leaves_int_tensors_alone(write, tmp_path):
    tensors = {
        "w": np.linspace(-1, 1, 7, dtype=np.float32),
        "ids": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False]),
        "h": np.linspace(-2, 2, 3).astype(np.float16),
    }
    path = write(tensors)
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast_": {"target": ".*", "dtype": "bfloat16", "only": "float"}}], "output": str(out)})
    got = read(out)
    assert tensor_names(out) == list(tensors)
    assert raw_bytes(out, "ids")[0] == "I64"
    assert raw_bytes(out, "mask")[0] == "BOOL"
    np.testing.assert_array_equal(got["ids"], tensors["ids"])
    np.testing.assert_array_equal(got["mask"], tensors["mask"])
    _assert_same(got["w"], tensors["w"].astype(ml_dtypes.bfloat16), "w")
    _assert_same(got["h"], tensors["h"].astype(ml_dtypes.bfloat16), "h")


def test_cast_new_tensors_only_float(write, tmp_path):
    tensors = {"w": np.ones(3, np.float64), "ids": np.arange(3, dtype=np.int32)}
    path = write(tensors)
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "(.*)", "to": r"c.\1", "dtype": "float16", "only": "float"}}], "output": str(out)})
    got = read(out)
    assert set(got) == {"w", "ids", "c.w"}
    assert got["c.w"].dtype == np.float16


def test_cast_without_only_float_converts_ints(write, tmp_path):
    path = write({"ids": np.arange(4, dtype=np.int64)})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast_": {"target": ".*", "dtype": "float32"}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["ids"], np.arange(4, dtype=np.float32))
    assert got["ids"].dtype == np.float32


@pytest.mark.parametrize("key", ["to", "dtype"])
def test_cast_inplace_accepts_to_and_dtype(write, tmp_path, key):
    x = np.array([0.1, 0.2, 1e4 + 1], np.float32)
    path = write({"a": np.zeros(1, np.int8), "x": x, "z": np.zeros(1, np.int8)})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast_": {"target": "x", key: "half"}}], "output": str(out)})
    got = read(out)
    _assert_same(got["x"], x.astype(np.float16), key)
    assert tensor_names(out) == ["a", "x", "z"]  # in place keeps the position


def test_cast_inplace_to_and_dtype_agreeing_is_fine_disagreeing_is_plan_error(write, tmp_path):
    path = write({"x": np.zeros(2, np.float32)})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast_": {"target": "x", "to": "fp16", "dtype": "float16"}}], "output": str(out)})
    assert read(out)["x"].dtype == np.float16
    with pytest.raises(bs.PlanError):
        bs.run({"inputs": [str(path)], "transforms": [{"cast_": {"target": "x", "to": "float16", "dtype": "bfloat16"}}], "output": str(tmp_path / "o2.safetensors")})
    with pytest.raises(bs.PlanError):
        bs.run({"inputs": [str(path)], "transforms": [{"cast_": {"target": "x"}}], "output": str(tmp_path / "o3.safetensors")})


@pytest.mark.parametrize(
    ("name", "expected"),
    [("double", "float64"), ("fp64", "float64"), ("float", "float32"), ("FP32", "float32"), ("half", "float16"), ("BF16", "bfloat16"),
     ("short", "int16"), ("int", "int32"), ("long", "int64"), ("Float8_E4M3FN", "float8_e4m3fn"), ("bool", "bool"), ("uint8", "uint8")],
)
def test_dtype_names(write, tmp_path, name, expected):
    x = np.array([1.0, 2.0, 0.0], np.float32)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "x", "to": "y", "dtype": name}}], "output": str(out)})
    got = read(out)
    assert got["y"].dtype == DTYPES[expected]
    np.testing.assert_array_equal(got["y"].astype(np.float64), x.astype(DTYPES[expected]).astype(np.float64))


def test_unknown_dtype_is_plan_error(write, tmp_path):
    path = write({"x": np.zeros(2, np.float32)})
    with pytest.raises(bs.PlanError, match="float17"):
        bs.run({"inputs": [str(path)], "transforms": [{"cast": {"from": "x", "to": "y", "dtype": "float17"}}], "output": str(tmp_path / "o.safetensors")})


def test_cast_inplace_through_slice_is_refused(write, tmp_path):
    path = write({"x": np.zeros(4, np.float32)})
    with pytest.raises(bs.BrainSurgeryError, match="slice"):
        bs.run({"inputs": [str(path)], "transforms": [{"cast_": {"target": "x::[:2]", "dtype": "float16"}}], "output": str(tmp_path / "o.safetensors")})


def test_cast_chain_roundtrip_f32_bf16_f32(write, tmp_path):
    x = np.random.default_rng(9).standard_normal(64).astype(np.float32)
    path = write({"x": x})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"cast_": {"target": "x", "dtype": "bf16"}}, {"cast_": {"target": "x", "dtype": "float32"}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["x"], x.astype(ml_dtypes.bfloat16).astype(np.float32))
