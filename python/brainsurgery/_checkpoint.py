"""Lazy, zero-copy NumPy views of checkpoint tensors."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from brainsurgery import _core

if TYPE_CHECKING:
    import numpy as np

# NumPy and ml_dtypes are imported on first use: the command line never needs them, and they
# would double its start-up time.

# Every dtype's facts come from the engine's one table (`_core.dtypes()`).
_DTYPES = {info["name"]: info for info in _core.dtypes()}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a brainsurgery dtype name (``bfloat16`` via ml_dtypes)."""
    import numpy as np

    info = _DTYPES[name]
    if info["size"] is None:
        # Packed sub-byte formats have no NumPy layout (ml_dtypes stores one element per byte).
        raise _core.FormatError(f"{name} tensors are packed below one byte per element and have no NumPy view")
    if info["ml_dtypes"]:
        # Dtypes NumPy lacks come from ml_dtypes, by attribute name.
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name).newbyteorder("<")


class Checkpoint(Mapping[str, "np.ndarray"]):
    """A checkpoint opened lazily: a read-only mapping from tensor names to NumPy arrays.

    Only headers are read when it is opened. Indexing returns a read-only array that views the
    memory-mapped file directly (no copy), with the saved strides for a non-contiguous PyTorch
    tensor; the array keeps the mapping alive after the checkpoint object is gone.
    """

    def __init__(self, core: _core.Checkpoint) -> None:
        self._core = core

    def __getitem__(self, name: str) -> np.ndarray:
        import numpy as np

        dtype, shape = self._core.info(name)
        strides = self._core.strides(name)
        if strides is not None:
            # A non-contiguous PyTorch view: the same strided view over the mapped storage.
            view = memoryview(self._core.buffer(name))
            return np.ndarray(tuple(shape), dtype=numpy_dtype(dtype), buffer=view, strides=strides)
        array = np.frombuffer(memoryview(self._core.buffer(name)), dtype=numpy_dtype(dtype))
        return array.reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._core.keys())

    def __len__(self) -> int:
        return len(self._core)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._core

    def info(self, name: str) -> tuple[str, list[int]]:
        """``(dtype name, shape)`` of a tensor, from the header alone."""
        return self._core.info(name)

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the (first) file."""
        return self._core.metadata

    @property
    def path(self) -> str:
        """The path that was opened."""
        return self._core.path

    @property
    def format(self) -> str:
        """The format of the weight files read: ``safetensors``, ``PyTorch`` or ``NumPy``."""
        return self._core.format

    @property
    def notices(self) -> list[str]:
        """How a directory was read, when it matters: weights of another format or training
        state (``optimizer.pt``, ...) left out. Empty for a file."""
        return self._core.notices

    def __repr__(self) -> str:
        return f"<brainsurgery.Checkpoint {self.path!r}: {len(self)} tensors>"


def open(path: str | os.PathLike[str]) -> Checkpoint:  # noqa: A001 - mirrors the SPEC's bs.open
    """Open a checkpoint lazily; see :class:`Checkpoint`.

    ``path`` is a ``.safetensors``, ``.bin``/``.pt``/``.pth`` or ``.npy``/``.npz`` file, or a
    directory of them (docs/semantics.md says which files of a directory are read).
    """
    return Checkpoint(_core.open(os.fspath(path)))
