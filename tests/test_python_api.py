"""The Python surface (python/brainsurgery, src/bindings): open(), run(), check(), reports, errors."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from brainsurgery import _core
from conftest import read, read_header, tensor_names
from helpers import write_raw_st

RNG = np.random.default_rng(21)
TENSORS = {
    "w": RNG.standard_normal((3, 4)).astype(np.float32),
    "h": RNG.standard_normal(5).astype(np.float16),
    "bf": RNG.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
    "d": RNG.standard_normal(2),
    "ids": np.arange(4, dtype=np.int64),
    "mask": np.array([True, False, True]),
    "u": np.array([0, 255], np.uint8),
    "e4": RNG.standard_normal(3).astype(ml_dtypes.float8_e4m3fn),
    "empty": np.zeros((0, 3), np.float32),
    "scalar": np.array(2.5, np.float32),
}


@pytest.fixture
def src(write):
    return write(TENSORS, metadata={"format": "pt", "note": "x"})


# ---------------------------------------------------------------- open()


def test_open_values_equal_what_was_written(src):
    ck = bs.open(src)
    for name, expected in TENSORS.items():
        got = ck[name]
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), name


def test_open_accepts_pathlike_and_directory(gpt2, gpt2_tensors):
    for path in (gpt2, str(gpt2), gpt2 / "model.safetensors"):
        ck = bs.open(path)
        assert list(ck) == list(gpt2_tensors)
        np.testing.assert_array_equal(ck["wte.weight"], gpt2_tensors["wte.weight"])


def test_open_bf16_and_float8_dtypes(src):
    ck = bs.open(src)
    assert ck["bf"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert ck["e4"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(ck["bf"].astype(np.float32), TENSORS["bf"].astype(np.float32))
    assert ck.info("bf") == ("bfloat16", [2, 3])


def test_open_arrays_are_read_only(src):
    ck = bs.open(src)
    a = ck["w"]
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    with pytest.raises(ValueError):
        a.flags.writeable = True
    with pytest.raises(ValueError):
        np.add(a, 1, out=a)
    # The file is unchanged.
    assert bs.open(src)["w"].tobytes() == TENSORS["w"].tobytes()


WRITE_THROUGH_TORCH = """
import sys, torch, brainsurgery as bs
ck = bs.open(sys.argv[1])
view = torch.from_dlpack(ck["w"])          # torch ignores NumPy's read-only flag
view.add_(1.0)                             # a write into the mapped page
model = torch.nn.Linear(4, 3, bias=False)  # and what a training script does with it
model.load_state_dict({"weight": torch.from_dlpack(ck["w"])}, assign=True)
model.weight.grad = torch.ones_like(model.weight)
torch.optim.SGD(model.parameters(), lr=0.1).step()
print("survived", float(ck["w"][0, 0]))
"""


def test_torch_writes_through_a_view_land_in_private_pages(src):
    # Issue 11: the views were read-only mappings, and a write through torch killed the process
    # with SIGSEGV. They are copy-on-write private mappings now: no crash, the file unchanged.
    pytest.importorskip("torch")
    before = Path(src).read_bytes()
    proc = subprocess.run([sys.executable, "-c", WRITE_THROUGH_TORCH, str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "survived" in proc.stdout
    assert Path(src).read_bytes() == before
    assert bs.open(src)["w"].tobytes() == TENSORS["w"].tobytes()


def test_open_shape_dtype_info_and_missing_names(src):
    # Issue 11: header facts without arrays, a table of every tensor, close matches on a typo.
    ck = bs.open(src)
    assert ck.shape("w") == (3, 4) and ck.dtype("bf") == "bfloat16" and ck.shape("scalar") == ()
    rows = ck.info()
    table = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert [r["name"] for r in table] == list(ck)
    w = next(r for r in table if r["name"] == "w")
    assert (w["dtype"], tuple(w["shape"]), w["nbytes"], w["file"]) == ("float32", (3, 4), 48, str(src))
    with pytest.raises(KeyError, match=r'no such tensor; closest: "w"'):
        ck["ww"]
    with pytest.raises(KeyError):
        ck.shape("nope-at-all-" * 3)
    assert "ww" not in ck and ck.get("ww") is None


def test_get_slice_reads_the_rows_asked_for(src):
    ck = bs.open(src)
    part = ck.get_slice("w")
    assert part.get_shape() == [3, 4] and part.get_dtype() == "float32" and part.shape == (3, 4)
    rows = part[1:3]
    np.testing.assert_array_equal(rows, TENSORS["w"][1:3])
    assert rows.flags.writeable and rows.flags.owndata  # an owned copy of only the rows
    np.testing.assert_array_equal(ck.get_slice("bf")[:, ::2], TENSORS["bf"][:, ::2])
    with pytest.raises(KeyError):
        ck.get_slice("missing")


def test_checkpoint_reprs_fold_layers(tmp_path):
    from conftest import save_safetensors

    path = tmp_path / "m.safetensors"
    save_safetensors(path, {f"layers.{i}.w": np.zeros((2, 2), np.float32) for i in range(12)})
    ck = bs.open(path)
    text = ck._summary()
    assert "layers.[0-11].w" in text and "12 tensors" in text
    assert ck._repr_html_().startswith("<pre>") and "layers.[0-11].w" in ck._repr_html_()

    class Printer:
        def __init__(self):
            self.out = ""

        def text(self, t):
            self.out += t

    p = Printer()
    ck._repr_pretty_(p, False)
    assert p.out == text
    # A relative path after chdir still summarises; a deleted file gives the short repr.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        rel = bs.open("m.safetensors")
        os.chdir("/")
        assert "layers.[0-11].w" in rel._summary()
    finally:
        os.chdir(cwd)
    path.unlink()
    assert ck._summary() == repr(ck)


def test_open_is_zero_copy(src):
    ck = bs.open(src)
    a, b = ck["w"], ck["w"]
    assert np.shares_memory(a, b)
    assert not np.shares_memory(a, ck["h"])
    base = a
    chain = []
    while base is not None:
        chain.append(type(base))
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    assert _core.TensorBuffer in chain, chain


def test_array_outlives_the_checkpoint(src):
    ck = bs.open(src)
    a = ck["w"]
    h = ck["h"][1:]
    del ck
    gc.collect()
    np.testing.assert_array_equal(a, TENSORS["w"])
    np.testing.assert_array_equal(h, TENSORS["h"][1:])
    assert float(a.sum()) == pytest.approx(float(TENSORS["w"].sum()), rel=1e-6)


def test_checkpoint_mapping_protocol(src):
    ck = bs.open(src)
    assert isinstance(ck, Mapping)
    assert len(ck) == len(TENSORS)
    assert list(ck) == list(TENSORS)  # file order
    assert list(ck.keys()) == list(TENSORS)
    assert "w" in ck and "nope" not in ck and 3 not in ck and None not in ck
    with pytest.raises(KeyError):
        ck["nope"]
    assert ck.get("nope") is None
    assert dict(ck.items()).keys() == TENSORS.keys()
    assert ck.metadata == {"format": "pt", "note": "x"}
    assert Path(ck.path) == src
    assert ck.info("w") == ("float32", [3, 4])
    assert ck.info("scalar") == ("float32", [])
    assert ck["scalar"].shape == () and ck["empty"].shape == (0, 3)
    assert "10 tensors" in repr(ck)


def test_open_missing_file_raises(tmp_path):
    with pytest.raises((bs.BrainSurgeryError, OSError)):
        bs.open(tmp_path / "missing.safetensors")


def test_open_is_lazy_header_only(src, tmp_path):
    # Overwriting the data region with garbage doesn't matter until a tensor is read.
    copy = tmp_path / "garbage.safetensors"
    shutil.copy(src, copy)
    header, start = read_header(copy)
    with open(copy, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * (copy.stat().st_size - start))
    ck = bs.open(copy)
    assert list(ck) == list(TENSORS)
    assert ck["ids"].tobytes() == b"\xff" * 32


def _one_tensor(tmp_path, shape):
    """A float32 tensor `t` of this shape (its data zeros), header written by hand."""
    nbytes = 4 * int(np.prod(shape, dtype=object)) if 0 not in shape else 0
    header = {"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}
    return write_raw_st(tmp_path / "t.safetensors", json.dumps(header).encode(), bytes(nbytes))


NUMPY_MAX_DIMS = 64 if int(np.__version__.split(".")[0]) >= 2 else 32


@pytest.mark.parametrize(
    ("shape", "part"),
    [
        ([0, 2**62], "more than NumPy can address"),
        ([0, 2**61], "more than NumPy can address"),
        ([0, 2**63], "more than NumPy can address"),
        ([0, 2**64 - 1], "more than NumPy can address"),
        ([0, 2**40, 2**40], "more than NumPy can address"),
        ([1] * NUMPY_MAX_DIMS + [0], f"NumPy arrays have at most {NUMPY_MAX_DIMS}"),
        ([0] * 200, f"NumPy arrays have at most {NUMPY_MAX_DIMS}"),
    ],
)
def test_tensor_numpy_cannot_view_is_a_format_error(tmp_path, shape, part):
    # Valid headers (a zero makes the tensor empty); NumPy refused them with a ValueError.
    path = _one_tensor(tmp_path, shape)
    ck = bs.open(path)
    assert ck.info("t") == ("float32", shape)
    with pytest.raises(bs.FormatError, match="no NumPy view of tensor 't'") as e:
        ck["t"]
    assert part in str(e.value)
    assert e.value.tensor == "t" and e.value.path == str(path)


@pytest.mark.parametrize("shape", [[0, 2**60], [1] * NUMPY_MAX_DIMS, [0] * NUMPY_MAX_DIMS])
def test_tensor_views_up_to_numpys_limits(tmp_path, shape):
    array = bs.open(_one_tensor(tmp_path, shape))["t"]
    assert array.shape == tuple(shape) and array.size == (0 if 0 in shape else 1)


def test_a_name_that_is_not_unicode_names_no_tensor(src):
    ck = bs.open(src)
    assert "\ud800" not in ck
    with pytest.raises(KeyError):
        ck["\ud800"]
    with pytest.raises(KeyError):
        ck.info("\ud800")
    with pytest.raises(bs.FormatError, match="lone surrogate"):
        bs.open("\ud800.safetensors")


# ---------------------------------------------------------------- exceptions


def test_exception_hierarchy():
    for cls in (bs.PlanError, bs.TransformError, bs.AssertionFailed, bs.FormatError):
        assert issubclass(cls, bs.BrainSurgeryError)
    assert issubclass(bs.BrainSurgeryError, Exception)
    assert len({bs.PlanError, bs.TransformError, bs.AssertionFailed, bs.FormatError}) == 4


EXCEPTIONS = ("BrainSurgeryError", "PlanError", "TransformError", "AssertionFailed", "FormatError")


@pytest.mark.parametrize("name", EXCEPTIONS)
def test_exception_class_names_are_the_public_names(name):
    # Tracebacks print `module.qualname`; users must see the names the SPEC documents (§11),
    # not `_core.PlanError_`.
    cls = getattr(bs, name)
    assert cls.__name__ == name, cls
    assert cls.__qualname__ == name, cls


@pytest.mark.parametrize("name", EXCEPTIONS)
def test_exception_module_is_the_package(name):
    cls = getattr(bs, name)
    assert cls.__module__.startswith("brainsurgery"), cls


# ---------------------------------------------------------------- run(): plan forms


def _plan(src, out, by=2.0):
    return {"inputs": [str(src)], "transforms": [{"scale_": {"target": "w", "by": by}}], "output": str(out)}


def _w(out):
    return read(out)["w"]


def _expected_w(by):
    return TENSORS["w"] * np.float32(by)


def test_run_accepts_dict(src, tmp_path):
    out = tmp_path / "o.safetensors"
    bs.run(_plan(src, out))
    np.testing.assert_array_equal(_w(out), _expected_w(2.0))


def test_run_accepts_yaml_text(src, tmp_path):
    out = tmp_path / "o.safetensors"
    text = f"inputs:\n  - {src}\ntransforms:\n  - scale_: {{ target: w, by: 3.0 }}\noutput: {out}\n"
    bs.run(text)
    np.testing.assert_array_equal(_w(out), _expected_w(3.0))


def test_run_accepts_json_text(src, tmp_path):
    out = tmp_path / "o.safetensors"
    bs.run(json.dumps(_plan(src, out, by=-1.0)))
    np.testing.assert_array_equal(_w(out), _expected_w(-1.0))


@pytest.mark.parametrize("as_type", [str, Path])
def test_run_accepts_a_path(src, tmp_path, as_type):
    out = tmp_path / "o.safetensors"
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"inputs: ['{src}']\ntransforms:\n  - scale_: {{target: w, by: 0.5}}\noutput: '{out}'\n")
    bs.run(as_type(plan_file))
    np.testing.assert_array_equal(_w(out), _expected_w(0.5))


def test_run_list_of_files_merged_later_list_replaces(src, tmp_path):
    out = tmp_path / "o.safetensors"
    other = tmp_path / "other.safetensors"
    base = tmp_path / "base.yaml"
    base.write_text(f"inputs: ['{src}']\ntransforms:\n  - scale_: {{target: w, by: 2.0}}\n  - delete: {{target: h}}\noutput: {{path: '{other}'}}\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text(f"transforms:\n  - scale_: {{target: w, by: 4.0}}\noutput: {{path: '{out}'}}\n")
    bs.run([base, str(extra)])
    got = read(out)
    assert not other.exists()  # mapping merged: the later output.path wins
    np.testing.assert_array_equal(got["w"], _expected_w(4.0))
    assert "h" in got  # the later transforms list replaced the earlier one entirely


def test_run_list_of_dicts_merged_recursively(src, tmp_path):
    out = tmp_path / "o.safetensors"
    bs.run([{"inputs": [str(src)], "output": {"path": str(tmp_path / "x.safetensors")}}, {"transforms": [{"delete": {"target": "h"}}], "output": {"path": str(out)}}])
    assert "h" not in read(out)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "overrides",
    [{"transforms[0].scale_.by": 0.5}, ["transforms[0].scale_.by=0.5"], ("transforms[0].scale_.by=0.5",)],
)
def test_run_overrides_apply_last(src, tmp_path, overrides):
    out = tmp_path / "o.safetensors"
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"inputs: ['{src}']\ntransforms:\n  - scale_: {{target: w, by: 2.0}}\noutput: '{out}'\n")
    bs.run([plan_file], overrides=overrides)
    np.testing.assert_array_equal(_w(out), _expected_w(0.5))


def test_overrides_values_are_yaml_typed(src, tmp_path):
    out = tmp_path / "o.safetensors"
    plan = {"inputs": [str(src)], "transforms": [{"copy": {"from": "w", "to": "x"}}], "output": str(out)}
    # a string that looks like a number stays a string when quoted
    bs.run(plan, overrides=["transforms[0].copy.to='007'"])
    got = read(out)
    assert "007" in got
    np.testing.assert_array_equal(got["007"], TENSORS["w"])


def test_override_of_nested_output_key(src, tmp_path):
    out = tmp_path / "o.safetensors"
    bs.run(_plan(src, tmp_path / "never.safetensors"), overrides={"output": str(out)})
    assert out.exists() and not (tmp_path / "never.safetensors").exists()


def test_numpy_scalars_are_accepted_in_plans(write, tmp_path: Path) -> None:
    model = write({"w": np.arange(6, dtype=np.float32)})
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [str(model)], "transforms": [{"scale_": {"target": "w", "by": np.float32(0.5)}},
                                                    {"assert": {"count": {"of": "w", "is": np.int64(1)}}}],
            "output": str(out)})
    assert read(out)["w"].tobytes() == (np.arange(6, dtype=np.float32) * np.float32(0.5)).tobytes()


# ---------------------------------------------------------------- run(): plan values from Python

MAX_DEPTH = 64  # src/plan/mod.rs MAX_DEPTH: the YAML parser's nesting budget
MAX_NODES = 250_000  # src/plan/mod.rs MAX_NODES

# Each case runs in a child interpreter, so a regression (these once killed the interpreter with
# SIGSEGV, or ran it out of memory) fails the test instead of the test run. The child prints what
# the call raised.
# Peak RSS from VmHWM (per address space, so it starts afresh at exec): ru_maxrss is kept across
# fork and exec on Linux, so a child of a pytest that imported torch reported 800 MB.
CHILD = """
import json, re, sys, time
import brainsurgery as bs
def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
PLAN = {"inputs": [sys.argv[1]], "output": sys.argv[2]}
start = time.monotonic()
try:
%s
except BaseException as e:
    print(json.dumps({"class": type(e).__name__, "message": str(e), "location": getattr(e, "location", None),
                      "seconds": time.monotonic() - start,
                      "rss_mb": peak_mb()}))
