"""What ``Plan`` and ``Assertion`` are made of: the hand-written part of the builder and the rules
that turn the engine's transform specs (``_core.transform_specs()``) into Python methods.

``_plan.py`` applies these rules at import time, so a transform added to the engine's registry
gets its builder method with no Python edit; ``_plan_stubgen.py`` applies the same rules to
write ``_plan.pyi``, the stub that lets editors complete the generated methods.

Naming rules (the engine's names are kept wherever Python allows them):

- A transform's method is its name (``copy``, ``scale_``, ``extract_lora``). A name that is a
  Python keyword or one of ``Plan``'s own attributes (``to_yaml``, ``run``, ...) gets a trailing
  ``_`` (more while the name is taken): ``assert`` is ``assert_``. A trailing ``_`` on a transform
  *name* means "in place" only where the engine says so (``scale_`` is the twin of ``scale``);
  ``assert_`` is simply ``assert``, which has no in-place form.
- A key's parameter is its name; a keyword key gets a trailing ``_`` (``from`` is ``from_``,
  ``is`` is ``is_``), and characters Python does not allow in a name become ``_``. The key's own
  spelling is accepted too: ``plan.copy(**{"from": "a", "to": "b"})``.
- Required keys are positional (in the order of the key table), the others keyword-only; a
  transform without required keys takes its first key positionally, as its one-value short
  form does (``dump: 'h\\..*'`` is ``plan.dump("h\\..*")``, ``help: scale_`` is
  ``plan.help("scale_")``).
- A key left out, or given as ``None``, is not written: the engine's default applies. Signature
  defaults show the engine's default where it is a literal value, ``None`` where the engine
  describes it in words (``dump``'s ``target``: every tensor of the default alias).
"""

from __future__ import annotations

import copy as _copy
import difflib
import functools
import inspect
import keyword
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeAlias

from brainsurgery import _core

if TYPE_CHECKING:
    from brainsurgery._run import RunResult

# Annotations of the generated parameters (the stub names them; these are what they mean).
Reference: TypeAlias = str | Sequence[Any] | Mapping[str, Any]
"""A tensor reference: ``alias::pattern::[slice]`` text, a structured pattern (a list of segment
tokens) or a mapping ``{alias, path, slice}`` (SPEC §3)."""
Template: TypeAlias = str | Sequence[Any] | Mapping[str, Any]
"""A rewrite of each match (``\\1``, ``\\g<name>``, structured output tokens)."""
TransformEntry: TypeAlias = Mapping[str, Any] | str
"""One entry of a transform list: ``{name: keys}`` or a bare name such as ``"exit"``."""
Transforms: TypeAlias = "Sequence[TransformEntry] | PlanBase"
PlanValue: TypeAlias = "Mapping[str, Any] | PlanBase"

# Key types as help prints them (`FieldKind::describe`), and the annotation each gets. A type
# the engine adds later is annotated `Any` until it is named here.
KEY_TYPES: dict[str, str] = {
    "reference": "Reference",
    "template": "Template",
    "bool": "bool",
    "number": "float",
    "string": "str",
    "dtype": "str",
    "shape": "Sequence[int]",
    "list of numbers": "float | Sequence[float]",
    "list of templates": "Sequence[Template]",
    "list of references": "Sequence[Reference]",
    "nested list": "float | Sequence[Any]",
    "list of transforms": "Transforms",
    "plan": "PlanValue",
    "models": "Mapping[str, Any] | Sequence[str]",
    "parameter": "float | Sequence[Any]",
    "slices": "Sequence[Mapping[str, Any]]",
    "router": "str | Mapping[str, Any]",
    "list of aliases": "Sequence[str]",
    "patterns": "Mapping[str, str]",
    "settings": "Mapping[str, Any] | Sequence[str]",
    "list of paths": "str | Sequence[str]",
}

# A default the engine gives as a literal value (shown in the signature) rather than in words
# (`by extension, else safetensors`), which the signature shows as None.
_LITERAL = re.compile(r"[A-Za-z0-9_.+-]+")


