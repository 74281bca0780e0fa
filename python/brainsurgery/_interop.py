"""Arrays to and from other libraries: ``save`` (arrays or torch tensors to any output format) and
``to_torch`` (arrays to torch tensors through DLPack). Neither imports torch unless asked to."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from brainsurgery import _core


def save(
    tensors: Mapping[str, Any] | Sequence[tuple[str, Any]],
    path: str | os.PathLike[str],
    *,
    format: str | None = None,  # noqa: A002 - the plan's `output.format` key
    shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    threads: int = 0,
    quiet: bool = False,
) -> _core.Report:
    """Write arrays to a checkpoint: what a plan's ``output:`` writes, for tensors you hold.

    ``tensors`` maps names to arrays (in order) — NumPy arrays of any brainsurgery dtype
    (bfloat16 and float8 from ml_dtypes included), torch or JAX CPU tensors (through DLPack: no
    torch import, no copy), anything with the array interface — or is a list of
    ``(name, array)`` pairs; an opened checkpoint works too. ``path``, ``format`` (``safetensors``,
    ``torch``, ``npz``, ``npy``; by default from the extension, safetensors for a directory),
    ``shard_size`` (a directory's shard budget: bytes or ``"5GB"``, ``"none"`` for one file;
    5GB by default) and ``overwrite`` mean what the same keys of a plan's ``output`` mean. The
    write streams the arrays' own memory (contiguous little-endian arrays are never copied;
    others are copied once, see docs/python.md), is atomic (nothing is left behind on an error or
    Ctrl-C) and gives the same bytes as a plan run writing the same tensors and metadata.
    ``metadata`` is added to the file's ``__metadata__`` (with ``format: pt`` and
    ``brainsurgery.version``). Returns the report, as ``run`` does.

    >>> bs.save({"w": np.ones((2, 2), np.float32)}, "out.safetensors")  # doctest: +SKIP
    """
    output: dict[str, Any] = {"path": os.fspath(path)}
    if format is not None:
        output["format"] = format
    if shard_size is not None:
        output["shard"] = shard_size
    if overwrite:
        output["overwrite"] = True
    report = _core.save(tensors, output, metadata=dict(metadata) if metadata is not None else None, threads=threads)
    if not quiet:
        for notice in report["notices"]:
            print(f"notice: {notice}", file=sys.stderr)
    return report


def _torch() -> Any:
    try:
        # By name: torch is optional, with or without type information installed.
        torch = importlib.import_module("torch")
    except ImportError as e:
        raise ImportError("brainsurgery.to_torch needs PyTorch, which is not installed: pip install torch") from e
    return torch


def _one_to_torch(torch: Any, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    import numpy as np

    from brainsurgery._array import Array

    if isinstance(value, np.ndarray):
        # Our DLPack export handles every dtype (NumPy's refuses bf16 and float8).
        return torch.from_dlpack(value if isinstance(value, Array) else value.view(Array))
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    raise TypeError(f"to_torch takes NumPy arrays or a mapping of them, not {type(value).__name__}")


def to_torch(x: Any) -> Any:
    """A torch tensor viewing an array's memory, through DLPack, without a copy: every dtype,
    bfloat16 and float8 included. A mapping (a checkpoint, a dict of arrays) gives a dict of
    name → tensor, each one a view (a lazy mapping is read one view at a time; nothing is
    copied). Imports torch only when called; ``ImportError`` when torch is missing.

    Views of a checkpoint are copy-on-write: writing into the tensor (an optimizer step after
    ``load_state_dict(..., assign=True)``) changes private pages, never the file.

    >>> model.load_state_dict(bs.to_torch(bs.open("model.safetensors")), assign=True)  # doctest: +SKIP
    """
    torch = _torch()
    if isinstance(x, Mapping):
        return {name: _one_to_torch(torch, x[name]) for name in x}
    return _one_to_torch(torch, x)