else:
    print(json.dumps({"class": None}))
"""


def _in_child(src, tmp_path, code: str) -> dict:
    body = "\n".join("    " + line for line in code.strip().splitlines())
    proc = subprocess.run([sys.executable, "-c", CHILD % body, str(src), str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"child died with status {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


HOSTILE = {
    # name: (code, location, message part)
    "list_inside_itself": (
        "l = []; l.append(l); bs.run({**PLAN, 'transforms': l})",
        "transforms[0]", "this list contains itself (a cycle)"),
    "dict_inside_itself": (
        "d = {}; d['a'] = d; bs.run({**PLAN, 'transforms': [{'fill_': d}]})",
        "transforms[0].fill_.a", "this mapping contains itself (a cycle)"),
    "cycle_through_a_tuple": (
        "l = []; t = (l,); l.append(t); bs.check({**PLAN, 'transforms': [l]})",
        "transforms[0][0][0]", "this list contains itself"),
    "nested_10000_lists": (
        "x = 1\nfor _ in range(10_000): x = [x]\nbs.run({**PLAN, 'transforms': x})",
        "transforms" + "[0]" * (MAX_DEPTH - 1), f"nest deeper than {MAX_DEPTH} levels"),
    "nested_10000_dicts": (
        "x = 1\nfor _ in range(10_000): x = {'k': x}\nbs.check({**PLAN, 'output': x})",
        "output" + ".k" * (MAX_DEPTH - 1), f"nest deeper than {MAX_DEPTH} levels"),
    "index_returns_self": (
        "class I:\n    def __index__(self): return self\n"
        "bs.run({**PLAN, 'transforms': [{'scale_': {'target': 'w', 'by': I()}}]})",
        "transforms[0].scale_.by", "I.__index__() gave a __main__.I, not an int"),
    "float_returns_self": (
        "class F:\n    def __float__(self): return self\n"
        "bs.check({**PLAN, 'transforms': [{'scale_': {'target': 'w', 'by': F()}}]})",
        "transforms[0].scale_.by", "F.__float__() gave a __main__.F, not a float"),
    "index_returns_a_float": (
        "class I:\n    def __index__(self): return 2.5\n"
        "bs.check({**PLAN, 'transforms': [{'scale_': {'target': 'w', 'by': I()}}]})",
        "transforms[0].scale_.by", "gave a float, not an int"),
    "index_raises": (
        "class I:\n    def __index__(self): raise ValueError('boom')\n"
        "bs.check({**PLAN, 'transforms': [{'scale_': {'target': 'w', 'by': I()}}]})",
        "transforms[0].scale_.by", "I.__index__() raised ValueError: boom"),
    "overrides_cycle": (
        "l = []; l.append(l); bs.run(PLAN, overrides={'transforms': l})",
        "transforms[0]", "this list contains itself"),
    "overrides_nested_10000": (
        "x = 1\nfor _ in range(10_000): x = [x]\nbs.check(PLAN, overrides={'transforms': x})",
        "transforms" + "[0]" * MAX_DEPTH, f"nest deeper than {MAX_DEPTH} levels"),
    "overrides_path_of_200000_steps": (
        "bs.check(PLAN, overrides=['output' + '.a' * 200_000 + '=1'])",
        None, "more than 10000 keys and indices"),
    # A list holding one list twice, 40 times over: 2^40 values when unfolded.
    "shared_lists_unfold_past_the_value_budget": (
        "x = [1]\nfor _ in range(40): x = [x, x]\nbs.check({**PLAN, 'transforms': x})",
        None, f"more than {MAX_NODES} values"),
    "dict_changed_by_index_while_read": (
        "d = {}\nclass M:\n    def __index__(self):\n        d['later'] = 1\n        return 1\n"
        "d.update(a=M(), b=2)\nbs.check({**PLAN, 'transforms': [{'scale_': d}]})",
        None, "unknown key `a`"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_python_plan_values_are_plan_errors(src, tmp_path, case):
    code, location, part = HOSTILE[case]
    got = _in_child(src, tmp_path, code)
    assert got["class"] == "PlanError", got
    assert part in got["message"], got
    if location is not None:
        assert got["location"] == location, got
        assert got["message"].startswith(location + ": "), got
    # Stopped at the limit, not after walking (or building locations for) the whole value; the
    # 10,000-deep cases once took 0.6-2.7 s and 0.9-2 GB before the crash.
    assert got["seconds"] < 5 and got["rss_mb"] < 500, got
    assert not (tmp_path / "o.safetensors").exists()


def _nested(depth: int):
    x: object = 1
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("as_text", [False, True])
def test_python_values_nest_exactly_as_deep_as_yaml(src, tmp_path, as_text):
    # `output` at depth 2 holds lists: up to MAX_DEPTH levels in all is read (and then refused as
    # an output), one more is refused as too deep, in a dict and in YAML text alike.
    def output_error(levels):
        plan = {"inputs": [str(src)], "output": _nested(levels - 1)}
        with pytest.raises(bs.PlanError) as e:
            bs.check(json.dumps(plan) if as_text else plan)
        return str(e.value)

    assert "expected a path or a mapping, got a list" in output_error(MAX_DEPTH)
    assert "depth" in output_error(MAX_DEPTH + 1) or "deeper" in output_error(MAX_DEPTH + 1)


def test_a_list_used_twice_is_not_a_cycle(src, tmp_path):
    step = {"scale_": {"target": "w", "by": 2.0}}
    bs.run({"inputs": [str(src)], "transforms": [step, step], "output": str(tmp_path / "o.safetensors")})
    assert _w(tmp_path / "o.safetensors").tobytes() == (TENSORS["w"] * np.float32(4)).tobytes()


def test_any_mapping_is_a_plan(src, tmp_path):
    from types import MappingProxyType

    out = tmp_path / "o.safetensors"
    bs.run(MappingProxyType(_plan(src, out)), overrides=MappingProxyType({"transforms[0].scale_.by": 3}))
    assert _w(out).tobytes() == _expected_w(3).tobytes()


@pytest.mark.parametrize(
    ("call", "location", "part"),
    [
        (lambda p: bs.check({**p, "inputs": ["\ud800"]}), "inputs[0]", "lone surrogate"),
        (lambda p: bs.check({**p, "output": {"\udcff": 1}}), "output", "lone surrogate"),
        (lambda p: bs.check(p, overrides={"output": "\ud800"}), "output", "lone surrogate"),
        (lambda p: bs.check(p, overrides={1: 2}), None, "override keys are key paths"),
        (lambda p: bs.check(p, overrides={"output=x": 2}), None, "holds `=`"),
        (lambda p: bs.check({**p, "output": {"path": b"o.safetensors"}}), "output.path", "cannot use a bytes"),
        (lambda p: bs.check({**p, "transforms": [{"scale_": {"target": "w", "by": 2**64}}]}),
         "transforms[0].scale_.by", "out of range"),
        (lambda p: bs.check({**p, "transforms": [{"scale_": {"target": "w", "by": float("nan")}}]}),
         "transforms[0].scale_.by", "not a finite number"),
    ],
)
def test_unusable_python_values_are_plan_errors(src, tmp_path, call, location, part):
    with pytest.raises(bs.PlanError) as e:
        call(_plan(src, tmp_path / "o.safetensors"))
    assert part in str(e.value)
    if location is not None:
        assert e.value.location == location


@pytest.mark.parametrize(
    "call",
    [
        lambda: bs.check("a: b\n\ud800"),
        lambda: bs.check(["\ud800.yaml"]),
        lambda: bs.check({}, overrides=["output=\ud800"]),
    ],
)
def test_plan_text_that_is_not_unicode_is_a_plan_error(call):
    # It was a UnicodeEncodeError.
    with pytest.raises(bs.PlanError, match="lone surrogate"):
        call()


@pytest.mark.parametrize("call", [lambda: bs.check(3), lambda: bs.check({}, overrides=3),
                                  lambda: bs.check({}, overrides=[3])])
def test_plan_arguments_of_the_wrong_type_are_type_errors(call):
    with pytest.raises(TypeError):
        call()


class _ItemsNotPairs(Mapping):
    """A mapping whose ``items()`` gives triples."""

    def __getitem__(self, key):
        return 1

    def __iter__(self):
        return iter(["output"])

    def __len__(self):
        return 1

    def items(self):
        return [("output", 1, 2)]


def test_override_mapping_items_that_are_not_pairs_are_a_plan_error(src, tmp_path):
    # It was the ValueError of the tuple conversion.
    with pytest.raises(bs.PlanError, match=r"_ItemsNotPairs\.items\(\) failed"):
        bs.check(_plan(src, tmp_path / "o.safetensors"), overrides=_ItemsNotPairs())


def test_engine_thread_that_cannot_start_is_a_brainsurgery_error(src, tmp_path):
    # Too little address space left for the engine thread's 64 MiB stack: the OS refuses the
    # thread (EAGAIN). It was a RuntimeError (issue 9); a panic takes the same path, with
    # "internal error (a bug in brainsurgery, please report it): <message>" (src/error.rs tests).
    got = _in_child(src, tmp_path, """
