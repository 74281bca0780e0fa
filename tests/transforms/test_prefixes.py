"""prefixes (src/transforms/prefixes.rs): list/add/remove/rename aliases, and the output alias
they lead to (SPEC §6.3)."""

from __future__ import annotations

import numpy as np
import pytest

import brainsurgery as bs
from conftest import read, tensor_names


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": np.arange(3, dtype=np.int32)}


def test_list_emits_aliases_with_counts(write):
    a = write(_tensors(), "a.safetensors")
    report = bs.check(
        {
            "inputs": [f"x::{a}", f"y::{a}"],
            "transforms": [{"prefixes": {"mode": "add", "alias": "empty"}}, {"prefixes": {"mode": "list"}}, {"prefixes": "list"}],
        }
    )
    assert len(report["output"]) == 2
    lines = report["output"][0].splitlines()
    assert [line.split()[0] for line in lines] == ["x", "y", "empty"]
    assert "2 tensors" in lines[0] and "0 tensors" in lines[2]


def test_list_marks_the_default_alias(write):
    a = write(_tensors(), "a.safetensors")
    report = bs.check({"inputs": [str(a)], "transforms": [{"prefixes": "list"}]})
    assert report["output"] == ["model  2 tensors (default)"]


def test_issue9_list_shortens_a_65536_character_alias(write):
    """Issue 9 item 2: the alias column's width panicked past 65,535 characters."""
    a = write(_tensors(), "a.safetensors")
    alias = "a" * 65_536
    report = bs.check({"inputs": [f"{alias}::{a}", f"b::{a}"], "transforms": [{"prefixes": "list"}]})
    lines = report["output"][0].splitlines()
    assert lines[0] == "a" * 50 + "…" + "a" * 49 + "  2 tensors"
    assert lines[1] == "b" + " " * 99 + "  2 tensors"


def test_add_then_write_makes_it_the_output(write, tmp_path):
    t = _tensors()
    a = write(t, "a.safetensors")
    out = tmp_path / "out.safetensors"
    report = bs.run(
        {
            "inputs": [f"x::{a}", f"y::{a}"],
            "transforms": [
                {"prefixes": {"mode": "add", "alias": "new"}},
                {"copy": {"from": "x::w", "to": "new::w2"}},
            ],
            "output": str(out),
        }
    )
    assert report["alias"] == "new"
    got = read(out)
    assert list(got) == ["w2"]
    np.testing.assert_array_equal(got["w2"], t["w"])


def test_add_alone_does_not_choose_the_output(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"set output.alias to one of: x, y, new"):
        bs.check(
            {
                "inputs": [f"x::{a}", f"y::{a}"],
                "transforms": [{"prefixes": {"mode": "add", "alias": "new"}}],
                "output": str(tmp_path / "o.safetensors"),
            }
        )


def test_add_existing_is_a_plan_error(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes\.alias.*`model` already exists"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "add", "alias": "model"}}]})


def test_remove_drops_an_alias(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    report = bs.check(
        {
            "inputs": [f"x::{a}", f"y::{a}"],
            "transforms": [{"prefixes": {"mode": "remove", "alias": "y"}}, {"prefixes": "list"}],
            "output": {"path": str(tmp_path / "o.safetensors"), "alias": "x"},
        }
    )
    assert report["output"][0].split()[0] == "x"
    assert len(report["output"][0].splitlines()) == 1
    with pytest.raises(bs.PlanError, match=r"transforms\[1\].*unknown alias `y`"):
        bs.check(
            {
                "inputs": [f"x::{a}", f"y::{a}"],
                "transforms": [{"prefixes": {"mode": "remove", "alias": "y"}}, {"copy": {"from": "y::w", "to": "x::q"}}],
            }
        )


def test_remove_unknown_and_default_are_plan_errors(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes\.alias.*unknown alias `nope`"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "remove", "alias": "nope"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes\.alias.*cannot remove `model`.*default alias"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "remove", "alias": "model"}}]})


def test_rename_single_input_keeps_it_the_output_with_order_and_metadata(write, tmp_path):
    t = _tensors()
    a = write(t, "a.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out.safetensors"
    report = bs.run(
        {
            "inputs": [str(a)],
            "transforms": [
                {"prefixes": {"mode": "rename", "from": "model", "to": "base"}},
                # Bare references follow the renamed default alias.
                {"scale_": {"target": "w", "by": 3}},
                {"copy": {"from": "base::b", "to": "b2"}},
            ],
            "output": str(out),
        }
    )
    assert report["alias"] == "base"
    assert (report["added"], report["removed"]) == (1, 0)
    assert tensor_names(out) == ["w", "b", "b2"]
    got = read(out)
    np.testing.assert_array_equal(got["w"], t["w"] * np.float32(3))
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        assert f.metadata()["format"] == "pt"


def test_rename_the_written_alias_follows(write, tmp_path):
    t = _tensors()
    a = write(t, "a.safetensors")
    out = tmp_path / "out.safetensors"
    report = bs.run(
        {
            "inputs": [f"x::{a}", f"y::{a}"],
            "transforms": [
                {"scale_": {"target": "y::w", "by": 2}},
                {"prefixes": {"mode": "rename", "from": "y", "to": "z"}},
            ],
            "output": str(out),
        }
    )
    assert report["alias"] == "z"
    np.testing.assert_array_equal(read(out)["w"], t["w"] * np.float32(2))


def test_rename_away_from_explicit_output_alias_is_a_plan_error(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"output\.alias.*unknown alias `x`.*known: z, y"):
        bs.check(
            {
                "inputs": [f"x::{a}", f"y::{a}"],
                "transforms": [{"prefixes": {"mode": "rename", "from": "x", "to": "z"}}],
                "output": {"path": str(tmp_path / "o.safetensors"), "alias": "x"},
            }
        )


def test_rename_errors(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes\.from.*unknown alias `q`"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "rename", "from": "q", "to": "r"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes\.to.*`model` already exists"):
        bs.check(
            {
                "inputs": [f"model::{a}", f"b::{a}"],
                "transforms": [{"prefixes": {"mode": "rename", "from": "b", "to": "model"}}],
            }
        )
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes.*missing required key `to`"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "rename", "from": "model"}}]})


def test_bad_mode_and_keys(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes\.mode.*unknown mode `lst`"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "lst"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes\.from.*does not apply to mode `add`"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "add", "alias": "a", "from": "b"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes.*`alais`.*did you mean `alias`"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "add", "alais": "a"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.prefixes\.alias.*not a valid alias"):
        bs.check({"inputs": [str(a)], "transforms": [{"prefixes": {"mode": "add", "alias": "a b"}}]})


def test_issue15_prefixes_without_mode_lists(write, tmp_path):
    """Issue 15 item 4: `prefixes: {}` and a bare `prefixes` list, as in the 0.2 tool."""
    from helpers import cli

    a = write(_tensors(), "a.safetensors")
    plan = tmp_path / "list.yaml"
    plan.write_text(
        f"inputs:\n  - {a}\ntransforms:\n  - prefixes: {{}}\n  - prefixes\n  - prefixes: {{ mode: add, alias: scratch }}\n  - prefixes: {{}}\n"
    )
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = bs.run(plan.read_text())
    assert report["output"][:2] == ["model  2 tensors (default)"] * 2
    assert [line.split()[0] for line in report["output"][2].splitlines()] == ["model", "scratch"]
    assert "model  2 tensors (default)" in proc.stdout and "scratch  0 tensors" in proc.stdout
