"""Bad input, one test each (SPEC §2, §3, §6.2, §10, §11).

Each case runs through the CLI (exit status; one ``error: ...`` paragraph on stderr naming the
transform index, reference or file) and, where natural, through ``brainsurgery.run`` (exception
class). After every failure the output directory is listed: no output file and no ``.*.tmp-*``
temporary may be left. Exit status 2 = invalid plan or input (PlanError/FormatError), 1 = failed
transform or assertion (TransformError/AssertionFailed).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import brainsurgery as bs
from helpers import assert_one_error, cli, dump_plan, listing, sha256, temporaries, write_raw_st, write_st

A = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.ones((3, 2), dtype=np.float32)
H = np.full(4, 0.5, dtype=np.float16)
IDS = np.arange(3, dtype=np.int64)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace: ``in.safetensors`` and an empty output directory ``out/``."""
    write_st(tmp_path / "in.safetensors", {"a.weight": A, "b.weight": B, "h.weight": H, "ids": IDS}, {"format": "pt"})
    (tmp_path / "out").mkdir()
    return tmp_path


def assert_nothing_written(ws: Path) -> None:
    out = ws / "out"
    assert listing(out) == [], f"output directory not empty: {listing(out)}"
    assert temporaries(ws) == [], f"temporaries left: {temporaries(ws)}"


def plan_with(transforms: list[Any], output: Any = "out/o.safetensors", inputs: list[str] | None = None) -> dict[str, Any]:
    return {"inputs": inputs or ["in.safetensors"], "transforms": transforms, "output": output}


def check_both(
    ws: Path,
    plan: dict[str, Any] | str,
    status: int,
    exc: type[BaseException],
    needles: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
    python: bool = True,
) -> str:
    """Run ``plan`` through the CLI and (if ``python``) ``bs.run``; check status, message, class
    and that nothing was written. Returns the CLI message."""
    path = ws / "plan.yaml"
    if isinstance(plan, str):
        path.write_text(plan)
    else:
        dump_plan(path, plan)
    proc = cli([path.name], cwd=ws)
    message = assert_one_error(proc, status, *needles)
    assert_nothing_written(ws)
    if python:
        monkeypatch.chdir(ws)
        with pytest.raises(exc) as info:
            bs.run(path if isinstance(plan, str) else plan)
        assert type(info.value) is exc
        assert isinstance(info.value, bs.BrainSurgeryError)
        for needle in needles:
            if needle != "plan.yaml" or isinstance(plan, str):
                assert needle in str(info.value), f"{needle!r} not in {info.value}"
        assert_nothing_written(ws)
    return message


# ---------------------------------------------------------------- plan errors (exit 2)


