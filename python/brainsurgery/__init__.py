"""Declarative, reproducible surgery on neural-network checkpoints.

>>> import brainsurgery as bs
>>> report = bs.run({"inputs": ["model.safetensors"], "transforms": [...], "output": "out/"})  # doctest: +SKIP

The engine is Rust (``brainsurgery._core``); this package re-exports it and adds the NumPy view of
opened checkpoints.
"""

from brainsurgery._checkpoint import Checkpoint, open
from brainsurgery._core import (
    AssertionFailed,
    BrainSurgeryError,
    FormatError,
    PlanError,
    TransformError,
    __version__,
)
from brainsurgery._run import RunResult, check, run
from brainsurgery._session import Session, Tensors

__all__ = [
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
]
