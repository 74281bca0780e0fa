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
    from_mergekit,
)
from brainsurgery._interop import save, to_torch
from brainsurgery._run import RunResult, check, run
from brainsurgery._session import Session, Tensors

if TYPE_CHECKING:
    from brainsurgery._array import Array
    from brainsurgery._plan import Assertion, Plan

# Names imported on first use, to keep `import brainsurgery` light (the command line needs none).
_LAZY = ("Array", "Assertion", "Plan")

__all__ = [
    "Array",
    "Assertion",
    "AssertionFailed",
    "BrainSurgeryError",
    "Checkpoint",
    "FormatError",
    "Plan",
    "PlanError",
    "RunResult",
    "Session",
    "Tensors",
    "TransformError",
    "__version__",
    "check",
    "from_mergekit",
    "open",
    "run",
    "save",
    "to_torch",
]


def __getattr__(name: str) -> Any:
    # `Array` subclasses np.ndarray: importing it loads NumPy. The plan builder's methods are
    # generated from the engine's specs when it is first used (and it imports `inspect`).
    if name == "Array":
        from brainsurgery._array import Array

        return Array
    if name in ("Assertion", "Plan"):
        from brainsurgery import _plan

        return getattr(_plan, name)
    raise AttributeError(f"module 'brainsurgery' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Completion (`bs.Pl<Tab>`) lists the lazily imported names too.
    return sorted({*globals(), *_LAZY})
