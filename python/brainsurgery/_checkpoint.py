"""Lazy, zero-copy NumPy views of checkpoint tensors."""

from __future__ import annotations

import os
import sys
import html
import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

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


def _max_dims(np_version: str) -> int:
    """NumPy's limit on an array's dimensions (``NPY_MAXDIMS``): 64 since NumPy 2.0, 32 before."""
    return 64 if int(np_version.split(".")[0]) >= 2 else 32


def _no_view(shape: list[int], itemsize: int, np_version: str) -> str | None:
    """Why NumPy can make no array of this shape, or None. NumPy refuses more dimensions than
    ``NPY_MAXDIMS`` and a size whose bytes, counting every dimension but zeros (it multiplies them
    before it looks for a zero), exceed ``sys.maxsize``; a valid header can have either."""
    limit = _max_dims(np_version)
    if len(shape) > limit:
        return f"it has {len(shape)} dimensions and NumPy arrays have at most {limit}"
    nbytes = itemsize
    for dim in shape:
        nbytes *= dim or 1
    if nbytes > sys.maxsize:
        return (
            f"its shape {shape} times {itemsize}-byte elements is {nbytes} bytes (zero dimensions left out, "
            f"as NumPy counts), more than NumPy can address ({sys.maxsize})"
        )
    return None


def _no_view_error(message: str, name: str, path: str | None) -> _core.FormatError:
    error = _core.FormatError(message)
    error.tensor = name
    error.path = path
    return error


def make_array(
    buffer: Any, dtype: str, shape: list[int], strides: list[int] | None, name: str, path: str | None = None
) -> np.ndarray:
    """A read-only :class:`brainsurgery.Array` (a NumPy array that exports DLPack for every dtype)
    over a tensor's bytes (an engine buffer: a mapped file's or a computed tensor's), without a copy; ``FormatError`` naming the tensor when NumPy cannot
    represent it."""
    import numpy as np

    np_dtype = numpy_dtype(dtype)
    why = _no_view(shape, np_dtype.itemsize, np.__version__)
    if why is not None:
        raise _no_view_error(f"no NumPy view of tensor {name!r} ({dtype} {shape}): {why}", name, path)
    from brainsurgery._array import Array

    try:
        if strides is not None:
            # A non-contiguous PyTorch view: the same strided view over the mapped storage.
            return Array(tuple(shape), dtype=np_dtype, buffer=memoryview(buffer), strides=strides)
        # `Array` adds DLPack export for every dtype (bf16 and float8 to torch, no copy).
        return np.frombuffer(memoryview(buffer), dtype=np_dtype).reshape(shape).view(Array)
    except (ValueError, OverflowError) as e:
        # Anything else NumPy refuses about a header the engine accepted.
        message = f"no NumPy view of tensor {name!r} ({dtype} {shape}): NumPy refused it: {e}"
        raise _no_view_error(message, name, path) from e


class CoreKeys:
    """Iteration, length and membership of a mapping whose keys the engine object ``_core``
    holds (a checkpoint, a session, a run's tensors)."""

    _core: Any

    def __iter__(self) -> Iterator[str]:
        return iter(self._core.keys())

    def __len__(self) -> int:
        return len(self._core)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._core


