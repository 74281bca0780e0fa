"""``Session``: apply transforms one at a time, read and hand in tensors, keep the plan."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from brainsurgery import _core
from brainsurgery._checkpoint import CoreKeys, make_array

if TYPE_CHECKING:
    import numpy as np

Transform = Mapping[str, Any] | str | Sequence[Mapping[str, Any] | str]


def _show(result: Mapping[str, Any], quiet: bool) -> None:
    if not quiet:
        for notice in result["notices"]:
            print(f"notice: {notice}", file=sys.stderr)
        for text in result["output"]:
            print(text)


class Session(CoreKeys, MutableMapping[str, "np.ndarray"]):
    """A checkpoint being edited interactively: transforms run through the same engine as a plan.

    >>> s = Session(inputs={"m": "model.safetensors"})  # doctest: +SKIP
    >>> s.apply({"scale_": {"target": "m::.*norm.*", "by": 0.5}})  # doctest: +SKIP
    >>> s.apply("delete: target: m::lm_head.weight")  # doctest: +SKIP
    >>> s["m::new.weight"] = np.zeros((4, 4), np.float32)  # borrowed, not copied  # doctest: +SKIP
    >>> s.save("out/")  # doctest: +SKIP

    Keys are ``alias::name`` (a bare name means the default alias: the only input). Reading a
    tensor gives a read-only array: a view of the mapped file when it is still as it was read,
    computed on access otherwise. Each ``apply`` is checked against the headers before it runs,
    and a failing one leaves the session as it was. ``plan`` is the plan of everything applied,
    which ``brainsurgery.run`` replays to the same bytes.
    """

    def __init__(
        self,
        inputs: Mapping[str, str | os.PathLike[str]] | Sequence[str] | str | None = None,
        *,
        plan: Any = None,
        threads: int = 0,
        quiet: bool = False,
        max_memory: int | str | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Open ``inputs`` (``{"alias": path}``, ``["alias::path", ...]`` or one path), or start
        from a ``plan`` (its transforms are applied, its output is not written). Tensors computed
        whole stay within ``max_memory`` (bytes or ``"8GB"``; default: half of physical memory),
        the rest in a scratch arena in ``scratch_dir`` (default: the folder of the plan's output,
        else the system's temporary folder)."""
        if plan is not None and inputs is not None:
            raise TypeError("give inputs or a plan, not both")
        if plan is None:
            if isinstance(inputs, Mapping):
                inputs = {alias: os.fspath(path) for alias, path in inputs.items()}
            elif isinstance(inputs, os.PathLike):
                inputs = os.fspath(inputs)
            plan = {"inputs": inputs if inputs is not None else []}
        scratch = os.fspath(scratch_dir) if scratch_dir is not None else None
        self._core = _core.Session(plan, threads=threads, max_memory=max_memory, scratch_dir=scratch)
        self._quiet = quiet

    # -- transforms ---------------------------------------------------------------------------

    def apply(self, transform: Transform) -> _core.Applied:
        """Apply a transform: a dict (``{"scale_": {"target": ..., "by": 2}}``), a list of them,
        YAML text, or the one-line form (``"delete: target: m::lm_head.weight"``). What it prints
        (``dump``, ``diff``) is printed unless the session is quiet, and returned with its notes.
        Raises ``PlanError``, ``TransformError``, ``AssertionFailed`` or ``FormatError``; the
        session is unchanged when it raises."""
        result = self._core.apply(transform)
        _show(result, self._quiet)
        return result

    def check(self, alias: str | None = None) -> _core.Report:
        """What saving ``alias`` (default: the default alias, or the only one) would write:
        tensors, bytes and the memory it would take. Reads no tensor data."""
        if alias is None and self._core.default_alias is None and len(self.aliases) == 1:
            alias = self.aliases[0]
        return self._core.check(alias)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        alias: str | None = None,
        format: str | None = None,  # noqa: A002 - the plan key's name
        shard: str | int | None = None,
        overwrite: bool = False,
    ) -> list[str]:
        """Write an alias (default: the default alias) atomically, as a plan's ``save`` does;
        returns the files written. Recorded in :attr:`plan`."""
        if alias is None:
            aliases = self.aliases
            alias = self._core.default_alias or (aliases[0] if len(aliases) == 1 else None)
        if alias is None:
            raise _core.PlanError(f"the session has several aliases ({', '.join(self.aliases)}); say which to save")
        payload: dict[str, Any] = {"path": os.path.abspath(os.fspath(path)), "alias": alias}
        if format is not None:
            payload["format"] = format
        if shard is not None:
            payload["shard"] = shard
        if overwrite:
            payload["overwrite"] = True
        return list(self.apply({"save": payload})["written"])

    @property
    def plan(self) -> dict[str, Any]:
        """The plan of everything applied so far (inputs with absolute paths, transforms, saves),
        as a dict: ``brainsurgery.run(s.plan)`` replays it; the last save writes the same bytes
        (an earlier one the same tensors, its recorded plan hash aside). Refused
        (``PlanError``) once an array was handed in, since no plan can hold its values: save
        those with ``brainsurgery.save`` and ``load`` them instead."""
        return self._core.plan()

    # -- tensors --------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> np.ndarray:
        buffer, dtype, shape, strides = self._core.get(key)
        return make_array(buffer, dtype, shape, strides, key)

    def __setitem__(self, key: str, array: Any) -> None:
        """Hand in an array as tensor ``key`` (``alias::name``; a new alias is created). A NumPy
        array is borrowed, not copied: the session keeps a reference and reads it when a
        transform or a save needs it, so change it afterwards only if the session should see
        the change. A torch (DLPack) tensor is copied once: torch can free the memory it
        exported while the session still holds it."""
        self._core.set(key, array)

    def __delitem__(self, key: str) -> None:
        if key not in self._core:
            # The engine's KeyError, with the closest names.
            self._core.get(key)
        alias, sep, name = key.partition("::")
        target = f"{alias}::{re.escape(name)}" if sep else re.escape(key)
        self.apply({"delete": {"target": target}})

    def info(self, key: str) -> tuple[str, list[int]]:
        """``(dtype, shape)`` of a tensor, without reading it."""
        return self._core.info(key)

    @property
    def aliases(self) -> list[str]:
        """The aliases, in order."""
        return self._core.aliases()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the session's state and mappings (arrays already read stay valid). Later use
        raises ``BrainSurgeryError``."""
        self._core.close()

    @property
    def closed(self) -> bool:
        return self._core.closed

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<brainsurgery.Session (closed)>"
        return f"<brainsurgery.Session: {len(self)} tensors in {', '.join(self.aliases) or 'no aliases'}>"


class Tensors(CoreKeys, Mapping[str, "np.ndarray"]):
    """The tensors a plan without an output leaves (``run(plan).tensors``): read-only arrays,
    views of the input files where a tensor is unchanged, computed on access otherwise."""

    def __init__(self, core: _core.Tensors) -> None:
        self._core = core

    @property
    def alias(self) -> str:
        """The alias these tensors are."""
        return self._core.alias

    def __getitem__(self, name: str) -> np.ndarray:
        buffer, dtype, shape, strides = self._core.get(name)
        return make_array(buffer, dtype, shape, strides, name)

    def info(self, name: str) -> tuple[str, list[int]]:
        """``(dtype, shape)`` of a tensor, without computing it."""
        return self._core.info(name)

    def __repr__(self) -> str:
        return f"<brainsurgery.Tensors {self.alias!r}: {len(self)} tensors>"
