"""Shared fixtures: writing safetensors inputs with NumPy alone and reading outputs independently.

Inputs are written by ``examples/make_tiny_gpt2.save_safetensors`` (hand-made layout, NumPy only);
outputs are read back with the official ``safetensors.numpy.load_file`` (an implementation that is
not ours), except bfloat16 outputs, which it cannot hold: those are read with ``brainsurgery.open``
*and* checked byte for byte against a header parsed here with ``json`` + ``struct``.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from make_tiny_gpt2 import save_safetensors, tiny_gpt2  # noqa: E402

import brainsurgery as bs  # noqa: E402

__all__ = ["save_safetensors", "tiny_gpt2"]


def read_header(path: Path) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the offset where its data begins."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def raw_bytes(path: Path, name: str) -> tuple[str, list[int], bytes]:
    """``(safetensors dtype, shape, data bytes)`` of one tensor, read by hand."""
    header, start = read_header(path)
    entry = header[name]
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + begin)
        data = f.read(end - begin)
    return entry["dtype"], entry["shape"], data


def tensor_names(path: Path) -> list[str]:
    """Tensor names in file (data-offset) order."""
    header, _ = read_header(path)
    entries = [(v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__"]
    return [k for _, k in sorted(entries)]


def read(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors output file.

    Uses the official reader; for files holding bfloat16/float8 (which it cannot represent in NumPy)
    falls back to ``brainsurgery.open`` after checking every tensor's bytes against the raw file.
    """
    header, _ = read_header(path)
    special = {"BF16", "F8_E4M3", "F8_E5M2"}
    if not any(v["dtype"] in special for k, v in header.items() if k != "__metadata__"):
        from safetensors.numpy import load_file

        return load_file(str(path))
    ck = bs.open(path)
    out: dict[str, np.ndarray] = {}
    for name in header:
        if name == "__metadata__":
            continue
        array = np.array(ck[name])  # copy out of the mapping
        dtype, shape, data = raw_bytes(path, name)
        assert list(array.shape) == shape
        assert array.tobytes() == data, f"brainsurgery.open disagrees with the file bytes of {name}"
        out[name] = array
    return out


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """``write(tensors, name="in.safetensors", metadata=None)`` → absolute path of a new file."""

    def _write(tensors: dict[str, np.ndarray], name: str = "in.safetensors", metadata: dict[str, str] | None = None) -> Path:
        path = (tmp_path / name).resolve()
        save_safetensors(path, tensors, metadata)
        return path

    return _write


@pytest.fixture
def gpt2_tensors() -> dict[str, np.ndarray]:
    """The tiny GPT-2 tensors (2 layers, width 16) as NumPy arrays."""
    return tiny_gpt2(layers=2, width=16, vocab=32, positions=8)


@pytest.fixture
def gpt2(tmp_path: Path, gpt2_tensors: dict[str, np.ndarray]) -> Path:
    """A tiny GPT-2 checkpoint directory (model.safetensors + config.json) in a tmp dir."""
    out = (tmp_path / "tiny-gpt2").resolve()
    save_safetensors(out / "model.safetensors", gpt2_tensors, {"format": "pt"})
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 16}))
    return out
