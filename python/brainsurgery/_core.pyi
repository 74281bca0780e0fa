"""Type stubs for the Rust extension module ``brainsurgery._core``."""

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NotRequired, TypedDict, final

__all__ = [
    "__version__",
    "run",
    "check",
    "open",
    "cli_main",
    "transform_specs",
    "Checkpoint",
    "TensorBuffer",
    "BrainSurgeryError",
    "PlanError",
    "TransformError",
    "AssertionFailed",
    "FormatError",
]

__version__: str

class TensorReport(TypedDict):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

class Report(TypedDict):
    alias: str | None
    tensors: list[TensorReport]
    total_bytes: int
    written: list[str]
    notes: list[str]
    output: list[str]
    notices: list[str]
    added: int
    removed: int
    peak_memory_estimate: int

PlanLike = Mapping[str, Any] | str | os.PathLike[str]

def run(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    threads: int = 0,
) -> Report:
    """Run a plan and write its output; returns a report."""

def check(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> Report:
    """Check a plan against the checkpoint headers without reading tensor data."""

def cli_main(args: list[str]) -> int:
    """Run the command line on ``args``; returns the exit status."""

class KeySpec(TypedDict):
    name: str
    type: str
    required: bool
    default: str | None
    doc: str

class OperatorSpec(TypedDict):
    name: str
    doc: str | None
    keys: list[KeySpec]

class TransformSpec(TypedDict):
    name: str
    doc: str
    form: Literal["plain", "new", "in_place"]
    in_place: bool
    twin: str | None
    keys: list[KeySpec]
    operators: NotRequired[list[OperatorSpec]]

def transform_specs() -> list[TransformSpec]:
    """Every transform as data, from the key tables that validate plans and print help."""

def open(path: str) -> Checkpoint:
    """Open a checkpoint lazily (headers only)."""

@final
class TensorBuffer:
    """Read-only bytes of one mapped tensor (buffer protocol)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

@final
class Checkpoint:
    """A checkpoint opened lazily."""

    @property
    def metadata(self) -> dict[str, str]: ...
    @property
    def path(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def notices(self) -> list[str]: ...
    def keys(self) -> list[str]: ...
    def info(self, name: str) -> tuple[str, list[int]]: ...
    def buffer(self, name: str) -> TensorBuffer: ...
    def strides(self, name: str) -> list[int] | None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: str, /) -> bool: ...

class BrainSurgeryError(Exception): ...
class PlanError(BrainSurgeryError): ...
class TransformError(BrainSurgeryError): ...
class AssertionFailed(BrainSurgeryError): ...
class FormatError(BrainSurgeryError): ...
