"""add / subtract / multiply and add_ / subtract_ (src/transforms/arith.rs) against NumPy.

Reference: computed in f32 (f64 for F64), rounded to nearest even back to the dtype:
``(a.astype(f32) ∘ b.astype(f32)).astype(dtype)``. With ``dtype:`` both operands are first
converted to it (NumPy ``astype``).
"""

from __future__ import annotations

import operator

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import read, tensor_names

FLOAT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}
OPS = {"add": operator.add, "subtract": operator.sub, "multiply": operator.mul}


def reference(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    wide = np.float64 if a.dtype == np.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        return OPS[op](a.astype(wide), b.astype(wide)).astype(a.dtype)


def assert_bits_equal(got: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    nan = np.isnan(expected.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float64)), nan, err_msg=what)
    u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[expected.dtype.itemsize]
    np.testing.assert_array_equal(got.view(u)[~nan], expected.view(u)[~nan], err_msg=what)


def _pair(dtype: np.dtype, shape=(40, 33)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    a = rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape))
    b = rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape))
    a.flat[:3] = [np.nan, np.inf, 0.0]
    return a.astype(dtype), b.astype(dtype)


def run(path, tmp_path, transforms, threads=0):
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)}, threads=threads)
    return read(out)


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_binary_creates_missing_destination(write, tmp_path, dtype, op):
    a, b = _pair(FLOAT_DTYPES[dtype])
    got = run(write({"a": a, "b": b}), tmp_path, [{op: {"from_a": "a", "from_b": "b", "to": "c"}}])
    assert_bits_equal(got["c"], reference(op, a, b), f"{op} {dtype}")
    assert got["a"].tobytes() == a.tobytes() and got["b"].tobytes() == b.tobytes()


@pytest.mark.parametrize("op", list(OPS))
def test_binary_overwrites_existing_destination_in_place_of_order(write, tmp_path, op):
    a, b = _pair(np.dtype(np.float32), (5, 4))
    c = np.zeros((5, 4), np.float32)
    path = write({"c": c, "a": a, "b": b})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{op: {"from_a": "a", "from_b": "b", "to": "c"}}], "output": str(out)})
    assert_bits_equal(read(out)["c"], reference(op, a, b))
    assert tensor_names(out) == ["c", "a", "b"]


def test_binary_rewrites_from_each_match(write, tmp_path):
    rng = np.random.default_rng(2)
    t = {}
    for i in range(3):
        t[f"x.{i}"] = rng.standard_normal(6).astype(np.float32)
        t[f"y.{i}"] = rng.standard_normal(6).astype(np.float32)
    got = run(write(t), tmp_path, [{"subtract": {"from_a": r"x\.(\d)", "from_b": r"y.\1", "to": r"d.\1"}}])
    for i in range(3):
        np.testing.assert_array_equal(got[f"d.{i}"], t[f"x.{i}"] - t[f"y.{i}"])