def annotation(key: Mapping[str, Any]) -> str:
    """The annotation of a key's parameter, as text (``Reference``, ``float | None``)."""
    text = KEY_TYPES.get(key["type"], "Any")
    if key["required"] or text == "Any":
        return text
    return f"{text} | None"


def default_of(key: Mapping[str, Any]) -> Any:
    """The signature default of an optional key: the engine's default when it is a literal of the
    key's type, else None (which leaves the key out, so the engine's default applies)."""
    text = key["default"]
    if text is None or not _LITERAL.fullmatch(text):
        return None
    kind = key["type"]
    if kind == "bool":
        return {"true": True, "false": False}.get(text)
    if kind == "number":
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return None
    if kind in ("string", "dtype"):
        return text
    return None


def python_name(name: str, taken: Iterable[str] = ()) -> str:
    """``name`` as a Python identifier: characters a name cannot hold become ``_``, then ``_`` is
    appended while it is a keyword or in ``taken``."""
    out = re.sub(r"\W", "_", name)
    if not out or out[0].isdigit():
        out = "_" + out
    taken = set(taken)
    while keyword.iskeyword(out) or out in taken:
        out += "_"
    return out


def parameter_names(keys: Sequence[Mapping[str, Any]]) -> list[str]:
    """The parameter of each key, in table order: distinct from one another, from every key's
    own spelling and from ``self``."""
    raw = [k["name"] for k in keys]
    out: list[str] = []
    for name in raw:
        if name.isidentifier() and not keyword.iskeyword(name) and name != "self":
            out.append(name)
        else:
            out.append(python_name(name, [*raw, *out, "self"]))
    return out


def parameters(keys: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any], inspect._ParameterKind, Any]]:
    """``(parameter name, key, kind, default)`` of each key, in signature order: required keys
    positional in table order, then the others keyword-only; without required keys the first key
    is positional (the one-value short form). ``default`` is ``inspect.Parameter.empty`` for a
    required key."""
    names = parameter_names(keys)
    pairs = list(zip(names, keys))
    required = [(n, k) for n, k in pairs if k["required"]]
    optional = [(n, k) for n, k in pairs if not k["required"]]
    out: list[tuple[str, Mapping[str, Any], inspect._ParameterKind, Any]] = []
    for n, k in required:
        out.append((n, k, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty))
    for i, (n, k) in enumerate(optional):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if i == 0 and not required else inspect.Parameter.KEYWORD_ONLY
        out.append((n, k, kind, default_of(k)))
    return out


def key_doc(name: str, key: Mapping[str, Any]) -> str:
    """One line of a method's docstring: parameter, key spelling, type, requirement, doc."""
    spelled = f" (key ``{key['name']}``)" if name != key["name"] else ""
    if key["required"]:
        need = "required"
    elif key["default"] is not None:
        need = f"default: {key['default']}"
    else:
        need = "optional"
    return f"    {name}{spelled}: {key['type']}, {need}. {key['doc']}"


def plain(value: Any) -> Any:
    """A value as plain plan data: plans and assertions as their dicts, mappings as dicts, tuples
    as lists, paths as str. Anything else is left for the engine to accept or refuse."""
    if isinstance(value, PlanBase):
        return value.to_dict()
    if isinstance(value, AssertionBase):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def plan_error(message: str, transform: str | None = None, index: int | None = None) -> _core.PlanError:
    """A ``PlanError`` raised by the builder, with the attributes the engine's would have."""
    error = _core.PlanError(message)
    error.transform = transform
    error.transform_index = index
    return error


def closest(word: str, candidates: Iterable[str]) -> str:
    """``; did you mean `x`?`` for the closest candidates, or nothing."""
    close = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"`{c}`" for c in close) + "?"


@functools.cache
def specs_by_name() -> dict[str, Mapping[str, Any]]:
    """The engine's transform specs by name (read once; the registry is fixed at build time)."""
    return {s["name"]: s for s in _core.transform_specs()}


