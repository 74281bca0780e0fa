"""Declarative, reproducible surgery on neural-network checkpoints.

>>> import brainsurgery as bs
>>> report = bs.run({"inputs": ["model.safetensors"], "transforms": [...], "output": "out/"})  # doctest: +SKIP

The engine is Rust (``brainsurgery._core``); this package re-exports it and adds the NumPy view of
opened checkpoints.
"""

from typing import TYPE_CHECKING

from brainsurgery._checkpoint import Checkpoint, open
from brainsurgery._core import (
    AssertionFailed,
    BrainSurgeryError,
    FormatError,
    PlanError,
    TransformError,
    __version__,
)
from brainsurgery._run import check, run

if TYPE_CHECKING:
    from brainsurgery._plan import Assertion, Plan

__all__ = [
    "Assertion",
    "AssertionFailed",
    "BrainSurgeryError",
    "Checkpoint",
    "FormatError",
    "Plan",
    "PlanError",
    "TransformError",
    "__version__",
    "check",
    "open",
    "run",
]


def __getattr__(name: str) -> object:
    # The plan builder's methods are generated from the engine's specs when it is first used,
    # which keeps them (and `inspect`) out of `import brainsurgery`.
    if name in ("Assertion", "Plan"):
        from brainsurgery import _plan

        return getattr(_plan, name)
    raise AttributeError(f"module 'brainsurgery' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Completion (`bs.Pl<Tab>`) lists the lazily imported names too.
    return sorted({*globals(), "Assertion", "Plan"})
