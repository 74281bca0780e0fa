"""``brainsurgery.Plan`` and ``brainsurgery.Assertion``: plans built in Python, with one method per
transform and one constructor per assertion operator, generated here at import time from the
engine's transform specs (``_core.transform_specs()``), so a transform added to the engine gets
its method with no edit to this package. ``_plan.pyi`` lists the same methods for editors and type
checkers; ``python -m brainsurgery._plan_stubgen`` regenerates it. The naming rules are in
``_plan_base``.
"""

from __future__ import annotations

from brainsurgery._plan_base import (
    AssertionBase,
    PlanBase,
    assert_method,
    method_names,
    operator_constructor,
    operator_names,
    specs_by_name,
    transform_method,
)

__all__ = ["Assertion", "Plan"]


class Plan(PlanBase):
    """A plan (SPEC §2) built in Python. Each transform is a method that appends it and returns
    the plan, so calls chain; keys are the method's parameters (``from`` is ``from_``), their
    names are checked at once (``PlanError`` with the closest names), their values when the plan
    runs.

    >>> import brainsurgery as bs
    >>> plan = (bs.Plan(inputs=["model.safetensors"], output="out.safetensors")
    ...         .move(r"h\\.(\\d+)\\.(.*)", r"layers.\\1.\\2")
    ...         .scale_(r".*\\.c_proj\\.weight", 0.5)
    ...         .assert_(bs.Assertion.count(r"h\\..*", 0)))
    >>> plan.run()  # doctest: +SKIP

    ``to_dict()`` / ``to_yaml()`` give the plan as data or text, ``Plan.from_yaml`` /
    ``Plan.from_dict`` read one back; ``check()`` and ``run()`` hand it to the engine.
    """


class Assertion(AssertionBase):
    """An assertion (SPEC §5), one constructor per operator: ``Assertion.exists("x")``,
    ``Assertion.count("h\\..*", 0)``, ``Assertion.equal("a::.*", "b::\\g<0>", eps=1e-6)``;
    ``&`` is ``all``, ``|`` is ``any``, ``~`` is ``not``. ``Plan.assert_`` appends one."""


def _install() -> None:
    specs = list(specs_by_name().values())
    names = method_names(specs)
    for spec in specs:
        method = names[spec["name"]]
        operators = spec.get("operators")
        if operators is not None:
            ops = operator_names(operators)
            setattr(Plan, method, assert_method(spec, method, ops))
            for op in operators:
                setattr(Assertion, ops[op["name"]], staticmethod(operator_constructor(Assertion, op, ops[op["name"]])))
        else:
            setattr(Plan, method, transform_method(spec, method))


_install()
