"""help (src/transforms/help.rs) and `brainsurgery help`: generated from the key tables."""

from __future__ import annotations

import re

import numpy as np
import pytest

import brainsurgery as bs
from helpers import pymod

# Every transform this version registers (SPEC §4 grows this list; help must follow).
KNOWN = {"copy", "move", "delete", "assign", "cast", "cast_", "scale", "scale_", "assert", "exit", "dump", "diff", "help"}
OPERATORS = ["exists", "count", "shape", "dimensions", "dtype", "equal", "iszero", "finite", "reads", "writes", "all", "any", "not"]


@pytest.fixture
def src(write):
    return write({"x": np.ones(2, np.float32)})


def helped(src, *payloads):
    report = bs.check({"inputs": [str(src)], "transforms": [{"help": p} if p is not None else "help" for p in payloads]})
    return report["output"]


def listed(text):
    names = []
    for line in text.splitlines()[1:]:
        if m := re.match(r"^  (\S+)  +\S", line):
            names.append(m.group(1))
    return names


def test_bare_help_lists_every_transform_and_each_has_help(src):
    (text,) = helped(src, None)
    names = listed(text)
    assert KNOWN <= set(names), set(KNOWN) - set(names)
    assert len(names) == len(set(names))
    assert text.splitlines()[-1].endswith(", ".join(OPERATORS))
    # Every listed name is a transform the engine accepts, with its own help.
    outputs = helped(src, *names)
    for name, out in zip(names, outputs):
        assert out.startswith(f"{name}: "), out


def test_scale_keys_and_docs(src):
    out, same = helped(src, "scale_", {"transform": "scale_"})
    assert out == same
    lines = out.splitlines()
    assert lines[0] == "scale_: multiply tensors by a number in place"
    keys = {m.group(1): (m.group(2), m.group(3), m.group(4)) for l in lines[2:] if (m := re.match(r"^  (\S+)\s+(\S+)\s+(required|optional(?: \(default: [^)]*\))?)\s+(.+)$", l))}
    assert set(keys) == {"target", "by"}
    assert keys["target"][:2] == ("reference", "required") and "in place" in keys["target"][2]
    assert keys["by"] == ("number", "required", "the factor")


def test_assert_operator_help(src):
    equal, all_, assert_ = helped(src, {"assert": "equal"}, {"assert": "all"}, "assert")
    assert equal.splitlines()[0] == "assert equal:"
    assert re.search(r"^  eps\s+number\s+optional \(default: 0\)\s+\S", equal, re.M)
    assert re.search(r"^  right\s+template\s+required\s+\S", equal, re.M)
    assert "list of assertions" in all_
    for op in OPERATORS:
        assert re.search(rf"^  {op}: ", assert_, re.M), op


@pytest.mark.parametrize(
    "payload, exc_text",
    [
        ("scael_", "did you mean `scale_`"),
        ({"transform": "dumpp"}, "did you mean `dump`"),
        ({"assert": "eqaul"}, "did you mean `equal`"),
        ({"assert": "equal", "transform": "copy"}, "not both"),
        ({"topic": "copy"}, "unknown key `topic`"),
    ],
)
def test_unknown_names_are_plan_errors(src, payload, exc_text):
    with pytest.raises(bs.PlanError) as info:
        helped(src, payload)
    assert exc_text in str(info.value) and "transforms[0]" in str(info.value)


def test_cli_help_prints_the_transform_help(src, tmp_path):
    (want,) = helped(src, "scale_")
    proc = pymod(["help", "scale_"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == want + "\n", proc.stdout + proc.stderr
    proc = pymod(["help", "assert", "equal"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == helped(src, {"assert": "equal"})[0] + "\n"
    proc = pymod(["help"], cwd=tmp_path)
    assert proc.returncode == 0 and "Usage: brainsurgery" in proc.stdout and helped(src, None)[0] in proc.stdout
    proc = pymod(["help", "check"], cwd=tmp_path)
    assert proc.returncode == 0 and "Usage: brainsurgery check" in proc.stdout
    proc = pymod(["help", "diff"], cwd=tmp_path)
    assert "Usage: brainsurgery diff" in proc.stdout and helped(src, "diff")[0] in proc.stdout
    proc = pymod(["help", "scael_"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "did you mean `scale_`" in proc.stderr


def test_transform_specs_cover_every_transform_and_match_help(src):
    """Issue 8: `_core.transform_specs()` is the key tables as data; the same tables print help."""
    from brainsurgery import _core

    specs = {s["name"]: s for s in _core.transform_specs()}
    overview = helped(src, None)[0]
    listed = {line.split()[0] for line in overview.splitlines()[1:] if line.startswith("  ")}
    assert set(specs) == listed and KNOWN <= set(specs)
    for name, spec in specs.items():
        # Help's key rows, rebuilt from the data: name, type, requirement and doc in columns.
        keys = spec["keys"]
        need = ["required" if k["required"] else "optional" + (f" (default: {k['default']})" if k["default"] else "") for k in keys]
        widths = [max((len(x) for x in column), default=0) for column in ([k["name"] for k in keys], [k["type"] for k in keys], need)]
        rows = [
            f"  {k['name']:<{widths[0]}}  {k['type']:<{widths[1]}}  {n:<{widths[2]}}  {k['doc']}" for k, n in zip(keys, need)
        ]
        text = helped(src, name)[0].splitlines()
        assert text[0] == f"{name}: {spec['doc']}"
        if name == "assert":
            assert spec["operators"] and not keys
        elif keys:
            assert text[1:] == ["keys:", *rows]
        else:
            assert text[1:] == ["takes no keys"]
    scale, scale_ = specs["scale"], specs["scale_"]
    assert (scale["form"], scale["in_place"], scale["twin"]) == ("new", False, "scale_")
    assert (scale_["form"], scale_["in_place"], scale_["twin"]) == ("in_place", True, "scale")
    assert [k["name"] for k in scale["keys"]] == ["from", "to", "by"]
    assert [k["name"] for k in scale_["keys"]] == ["target", "by"]
    assert [k["name"] for k in specs["cast_"]["keys"]] == ["target", "to", "dtype", "only"]
    assert [k["name"] for k in specs["add_"]["keys"]] == ["from", "to"]
    assert specs["multiply"]["twin"] is None and specs["copy"]["form"] == "plain"
    assert {op["name"] for op in specs["assert"]["operators"]} == set(OPERATORS)