def test_malformed_yaml_names_file_and_line(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "inputs: [in.safetensors]\ntransforms:\n  - copy: {from: a.weight, to: [b\noutput: out/o.safetensors\n"
    message = check_both(ws, text, 2, bs.PlanError, ("plan.yaml",), monkeypatch)
    assert re.search(r"line\s*[34]\b", message), message


def test_unknown_transform_suggests_the_right_name(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_with([{"scale_": {"target": "a.weight", "by": 2}}, {"scael_": {"target": "a.weight", "by": 2}}])
    message = check_both(ws, plan, 2, bs.PlanError, ("transforms[1]", "`scael_`"), monkeypatch)
    # `scael_` is one adjacent swap from `scale_` and two edits from `scale`.
    assert "did you mean `scale_`" in message, message


def test_unknown_key_in_transform_suggests(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_with([{"copy": {"from": "a.weight", "to": "c"}}, {"scale_": {"target": "a.weight", "byy": 2}}])
    check_both(ws, plan, 2, bs.PlanError, ("transforms[1]", "scale_", "`byy`", "did you mean `by`"), monkeypatch)


def test_wrong_value_type(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "inputs: [in.safetensors]\ntransforms:\n  - scale_: {target: a.weight, by: abc}\noutput: out/o.safetensors\n"
    message = check_both(ws, text, 2, bs.PlanError, ("transforms[0]", "by", "abc"), monkeypatch)
    assert "number" in message, message


def test_bad_regex(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_with([{"scale_": {"target": "a\\.(unclosed", "by": 2}}])
    check_both(ws, plan, 2, bs.PlanError, ("transforms[0]", "(unclosed"), monkeypatch)


def test_unknown_alias(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_with([{"scale_": {"target": "nope::a.weight", "by": 2}}])
    check_both(ws, plan, 2, bs.PlanError, ("transforms[0]", "`nope`", "model"), monkeypatch)


def test_a_required_key_left_empty_is_a_plan_error(ws: Path) -> None:
    # `dtype:` with nothing after it is YAML null: reported as missing, not a panic later.
    plan = {"inputs": [str(ws / "in.safetensors")], "transforms": [{"cast": {"from": "a.weight", "to": "v", "dtype": None}}]}
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.cast.*missing required key `dtype`"):
        bs.check(plan)


# ---------------------------------------------------------------- transform errors (exit 1)


def test_zero_matches_shows_closest_names_not_all(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Enough tensors that "closest" must be a selection, not the whole list.
    many = {f"layer.{i}.weight": np.zeros(1, np.float32) for i in range(40)}
    many["lm_head.weight"] = np.zeros(1, np.float32)
    write_st(ws / "in.safetensors", many)
    plan = plan_with([{"copy": {"from": "layer.0.weight", "to": "k"}}, {"scale_": {"target": "lm_haed\\.weight", "by": 2}}])
    message = check_both(ws, plan, 1, bs.TransformError, ("transforms[1]", "lm_haed", "lm_head.weight"), monkeypatch)
    shown = re.findall(r"layer\.\d+\.weight", message)
    assert len(shown) < 10, f"message lists too many names: {message}"


def test_destination_collision(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_with([{"copy": {"from": "(a|b)\\.weight", "to": "same"}}])
    message = check_both(ws, plan, 1, bs.TransformError, ("transforms[0]", "same", "a.weight", "b.weight"), monkeypatch)
    assert "copy" in message


def test_assign_shape_mismatch(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Same dtype (float32), shapes (2, 3) vs (3, 2): same element count, still refused.
    plan = plan_with([{"assign": {"from": "a.weight", "to": "b.weight"}}])
    message = check_both(ws, plan, 1, bs.TransformError, ("transforms[0]", "a.weight", "b.weight"), monkeypatch)
    assert "shape" in message and re.search(r"\(?2, 3\)?", message) and re.search(r"\(?3, 2\)?", message), message


def test_failing_assertion_reports_measured_value(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a.weight = 0..5; after scale_ ×3 the largest |a - a_copy| is 10 (at element 5: 15 - 5).
    plan = plan_with(
        [
            {"copy": {"from": "a.weight", "to": "a.copy"}},
            {"scale_": {"target": "a\\.weight", "by": 3}},
            {"assert": {"equal": {"left": "a.weight", "right": "a.copy"}}},
        ]
    )
    message = check_both(ws, plan, 1, bs.AssertionFailed, ("transforms[2]", "equal", "a.weight"), monkeypatch)
    values = [float(v) for v in re.findall(r"=\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)", message)]
    assert 10.0 in values, f"measured max |a-b| = 10 not reported: {message}"


def test_failing_count_assertion_reports_count(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_with([{"assert": {"count": {"of": ".*weight", "is": 5}}}])
    message = check_both(ws, plan, 1, bs.AssertionFailed, ("transforms[0]", "count"), monkeypatch)
    assert re.search(r"\b3\b", message), message  # three tensors match


@pytest.mark.parametrize("output", ["out/o.safetensors", {"path": "out/dir", "shard": "16B"}])
def test_failing_assertion_after_writing_transforms_writes_nothing(
    ws: Path, monkeypatch: pytest.MonkeyPatch, output: Any
) -> None:
    # Transforms that change, create and delete tensors run first; the last assertion fails.
    plan = plan_with(
        [
            {"scale_": {"target": "a\\.weight", "by": 2}},
            {"copy": {"from": "b.weight", "to": "c.weight"}},
            {"cast_": {"target": "h\\.weight", "dtype": "float32"}},
            {"delete": {"target": "ids"}},
            {"assert": {"dtype": {"of": "h.weight", "is": "float16"}}},
        ],
        output=output,
    )
    check_both(ws, plan, 1, bs.AssertionFailed, ("transforms[4]", "dtype", "h.weight"), monkeypatch)


def test_failed_run_leaves_an_existing_output_untouched(ws: Path) -> None:
    existing = write_st(ws / "out" / "o.safetensors", {"old": np.zeros(2, np.float32)})
    before = existing.read_bytes()
    dump_plan(ws / "plan.yaml", plan_with([{"scale_": {"target": "a.weight", "by": 2}}, {"assert": {"count": {"of": ".*", "is": 0}}}]))
    assert_one_error(cli(["plan.yaml"], cwd=ws), 1, "transforms[1]")
    assert existing.read_bytes() == before
    assert listing(ws / "out") == ["o.safetensors"]


# ---------------------------------------------------------------- input errors (exit 2)


def test_missing_input_file(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_with([], inputs=["nothere.safetensors"])
    check_both(ws, plan, 2, bs.FormatError, ("nothere.safetensors",), monkeypatch)


def _hostile(ws: Path, name: str, header: dict[str, Any] | None, data: bytes, header_len: int | None = None, raw: bytes | None = None) -> None:
    text = raw if raw is not None else json.dumps(header).encode()
    write_raw_st(ws / name, text, data, header_len)


F32x8 = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes


def test_truncated_in_data_region(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = {"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}
    _hostile(ws, "bad.safetensors", header, F32x8[:20])  # cut 12 bytes into the data
    check_both(ws, plan_with([], inputs=["bad.safetensors"]), 2, bs.FormatError, ("bad.safetensors",), monkeypatch)


def test_offsets_past_end_of_file(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = {
        "x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [32, 40]},
    }
    _hostile(ws, "bad.safetensors", header, F32x8)
    check_both(ws, plan_with([], inputs=["bad.safetensors"]), 2, bs.FormatError, ("bad.safetensors", "y"), monkeypatch)


def test_overlapping_offsets(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = {
        "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "y": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    _hostile(ws, "bad.safetensors", header, F32x8[:24])
    message = check_both(ws, plan_with([], inputs=["bad.safetensors"]), 2, bs.FormatError, ("bad.safetensors",), monkeypatch)
    assert "overlap" in message


def test_byte_size_disagrees_with_dtype_and_shape(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}  # 4×4 = 16 bytes, not 32
    _hostile(ws, "bad.safetensors", header, F32x8)
    message = check_both(ws, plan_with([], inputs=["bad.safetensors"]), 2, bs.FormatError, ("bad.safetensors", "x"), monkeypatch)
    assert "16" in message and "32" in message, message


def test_header_length_larger_than_file(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = {"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}
    _hostile(ws, "bad.safetensors", header, F32x8, header_len=1_000_000)
    check_both(ws, plan_with([], inputs=["bad.safetensors"]), 2, bs.FormatError, ("bad.safetensors",), monkeypatch)


def test_header_not_json(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hostile(ws, "bad.safetensors", None, F32x8, raw=b'{"x": not json at all} ')
    message = check_both(ws, plan_with([], inputs=["bad.safetensors"]), 2, bs.FormatError, ("bad.safetensors",), monkeypatch)
    assert "JSON" in message or "json" in message, message


def test_hostile_inputs_fail_check_too(ws: Path) -> None:
    # `check` reads only headers, and must still refuse a header pointing past the file.
    header = {"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}
    _hostile(ws, "bad.safetensors", header, F32x8[:8])
    dump_plan(ws / "plan.yaml", plan_with([], inputs=["bad.safetensors"]))
    assert_one_error(cli(["check", "plan.yaml"], cwd=ws), 2, "bad.safetensors")
    assert_one_error(cli(["inspect", "bad.safetensors"], cwd=ws), 2, "bad.safetensors")
    assert_nothing_written(ws)


# ---------------------------------------------------------------- output errors (exit 2)


def test_output_equal_to_input_file(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = sha256(ws / "in.safetensors")
    plan = plan_with([{"scale_": {"target": "a.weight", "by": 2}}], output="in.safetensors")
    check_both(ws, plan, 2, bs.PlanError, ("in.safetensors",), monkeypatch)
    # also through a different spelling of the same path
    plan = plan_with([{"scale_": {"target": "a.weight", "by": 2}}], output="./out/../in.safetensors")
    check_both(ws, plan, 2, bs.PlanError, ("in.safetensors",), monkeypatch)
    assert sha256(ws / "in.safetensors") == before
    assert temporaries(ws) == []


@pytest.mark.parametrize("output", ["ckpt", "ckpt/", "./out/../ckpt", "ckpt/model.safetensors"])
def test_output_equal_to_input_directory(ws: Path, monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    ckpt = ws / "ckpt"
    write_st(ckpt / "model.safetensors", {"a.weight": A})
    (ckpt / "config.json").write_text("{}")
    before = {p: sha256(ckpt / p) for p in listing(ckpt)}
    plan = plan_with([{"scale_": {"target": "a.weight", "by": 2}}], inputs=["ckpt"], output=output)
    check_both(ws, plan, 2, bs.PlanError, ("ckpt",), monkeypatch)
    assert {p: sha256(ckpt / p) for p in listing(ckpt)} == before


def _root_can_write_readonly_dirs(tmp_path: Path) -> bool:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    os.chmod(probe_dir, 0o500)
    try:
        (probe_dir / "x").write_text("x")
        return True
    except PermissionError:
        return False
    finally:
        os.chmod(probe_dir, 0o700)


def test_unwritable_output_location(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if _root_can_write_readonly_dirs(ws):
        # Running as root (CAP_DAC_OVERRIDE): chmod 0o500 does not block writes. Use an output
        # whose parent is an existing regular FILE instead; creating anything there fails with
        # ENOTDIR for every user.
        (ws / "out" / "blocker").write_text("not a directory")
        outputs = ["out/blocker/o.safetensors", "out/blocker/sub/dir"]
        expect_listing = ["blocker"]
    else:
        ro = ws / "out" / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        outputs = ["out/ro/o.safetensors", "out/ro/dir"]
        expect_listing = ["ro"]
    try:
        for output in outputs:
            dump_plan(ws / "plan.yaml", plan_with([{"scale_": {"target": "a.weight", "by": 2}}], output=output))
            assert_one_error(cli(["plan.yaml"], cwd=ws), 2, output.split("/")[1])
            assert listing(ws / "out") == expect_listing
            assert temporaries(ws) == []
            monkeypatch.chdir(ws)
            with pytest.raises(bs.FormatError):
                bs.run(ws / "plan.yaml")
            assert listing(ws / "out") == expect_listing
            assert temporaries(ws) == []
    finally:
        for p in (ws / "out").iterdir():
            os.chmod(p, 0o700)


# ---------------------------------------------------------------- exception classes


@pytest.mark.parametrize("name", ["PlanError", "TransformError", "AssertionFailed", "FormatError", "BrainSurgeryError"])
def test_exception_classes_have_their_public_names(name: str) -> None:
    cls = getattr(bs, name)
    assert issubclass(cls, bs.BrainSurgeryError)
    # What a traceback shows: `brainsurgery...PlanError`, not an internal spelling.
    assert cls.__name__ == name, f"{name} is exposed as {cls.__module__}.{cls.__name__}"


# ---------------------------------------------------------------- structured attributes


def raised(plan: dict[str, Any] | str, ws: Path, monkeypatch: pytest.MonkeyPatch) -> bs.BrainSurgeryError:
    monkeypatch.chdir(ws)
    with pytest.raises(bs.BrainSurgeryError) as info:
        bs.run(plan)
    return info.value


def attributes(e: bs.BrainSurgeryError) -> dict[str, Any]:
    return {k: getattr(e, k) for k in ("transform_index", "transform", "reference", "tensor", "path", "location")}


def test_plan_error_carries_its_location(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = raised(plan_with([{"copy": {"from": "a.weight", "to": "c"}}, {"scale_": {"target": "a.weight", "byy": 2}}]), ws, monkeypatch)
    assert isinstance(e, bs.PlanError)
    assert attributes(e) == {
        "transform_index": 1,
        "transform": "scale_",
        "reference": None,
        "tensor": None,
        "path": None,
        "location": "transforms[1].scale_",
    }


def test_zero_matches_carries_the_reference(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = raised(plan_with([{"scale_": {"target": "nothing.*", "by": 2}}]), ws, monkeypatch)
    assert isinstance(e, bs.TransformError)
    a = attributes(e)
    assert (a["transform_index"], a["transform"], a["reference"]) == (0, "scale_", "nothing.*")


def test_a_nested_step_keeps_its_reference(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = raised(plan_with([{"execute": {"transforms": [{"scale_": {"target": "nomatch", "by": 2}}]}}]), ws, monkeypatch)
    assert isinstance(e, bs.TransformError)
    a = attributes(e)
    assert (a["transform_index"], a["reference"]) == (0, "nomatch")
    assert a["location"] is not None and a["location"].startswith("transforms[0].execute"), a["location"]


def test_a_misspelled_transform_still_carries_its_index(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = raised(plan_with([{"copy": {"from": "a.weight", "to": "c"}}, {"scael_": {"target": "a.weight", "by": 2}}]), ws, monkeypatch)
    assert isinstance(e, bs.PlanError)
    a = attributes(e)
    assert (a["transform_index"], a["transform"], a["location"]) == (1, None, "transforms[1]")


def test_transform_error_carries_the_tensor(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = raised(plan_with([{"reshape_": {"target": "a.weight", "shape": [7]}}]), ws, monkeypatch)
    assert isinstance(e, bs.TransformError)
    a = attributes(e)
    assert (a["transform_index"], a["transform"]) == (0, "reshape_")
    assert a["tensor"] is not None and a["tensor"].endswith("a.weight")
    # The message says each layer's part once.
    assert str(e).count("a.weight") == 1, str(e)


def test_assertion_carries_the_tensor(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = raised(plan_with([{"copy": {"from": "a.weight", "to": "c"}}, {"assert": {"equal": {"left": "a.weight", "right": "b.weight"}}}]), ws, monkeypatch)
    assert isinstance(e, bs.AssertionFailed)
    a = attributes(e)
    assert (a["transform_index"], a["transform"]) == (1, "assert")


def test_format_error_carries_the_path(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "bad.safetensors").write_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00{")
    e = raised(plan_with([], inputs=["bad.safetensors"]), ws, monkeypatch)
    assert isinstance(e, bs.FormatError)
    assert e.path is not None and e.path.endswith("bad.safetensors")
    assert e.transform_index is None


def test_every_exception_class_has_the_attributes_unset_by_default() -> None:
    e = bs.PlanError("raised by hand")
    assert attributes(e) == dict.fromkeys(attributes(e))