def test_binary_with_slices_on_all_sides(write, tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    b = np.arange(24, dtype=np.float32).reshape(6, 4) / 7
    c = np.ones((3, 8), np.float32)
    got = run(write({"a": a, "b": b, "c": c}), tmp_path, [{"multiply": {"from_a": "a::[1:3, ::2]", "from_b": "b::[:2, 1:]", "to": "c::[::2, 5:]"}}])
    expected = c.copy()
    expected[::2, 5:] = a[1:3, ::2] * b[:2, 1:]
    np.testing.assert_array_equal(got["c"], expected)


def test_binary_dtype_converts_both_operands(write, tmp_path):
    a = np.linspace(-3, 3, 10, dtype=np.float32).astype(np.float16)
    b = np.arange(10, dtype=np.int64)
    got = run(write({"a": a, "b": b}), tmp_path, [{"add": {"from_a": "a", "from_b": "b", "to": "c", "dtype": "float32"}}])
    np.testing.assert_array_equal(got["c"], a.astype(np.float32) + b.astype(np.float32))
    assert got["c"].dtype == np.float32


def test_binary_int_operands_with_float_dtype(write, tmp_path):
    a, b = np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32) * 3
    got = run(write({"a": a, "b": b}), tmp_path, [{"multiply": {"from_a": "a", "from_b": "b", "to": "c", "dtype": "bf16"}}])
    expected = (a.astype(ml_dtypes.bfloat16).astype(np.float32) * b.astype(ml_dtypes.bfloat16).astype(np.float32)).astype(ml_dtypes.bfloat16)
    assert_bits_equal(got["c"], expected)


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("op", ["add_", "subtract_"])
def test_inplace_matches_numpy(write, tmp_path, dtype, op):
    a, b = _pair(FLOAT_DTYPES[dtype])
    got = run(write({"w": a, "delta": b}), tmp_path, [{op: {"from": "delta", "to": "w"}}])
    assert_bits_equal(got["w"], reference(op[:-1], a, b), f"{op} {dtype}")
    assert got["delta"].tobytes() == b.tobytes()


@pytest.mark.parametrize(("slice_text", "index"), [("[:2]", np.s_[:2]), ("[:, 1:4]", np.s_[:, 1:4]), ("[::-2, 3]", np.s_[::-2, 3])])
def test_inplace_through_slice_changes_only_the_region(write, tmp_path, slice_text, index):
    w = np.random.default_rng(4).standard_normal((5, 6)).astype(ml_dtypes.bfloat16)
    region = w[index]
    d = np.random.default_rng(5).standard_normal(region.shape).astype(ml_dtypes.bfloat16)
    got = run(write({"w": w, "d": d}), tmp_path, [{"add_": {"from": "d", "to": f"w::{slice_text}"}}])
    expected = w.copy()
    expected[index] = reference("add", np.ascontiguousarray(region), d)
    assert_bits_equal(got["w"], expected, slice_text)


def test_inplace_twice_and_threads_give_same_bytes(write, tmp_path):
    a, b = _pair(np.dtype(np.float16), (300, 70))
    path = write({"w": a, "d": b})
    plan = [{"add_": {"from": "d", "to": "w"}}, {"subtract_": {"from": "d", "to": "w"}}]
    one = run(path, tmp_path, plan, threads=1)["w"]
    two = run(path, tmp_path, plan, threads=2)["w"]
    assert one.tobytes() == two.tobytes()
    assert_bits_equal(one, reference("subtract", reference("add", a, b), b))


# ---- bad input ----


def _fails(write, tmp_path, tensors, transform, body, exc, needles):
    path = write(tensors)
    out = tmp_path / "out.safetensors"
    with pytest.raises(exc) as info:
        bs.run({"inputs": [str(path)], "transforms": [{"copy": {"from": "a", "to": "a2"}}, {transform: body}], "output": str(out)})
    text = str(info.value)
    for needle in needles:
        assert needle in text, text
    assert not out.exists()
    return text


A = np.ones((2, 3), np.float32)


def test_wrong_key_suggests(write, tmp_path):
    _fails(write, tmp_path, {"a": A}, "add", {"from_a": "a", "form_b": "a", "to": "c"}, bs.PlanError, ("transforms[1].add", "form_b", "did you mean `from_b`"))


def test_wrong_dtype_value(write, tmp_path):
    _fails(write, tmp_path, {"a": A}, "add", {"from_a": "a", "from_b": "a", "to": "c", "dtype": 3}, bs.PlanError, ("transforms[1].add.dtype",))


def test_different_dtypes_without_dtype(write, tmp_path):
    _fails(write, tmp_path, {"a": A, "h": A.astype(np.float16)}, "add", {"from_a": "a", "from_b": "h", "to": "c"}, bs.TransformError, ("transforms[1] (add)", "model::a", "model::h", "dtype:"))


