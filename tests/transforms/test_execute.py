"""execute (src/transforms/execute.rs): nested plans inline, as a mapping and as a file; nested
locations in errors; cycles between plan files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import brainsurgery as bs
from conftest import read, tensor_names


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}


def _dump(path: Path, plan: dict) -> Path:
    path.write_text(json.dumps(plan))
    return path


def test_inline_transforms_run_in_the_current_state(write, tmp_path):
    t = _tensors()
    a = write(t, "a.safetensors")
    out = tmp_path / "out.safetensors"
    bs.run(
        {
            "inputs": [str(a)],
            "transforms": [
                {"copy": {"from": "w", "to": "w2"}},
                {"execute": {"transforms": [{"scale_": {"target": "w2", "by": 2}}, {"delete": {"target": "b"}}]}},
                {"scale_": {"target": "w2", "by": 3}},
            ],
            "output": str(out),
        }
    )
    got = read(out)
    assert tensor_names(out) == ["w", "w2"]
    np.testing.assert_array_equal(got["w2"], t["w"] * np.float32(2) * np.float32(3))


def test_plan_form_loads_its_inputs_and_saves_its_output(write, tmp_path):
    t = _tensors()
    a = write(t, "a.safetensors")
    other = {"x": np.arange(4, dtype=np.float32)}
    b = write(other, "b.safetensors")
    nested_out = tmp_path / "nested.safetensors"
    out = tmp_path / "out.safetensors"
    report = bs.run(
        {
            "inputs": [str(a)],
            "transforms": [
                {
                    "execute": {
                        "plan": {
                            "inputs": [f"other::{b}"],
                            # Bare references mean the nested plan's single input.
                            "transforms": [{"scale_": {"target": "x", "by": 2}}],
                            "output": str(nested_out),
                        }
                    }
                },
                {"copy": {"from": "other::x", "to": "model::x"}},
            ],
            "output": str(out),
        }
    )
    assert report["alias"] == "model"
    np.testing.assert_array_equal(read(nested_out)["x"], other["x"] * 2)
    got = read(out)
    np.testing.assert_array_equal(got["x"], other["x"] * 2)
    np.testing.assert_array_equal(got["w"], t["w"])


def test_plan_form_reuses_an_input_of_the_same_checkpoint(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    report = bs.check(
        {
            "inputs": [str(a)],
            "transforms": [{"execute": {"plan": {"inputs": [str(a)], "transforms": [{"prefixes": "list"}]}}}],
        }
    )
    assert report["output"] == ["model  2 tensors (default)"]


def test_plan_form_input_clash_is_a_plan_error(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    b = write(_tensors(), "b.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.execute\.plan\.inputs\[0\].*`model` already exists"):
        bs.check({"inputs": [str(a)], "transforms": [{"execute": {"plan": {"inputs": [str(b)]}}}]})


def test_nested_output_is_not_written_by_check(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    nested_out = tmp_path / "nested.safetensors"
    plan = {"output": {"path": str(nested_out), "alias": "model"}}
    report = bs.check({"inputs": [str(a)], "transforms": [{"execute": {"plan": plan}}]})
    assert not nested_out.exists()
    assert any("written when the plan runs" in n for n in report["notes"])
    # SPEC §6.3 applies to the nested plan alone: no input and nothing written there.
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.execute\.plan\.output.*set output.alias"):
        bs.check({"inputs": [str(a)], "transforms": [{"execute": {"plan": {"output": str(nested_out)}}}]})


def test_path_form_resolves_relative_to_the_plan_file(write, tmp_path):
    t = _tensors()
    a = write(t, "a.safetensors")
    sub = tmp_path / "plans"
    sub.mkdir()
    _dump(sub / "inner.yaml", {"transforms": [{"scale_": {"target": "b", "by": -1}}]})
    main = _dump(
        sub / "main.yaml",
        {"inputs": [str(a)], "transforms": [{"execute": {"path": "inner.yaml"}}], "output": str(tmp_path / "o.safetensors")},
    )
    # Run from another directory: the nested path is relative to main.yaml, not the cwd.
    proc = subprocess.run(
        [sys.executable, "-m", "brainsurgery", str(main)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(read(tmp_path / "o.safetensors")["b"], -t["b"])
    # Without a plan file the path is relative to the working directory.
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.execute\.path.*does not exist"):
        bs.check({"inputs": [str(a)], "transforms": [{"execute": {"path": "inner.yaml"}}]})


def test_nested_errors_name_the_nested_location(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    # Plan errors are found when the plan is parsed, before any input is opened.
    with pytest.raises(bs.PlanError, match=r"transforms\[1\]\.execute\.transforms\[0\]\.scale_.*`bu`.*did you mean `by`"):
        bs.check(
            {
                "inputs": ["does-not-exist.safetensors"],
                "transforms": ["exit", {"execute": {"transforms": [{"scale_": {"target": "w", "bu": 2}}]}}],
            }
        )
    with pytest.raises(bs.TransformError, match=r"transforms\[0\] \(execute\).*transforms\[0\]\.execute\.transforms\[1\] \(scale_\).*`nope`"):
        bs.check(
            {
                "inputs": [str(a)],
                "transforms": [{"execute": {"transforms": [{"copy": {"from": "w", "to": "q"}}, {"scale_": {"target": "nope", "by": 2}}]}}],
            }
        )
    with pytest.raises(bs.AssertionFailed, match=r"at transforms\[0\]\.execute\.plan\.transforms\[0\]\.execute\.transforms\[0\]"):
        bs.run(
            {
                "inputs": [str(a)],
                "transforms": [
                    {"execute": {"plan": {"transforms": [{"execute": {"transforms": [{"assert": {"iszero": "w"}}]}}]}}}
                ],
            }
        )


def test_execute_needs_exactly_one_form(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.execute.*exactly one of"):
        bs.check({"inputs": [str(a)], "transforms": [{"execute": {"transforms": [], "path": "x.yaml"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.execute\.plan.*unknown key `transform`"):
        bs.check({"inputs": [str(a)], "transforms": [{"execute": {"plan": {"transform": []}}}]})


def test_exit_inside_a_nested_plan_stops_the_run(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    out = tmp_path / "o.safetensors"
    bs.run(
        {
            "inputs": [str(a)],
            "transforms": [{"execute": {"transforms": ["exit"]}}, {"delete": {"target": "w"}}],
            "output": str(out),
        }
    )
    assert "w" in read(out)


def test_cycle_between_plan_files_is_a_plan_error_and_writes_nothing(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    out = tmp_path / "o.safetensors"
    saved = tmp_path / "saved.safetensors"
    _dump(tmp_path / "b.yaml", {"transforms": [{"execute": {"path": "a.yaml"}}]})
    _dump(
        tmp_path / "a.yaml",
        {
            "inputs": [str(a)],
            "transforms": [{"save": {"path": str(saved), "alias": "model"}}, {"execute": {"path": "b.yaml"}}],
            "output": str(out),
        },
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "brainsurgery", "a.yaml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "execute cycle" in proc.stderr and "a.yaml → " in proc.stderr and "b.yaml → " in proc.stderr, proc.stderr
    assert "transforms[1].execute.path(b.yaml).transforms[0].execute.path" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(bs.PlanError, match=r"execute cycle: .*a\.yaml → .*b\.yaml → .*a\.yaml"):
        bs.run(str(tmp_path / "a.yaml"))


def test_plan_executing_itself_is_a_cycle(tmp_path):
    _dump(tmp_path / "self.yaml", {"transforms": [{"execute": {"path": "self.yaml"}}]})
    with pytest.raises(bs.PlanError, match=r"execute cycle: .*self\.yaml → .*self\.yaml"):
        bs.check(str(tmp_path / "self.yaml"))


def _prompt(args: list[str], script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A ``-i`` session with ``script`` piped to stdin."""
    return subprocess.run(
        [sys.executable, "-m", "brainsurgery", "-i", *args], input=script, capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_prompt_path_resolves_relative_to_the_plan_file(write, tmp_path):
    """Issue 8: a relative `execute: {path}` typed at the `-i` prompt resolves against the plan's
    directory, as it does inside the plan, not against the working directory."""
    t = _tensors()
    a = write(t, "a.safetensors")
    sub = tmp_path / "plans"
    sub.mkdir()
    _dump(sub / "inner.yaml", {"transforms": [{"scale_": {"target": "b", "by": -1}}]})
    # A decoy in the working directory: resolving there would scale by 10 instead.
    _dump(tmp_path / "inner.yaml", {"transforms": [{"scale_": {"target": "b", "by": 10}}]})
    main = _dump(sub / "main.yaml", {"inputs": [str(a)], "output": str(tmp_path / "o.safetensors")})
    proc = _prompt([str(main)], "execute: path: inner.yaml\n", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error" not in proc.stdout + proc.stderr
    np.testing.assert_array_equal(read(tmp_path / "o.safetensors")["b"], -t["b"])


def test_prompt_path_without_a_plan_resolves_against_the_working_directory(write, tmp_path):
    t = _tensors()
    write(t, "a.safetensors")
    _dump(tmp_path / "inner.yaml", {"transforms": [{"scale_": {"target": "b", "by": -1}}]})
    out = tmp_path / "o.safetensors"
    proc = _prompt(["a.safetensors", "-o", str(out)], "execute: path: inner.yaml\n", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    np.testing.assert_array_equal(read(out)["b"], -t["b"])


def test_issue9_execute_path_to_a_file_that_is_not_a_plan_quotes_nothing(write, tmp_path):
    """Issue 9 item 9: the file's first line came back as an "unknown key"."""
    a = write(_tensors(), "a.safetensors")
    (tmp_path / "shadow").write_text("hunter2:*:19000:0:99999:7:::\n")
    with pytest.raises(bs.PlanError) as info:
        bs.check({"inputs": [str(a)], "transforms": [{"execute": {"path": str(tmp_path / "shadow")}}]})
    assert "not a plan" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(bs.PlanError, match="/dev/zero` is a character device"):
        bs.check({"inputs": [str(a)], "transforms": [{"execute": {"path": "/dev/zero"}}]})


def test_a_run_of_more_than_50000_transforms_is_refused(write, tmp_path):
    """180,000 `scale_` stacked on one tensor (30,000 in a file, executed six times) overflowed the
    engine's stack when the tensor was read (SIGSEGV); the run is now refused at the 50,001st."""
    path = write({"w": np.ones(4, np.float32)})
    inner = tmp_path / "inner.yaml"
    inner.write_text("transforms:\n" + "  - scale_: {target: w, by: 1.0}\n" * 30_000)
    plan = {"inputs": [str(path)], "transforms": [{"execute": {"path": str(inner)}}] * 6}
    with pytest.raises(bs.TransformError, match="more than 50000 transforms in one run") as info:
        bs.check(plan)
    assert info.value.transform_index == 1