class Checkpoint(CoreKeys, Mapping[str, "np.ndarray"]):
    """A checkpoint opened lazily: a read-only mapping from tensor names to NumPy arrays.

    Only headers are read when it is opened. Indexing returns a read-only :class:`brainsurgery.Array`
    (a NumPy array) that views the memory-mapped file directly (no copy), with the saved strides
    for a non-contiguous PyTorch tensor; the array keeps the mapping alive after the checkpoint
    object is gone, and ``torch.from_dlpack`` views it without a copy for every dtype.
    """

    def __init__(self, core: _core.Checkpoint, source: str | None = None) -> None:
        self._core = core
        # The absolute path opened, so a notebook repr after os.chdir still finds the file.
        self._source = source if source is not None else core.path

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape = self._core.info(name)
        strides = self._core.strides(name)
        return make_array(self._core.buffer(name), dtype, shape, strides, name, self.path)

    def get(self, name: str, default: Any = None) -> Any:
        # Membership first: a miss through __getitem__ would compute close-match suggestions.
        return self[name] if name in self else default

    def info(self, name: str | None = None, *, pattern: str | list[str] | None = None) -> Any:
        r"""From the headers alone: with a name, ``(dtype name, shape)`` of that tensor; without,
        one row per tensor (``name``, ``dtype``, ``shape``, ``nbytes``, ``file``) in file order,
        as a pandas DataFrame when pandas is installed, else a list of dicts. ``pattern`` keeps
        the tensors it matches, as ``brainsurgery inspect PATH PATTERN``: a regex matched against
        the whole name (``r"model\.layers\.\d+\.mlp\..*"``) or a structured pattern's tokens
        (``["model", "layers", "$i", "*rest"]``)."""
        if name is not None:
            if pattern is not None:
                raise TypeError("info() takes a name or a pattern, not both")
            return self._core.info(name)
        rows = [
            {"name": n, "dtype": d, "shape": tuple(shape), "nbytes": nbytes, "file": file}
            for n, d, shape, nbytes, file in self._core.table(pattern)
        ]
        try:
            # By name: pandas is an optional extra, with or without its type stubs installed.
            pandas = importlib.import_module("pandas")
        except ImportError:
            return rows
        return pandas.DataFrame(rows, columns=["name", "dtype", "shape", "nbytes", "file"])

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header."""
        return tuple(self._core.info(name)[1])

    def dtype(self, name: str) -> str:
        """A tensor's dtype name (``bfloat16``, ``float32``, ...), from the header."""
        return self._core.info(name)[0]

    def get_slice(self, name: str) -> TensorSlice:
        """A handle that reads only the part of a tensor it is indexed with, as safetensors'
        ``get_slice``: ``ck.get_slice("embed.weight")[1000:1010]`` touches those rows' pages of
        the mapped file and returns them as an owned array."""
        return TensorSlice(self, name)

    _SUMMARY_LINES = 200

    def _summary(self) -> str:
        # The engine's `dump compact` of the headers: layer runs folded (`h.[0-11].attn...`).
        # A repr must not raise: a file moved or deleted since it was opened gives the short repr.
        try:
            plan = {"inputs": [f"checkpoint::{self._source}"], "transforms": [{"dump": {"format": "compact"}}]}
            lines = "\n".join(_core.check(plan)["output"]).splitlines()
        except _core.BrainSurgeryError:
            return repr(self)
        if len(lines) > self._SUMMARY_LINES:
            more = len(lines) - self._SUMMARY_LINES
            lines = [*lines[: self._SUMMARY_LINES], f"  … {more} more lines (ck.info() lists every tensor)"]
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self) if cycle else self._summary())

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(self._summary())}</pre>"

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
        """The format of the weight files read: ``safetensors``, ``PyTorch``, ``NumPy`` or ``DCP``."""
        return self._core.format

    @property
    def notices(self) -> list[str]:
        """How a directory was read, when it matters: weights of another format or training
        state (``optimizer.pt``, ...) left out. Empty for a file."""
        return self._core.notices

    def __repr__(self) -> str:
        return f"<brainsurgery.Checkpoint {self.path!r}: {len(self)} tensors>"


class TensorSlice:
    """One tensor of an open checkpoint, read only where indexed (see ``Checkpoint.get_slice``)."""

    def __init__(self, checkpoint: Checkpoint, name: str) -> None:
        self._checkpoint = checkpoint
        self._name = name
        # Fails now, with close matches, for a name the checkpoint lacks.
        self._dtype, self._shape = checkpoint.info(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._shape)

    @property
    def dtype(self) -> str:
        return self._dtype

    def get_shape(self) -> list[int]:
        """The shape, as safetensors' slice handle gives it."""
        return list(self._shape)

    def get_dtype(self) -> str:
        """The dtype name."""
        return self._dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        import numpy as np

        # Indexing the mapped view selects without reading; the copy reads only what it selects.
        return np.array(self._checkpoint[self._name][key], copy=True)

    def __repr__(self) -> str:
        return f"<brainsurgery.TensorSlice {self._name!r} {self._dtype} {tuple(self._shape)}>"


def open(path: str | os.PathLike[str]) -> Checkpoint:  # noqa: A001 - mirrors the SPEC's bs.open
    """Open a checkpoint lazily; see :class:`Checkpoint`.

    ``path`` is a ``.safetensors``, ``.bin``/``.pt``/``.pth`` or ``.npy``/``.npz`` file, or a
    directory of them (docs/semantics.md says which files of a directory are read).
    """
    return Checkpoint(_core.open(os.fspath(path)), os.path.abspath(os.fspath(path)))