import resource
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
bs.check(PLAN)
""")
    assert got["class"] == "BrainSurgeryError", got
    assert got["message"].startswith("the engine thread could not start: "), got


def test_cli_main_refuses_arguments_that_are_not_utf8(capfd):
    # sys.argv keeps undecodable bytes as lone surrogates; it was a UnicodeEncodeError.
    assert _core.cli_main(["x\udcff.safetensors"]) == 2
    assert "not UTF-8" in capfd.readouterr().err


# ---------------------------------------------------------------- reports


def test_run_report_fields(src, tmp_path):
    out = tmp_path / "o.safetensors"
    report = bs.run(
        {
            "inputs": [str(src)],
            "transforms": [{"copy": {"from": "w", "to": "w2"}}, {"delete": {"target": "h|d"}}, {"cast_": {"target": "w2", "dtype": "bf16"}}],
            "output": str(out),
        }
    )
    expected_names = [n for n in TENSORS if n not in ("h", "d")] + ["w2"]
    assert report["alias"] == "model"
    assert [t["name"] for t in report["tensors"]] == expected_names
    assert tensor_names(out) == expected_names
    header, _ = read_header(out)
    for t in report["tensors"]:
        ref = TENSORS.get(t["name"], TENSORS["w"].astype(ml_dtypes.bfloat16))
        assert tuple(t["shape"]) == ref.shape
        assert t["nbytes"] == ref.nbytes
        assert t["dtype"] == ("bfloat16" if t["name"] == "w2" else ref.dtype.name)
        begin, end = header[t["name"]]["data_offsets"]
        assert end - begin == t["nbytes"]
    assert report["total_bytes"] == sum(t["nbytes"] for t in report["tensors"])
    assert [Path(p).resolve() for p in report["written"]] == [out.resolve()]
    assert report["added"] == 1 and report["removed"] == 2
    assert isinstance(report["notes"], list) and all(isinstance(n, str) for n in report["notes"])
    assert isinstance(report["peak_memory_estimate"], int) and report["peak_memory_estimate"] > 0


def test_check_report_matches_run_report_and_writes_nothing(src, tmp_path):
    out = tmp_path / "o.safetensors"
    plan = {"inputs": [str(src)], "transforms": [{"copy": {"from": "w", "to": "w2"}}, {"delete": {"target": "ids"}}], "output": str(out)}
    checked = bs.check(plan)
    assert checked["written"] == []
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
    ran = bs.run(plan)
    for key in ("alias", "tensors", "total_bytes", "added", "removed"):
        assert checked[key] == ran[key], key


def test_check_catches_plan_and_transform_errors(src, tmp_path):
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(bs.PlanError):
        bs.check({"inputs": [str(src)], "transforms": [{"copy": {"from": "w"}}], "output": out})
    with pytest.raises(bs.TransformError):
        bs.check({"inputs": [str(src)], "transforms": [{"copy": {"from": "w", "to": "h"}}], "output": out})
    with pytest.raises(bs.TransformError):
        bs.check({"inputs": [str(src)], "transforms": [{"scale_": {"target": "ids", "by": 2}}], "output": out})


# ---------------------------------------------------------------- check() reads no tensor data


def _corrupt_data(src: Path, dst: Path) -> None:
    """Copy ``src`` with every byte of its data region (not the header) set to 0xff (NaN for floats)."""
    shutil.copy(src, dst)
    _, start = read_header(dst)
    size = dst.stat().st_size
    with open(dst, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * (size - start))


def test_check_reads_no_data_corrupted_values(write, tmp_path):
    tensors = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
    clean = write(tensors)
    bad = tmp_path / "bad.safetensors"
    _corrupt_data(clean, bad)
    plan = {
        "inputs": [str(bad)],
        "transforms": [{"assert": {"finite": ".*"}}, {"scale_": {"target": "w", "by": 2.0}}, {"assert": {"iszero": "b"}}],
        "output": str(tmp_path / "o.safetensors"),
    }
    # The headers are intact, so check() (which never looks at values) passes ...
    report = bs.check(plan)
    assert [t["name"] for t in report["tensors"]] == ["w", "b"]
    # ... while run() reads the values and finds NaN.
    with pytest.raises(bs.AssertionFailed, match="NaN"):
        bs.run(plan)
    assert not (tmp_path / "o.safetensors").exists()
    # The same plan on the clean file passes both.
    plan["inputs"] = [str(clean)]
    bs.check(plan)
    bs.run(plan)


def test_check_reads_no_data_run_copies_garbage_bytes(write, tmp_path):
    tensors = {"w": np.ones((4, 4), np.float32), "ids": np.arange(3, dtype=np.int64)}
    bad = tmp_path / "bad.safetensors"
    _corrupt_data(write(tensors), bad)
    out = tmp_path / "o.safetensors"
    plan = {"inputs": [str(bad)], "transforms": [{"copy": {"from": "ids", "to": "ids2"}}], "output": str(out)}
    bs.check(plan)
    assert not out.exists()
    bs.run(plan)
    got = read(out)
    assert got["ids2"].tobytes() == b"\xff" * 24
    np.testing.assert_array_equal(got["ids2"], np.full(3, -1, np.int64))


def test_truncated_data_region_is_a_format_error_for_check_and_run(write, tmp_path):
    # Truncation is visible from the header plus the file size, so check() refuses it as well.
    clean = write({"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)})
    short = tmp_path / "short.safetensors"
    shutil.copy(clean, short)
    _, start = read_header(short)
    with open(short, "r+b") as f:
        f.truncate(start + 10)
    plan = {"inputs": [str(short)], "transforms": [{"scale_": {"target": "w", "by": 2.0}}], "output": str(tmp_path / "o.safetensors")}
    with pytest.raises(bs.FormatError):
        bs.check(plan)
    with pytest.raises(bs.FormatError):
        bs.run(plan)
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------- determinism


def read_header_bytes(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_issue9_threads_are_clamped_to_four_per_core(write, tmp_path):
    """Issue 9 item 11a: `threads=100000` started 100,000 threads (load average 1,600, EAGAIN)."""
    src = write({"w": np.arange(6, dtype=np.float32)})
    out = tmp_path / "out.safetensors"
    report = bs.run({"inputs": [str(src)], "output": str(out)}, threads=100_000, quiet=True)
    [notice] = [n for n in report["notices"] if "threads requested" in n]
    m = re.fullmatch(r"100000 threads requested, more than 4 per core on (\d+) cores; using (\d+)", notice)
    assert m and int(m[2]) == 4 * int(m[1]), notice
    limit = int(m[2])
    np.testing.assert_array_equal(bs.open(out)["w"], np.arange(6, dtype=np.float32))
    report = bs.run({"inputs": [str(src)], "output": str(out)}, threads=limit, quiet=True)
    assert not any("threads requested" in n for n in report["notices"])


def test_issue9_deep_chain_before_matmul_reads_on_a_big_enough_stack(write, tmp_path):
    """Issue 9: matmul read its operands on a 2 MiB thread; 5,000 in-place edits before it
    overflowed the stack (a segfault)."""
    src = write({"a": np.eye(4, dtype=np.float32), "b": np.arange(16, dtype=np.float32).reshape(4, 4)})
    out = tmp_path / "out.safetensors"
    transforms = [{"scale_": {"target": "a", "by": 1.0}}] * 5000 + [{"matmul": {"from_a": "a", "from_b": "b", "to": "c"}}]
    bs.run({"inputs": [str(src)], "transforms": transforms, "output": str(out)}, quiet=True)
    np.testing.assert_array_equal(bs.open(out)["c"], np.arange(16, dtype=np.float32).reshape(4, 4))


def test_threads_give_byte_identical_output(write, tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((300, 1000)).astype(np.float32) for i in range(3)}  # > 1 MiB each
    tensors["ids"] = np.arange(1000, dtype=np.int64)
    src = write(tensors)
    transforms = [
        {"scale_": {"target": "t0", "by": 0.3}},
        {"cast": {"from": r"t(\d)", "to": r"bf\1", "dtype": "bfloat16"}},
        {"copy": {"from": "t1::[::-1, 100:900:3]", "to": "part"}},
        {"assign": {"from": "t2::[:150]", "to": "t1::[150:]"}},
        {"assert": {"equal": {"left": "t1::[150:]", "right": "t2::[:150]"}}},
        {"delete": {"target": "t2"}},
    ]
    # The plan (and so its hash in the metadata) must be the same: one output path, kept aside.
    out = tmp_path / "out.safetensors"
    digests = {}
    for threads in (1, 2, 4, 0):
        bs.run({"inputs": [str(src)], "transforms": transforms, "output": str(out)}, threads=threads)
        digests[threads] = _sha(out)
        shutil.copy(out, tmp_path / f"kept{threads}.safetensors")
    assert len(set(digests.values())) == 1, digests
    # And the content is right (vs NumPy).
    got = bs.open(tmp_path / "kept2.safetensors")
    np.testing.assert_array_equal(got["t0"], tensors["t0"] * np.float32(0.3))
    np.testing.assert_array_equal(got["part"], tensors["t1"][::-1, 100:900:3])
    t1 = tensors["t1"].copy()
    t1[150:] = tensors["t2"][:150]
    np.testing.assert_array_equal(got["t1"], t1)
    assert got["bf2"].tobytes() == tensors["t2"].astype(ml_dtypes.bfloat16).tobytes()


def test_repeated_runs_are_byte_identical(src, tmp_path):
    out = tmp_path / "o.safetensors"
    plan = {"inputs": [str(src)], "transforms": [{"cast_": {"target": ".*", "dtype": "float16", "only": "float"}}], "output": str(out)}
    bs.run(plan)
    first = out.read_bytes()
    bs.run(plan)
    assert out.read_bytes() == first
    # The same plan as JSON / YAML text (keys in the same order) gives the same file.
    import yaml

    bs.run(json.dumps(plan))
    assert out.read_bytes() == first
    bs.run(yaml.safe_dump(plan, sort_keys=False))
    assert out.read_bytes() == first


def test_plan_hash_ignores_mapping_key_order(src, tmp_path):
    # SPEC §1: same inputs and plan give byte-identical output. Reordering the keys of a mapping
    # does not change the plan, so the recorded plan_sha256 (and the file) must not change either.
    out = tmp_path / "o.safetensors"
    plan = {"inputs": [str(src)], "transforms": [{"scale_": {"target": "w", "by": 2.0}}], "output": str(out)}
    reordered = {"output": str(out), "transforms": [{"scale_": {"by": 2.0, "target": "w"}}], "inputs": [str(src)]}
    bs.run(plan)
    first = out.read_bytes()
    bs.run(reordered)
    assert read_header(out)[0]["__metadata__"] == read_header_bytes(first)["__metadata__"]
    assert out.read_bytes() == first


def test_output_metadata_keeps_input_and_adds_version_and_plan_hash(src, tmp_path):
    out = tmp_path / "o.safetensors"
    bs.run(_plan(src, out))
    header, _ = read_header(out)
    meta = header["__metadata__"]
    assert meta["format"] == "pt" and meta["note"] == "x"
    assert meta["brainsurgery.version"] == bs.__version__
    assert len(meta["brainsurgery.plan_sha256"]) == 64
    int(meta["brainsurgery.plan_sha256"], 16)


@pytest.mark.parametrize("threads", [-1, 2**64, -(2**70)])
def test_threads_out_of_range_is_a_plan_error(src, tmp_path, threads):
    # It was an OverflowError from the argument conversion.
    with pytest.raises(bs.PlanError, match=r"^threads: .* is not a thread count"):
        bs.run(_plan(src, tmp_path / "o.safetensors"), threads=threads)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("threads", ["x", 1.5, None])
def test_threads_of_the_wrong_type_is_a_type_error(src, tmp_path, threads):
    with pytest.raises(TypeError, match="threads must be an int"):
        bs.run(_plan(src, tmp_path / "o.safetensors"), threads=threads)



def test_version():
    import importlib.metadata

    assert bs.__version__ == importlib.metadata.version("brainsurgery")


# ---------------------------------------------------------------- the README demo, end to end


def test_demo_plan_on_tiny_gpt2(tmp_path):
    # The demo asserts the default width (64), so build the default tiny GPT-2 here.
    from conftest import save_safetensors, tiny_gpt2

    gpt2_tensors = tiny_gpt2()
    gpt2 = tmp_path / "tiny-gpt2"
    save_safetensors(gpt2 / "model.safetensors", gpt2_tensors, {"format": "pt"})
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
    out = tmp_path / "gpt2-bf16"
    report = bs.run(demo, overrides={"inputs": [f"gpt2::{gpt2}"], "output.path": str(out)})
    assert report["alias"] == "gpt2"
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files  # sidecar copied to a directory output
    weights = [out / f for f in files if f.endswith(".safetensors")]
    got: dict[str, np.ndarray] = {}
    for w in weights:
        got.update(read(w))
    expected: dict[str, np.ndarray] = {}
    for name, value in gpt2_tensors.items():
        new = name
        if name.startswith("h."):
            _, i, rest = name.split(".", 2)
            new = f"layers.{i}.{rest}"
        if name.endswith("attn.c_proj.weight"):
            value = value * np.float32(0.5)
        if value.dtype.kind == "f":
            value = value.astype(ml_dtypes.bfloat16)
        expected[new] = value
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].tobytes() == value.tobytes(), name


def test_dtype_and_format_tables_come_from_the_engine():
    from brainsurgery import _core

    dtypes = {d["name"]: d for d in _core.dtypes()}
    assert dtypes["bfloat16"]["safetensors"] == "BF16" and dtypes["bfloat16"]["ml_dtypes"]
    assert dtypes["float32"]["numpy"] == "<f4" and dtypes["float32"]["torch_storage"] == "FloatStorage"
    assert dtypes["float4_e2m1fn"]["size"] is None and dtypes["float4_e2m1fn"]["torch"] is None
    assert "long" in dtypes["int64"]["aliases"]
    formats = {f["name"]: f for f in _core.formats()}
    assert set(formats) == {"safetensors", "PyTorch", "NumPy", "DCP"}
    assert formats["DCP"]["keys"] == ["dcp"] and formats["DCP"]["extensions"] == []  # a directory
    assert ".pth" in formats["PyTorch"]["extensions"]
    assert formats["safetensors"]["index_name"] == "model.safetensors.index.json"
