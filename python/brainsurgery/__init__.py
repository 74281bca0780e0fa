"""Declarative, reproducible surgery on neural-network checkpoints.

>>> import brainsurgery as bs
>>> report = bs.run({"inputs": ["model.safetensors"], "transforms": [...], "output": "out/"})  # doctest: +SKIP

The engine is Rust (``brainsurgery._core``); this package re-exports it and adds the NumPy view of
opened checkpoints, ``save`` for arrays and ``to_torch``.
"""

# Every public name is imported on first use (PEP 562), so the command line, which needs only
# `_core`, starts without `typing` and the Python modules (issue 14 item 9). Type checkers read the
# imports below; at run time `TYPE_CHECKING` is false without importing `typing`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from brainsurgery._array import Array as Array
    from brainsurgery._checkpoint import Checkpoint as Checkpoint
    from brainsurgery._checkpoint import open as open  # noqa: A004 - mirrors the SPEC's bs.open
    from brainsurgery._core import AssertionFailed as AssertionFailed
    from brainsurgery._core import BrainSurgeryError as BrainSurgeryError
    from brainsurgery._core import FormatError as FormatError
    from brainsurgery._core import PlanError as PlanError
    from brainsurgery._core import TransformError as TransformError
    from brainsurgery._core import __version__ as __version__
    from brainsurgery._core import from_mergekit as from_mergekit
    from brainsurgery._interop import save as save
    from brainsurgery._interop import to_torch as to_torch
    from brainsurgery._plan import Assertion as Assertion
    from brainsurgery._plan import Plan as Plan
    from brainsurgery._run import RunResult as RunResult
    from brainsurgery._run import check as check
    from brainsurgery._run import run as run
    from brainsurgery._session import Session as Session
    from brainsurgery._session import Tensors as Tensors

# Where each public name lives. `Array` subclasses np.ndarray (importing it loads NumPy); the
# plan builder's methods are generated from the engine's specs when it is first used.
_LAZY = {
    "Array": "_array",
    "Assertion": "_plan",
    "AssertionFailed": "_core",
    "BrainSurgeryError": "_core",
    "Checkpoint": "_checkpoint",
    "FormatError": "_core",
    "Plan": "_plan",
    "PlanError": "_core",
    "RunResult": "_run",
    "Session": "_session",
    "Tensors": "_session",
    "TransformError": "_core",
    "__version__": "_core",
    "check": "_run",
    "from_mergekit": "_core",
    "open": "_checkpoint",
    "run": "_run",
    "save": "_interop",
    "to_torch": "_interop",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'brainsurgery' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"brainsurgery.{module}"), name)
    # Cached: later lookups are plain module attributes.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # Completion (`bs.Pl<Tab>`) lists the lazily imported names too.
    return sorted({*globals(), *_LAZY})
