"""Issue 14 item 7: `-i` for scripts. With stdin not a terminal, a failing entry ends the session
with its exit status and nothing written, as a plan would; `--keep-going` reports it and goes on.
`save-plan PATH` writes the session as a plan file that `brainsurgery PATH` runs to the same
output. Key completion (`: ` after a key) is tested at a pseudo-terminal. Expected values are
computed with NumPy here."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from helpers import assert_one_error, sha256, write_st

TENSORS = {
    "a.w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    "b.w": np.arange(4, dtype=np.float32),
}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    write_st(tmp_path / "m.safetensors", TENSORS)
    return tmp_path


def session(ws: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["brainsurgery", "-i", *args], input=script, capture_output=True, text=True, cwd=ws, timeout=60
    )


@pytest.mark.parametrize(
    ("entry", "status", "needle"),
    [
        ("copy: from: nothere, to: q", 1, "nothere"),  # a transform failed: exit 1
        ("copy: from: a.w, too: q", 2, "`too`"),  # a plan error: exit 2
        ("assert: iszero: a.w", 1, "iszero"),  # a failed assertion: exit 1
        ("copy: from: a.w, to: x, oops", 2, "expected ':' after key"),  # a syntax error
    ],
)
def test_a_failing_entry_ends_a_piped_session(ws: Path, entry: str, status: int, needle: str) -> None:
    script = f"scale_: target: a.w, by: 2\n{entry}\ncopy: from: b.w, to: c\n"
    proc = session(ws, script, "-o", "o.safetensors", "m.safetensors")
    assert_one_error(proc, status, needle)
    assert "the state is as it was" not in proc.stderr
    assert "scale_: 1 tensor" in proc.stdout  # the entry before it ran
    assert "copy" not in proc.stdout  # the one after it did not
    assert sorted(p.name for p in ws.iterdir()) == ["m.safetensors"]  # nothing written


def test_keep_going_reports_and_goes_on(ws: Path) -> None:
    script = "scale_: target: a.w, by: 2\ncopy: from: nothere, to: q\ncopy: from: b.w, to: c\n"
    proc = session(ws, script, "--keep-going", "-o", "o.safetensors", "m.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("error: ") == 1 and "the state is as it was before this entry" in proc.stderr
    got = load_file(str(ws / "o.safetensors"))
    np.testing.assert_array_equal(got["a.w"], TENSORS["a.w"] * np.float32(2))
    np.testing.assert_array_equal(got["c"], TENSORS["b.w"])


def test_keep_going_needs_interactive(ws: Path) -> None:
    proc = subprocess.run(["brainsurgery", "--keep-going", "m.safetensors"], capture_output=True, text=True, cwd=ws)
    assert proc.returncode == 2 and "--interactive" in proc.stderr, proc.stderr


def test_save_plan_replays_to_the_same_output(ws: Path) -> None:
    (ws / "plans").mkdir()
    (ws / "plans" / "base.yaml").write_text(
        "inputs: [../m.safetensors]\ntransforms:\n  - scale_: {target: b.w, by: -1}\noutput: {path: ../out, shard: 1MB}\n"
    )
    script = "\n".join(
        [
            "copy: from: a.w, to: y",  # `y`: a string PyYAML would not read as a boolean
            "scale_:",
            "  target: y",
            "  by: 0.25",
            "",
            "cast_: target: a.w, dtype: bfloat16",
            "save-plan session.yaml",
            "save",
        ]
    )
    proc = session(ws, script + "\n", "plans/base.yaml")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote plan {Path('session.yaml')}" in proc.stdout
    first = {p.name: sha256(p) for p in sorted((ws / "out").iterdir())}
    got = load_file(str(ws / "out" / "model.safetensors"))
    np.testing.assert_array_equal(got["b.w"], -TENSORS["b.w"])
    np.testing.assert_array_equal(got["y"], TENSORS["a.w"] * np.float32(0.25))
    plan = yaml.safe_load((ws / "session.yaml").read_text())
    assert [next(iter(t)) if isinstance(t, dict) else t for t in plan["transforms"]] == ["scale_", "copy", "scale_", "cast_"]
    assert Path(plan["output"]["path"]).is_absolute()
    # Replayed from another folder: the same files, byte for byte (the plan hash included).
    (ws / "out").rename(ws / "first")
    elsewhere = ws / "elsewhere"
    elsewhere.mkdir()
    replay = subprocess.run(["brainsurgery", str(ws / "session.yaml")], capture_output=True, text=True, cwd=elsewhere)
    assert replay.returncode == 0, replay.stderr
    assert {p.name: sha256(p) for p in sorted((ws / "out").iterdir())} == first


def test_save_plan_errors(ws: Path) -> None:
    proc = session(ws, "save-plan\n", "m.safetensors")
    assert_one_error(proc, 2, "save-plan needs a file name")
    proc = session(ws, "save-plan nodir/x.yaml\n", "m.safetensors")
    assert_one_error(proc, 2, "nodir/x.yaml")


def _read_until(fd: int, needle: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.skipif(sys.platform != "linux", reason="pseudo-terminal test")
def test_key_completion_inserts_colon_space(ws: Path) -> None:
    """At a terminal, Tab after `copy: fr` completes to `copy: from: `."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: the prompt on the pseudo-terminal
        os.chdir(ws)
        os.environ["BRAINSURGERY_HISTORY"] = str(ws / "history")
        os.environ["TERM"] = "xterm"
        os.execvp("brainsurgery", ["brainsurgery", "-i", "--no-progress", "m.safetensors"])
    try:
        assert b"bs> " in _read_until(fd, b"bs> ")
        os.write(fd, b"copy: fr\t")
        shown = _read_until(fd, b"from: ", timeout=10)
        assert b"copy: from: " in shown, shown
        os.write(fd, b"a.w, t\t")
        shown = _read_until(fd, b"to: ", timeout=10)
        assert b"to: " in shown, shown
        os.write(fd, b"z\r")
        applied = _read_until(fd, b"bs> ", timeout=30)
        assert b"copy: 1 tensor" in applied, applied
        os.write(fd, b"exit\r")
        # Until the process ends (EOF on the terminal), so closing it sends no SIGHUP.
        rest = _read_until(fd, b"\0never\0", timeout=30)
        assert b"no output" in rest, rest
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
