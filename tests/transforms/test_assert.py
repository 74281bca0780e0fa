"""assert (src/transforms/assert.rs): every operator true and false, messages, and errors."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import read

RNG = np.random.default_rng(11)
TENSORS = {
    "h.0.attn.w": RNG.standard_normal((4, 6)).astype(np.float32),
    "h.1.attn.w": RNG.standard_normal((4, 6)).astype(np.float32),
    "h.0.mlp.b": np.zeros(6, np.float32),
    "emb": RNG.standard_normal((2, 3, 4)).astype(np.float16),
    "ids": np.arange(5, dtype=np.int64),
    "bf": RNG.standard_normal(8).astype(ml_dtypes.bfloat16),
    "bad": np.array([1.0, np.nan, np.inf, -np.inf, 2.0], np.float32),
    "tiny": np.array([1e-4, -3e-4, 0.0], np.float32),
}


@pytest.fixture
def src(write):
    return write(TENSORS)


def _assert(src, tmp_path, expr, *, extra=()):
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(src)], "transforms": [*extra, {"assert": expr}], "output": str(out)})
    return out


PASSING = [
    {"exists": r"h\.0\..*"},
    {"exists": {"of": "emb"}},
    {"count": {"of": r"h\.\d+\.attn\.w", "is": 2}},
    {"count": {"of": r"nothing\..*", "is": 0}},
    {"count": {"of": ".*", "is": len(TENSORS)}},
    {"shape": {"of": r"h\.\d\.attn\.w", "is": [4, 6]}},
    {"shape": {"of": "emb::[1, :, ::2]", "is": [3, 2]}},
    {"dimensions": {"of": "emb", "is": 3}},
    {"dimensions": {"of": ".*", "ge": 1}},
    {"dimensions": {"of": "emb", "gt": 2}},
    {"dimensions": {"of": "h.*", "le": 2}},
    {"dimensions": {"of": "ids", "lt": 2}},
    {"dtype": {"of": r"h\..*", "is": "float32"}},
    {"dtype": {"of": "ids", "is": "long"}},
    {"dtype": {"of": "bf", "is": "bf16"}},
    {"equal": {"left": "h.0.attn.w", "right": "h.0.attn.w"}},
    {"equal": {"left": r"h\.0\.(.*)", "right": r"h.0.\1"}},
    {"iszero": "h.0.mlp.b"},
    {"iszero": {"of": "tiny", "eps": 3.1e-4}},
    {"iszero": {"of": "h.0.attn.w::[:0]"}},
    {"finite": r"h\..*"},
    {"finite": {"of": "bad::[::4]"}},
    {"all": [{"exists": "emb"}, {"count": {"of": "ids", "is": 1}}]},
    {"all": []},
    {"any": [{"exists": "nothing"}, {"exists": "emb"}]},
    {"not": {"exists": "nothing"}},
    {"not": {"iszero": "h.0.attn.w"}},
    {"not": {"not": {"exists": "emb"}}},
]

FAILING = [
    # (expression, assertion name, text that must appear: tensor and/or measured value)
    ({"exists": r"h\.9\..*"}, "exists", [r"h\.9"]),
    ({"count": {"of": r"h\.\d+\.attn\.w", "is": 3}}, "count", ["2"]),
    ({"count": {"of": r"nothing", "is": 1}}, "count", ["0"]),
    ({"shape": {"of": r"h\.\d\.attn\.w", "is": [6, 4]}}, "shape", ["h.0.attn.w", "(4, 6)"]),
    ({"dimensions": {"of": "emb", "is": 2}}, "dimensions", ["emb", "3"]),
    ({"dimensions": {"of": ".*", "ge": 2}}, "dimensions", ["1"]),
    ({"dimensions": {"of": "emb", "lt": 3}}, "dimensions", ["emb", "3"]),
    ({"dtype": {"of": ".*", "is": "float32"}}, "dtype", ["float16"]),
    ({"equal": {"left": "h.0.attn.w", "right": "h.1.attn.w"}}, "equal", ["h.0.attn.w", "h.1.attn.w"]),
    ({"iszero": "h.0.attn.w"}, "iszero", ["h.0.attn.w"]),
    ({"iszero": {"of": "tiny", "eps": 1e-4}}, "iszero", ["tiny", "3"]),
    ({"finite": ".*"}, "finite", ["bad", "1 NaN", "2 infinite"]),
    ({"all": [{"exists": "emb"}, {"exists": "nope"}]}, "exists", ["nope"]),
    ({"any": [{"exists": "nope"}, {"count": {"of": "emb", "is": 2}}]}, "any", ["nope"]),
    ({"not": {"exists": "emb"}}, "not", []),
]


@pytest.mark.parametrize("expr", PASSING, ids=[str(e)[:60] for e in PASSING])
def test_assertion_passes(src, tmp_path, expr):
    out = _assert(src, tmp_path, expr)
    # An assertion changes nothing.
    got = read(out)
    assert set(got) == set(TENSORS)
    for name, value in TENSORS.items():
        assert got[name].tobytes() == value.tobytes()


@pytest.mark.parametrize(("expr", "op", "needles"), FAILING, ids=[str(e[0])[:60] for e in FAILING])
def test_assertion_fails(src, tmp_path, expr, op, needles):
    with pytest.raises(bs.AssertionFailed) as info:
        _assert(src, tmp_path, expr, extra=[{"copy": {"from": "emb", "to": "emb2"}}])
    message = str(info.value)
    assert "transforms[1]" in message  # its index
    assert op in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "out.safetensors").exists()
    assert isinstance(info.value, bs.BrainSurgeryError)


def test_equal_failure_reports_max_abs_difference(src, tmp_path):
    a, b = TENSORS["h.0.attn.w"], TENSORS["h.1.attn.w"]
    expected = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    with pytest.raises(bs.AssertionFailed) as info:
        _assert(src, tmp_path, {"equal": {"left": "h.0.attn.w", "right": "h.1.attn.w", "eps": 1e-3}})
    message = str(info.value)
    numbers = [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)", message)]
    assert any(abs(n - expected) <= 1e-6 * expected for n in numbers), (expected, message)


def test_iszero_failure_reports_max_abs(src, tmp_path):
    expected = float(np.max(np.abs(TENSORS["h.1.attn.w"].astype(np.float64))))
    with pytest.raises(bs.AssertionFailed) as info:
        _assert(src, tmp_path, {"iszero": "h.1.attn.w"})
    numbers = [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)", str(info.value))]
    assert any(abs(n - expected) <= 1e-6 * expected for n in numbers), str(info.value)


def test_count_is_zero_after_delete(src, tmp_path):
    _assert(src, tmp_path, {"count": {"of": r"h\..*", "is": 0}}, extra=[{"delete": {"target": r"h\..*"}}])


def test_assert_sees_earlier_transforms(src, tmp_path):
    a = TENSORS["h.0.attn.w"]
    expr = {"all": [
        {"equal": {"left": "doubled", "right": "h.0.attn.w", "eps": float(np.max(np.abs(a))) * 1.0001}},
        {"not": {"equal": {"left": "doubled", "right": "h.0.attn.w"}}},
        {"dtype": {"of": "half", "is": "float16"}},
    ]}
    _assert(src, tmp_path, expr, extra=[{"scale": {"from": "h.0.attn.w", "to": "doubled", "by": 2.0}}, {"cast": {"from": "h.0.attn.w", "to": "half", "dtype": "float16"}}])


@pytest.mark.parametrize("other", [np.float16, ml_dtypes.bfloat16, np.float64, np.float32])
def test_equal_with_eps_across_dtypes(write, tmp_path, other):
    a = np.random.default_rng(3).standard_normal(100).astype(np.float32)
    b = a.astype(other)
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    path = write({"a": a, "b": b})
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"assert": {"equal": {"left": "a", "right": "b", "eps": diff}}}], "output": str(out)})
    if diff > 0:
        with pytest.raises(bs.AssertionFailed, match="equal"):
            bs.run({"inputs": [str(path)], "transforms": [{"assert": {"equal": {"left": "a", "right": "b", "eps": diff * 0.99}}}], "output": str(tmp_path / "o2.safetensors")})


def test_equal_across_aliases_and_slices(write, tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    ft = base.copy()
    ft[2] += 1
    pa = write({"w": base}, "a.safetensors")
    pb = write({"w": ft}, "b.safetensors")
    plan = lambda expr: {"inputs": [f"base::{pa}", f"ft::{pb}"], "transforms": [{"assert": expr}], "output": {"path": str(tmp_path / "o.safetensors"), "alias": "base"}}
    bs.run(plan({"equal": {"left": "base::w::[:2]", "right": "ft::w::[:2]"}}))
    bs.run(plan({"equal": {"left": "base::w", "right": "ft::w", "eps": 1.0}}))
    with pytest.raises(bs.AssertionFailed):
        bs.run(plan({"equal": {"left": "base::w", "right": "ft::w", "eps": 0.5}}))


def test_equal_nan_positions(write, tmp_path):
    # Documented in kernels::max_abs_diff: NaN against NaN counts as equal (a copy equals its
    # original), NaN against a number is an infinite difference whatever eps is.
    path = write({"a": np.array([np.nan, 1.0, np.inf], np.float32), "b": np.array([np.nan, 1.0, np.inf], np.float32), "c": np.array([0.0, 1.0, np.inf], np.float32)})
    bs.run({"inputs": [str(path)], "transforms": [{"assert": {"equal": {"left": "a", "right": "b"}}}], "output": str(tmp_path / "o.safetensors")})
    with pytest.raises(bs.AssertionFailed):
        bs.run({"inputs": [str(path)], "transforms": [{"assert": {"equal": {"left": "a", "right": "c", "eps": 1e30}}}], "output": str(tmp_path / "o.safetensors")})


def test_equal_missing_right_fails(src, tmp_path):
    with pytest.raises(bs.AssertionFailed, match="does not exist"):
        _assert(src, tmp_path, {"equal": {"left": "emb", "right": "emb.missing"}})


def test_iszero_nan_fails(write, tmp_path):
    path = write({"a": np.array([0.0, np.nan], np.float32)})
    with pytest.raises(bs.AssertionFailed, match="NaN"):
        bs.run({"inputs": [str(path)], "transforms": [{"assert": {"iszero": {"of": "a", "eps": 1e9}}}], "output": str(tmp_path / "o.safetensors")})


def test_finite_on_bf16_and_f16(write, tmp_path):
    good = np.array([1.0, -2.0, 65504.0], np.float32)
    path = write({"h": good.astype(np.float16), "b": good.astype(ml_dtypes.bfloat16), "hb": np.array([np.inf], np.float16), "bb": np.array([np.nan], np.float32).astype(ml_dtypes.bfloat16)})
    bs.run({"inputs": [str(path)], "transforms": [{"assert": {"finite": "h|b"}}], "output": str(tmp_path / "o.safetensors")})
    for bad in ("hb", "bb"):
        with pytest.raises(bs.AssertionFailed, match=bad):
            bs.run({"inputs": [str(path)], "transforms": [{"assert": {"finite": bad}}], "output": str(tmp_path / "o.safetensors")})


# ---------------------------------------------------------------- `not` does not hide plan errors


@pytest.mark.parametrize(
    "expr",
    [
        {"not": {"exists": "nosuchalias::emb"}},
        {"not": {"count": {"of": "nosuchalias::.*", "is": 0}}},
        {"not": {"exists": "emb("}},  # invalid regex
        {"not": {"frobnicate": "emb"}},  # unknown operator
        {"not": {"dimensions": {"of": "emb", "is": 2, "ge": 1}}},
    ],
)
def test_not_still_raises_plan_errors(src, tmp_path, expr):
    with pytest.raises(bs.PlanError):
        _assert(src, tmp_path, expr)


def test_unknown_alias_in_assert_is_plan_error(src, tmp_path):
    with pytest.raises(bs.PlanError, match="nosuchalias"):
        _assert(src, tmp_path, {"exists": "nosuchalias::emb"})


def test_value_assertions_on_integer_tensors(write, tmp_path):
    ids = np.array([0, -7, 3], np.int64)
    path = write({"ids": ids, "z": np.zeros(3, np.int32), "ids2": ids.copy(), "b": np.array([False, False])})
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"assert": {"all": [{"iszero": "z"}, {"iszero": "b"}, {"finite": "ids"}, {"equal": {"left": "ids", "right": "ids2"}}]}}], "output": str(out)})
    with pytest.raises(bs.AssertionFailed, match="7"):  # measured max |x| is 7
        bs.run({"inputs": [str(path)], "transforms": [{"assert": {"iszero": "ids"}}], "output": str(tmp_path / "o2.safetensors")})


def test_check_defers_value_assertions_but_evaluates_header_ones(src, tmp_path):
    plan = {"inputs": [str(src)], "transforms": [{"assert": {"iszero": "h.0.attn.w"}}], "output": str(tmp_path / "o.safetensors")}
    bs.check(plan)  # needs values: deferred, not failed
    with pytest.raises(bs.AssertionFailed):
        bs.run(plan)
    with pytest.raises(bs.AssertionFailed):
        bs.check({"inputs": [str(src)], "transforms": [{"assert": {"count": {"of": "emb", "is": 2}}}], "output": str(tmp_path / "o.safetensors")})


def test_reads_count_the_same_in_the_check_and_the_run(src, tmp_path):
    """Operands and in-place targets are reads; `any`/`all` read all their items in the run as in
    the check (which cannot decide value assertions early)."""
    from helpers import cli

    plan = tmp_path / "reads.yaml"
    plan.write_text(
        f"inputs:\n  - {src}\n"
        "transforms:\n"
        "  - copy: { from: h.0.attn.w, to: w2 }\n"
        "  - add: { from_a: h.0.attn.w, from_b: w2, to: q }\n"
        "  - subtract_: { from: h.0.attn.w, to: w2 }\n"
        "  - assert: { any: [ { finite: q }, { iszero: q } ] }\n"
        "  - assert: { reads: { of: w2, is: 2 } }\n"
        "  - assert: { reads: { of: q, is: 2 } }  # once per item of any\n",
    )
    assert bs.check(plan)["output"] == []
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_issue15_reads_and_writes_count_the_steps(src, tmp_path):
    """Issue 15 item 8: `reads` / `writes` as in the 0.2 tool — how many steps so far read or
    wrote each matched tensor (an input's arrival is one write; `exists` / `count` read nothing);
    `at_least` / `at_most` are its names for `ge` / `le`. Decided by the check too."""
    from helpers import assert_one_error, cli

    plan = tmp_path / "access.yaml"
    plan.write_text(
        f"inputs:\n  - {src}\n"
        "transforms:\n"
        "  - assert: { exists: emb }\n"
        "  - assert: { reads: { of: 'model::.*', is: 0 } }\n"
        "  - assert: { writes: { of: 'model::.*', is: 1 } }\n"
        "  - copy: { from: h.0.attn.w, to: h.0.attn.w_copy }\n"
        "  - scale_: { target: h.0.attn.w_copy, by: 0.5 }\n"
        "  - assert: { equal: { left: h.1.attn.w, right: h.1.attn.w } }\n"
        "  - assert: { reads: { of: 'h\\.0\\.attn\\.w', ge: 1 } }\n"
        "  - assert: { reads: { of: 'h\\.1\\.attn\\.w', is: 2 } }  # left and right\n"
        "  - assert: { writes: { of: h.0.attn.w_copy, is: 2 } }\n"
        "  - assert: { writes: { of: 'h\\.0\\.attn\\.w.*', lt: 3 } }\n"
        "  - assert: { reads: { of: h.0.attn.w_copy, at_most: 1 } }\n"
        "  - assert: { writes: { of: ids, at_least: 1 } }\n"
        "  - assert: { not: { reads: { of: emb, gt: 0 } } }\n",
    )
    assert bs.check(plan)["output"] == []
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    failing = tmp_path / "failing.yaml"
    failing.write_text(
        f"inputs:\n  - {src}\ntransforms:\n  - copy: {{ from: emb, to: e2 }}\n  - assert: {{ writes: {{ of: ln_f.weight, lt: 2 }} }}\n"
    )
    assert_one_error(cli([failing], cwd=tmp_path), 1, "transforms[1]", "writes", "ln_f.weight")
    failing.write_text(f"inputs:\n  - {src}\ntransforms:\n  - copy: {{ from: emb, to: e2 }}\n  - assert: {{ reads: {{ of: emb, lt: 1 }} }}\n")
    assert_one_error(cli([failing], cwd=tmp_path), 1, "transforms[1]", "model::emb", "read 1 times, expected fewer than 1")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.assert\.reads.*exactly one of"):
        bs.check({"inputs": [str(src)], "transforms": [{"assert": {"reads": {"of": "emb", "ge": 1, "at_most": 2}}}]})
    built = bs.Plan(inputs=[str(src)]).assert_(bs.Assertion.writes("emb", is_=1))
    built.run()
