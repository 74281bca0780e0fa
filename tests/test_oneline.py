"""The one-line form (SPEC §10) through the command line: ``-e`` one-shot transforms equal their
YAML plans, syntax errors show the column, and a piped ``-i`` session keeps the state from before
a failing block (issue 3, items 4 and 5). Expected values are computed with NumPy here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import assert_one_error, dump_plan, pymod, write_st

TENSORS = {
    "h.0.w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "h.1.w": np.linspace(-1, 1, 3, dtype=np.float32),
    "ids": np.arange(4, dtype=np.int64),
}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    write_st(tmp_path / "m.safetensors", TENSORS)
    return tmp_path


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def session(ws: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A ``-i`` session with ``script`` piped to stdin (no terminal: no prompt, no completion)."""
    return subprocess.run(
        [sys.executable, "-m", "brainsurgery", "-i", *args],
        input=script,
        capture_output=True,
        text=True,
        cwd=ws,
        timeout=60,
    )


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


LINES_AND_YAML = [
    (
        ["scale_: target: h\\.0\\.w, by: 0.5", "copy: from: h.1.w, to: h.1.copy"],
        [{"scale_": {"target": "h\\.0\\.w", "by": 0.5}}, {"copy": {"from": "h.1.w", "to": "h.1.copy"}}],
    ),
    (
        ["move: from: 'h\\.(\\d+)\\.w', to: layers.\\1.w", "delete: target: ids"],
        [{"move": {"from": "h\\.(\\d+)\\.w", "to": "layers.\\1.w"}}, {"delete": {"target": "ids"}}],
    ),
    (
        ["assign: {from: h.1.w, to: 'h.0.w::[1]'}", "assert: equal: {left: h.1.w, right: h.0.w::[1], eps: 1e-6}"],
        [
            {"assign": {"from": "h.1.w", "to": "h.0.w::[1]"}},
            {"assert": {"equal": {"left": "h.1.w", "right": "h.0.w::[1]", "eps": 1e-6}}},
        ],
    ),
    (
        [
            "cast: from: ids, to: ids32, dtype: int32",
            "assert: all: [{exists: ids32}, count: {of: 'h.*', is: 2}]",
            "exit",
        ],
        [
            {"cast": {"from": "ids", "to": "ids32", "dtype": "int32"}},
            {"assert": {"all": [{"exists": "ids32"}, {"count": {"of": "h.*", "is": 2}}]}},
            "exit",
        ],
    ),
]


@pytest.mark.parametrize(("lines", "transforms"), LINES_AND_YAML)
def test_execute_equals_yaml_plan(ws: Path, lines: list[str], transforms: list) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["m.safetensors"], "transforms": transforms, "output": "yaml.safetensors"})
    ok(pymod(["p.yaml"], cwd=ws))
    args = [a for line in lines for a in ("-e", line)]
    ok(pymod([*args, "-o", "line.safetensors", "m.safetensors"], cwd=ws))
    same(load_file(str(ws / "line.safetensors")), load_file(str(ws / "yaml.safetensors")))


def test_execute_values_against_numpy(ws: Path) -> None:
    ok(pymod(["-e", "scale_: target: h.*, by: 0.5", "--output", "o.safetensors", "-I", "m.safetensors"], cwd=ws))
    got = load_file(str(ws / "o.safetensors"))
    np.testing.assert_array_equal(got["h.0.w"], TENSORS["h.0.w"] * np.float32(0.5))
    np.testing.assert_array_equal(got["h.1.w"], TENSORS["h.1.w"] * np.float32(0.5))
    np.testing.assert_array_equal(got["ids"], TENSORS["ids"])


def test_execute_appends_after_plan_transforms(ws: Path) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["m.safetensors"], "transforms": [{"copy": {"from": "h.1.w", "to": "c"}}]})
    ok(pymod(["p.yaml", "-e", "scale_: target: c, by: 3", "-o", "o.safetensors"], cwd=ws))
    got = load_file(str(ws / "o.safetensors"))
    np.testing.assert_array_equal(got["c"], TENSORS["h.1.w"] * np.float32(3))


def test_execute_with_alias_inputs(ws: Path) -> None:
    write_st(ws / "b.safetensors", {"h.0.w": np.zeros((2, 3), np.float32)})
    line = "assign: from: a::h.0.w, to: b::h.0.w"
    proc = pymod(["-e", line, "-o", "o.safetensors", "a::m.safetensors", "b::b.safetensors", "output.alias=b"], cwd=ws)
    ok(proc)
    np.testing.assert_array_equal(load_file(str(ws / "o.safetensors"))["h.0.w"], TENSORS["h.0.w"])


@pytest.mark.parametrize(
    ("line", "column", "message"),
    [
        ("copy: from: h.0.w, to", 22, "expected ':' after key"),
        ("copy: from: 'h.0.w, to: x", 13, "unterminated quoted string"),
        ("copy: from: [h.0.w, to: x", 13, "`[` is never closed"),
        ("copy: {from: a, to: b}, move: {from: b, to: c}", 25, "one transform per line"),
    ],
)
def test_execute_syntax_error_shows_column(ws: Path, line: str, column: int, message: str) -> None:
    proc = pymod(["-e", "delete: target: ids", "-e", line, "-o", "o.safetensors", "m.safetensors"], cwd=ws)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert err.startswith(f"error: -e #2: 1:{column}: {message}"), err
    shown, caret = err.splitlines()[1:3]
    assert shown == f"  {line}"
    assert caret == " " * (column + 1) + "^"
    assert not (ws / "o.safetensors").exists()