def _check_keys(
    payload: Mapping[str, Any], keys: Sequence[Mapping[str, Any]], what: str, transform: str, index: int | None
) -> None:
    names = [k["name"] for k in keys]
    for given in payload:
        if given not in names:
            raise plan_error(
                f"{what}: unknown key `{given}`{closest(str(given), names)} (keys: {', '.join(names)})",
                transform,
                index,
            )


def check_assertion(expr: Any, operators: Sequence[Mapping[str, Any]], index: int | None) -> None:
    """Checks operator names and key names of an assertion expression given as data, as deep as
    it is data (a reference or value is the engine's to judge)."""
    if not isinstance(expr, Mapping):
        return
    by_name = {op["name"]: op for op in operators}
    if len(expr) != 1:
        raise plan_error(
            f"assert: an assertion is a mapping with exactly one operator ({', '.join(by_name)}), got {len(expr)} keys",
            "assert",
            index,
        )
    ((name, payload),) = expr.items()
    op = by_name.get(name)
    if op is None:
        raise plan_error(
            f"assert: unknown assertion operator `{name}`{closest(str(name), by_name)} (operators: {', '.join(by_name)})",
            "assert",
            index,
        )
    if op["keys"]:
        # A structured reference mapping has `path`; an operator payload has the keys (as the
        # engine tells them apart).
        if isinstance(payload, Mapping) and not ("path" in payload and "of" not in payload):
            _check_keys(payload, op["keys"], f"assert {name}", "assert", index)
    elif isinstance(payload, (list, tuple)):
        for item in payload:
            check_assertion(plain(item), operators, index)
    else:
        check_assertion(plain(payload), operators, index)


class AssertionBase:
    """An assertion expression (SPEC §5) built in Python: ``Assertion.count("h\\..*", 0)``.
    ``a & b`` is ``all``, ``a | b`` is ``any``, ``~a`` is ``not``; ``Plan.assert_(a)`` adds it."""

    __slots__ = ("_expr",)

    def __init__(self, expr: Mapping[str, Any] | AssertionBase) -> None:
        """Wraps an assertion given as data (``{"count": {"of": "x", "is": 0}}``); operator and
        key names are checked now."""
        data = plain(expr)
        check_assertion(data, _operators(), None)
        if not isinstance(data, dict):
            raise TypeError(f"an assertion is a mapping such as {{'exists': 'x'}}, not {type(expr).__name__}")
        self._expr: dict[str, Any] = data

    def to_dict(self) -> dict[str, Any]:
        """The assertion as plan data: ``{operator: payload}``."""
        return _copy.deepcopy(self._expr)

    def _combine(self, op: str, other: object) -> Self:
        if not isinstance(other, (AssertionBase, Mapping)):
            return NotImplemented
        other = plain(other)
        items: list[Any] = []
        for side in (self._expr, other):
            # `a & b & c` is one `all` of three, not nested pairs.
            items.extend(side[op] if isinstance(side, dict) and list(side) == [op] and isinstance(side[op], list) else [side])
        return type(self)({op: items})

    def __and__(self, other: AssertionBase | Mapping[str, Any]) -> Self:
        return self._combine("all", other)

    def __rand__(self, other: Mapping[str, Any]) -> Self:
        return type(self)(other)._combine("all", self)

    def __or__(self, other: AssertionBase | Mapping[str, Any]) -> Self:
        return self._combine("any", other)

    def __ror__(self, other: Mapping[str, Any]) -> Self:
        return type(self)(other)._combine("any", self)

    def __invert__(self) -> Self:
        return type(self)({"not": self.to_dict()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AssertionBase):
            return NotImplemented
        return self._expr == other._expr

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._expr!r})"


def _operators() -> list[Mapping[str, Any]]:
    spec = specs_by_name().get("assert")
    return list(spec.get("operators", [])) if spec else []


def _reserved() -> frozenset[str]:
    """Names of ``Plan``'s own attributes, which no generated method may take."""
    return frozenset(n for n in dir(PlanBase) if not n.startswith("_")) | {"inputs", "output"}


