"""Type stubs for the Rust extension module ``brainsurgery._core``."""

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NotRequired, TypedDict, final

__all__ = [
    "__version__",
    "run",
    "check",
    "open",
    "cli_main",
    "dtypes",
    "formats",
    "transform_specs",
    "dlpack",
    "borrow",
    "save",
    "to_yaml",
    "plan_document",
    "from_mergekit",
    "Checkpoint",
    "TensorBuffer",
    "ComputedBuffer",
    "Session",
    "Tensors",
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

class DTypeInfo(TypedDict):
    name: str
    safetensors: str
    aliases: list[str]
    bits: int
    size: int | None
    kind: Literal["float", "integer", "opaque"]
    numpy: str | None
    ml_dtypes: bool
    torch: str | None
    torch_storage: str | None

class FormatInfo(TypedDict):
    name: str
    keys: list[str]
    extensions: list[str]
    index_name: str | None
    single_name: str | None

class FactorizationReport(TypedDict):
    op: str
    tensor: str
    shape: tuple[int, int]
    method: Literal["exact", "randomized"]
    rank: int
    energy: float
    relative_error: float

class StepTimingReport(TypedDict):
    index: int
    transform: str
    seconds: float

class FilesystemReport(TypedDict):
    roles: list[str]
    path: str
    needed: int
    available: int | None
    enough: bool

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
    materialized_bytes: int
    memory_budget: int
    arena_bytes: int
    factorizations: list[FactorizationReport]
    timings: list[StepTimingReport]
    write_seconds: float | None
    bytes_read: int
    bytes_to_read: int
    bytes_to_write: int
    output_files: list[tuple[str, int]]
    filesystems: list[FilesystemReport]

PlanLike = Mapping[str, Any] | str | os.PathLike[str]

def run(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    threads: int = 0,
    progress: Callable[[int, int], object] | None = None,
    space_check: bool = True,
    max_memory: int | str | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> tuple[Report, Tensors | None]:
    """Run a plan and write its output; returns the report and, for a plan without an output,
    the resulting tensors."""

def check(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    threads: int = 0,
    max_memory: int | str | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> Report:
    """Check a plan against the checkpoint headers without reading tensor data."""

def cli_main(args: list[str]) -> int:
    """Run the command line on ``args``; returns the exit status."""

def dtypes() -> list[DTypeInfo]:
    """Every dtype the engine knows, one dict each, from the engine's one dtype table."""

def formats() -> list[FormatInfo]:
    """Every checkpoint format, one dict each, from the engine's one format table."""

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

def dlpack(
    array: Any,
    *,
    stream: Any = None,
    max_version: tuple[int, int] | None = None,
    dl_device: tuple[int, int] | None = None,
    copy: bool | None = None,
) -> Any:
    """A DLPack capsule over a NumPy array's memory, for every engine dtype (bfloat16 and float8
    included), holding the array until the consumer's deleter runs: what ``brainsurgery.Array``'s
    ``__dlpack__`` returns. Versioned when ``max_version`` is 1.x or later (``READ_ONLY`` set for
    an array that is not writeable); ``copy=True`` exports a fresh copy flagged ``IS_COPIED``."""

class BorrowInfo(TypedDict):
    dtype: str
    shape: tuple[int, ...]
    address: int
    nbytes: int
    copied: bool
    via: Literal["numpy", "dlpack", "buffer"]

def borrow(array: Any) -> BorrowInfo:
    """How the engine takes an array in (what ``save`` does with it): its dtype and shape, the
    address of the first byte the engine reads, and whether that is a copy (non-contiguous or
    big-endian input)."""

def save(
    tensors: Mapping[str, Any] | Sequence[tuple[str, Any]],
    output: Mapping[str, Any] | str,
    *,
    metadata: Mapping[str, str] | None = None,
    threads: int = 0,
) -> Report:
    """Write arrays, borrowed without a copy, to the output a plan's ``output:`` value describes
    (streamed, atomic, GIL released); returns the report."""
def to_yaml(obj: Mapping[str, Any] | Sequence[Any] | str | os.PathLike[str] | float | bool | None) -> str:
    """A plan value (dicts, lists, str, numbers, bool, None, paths) as YAML text from the engine's
    serializer: strings a YAML 1.1 or 1.2 reader would take for another type (``y``, ``no``,
    ``1e3``, ``0x10``, ``""``) are quoted, so the engine and PyYAML read back the same value.
    Raises ``PlanError`` for a value a plan cannot hold."""

def plan_document(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> dict[str, Any]:
    """The plan document ``run`` and ``check`` would see (sources merged in order, overrides
    applied), before any transform is parsed."""

def from_mergekit(
    config: Mapping[str, Any] | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The plan equivalent to a MergeKit config (a dict, YAML text or a path to a ``mergekit-yaml``
    config, or a ``mergekit-moe`` one with ``experts``): the models as inputs, one ``merge`` step
    into alias ``merged`` (``upcycle_moe`` of the base for MoE configs) and, with ``output``, the
    output writing it. Raises ``PlanError`` naming the key for what cannot be translated.

    >>> plan = bs.from_mergekit({"merge_method": "linear", "models": [...]}, output="out/")  # doctest: +SKIP
    >>> bs.run(plan)  # doctest: +SKIP
    """

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
    def table(self, pattern: str | list[str] | None = None) -> list[tuple[str, str, list[int], int, str]]: ...
    def buffer(self, name: str) -> TensorBuffer: ...
    def strides(self, name: str) -> list[int] | None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: str, /) -> bool: ...

class BrainSurgeryError(Exception):
    """Base class of every brainsurgery error. The attributes say what failed where (None when
    unknown), so a program need not parse the message."""

    transform_index: int | None
    transform: str | None
    reference: str | None
    tensor: str | None
    path: str | None
    location: str | None

class PlanError(BrainSurgeryError): ...
class TransformError(BrainSurgeryError): ...
class AssertionFailed(BrainSurgeryError): ...
class FormatError(BrainSurgeryError): ...

class Applied(TypedDict):
    output: list[str]
    notes: list[str]
    notices: list[str]
    written: list[str]
    exit: bool
    bytes_read: int
    factorizations: list[FactorizationReport]

ArrayParts = tuple[TensorBuffer | ComputedBuffer, str, list[int], list[int] | None]

@final
class ComputedBuffer:
    """Read-only bytes of one computed tensor, owned (buffer protocol)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

@final
class Session:
    """A live engine session: the state after the transforms applied so far."""

    def __new__(
        cls,
        plan: PlanLike | Sequence[PlanLike],
        *,
        overrides: Mapping[str, Any] | Sequence[str] | None = None,
        threads: int = 0,
        max_memory: int | str | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> Session: ...
    def apply(self, block: Any) -> Applied: ...
    def get(self, key: str) -> ArrayParts: ...
    def info(self, key: str) -> tuple[str, list[int]]: ...
    def set(self, key: str, array: Any) -> None: ...
    def keys(self) -> list[str]: ...
    def aliases(self) -> list[str]: ...
    @property
    def default_alias(self) -> str | None: ...
    def check(self, alias: str | None = None) -> Report: ...
    def plan(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: str, /) -> bool: ...

@final
class Tensors:
    """The tensors a plan without an output leaves, read lazily."""

    @property
    def alias(self) -> str: ...
    def keys(self) -> list[str]: ...
    def info(self, name: str) -> tuple[str, list[int]]: ...
    def get(self, name: str) -> ArrayParts: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: str, /) -> bool: ...