def test_execute_payload_error_names_transform(ws: Path) -> None:
    proc = pymod(["-e", "scale_: target: h.0.w, byy: 2", "m.safetensors"], cwd=ws)
    assert_one_error(proc, 2, "transforms[0].scale_", "`byy`", "did you mean `by`")


def test_nothing_to_run(ws: Path) -> None:
    proc = pymod(["--threads", "1"], cwd=ws)
    assert_one_error(proc, 2, "nothing to run")


def test_session_keeps_state_before_failing_block(ws: Path) -> None:
    script = "\n".join(
        [
            "scale_: target: h.0.w, by: 2",  # ok
            "copy: from: nothere, to: q",  # fails: no match
            "- copy: {from: h.1.w, to: z}",  # a block whose second transform fails …
            "- assert: {iszero: h.1.w}",
            "",
            "scale_:",  # a YAML block
            "  target: h.1.w",
            "  by: 3",
            "",
            "copy: from: h.1.w, to: y2, oops",  # syntax error
            "copy: from: h.1.w, to: c",
            "save",
            "scale_: target: c, by: 100",  # after save: never read
        ]
    )
    # `--keep-going`: piped input otherwise ends at the first failing entry (issue 14 item 7).
    proc = session(ws, script + "\n", "--keep-going", "-o", "o.safetensors", "m.safetensors")
    ok(proc)
    err = proc.stderr
    assert err.count("error: ") == 3, err
    assert "transforms[1] (copy)" in err and "nothere" in err
    assert "transforms[2] (assert)" in err and "iszero" in err
    assert "<prompt>: 1:32: expected ':' after key" in err
    assert err.count("(the state is as it was before this entry)") == 3
    got = load_file(str(ws / "o.safetensors"))
    assert sorted(got) == ["c", "h.0.w", "h.1.w", "ids"]  # no `z` from the failed block
    np.testing.assert_array_equal(got["h.0.w"], TENSORS["h.0.w"] * np.float32(2))
    np.testing.assert_array_equal(got["h.1.w"], TENSORS["h.1.w"] * np.float32(3))
    np.testing.assert_array_equal(got["c"], TENSORS["h.1.w"] * np.float32(3))
    assert "scale_: 1 tensor" in proc.stdout


def test_session_after_plan_and_end_of_input(ws: Path) -> None:
    dump_plan(
        ws / "p.yaml",
        {"inputs": ["m.safetensors"], "transforms": [{"delete": {"target": "ids"}}], "output": "o.safetensors"},
    )
    # The plan's transform ran before the prompt: `ids` is gone, so this entry fails.
    proc = session(ws, "copy: from: ids, to: x\ncopy: from: h.1.w, to: x\n", "--keep-going", "p.yaml")
    ok(proc)
    assert proc.stderr.count("error: ") == 1 and "transforms[1]" in proc.stderr, proc.stderr
    got = load_file(str(ws / "o.safetensors"))
    assert sorted(got) == ["h.0.w", "h.1.w", "x"]
    np.testing.assert_array_equal(got["x"], TENSORS["h.1.w"])


def test_session_without_output_writes_nothing(ws: Path) -> None:
    proc = session(ws, "scale_: target: h.0.w, by: 2\nexit\n", "m.safetensors")
    ok(proc)
    assert "no output" in proc.stdout
    assert sorted(p.name for p in ws.iterdir()) == ["m.safetensors"]


LETTERS = {name: np.full(2, i, np.float32) for i, name in enumerate(["y", "n", "Y", "N", "x"])}


@pytest.mark.parametrize("name", list(LETTERS))
def test_issue15_one_letter_names_are_strings(tmp_path: Path, name: str) -> None:
    """Issue 15 item 6: plans are read as PyYAML reads them, where only true/false/yes/no/on/off
    are booleans: `copy: {from: y, to: y_copy}` names the tensor `y`, in a plan file and in the
    one-line form alike."""
    write_st(tmp_path / "m.safetensors", LETTERS)
    (tmp_path / "p.yaml").write_text(
        "inputs:\n  - m.safetensors\n"
        f"output: {{ path: yaml.safetensors, sidecars: yes }}\n"
        f"transforms:\n  - copy: {{ from: {name}, to: {name}_copy }}\n"
    )
    ok(pymod(["p.yaml"], cwd=tmp_path))
    ok(pymod(["-e", f"copy: from: {name}, to: {name}_copy", "-o", "line.safetensors", "m.safetensors"], cwd=tmp_path))
    for out in ["yaml.safetensors", "line.safetensors"]:
        got = load_file(str(tmp_path / out))
        assert set(got) == {*LETTERS, f"{name}_copy"}
        np.testing.assert_array_equal(got[f"{name}_copy"], LETTERS[name])


def test_issue15_pyyaml_booleans_still_booleans(ws: Path) -> None:
    """`yes`/`off` (PyYAML booleans) still read as booleans; a boolean where a tensor name is
    expected is still refused, naming the key."""
    (ws / "p.yaml").write_text(
        "inputs: [m.safetensors]\noutput: { path: o.safetensors, sidecars: off }\n"
        "transforms:\n  - delete: { target: ids, missing_ok: yes }\n  - delete: { target: nothing, missing_ok: On }\n"
    )
    ok(pymod(["p.yaml"], cwd=ws))
    assert set(load_file(str(ws / "o.safetensors"))) == {"h.0.w", "h.1.w"}
    proc = pymod(["-e", "copy: from: yes, to: z", "m.safetensors"], cwd=ws)
    assert_one_error(proc, 2, "transforms[0].copy.from")