class PlanBase:
    """A plan (SPEC §2) built in Python, one method per transform: each appends the transform
    and returns the plan, so calls chain. See ``brainsurgery.Plan``."""

    inputs: Any
    """``inputs``: ``["alias::path", ...]``, one bare path, or a mapping ``{alias: path}``."""
    output: Any
    """``output``: a path, a mapping (``path``, ``format``, ``shard``, ``alias``, ...) or None."""

    def __init__(
        self,
        /,
        inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]] | None = None,
        output: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        *,
        transforms: Sequence[TransformEntry] | None = None,
        **extra: Any,
    ) -> None:
        """A plan with these ``inputs`` and ``output``; ``transforms`` (plan data) are checked and
        appended like ``append``'s; other top-level keys are kept as given, for the engine to
        check."""
        self.inputs = inputs
        self.output = output
        self._transforms: list[Any] | None = None
        self._extra: dict[str, Any] = dict(extra)
        if transforms is not None:
            self._transforms = []
            for entry in transforms:
                self.append(entry)

    # -- transforms ------------------------------------------------------------------------

    def _add(self, name: str, payload: dict[str, Any] | None) -> Self:
        if self._transforms is None:
            self._transforms = []
        # Without keys a transform is written bare, as plans write `exit` and `dump`.
        self._transforms.append(name if payload is None else {name: payload})
        return self

    def _index(self) -> int:
        return len(self._transforms or ())

    def append(self, entry: TransformEntry | Any, /) -> Self:
        """Appends one transform given as plan data: ``{"scale_": {"target": "x", "by": 0.5}}``
        or a bare name (``"exit"``). The transform's name and its key names are checked now (a
        ``PlanError`` names the closest ones); values are checked when the plan runs. Every
        transform is reachable this way, whatever its method is called."""
        entry = plain(entry)
        index = self._index()
        specs = specs_by_name()
        if isinstance(entry, str):
            name, payload = entry, None
        elif isinstance(entry, dict) and len(entry) == 1:
            ((name, payload),) = entry.items()
        else:
            raise plan_error(
                f"a transform is a one-key mapping {{name: keys}} or a bare name, got {entry!r}", None, index
            )
        spec = specs.get(name)
        if spec is None:
            raise plan_error(f"unknown transform `{name}`{closest(str(name), specs)}", str(name), index)
        if spec.get("operators") is not None:
            check_assertion(payload, spec["operators"], index)
        elif isinstance(payload, Mapping):
            _check_keys(payload, spec["keys"], str(name), str(name), index)
        if isinstance(entry, str):
            return self._add(name, None)
        if self._transforms is None:
            self._transforms = []
        self._transforms.append(entry)
        return self

    @property
    def transforms(self) -> list[Any]:
        """The transform entries so far, as plan data (a copy)."""
        return _copy.deepcopy(self._transforms or [])

    # -- documents -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The plan as the dict ``brainsurgery.run`` takes: ``inputs``, ``transforms``, ``output``
        (each when set), then any other top-level keys. A copy: changing it leaves the plan."""
        doc: dict[str, Any] = {}
        if self.inputs is not None:
            doc["inputs"] = plain(self.inputs)
        if self._transforms is not None:
            doc["transforms"] = _copy.deepcopy(self._transforms)
        if self.output is not None:
            doc["output"] = plain(self.output)
        for key, value in self._extra.items():
            doc[key] = plain(value)
        return doc

    def to_yaml(self) -> str:
        """The plan as YAML text, written by the engine's YAML serializer: strings another reader
        could take for a number, a bool or null (``y``, ``no``, ``1e3``, ``"0x10"``) are quoted,
        so the engine and PyYAML read back exactly this plan."""
        return _core.to_yaml(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Self:
        """A plan from plan data (what ``to_dict`` gives, or a parsed plan file). Transform names
        and key names are checked as ``append`` checks them."""
        if not isinstance(doc, Mapping):
            raise plan_error(f"a plan is a mapping, not {type(doc).__name__}")
        doc = dict(doc)
        transforms = doc.pop("transforms", None)
        if transforms is not None and not isinstance(transforms, (list, tuple)):
            raise plan_error(f"transforms: expected a list of transforms, got {type(transforms).__name__}")
        inputs, output = doc.pop("inputs", None), doc.pop("output", None)
        plan = cls(inputs, output)
        plan._extra = doc
        if transforms is not None:
            plan._transforms = []
            for entry in transforms:
                plan.append(entry)
        return plan

    @classmethod
    def from_yaml(
        cls,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        overrides: Mapping[str, Any] | Sequence[str] | None = None,
    ) -> Self:
        """A plan from YAML (or JSON) text or a plan file, read by the engine exactly as ``run``
        reads it (so a str holding no newline, ``": "`` or leading ``{`` is a path); a list is
        merged in order, and ``overrides`` apply last."""
        return cls.from_dict(_core.plan_document(source, overrides=overrides))

    # -- running ---------------------------------------------------------------------------

    def check(self, **kwargs: Any) -> _core.Report:
        """``brainsurgery.check`` of this plan (same keyword arguments)."""
        from brainsurgery._run import check

        return check(self.to_dict(), **kwargs)

    def run(self, **kwargs: Any) -> RunResult:
        """``brainsurgery.run`` of this plan (same keyword arguments)."""
        from brainsurgery._run import run

        return run(self.to_dict(), **kwargs)

    # -- display ---------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlanBase):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        try:
            return self.to_yaml()
        except Exception:  # noqa: BLE001 - a repr must not raise; the YAML error shows on to_yaml
            return f"{type(self).__name__}.from_dict({self.to_dict()!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


# -- generated methods -----------------------------------------------------------------------


def method_names(specs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Transform name → method name, for every transform (see the module's naming rules)."""
    reserved = _reserved()
    names = [s["name"] for s in specs]
    out: dict[str, str] = {}
    for name in names:
        if name.isidentifier() and not keyword.iskeyword(name) and name not in reserved:
            out[name] = name
    for name in names:
        if name not in out:
            out[name] = python_name(name, [*reserved, *names, *out.values()])
    return out


def transform_doc(spec: Mapping[str, Any], params: Sequence[tuple[str, Mapping[str, Any], Any, Any]]) -> str:
    lines = [f"{spec['name']}: {spec['doc']}", ""]
    if spec.get("twin"):
        lines.append(
            f"In place; ``{spec['twin']}`` writes new tensors instead."
            if spec.get("in_place")
            else f"Writes new tensors; ``{spec['twin']}`` works in place."
        )
        lines.append("")
    lines.append(
        f"Appends ``{spec['name']}`` to the plan's transforms and returns the plan. Key names are checked now, values when the plan runs; a key left out or None takes the engine's default."
    )
    if params:
        lines += ["", "Keys:"]
        lines += [key_doc(n, k) for n, k, _, _ in params]
    return "\n".join(lines)


# What an operator keyword of `Plan.assert_` takes, by `operator_kind`.
OPERATOR_PAYLOADS = {
    "keys": "Mapping[str, Any] | Reference | None",
    "list": "Sequence[Assertion | Mapping[str, Any]] | None",
    "one": "Assertion | Mapping[str, Any] | None",
}


def operator_kind(op: Mapping[str, Any]) -> str:
    """``keys`` (a key table), ``list`` (``all``/``any``: assertions) or ``one`` (``not``, and an
    operator without keys the builder does not know: one value, as given)."""
    if op["keys"]:
        return "keys"
    return "list" if op["name"] in ("all", "any") else "one"


def assert_doc(spec: Mapping[str, Any], names: Mapping[str, str]) -> str:
    lines = [
        f"{spec['name']}: {spec['doc']}",
        "",
        "Appends one ``assert``: either an ``Assertion`` (``Assertion.count('h\\\\..*', 0) & ~Assertion.exists('x')``) "
        "or plan data (``{'count': {'of': 'x', 'is': 0}}``) positionally, or one operator as a keyword "
        "whose value is the operator's payload as a plan writes it (``count={'of': 'x', 'is': 0}``, "
        "``exists='x'``). Operator and key names are checked now.",
        "",
        "Operators:",
    ]
    for op in spec["operators"]:
        if op["keys"]:
            keys = ", ".join(k["name"] if k["required"] else f"[{k['name']}]" for k in op["keys"])
        else:
            keys = op["doc"] or ""
        lines.append(f"    {names[op['name']]}: {keys}")
    return "\n".join(lines)


def operator_doc(op: Mapping[str, Any], params: Sequence[tuple[str, Mapping[str, Any], Any, Any]]) -> str:
    kind = operator_kind(op)
    lines = [f"The ``{op['name']}`` assertion" + (f": {op['doc']}." if op["doc"] else ".")]
    if kind == "list":
        lines.append(f"``Assertion.{op['name']}(a, b, ...)`` is ``{{{op['name']}: [a, b, ...]}}``.")
    if params:
        lines += ["", "Keys:"]
        lines += [key_doc(n, k) for n, k, _, _ in params]
    return "\n".join(lines)


def _bind(
    what: str,
    keys: Sequence[Mapping[str, Any]],
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    transform: str,
    index: int | None,
) -> dict[str, Any]:
    """The payload of one call: keyword arguments under the keys' own spellings are taken too,
    unknown names raise ``PlanError`` with the closest names, values are kept as given."""
    params = parameters(keys)
    by_param = {n: k for n, k, _, _ in params}
    by_key = {k["name"]: n for n, k, _, _ in params}
    named: dict[str, Any] = {}
    for given, value in kwargs.items():
        param = given if given in by_param else by_key.get(given)
        if param is None:
            raise plan_error(
                f"{what}: unknown key `{given}`{closest(given, by_param)} (keys: {', '.join(by_key)})", transform, index
            )
        if param in named:
            raise TypeError(f"{what}: key `{by_param[param]['name']}` given twice (as `{param}` and its key name)")
        named[param] = value
    bound = signature.bind_partial(*args, **named)
    payload: dict[str, Any] = {}
    missing = []
    for name, key in by_param.items():
        value = bound.arguments.get(name)
        if value is None:
            if key["required"]:
                missing.append(name)
            continue
        payload[key["name"]] = value
    if missing:
        raise plan_error(
            f"{what}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(f'`{m}`' for m in missing)}",
            transform,
            index,
        )
    # A Plan where a transform list goes (`execute(transforms=...)`) stands for its transforms.
    for key in keys:
        if key["type"] == "list of transforms" and isinstance(payload.get(key["name"]), PlanBase):
            payload[key["name"]] = payload[key["name"]].transforms
    # Table order, whatever the order of the call, so equal plans print alike.
    order = [k["name"] for k in keys]
    return {k: plain(payload[k]) for k in order if k in payload}


def _signature(params: Sequence[tuple[str, Mapping[str, Any], Any, Any]], self_name: str | None) -> inspect.Signature:
    out = [inspect.Parameter(self_name, inspect.Parameter.POSITIONAL_OR_KEYWORD)] if self_name else []
    for name, key, kind, default in params:
        out.append(inspect.Parameter(name, kind, default=default, annotation=annotation(key)))
    return inspect.Signature(out, return_annotation="Self" if self_name else "Assertion")


def _finish(function: Callable[..., Any], name: str, owner: str, signature: inspect.Signature, doc: str) -> None:
    function.__name__ = name
    function.__qualname__ = f"{owner}.{name}"
    function.__doc__ = doc
    function.__signature__ = signature  # type: ignore[attr-defined]
    function.__annotations__ = {
        p.name: p.annotation for p in signature.parameters.values() if p.annotation is not inspect.Parameter.empty
    } | {"return": signature.return_annotation}
    function.__module__ = "brainsurgery._plan"


def transform_method(spec: Mapping[str, Any], method: str) -> Callable[..., Any]:
    """The builder method of a transform with a key table."""
    name = spec["name"]
    keys = spec["keys"]
    params = parameters(keys)
    signature = _signature(params, "self")
    unbound = inspect.Signature(list(signature.parameters.values())[1:])

    def build(self: PlanBase, /, *args: Any, **kwargs: Any) -> PlanBase:
        payload = _bind(name, keys, unbound, args, kwargs, name, self._index())
        return self._add(name, payload or None)

    _finish(build, method, "Plan", signature, transform_doc(spec, params))
    return build


def assert_method(spec: Mapping[str, Any], method: str, op_names: Mapping[str, str]) -> Callable[..., Any]:
    """``Plan.assert_``: an ``Assertion`` or plan data positionally, or one operator keyword."""
    operators = spec["operators"]
    by_param = {op_names[op["name"]]: op["name"] for op in operators}
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter(
            "assertion",
            inspect.Parameter.POSITIONAL_ONLY,
            default=None,
            annotation="Assertion | Mapping[str, Any] | None",
        ),
    ]
    # `self` and `assertion` are positional-only, so an operator may share their names.
    params[0] = params[0].replace(kind=inspect.Parameter.POSITIONAL_ONLY)
    for param, op in by_param.items():
        ann = OPERATOR_PAYLOADS[operator_kind(next(o for o in operators if o["name"] == op))]
        params.append(inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann))
    signature = inspect.Signature(params, return_annotation="Self")

    def build(self: PlanBase, assertion: Any = None, /, **kwargs: Any) -> PlanBase:
        index = self._index()
        given = {}
        for key, value in kwargs.items():
            op = by_param.get(key) or (key if key in by_param.values() else None)
            if op is None:
                raise plan_error(
                    f"assert: unknown assertion operator `{key}`{closest(key, by_param)} "
                    f"(operators: {', '.join(by_param)})",
                    "assert",
                    index,
                )
            if value is not None:
                given[op] = value
        exprs = ([] if assertion is None else [assertion]) + [{op: v} for op, v in given.items()]
        if len(exprs) != 1:
            raise plan_error(
                f"assert takes one assertion (an Assertion, a mapping or one operator keyword), got {len(exprs)}",
                "assert",
                index,
            )
        expr = plain(exprs[0])
        check_assertion(expr, operators, index)
        return self._add(spec["name"], expr)

    _finish(build, method, "Plan", signature, assert_doc(spec, op_names))
    return build