def test_inplace_different_dtypes(write, tmp_path):
    _fails(write, tmp_path, {"a": A, "h": A.astype(np.float16)}, "add_", {"from": "h", "to": "a"}, bs.TransformError, ("transforms[1] (add_)", "model::a", "model::h"))


@pytest.mark.parametrize("transform", ["add", "subtract_"])
def test_integer_tensors_refused(write, tmp_path, transform):
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    body = {"from_a": "ids", "from_b": "ids", "to": "c"} if transform == "add" else {"from": "ids", "to": "ids"}
    _fails(write, tmp_path, {"a": A, "ids": ids}, transform, body, bs.TransformError, (f"transforms[1] ({transform})", "model::ids", "floating-point"))


def test_integer_result_dtype_refused(write, tmp_path):
    _fails(write, tmp_path, {"a": A}, "add", {"from_a": "a", "from_b": "a", "to": "c", "dtype": "int32"}, bs.PlanError, ("transforms[1]", "float"))


def test_shape_mismatch(write, tmp_path):
    _fails(write, tmp_path, {"a": A, "b": np.ones((3, 2), np.float32)}, "multiply", {"from_a": "a", "from_b": "b", "to": "c"}, bs.TransformError, ("transforms[1] (multiply)", "model::a", "(2, 3)", "(3, 2)"))


def test_destination_shape_mismatch(write, tmp_path):
    _fails(write, tmp_path, {"a": A, "c": np.ones(4, np.float32)}, "add", {"from_a": "a", "from_b": "a", "to": "c"}, bs.TransformError, ("model::c", "(4,)"))


def test_inplace_destination_missing(write, tmp_path):
    _fails(write, tmp_path, {"a": A}, "add_", {"from": "a", "to": "nope"}, bs.TransformError, ("transforms[1] (add_)", "model::nope"))


def test_operand_missing(write, tmp_path):
    _fails(write, tmp_path, {"a": A}, "add", {"from_a": "a", "from_b": "zzz", "to": "c"}, bs.TransformError, ("transforms[1] (add)", "model::zzz"))


def test_inplace_into_an_unknown_alias_is_a_plan_error(write, tmp_path):
    """Issue 8: `add_` writes into existing tensors like `assign`, so an unknown alias is named."""
    _fails(write, tmp_path, {"a": A}, "add_", {"from": "a", "to": "x::a"}, bs.PlanError, ("unknown alias `x`",))


def test_issue15_to_is_created_or_overwritten_as_help_says(write, tmp_path):
    """Issue 15: SPEC §4, docs/semantics.md and `help` agree that `to` of add / subtract /
    multiply is overwritten when it exists and created when it does not (a superset of the 0.2
    tool, whose plans pre-create it with `copy`). Values against NumPy."""
    from helpers import cli

    rng = np.random.default_rng(15)
    x = rng.standard_normal(8).astype(np.float32)
    src = write({"x": x})
    plan = tmp_path / "arith.yaml"
    plan.write_text(
        f"inputs:\n  - {src}\noutput: {{ path: out.safetensors }}\ntransforms:\n"
        "  - copy: { from: x, to: demo.sum }  # pre-create the destination, as the 0.2 tool needs\n"
        "  - add: { from_a: x, from_b: x, to: demo.sum }\n"
        "  - subtract: { from_a: demo.sum, from_b: x, to: demo.diff }  # created here\n"
        "  - multiply: { from_a: x, from_b: x, to: demo.prod }\n"
    )
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = read(tmp_path / "out.safetensors")
    total = reference("add", x, x)
    np.testing.assert_array_equal(out["demo.sum"], total)
    np.testing.assert_array_equal(out["demo.diff"], reference("subtract", total, x))
    np.testing.assert_array_equal(out["demo.prod"], reference("multiply", x, x))
    for name in ["add", "subtract", "multiply"]:
        text = cli(["help", name], cwd=tmp_path)
        assert text.returncode == 0, text.stderr
        assert "overwritten if it exists, else created" in text.stdout and "a missing one is created" in text.stdout
