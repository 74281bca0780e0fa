"""``run`` and ``check``: the engine's, plus printing what the plan's transforms print."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from brainsurgery import _core

PlanLike = Mapping[str, Any] | str | os.PathLike[str]


def _show(report: _core.Report, quiet: bool) -> _core.Report:
    if not quiet:
        for notice in report["notices"]:
            print(f"notice: {notice}", file=sys.stderr)
        for text in report["output"]:
            print(text)
    return report


def run(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    threads: int = 0,
    quiet: bool = False,
) -> _core.Report:
    """Run a plan (a dict, YAML text, a path, or a list of them merged in order) and write its output.

    What ``dump``, ``diff`` and ``help`` print is printed (unless ``quiet``) and is also in
    ``report["output"]``; notices about how inputs were read go to stderr and
    ``report["notices"]``. Raises ``PlanError``, ``TransformError``, ``AssertionFailed`` or
    ``FormatError``; nothing is written when it raises.

    >>> report = run({"inputs": ["model.safetensors"], "output": "out.safetensors"})  # doctest: +SKIP
    """
    return _show(_core.run(plan, overrides=overrides, threads=threads), quiet)


def check(
    plan: PlanLike | Sequence[PlanLike],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    quiet: bool = False,
) -> _core.Report:
    """Check a plan against the checkpoint headers without reading tensor data (SPEC §8.1).

    Returns the report of what a run would write.
    """
    return _show(_core.check(plan, overrides=overrides), quiet)
