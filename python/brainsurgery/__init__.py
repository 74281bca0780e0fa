"""Declarative, reproducible surgery on neural-network checkpoints.

>>> import brainsurgery as bs
>>> report = bs.run({"inputs": ["model.safetensors"], "transforms": [...], "output": "out/"})  # doctest: +SKIP

The engine is Rust (``brainsurgery._core``); this package re-exports it and adds the NumPy view of
opened checkpoints, ``save`` for arrays and ``to_torch``.
"""

from typing import TYPE_CHECKING, Any

from brainsurgery._checkpoint import Checkpoint, open
from brainsurgery._core import (
    AssertionFailed,
    BrainSurgeryError,
    FormatError,
    PlanError,
    TransformError,
    __version__,
)
from brainsurgery._interop import save, to_torch
from brainsurgery._run import RunResult, check, run
from brainsurgery._session import Session, Tensors

if TYPE_CHECKING:
    from brainsurgery._array import Array


def __getattr__(name: str) -> Any:
    # `Array` subclasses np.ndarray: importing it loads NumPy, which `import brainsurgery` does
    # not (the command line never needs it).
    if name == "Array":
        from brainsurgery._array import Array

        return Array
    raise AttributeError(f"module 'brainsurgery' has no attribute {name!r}")


__all__ = [
    "Array",
    "AssertionFailed",
    "BrainSurgeryError",
    "Checkpoint",
    "FormatError",
    "PlanError",
    "RunResult",
    "Session",
    "Tensors",
    "TransformError",
    "__version__",
    "check",
    "open",
    "run",
    "save",
    "to_torch",
]
