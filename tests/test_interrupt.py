"""Ctrl-C during a run: the engine stops at its next chunk, exits 130 with one message, and
leaves no output and no temporary behind (SPEC §6.2)."""

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from make_tiny_gpt2 import save_safetensors  # noqa: E402


def _run_when_loaded(tmp_path: Path, plan_text: str, settle: float, **popen: Any) -> subprocess.Popen[str]:
    """Starts `brainsurgery plan.yaml --threads 1` in `tmp_path` and returns once the extension is
    loaded (Python's own SIGINT handler is installed by then: on a loaded machine interpreter
    start-up alone can take over a second) and `settle` more seconds have passed."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text)
    proc = subprocess.Popen(
        ["brainsurgery", str(plan), "--threads", "1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    deadline = time.monotonic() + 30
    while "_core" not in Path(f"/proc/{proc.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle)
    return proc


def test_sigint_cancels_cleanly(tmp_path: Path) -> None:
    # 32 MiB tensor; 300 equal-assertions over it keep the engine busy for seconds, single-threaded.
    save_safetensors(tmp_path / "in.safetensors", {"w": np.zeros(8 << 20, np.float32)})
    checks = "".join("  - assert: {equal: {left: w, right: w}}\n" for _ in range(300))
    proc = _run_when_loaded(tmp_path, f"inputs: [in.safetensors]\ntransforms:\n{checks}output: out\n", 0.5)
    assert proc.poll() is None, "the plan finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip() == "error: interrupted; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "plan.yaml"]


def test_every_ctrl_c_cancels_its_entry_in_a_session(tmp_path: Path) -> None:
    # `-i` goes on after a cancelled entry; the next Ctrl-C must cancel the next entry too.
    save_safetensors(tmp_path / "in.safetensors", {"w": np.zeros(8 << 20, np.float32)})
    block = "".join("- assert: {equal: {left: w, right: w}}\n" for _ in range(300)) + "\n"
    proc = subprocess.Popen(
        [sys.executable, "-m", "brainsurgery", "-i", "--threads", "1", "in.safetensors"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    deadline = time.monotonic() + 30
    while "_core" not in Path(f"/proc/{proc.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    for _ in range(2):
        proc.stdin.write(block)
        proc.stdin.flush()
        time.sleep(0.5)  # the entry is running: 300 passes over 32 MiB take seconds
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    proc.stdin.write("exit\n")
    _, err = proc.communicate(timeout=60)
    assert err.count("interrupted") == 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def _busy_write(tmp_path: Path) -> subprocess.Popen[str]:
    """A run whose write takes seconds: 400 MB of normal noise generated on one thread."""
    save_safetensors(tmp_path / "in.safetensors", {"w": np.zeros(4, np.float32)})
    plan = "inputs: [in.safetensors]\ntransforms:\n  - rand: {target: r, shape: [100000000], distribution: normal}\noutput: out\n"
    proc = _run_when_loaded(tmp_path, plan, 1.0)
    assert proc.poll() is None, "the plan finished before it could be stopped"
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_cancel_like_ctrl_c(tmp_path: Path, signum: int) -> None:
    proc = _busy_write(tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert err.strip() == "error: interrupted; nothing was written"
    # Hidden temporaries included: nothing but the inputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "plan.yaml"]


def test_kill_9_during_a_write_leaves_nothing(tmp_path: Path) -> None:
    proc = _busy_write(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The output directory the run created may stay (empty); no file, hidden or not, is left.
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["in.safetensors", "plan.yaml"]


def test_a_run_started_with_sighup_ignored_keeps_ignoring_it(tmp_path: Path) -> None:
    """`nohup brainsurgery ...`: closing the terminal does not cancel the run."""
    save_safetensors(tmp_path / "in.safetensors", {"w": np.zeros(4, np.float32)})
    plan = "inputs: [in.safetensors]\ntransforms:\n  - rand: {target: r, shape: [30000000], distribution: normal}\noutput: out\n"
    proc = _run_when_loaded(tmp_path, plan, 0.0, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists()