def operator_names(operators: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Operator name → ``Assertion`` constructor (and ``assert_`` keyword) name."""
    reserved = frozenset(n for n in dir(AssertionBase) if not n.startswith("_"))
    out: dict[str, str] = {}
    for op in operators:
        name = op["name"]
        if name.isidentifier() and not keyword.iskeyword(name) and name not in reserved:
            out[name] = name
        else:
            out[name] = python_name(name, [*reserved, *(o["name"] for o in operators), *out.values()])
    return out


def operator_parameters(op: Mapping[str, Any]) -> list[inspect.Parameter]:
    kind = operator_kind(op)
    if kind == "list":
        return [inspect.Parameter("assertions", inspect.Parameter.VAR_POSITIONAL, annotation="Assertion | Mapping[str, Any]")]
    if kind == "one":
        return [inspect.Parameter("assertion", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Assertion | Mapping[str, Any]")]
    return [
        inspect.Parameter(name, pkind, default=default, annotation=annotation(key))
        for name, key, pkind, default in parameters(op["keys"])
    ]


def operator_constructor(cls: type[AssertionBase], op: Mapping[str, Any], method: str) -> Callable[..., Any]:
    """``Assertion.<operator>(...)``: the assertion ``{operator: payload}``."""
    name = op["name"]
    kind = operator_kind(op)
    signature = inspect.Signature(operator_parameters(op), return_annotation="Assertion")

    def build(*args: Any, **kwargs: Any) -> AssertionBase:
        if kind == "list":
            if kwargs:
                raise TypeError(f"Assertion.{method}() takes assertions positionally")
            return cls({name: [plain(a) for a in args]})
        if kind == "one":
            bound = signature.bind(*args, **kwargs)
            return cls({name: plain(bound.arguments["assertion"])})
        return cls({name: _bind(f"assert {name}", op["keys"], signature, args, kwargs, "assert", None)})

    _finish(build, method, "Assertion", signature, operator_doc(op, parameters(op["keys"])))
    return build
