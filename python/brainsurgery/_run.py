"""``run`` and ``check``: the engine's, plus printing what the plan's transforms print and the
result object."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from brainsurgery import _core
from brainsurgery._session import Tensors

PlanLike = Mapping[str, Any] | str | os.PathLike[str]


def _show(report: _core.Report, quiet: bool) -> _core.Report:
    if not quiet:
        for notice in report["notices"]:
            print(f"notice: {notice}", file=sys.stderr)
        for text in report["output"]:
            print(text)
    return report


class RunResult(dict[str, Any]):
    """What a run did: the report (a dict, keys as ``_core.Report``) with attributes for the
    parts most often read, and ``tensors``, the resulting checkpoint of a plan without an
    ``output`` (a lazy mapping: views where a tensor is unchanged, computed on access)."""

    tensors: Tensors | None
    seconds: float

    def __init__(self, report: Mapping[str, Any], tensors: Tensors | None, seconds: float) -> None:
        super().__init__(report)
        self.tensors = tensors
        self.seconds = seconds

    @property
    def written(self) -> list[str]:
        """Files written, by ``save`` transforms and then the output."""
        return list(self["written"])

    @property
    def notes(self) -> list[str]:
        """One line per transform executed, saying what it did."""
        return list(self["notes"])

    @property
    def factorizations(self) -> list[_core.FactorizationReport]:
        """Tensors factorized (``phlora``, ``extract_lora``): rank, energy kept, relative error."""
        return list(self["factorizations"])

    @property
    def timings(self) -> list[_core.StepTimingReport]:
        """Seconds each transform took, in order (``index``, ``transform``, ``seconds``); the
        output's write is ``write_seconds``."""
        return list(self["timings"])

    @property
    def write_seconds(self) -> float | None:
        """Seconds writing the output took (None without an output)."""
        return self["write_seconds"]

    @property
    def memory_budget(self) -> int:
        """The run's memory budget in bytes (``max_memory``, or half of physical memory)."""
        return int(self["memory_budget"])

    @property
    def arena_bytes(self) -> int:
        """The most bytes the scratch arena held at once (0 when everything fit the budget)."""
        return int(self["arena_bytes"])

    @property
    def bytes_read(self) -> int:
        """Bytes of tensor data the run read from input files (a byte read twice counts twice;
        reading ``tensors`` of a plan without output afterwards is not counted)."""
        return int(self["bytes_read"])

    @property
    def bytes_written(self) -> int:
        """Bytes of the files written (as they are on disk now)."""
        return sum(os.path.getsize(p) for p in self["written"] if os.path.isfile(p))

    def __repr__(self) -> str:
        lines = [f"<brainsurgery.RunResult in {self.seconds:.2f} s: {len(self['notes'])} transforms"]
        lines.append(f"  read {_size(self.bytes_read)} of tensor data from input files")
        if self.arena_bytes:
            lines.append(f"  held up to {_size(self.arena_bytes)} in the scratch arena")
        if self["written"]:
            lines.append(f"  wrote {len(self['written'])} file(s), {_size(self.bytes_written)}:")
            lines += [f"    {p}" for p in self["written"][:10]]
            if len(self["written"]) > 10:
                lines.append(f"    … {len(self['written']) - 10} more")
        if self.tensors is not None:
            lines.append(f"  result: {len(self.tensors)} tensors of `{self.tensors.alias}` (result.tensors)")
        if self["write_seconds"] is not None:
            lines.append(f"  output written in {self['write_seconds']:.2f} s")
        slowest = sorted(self["timings"], key=lambda t: -t["seconds"])[:3]
        if slowest and slowest[0]["seconds"] >= 0.01:
            steps = ", ".join(f"transforms[{t['index']}] {t['transform']} {t['seconds']:.2f} s" for t in slowest)
            lines.append(f"  slowest: {steps}")
        for f in self["factorizations"][:10]:
            lines.append(
                f"  {f['op']} {f['tensor']}: rank {f['rank']}, energy {f['energy']:.4f}, "
                f"relative error {f['relative_error']:.3g}"
            )
        lines += [f"  {note}" for note in self["notes"][:20]]
        return "\n".join(lines) + ">"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    threads: int = 0,
    quiet: bool = False,
    progress: bool | Callable[[int, int], object] | None = None,
    max_memory: int | str | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    space_check: bool = True,
) -> RunResult:
    """Run a plan (a dict, YAML text, a path, or a list of them merged in order) and write its output.

    What ``dump``, ``diff`` and ``help`` print is printed (unless ``quiet``) and is also in
    ``result["output"]``; notices about how inputs were read go to stderr and
    ``result["notices"]``. A plan without ``output`` writes nothing and returns the resulting
    checkpoint as ``result.tensors``, read lazily, so a training script can use it without a
    file (``model.load_state_dict(bs.to_torch(result.tensors))``). Raises ``PlanError``,
    ``TransformError``, ``AssertionFailed`` or ``FormatError``; nothing is written when it raises.
    Ctrl-C stops the run at its next chunk and raises ``KeyboardInterrupt``, leaving no partial
    output.

    ``progress``: a bar of the bytes written (tqdm's, a widget in notebooks) when ``True``, or by
    default when tqdm is installed and the run is interactive (a terminal or a notebook) and not
    ``quiet``; or a callable ``progress(done_bytes, total_bytes)`` called from the engine's
    writing threads at most every 50 ms and once at the end.

    ``max_memory``: the memory budget, bytes or a size such as ``"8GB"`` (default: half of
    physical memory); tensors computed whole (products, permutations that cannot stream) go to a
    scratch arena in ``scratch_dir`` (default: the output's folder) beyond it. A plan whose work
    cannot fit it even so is refused before anything is read.
    ``space_check``: before anything is read, the run refuses to start (``FormatError``) when
    the output's filesystem has less free space than the output's files take (``check`` reports
    the figures); ``False`` starts anyway, and a disk that fills fails the run leaving nothing.

    >>> result = run({"inputs": ["model.safetensors"], "output": "out.safetensors"})  # doctest: +SKIP
    """
    start = time.perf_counter()
    bar = _ProgressBar.make(progress, quiet) if not callable(progress) else None
    callback = progress if callable(progress) else bar
    try:
        report, tensors = _core.run(
            plan,
            overrides=overrides,
            threads=threads,
            progress=callback,
            space_check=space_check,
            max_memory=max_memory,
            scratch_dir=os.fspath(scratch_dir) if scratch_dir is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    result = RunResult(report, Tensors(tensors) if tensors is not None else None, time.perf_counter() - start)
    _show(report, quiet)
    return result


class _ProgressBar:
    """tqdm's bar fed by the engine's ``(done, total)`` calls, which arrive from several threads
    and not always in order (the largest ``done`` so far is shown)."""

    def __init__(self, tqdm: Any) -> None:
        self._tqdm = tqdm
        self._bar: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def make(progress: bool | None, quiet: bool) -> _ProgressBar | None:
        if progress is False or (progress is None and (quiet or not _interactive())):
            return None
        try:
            # By name: tqdm is an optional extra, with or without its type stubs installed.
            # tqdm.auto is a widget in notebooks, but warns and falls back when ipywidgets is
            # missing: then the text bar directly.
            widgets = importlib.util.find_spec("ipywidgets") is not None
            tqdm = importlib.import_module("tqdm.auto" if widgets else "tqdm.std").tqdm
        except ImportError:
            if progress:
                raise ImportError("progress=True needs tqdm: pip install tqdm") from None
            return None
        return _ProgressBar(tqdm)

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            if self._bar is None:
                self._bar = self._tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing")
            if done > self._bar.n:
                self._bar.update(done - self._bar.n)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()


def _interactive() -> bool:
    """A terminal on stderr, or a Jupyter kernel."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def check(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    quiet: bool = False,
    threads: int = 0,
    max_memory: int | str | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> _core.Report:
    """Check a plan against the checkpoint headers without reading tensor data (SPEC §8.1).

    Returns the report of what a run would write, with the peak memory it would take within
    the budget ``max_memory`` (as for :func:`run`) and the bytes of the scratch arena beyond it.
    """
    scratch = os.fspath(scratch_dir) if scratch_dir is not None else None
    report = _core.check(plan, overrides=overrides, threads=threads, max_memory=max_memory, scratch_dir=scratch)
    return _show(report, quiet)
