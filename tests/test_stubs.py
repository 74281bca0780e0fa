"""The type stubs are the contract: `mypy.stubtest` checks `_core.pyi` against the built module."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_core_stub_matches_the_extension() -> None:
    pytest.importorskip("mypy", reason="mypy is a dev dependency")
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "brainsurgery._core", "--allowlist", str(ROOT / ".mypy-stubtest-allowlist")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_type_checks_against_the_stubs() -> None:
    pytest.importorskip("mypy", reason="mypy is a dev dependency")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "python/brainsurgery"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
