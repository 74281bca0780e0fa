"""Plain helpers for the CLI, error and output tests (no fixtures; conftest.py owns those).

Everything here is an *independent* reference for the engine: safetensors files are written and
parsed by hand with ``struct`` + ``json``, so a test never trusts brainsurgery to check itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from make_tiny_gpt2 import save_safetensors  # noqa: E402

TEMP_RE = re.compile(r"^\..*\.tmp-")


def write_st(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (in dict order, back to back) as a safetensors file; returns ``path``."""
    path = Path(path)
    save_safetensors(path, tensors, metadata)
    return path


def write_raw_st(path: Path, header_bytes: bytes, data: bytes, header_len: int | None = None) -> Path:
    """A (possibly hostile) safetensors file: length prefix, ``header_bytes`` as given, ``data``."""
    n = len(header_bytes) if header_len is None else header_len
    Path(path).write_bytes(struct.pack("<Q", n) + header_bytes + data)
    return Path(path)


def header_pairs(path: Path) -> list[tuple[str, Any]]:
    """The JSON header of a safetensors file as ordered (key, value) pairs, as they appear."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    order = [k for k, _ in json.loads(raw, object_pairs_hook=list)]
    values = json.loads(raw)
    assert len(order) == len(values), "duplicate keys in the header"
    return [(k, values[k]) for k in order]


def header_dict(path: Path) -> dict[str, Any]:
    """The JSON header (keys in file order)."""
    return dict(header_pairs(path))


def tensor_order(path: Path) -> list[str]:
    """Tensor names in header order (``__metadata__`` left out)."""
    return [k for k, _ in header_pairs(path) if k != "__metadata__"]


def file_metadata(path: Path) -> dict[str, str]:
    return dict(header_dict(path).get("__metadata__", {}))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(root: Path) -> list[str]:
    """Every entry under ``root`` (dot-files included), relative, sorted."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(str((Path(dirpath) / name).relative_to(root)))
    return sorted(out)


def temporaries(root: Path) -> list[str]:
    """Leftover writer temporaries (``.NAME.tmp-*``) anywhere under ``root``."""
    return [p for p in listing(root) if TEMP_RE.match(Path(p).name)]


def dump_plan(path: Path, plan: dict[str, Any]) -> Path:
    """Write a plan file. JSON text is valid YAML, so the ``.yaml`` name is fine either way."""
    Path(path).write_text(json.dumps(plan, indent=2) + "\n")
    return Path(path)


def cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed ``brainsurgery`` console script."""
    return subprocess.run(["brainsurgery", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def pymod(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m brainsurgery``."""
    return subprocess.run(
        [sys.executable, "-m", "brainsurgery", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def assert_one_error(proc: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    """The process failed with ``status`` and printed one ``error: ...`` paragraph that contains
    every needle; returns the message (without the ``error: `` prefix)."""
    assert proc.returncode == status, f"exit {proc.returncode}, expected {status}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    err = proc.stderr
    assert err.startswith("error: "), err
    assert err.endswith("\n"), repr(err)
    body = err.rstrip("\n")
    assert "\n\n" not in body, f"more than one paragraph:\n{err}"
    assert "Traceback" not in err, err
    first_line = body.splitlines()[0]
    assert "error:" not in first_line[len("error: ") :], f"`error:` repeated inside the message: {first_line}"
    for needle in needles:
        assert needle in body, f"{needle!r} not in {err!r}"
    return body[len("error: ") :]
