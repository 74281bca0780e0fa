"""diff (src/transforms/diff.rs) and `brainsurgery diff`: exactly the injected differences."""

from __future__ import annotations

import re

import numpy as np
import pytest

import brainsurgery as bs
from helpers import pymod

RNG = np.random.default_rng(3)
BASE = {
    "h.0.w": RNG.standard_normal((4, 6)).astype(np.float32),
    "h.1.w": RNG.standard_normal((4, 6)).astype(np.float32),
    "h.0.b": RNG.standard_normal(6).astype(np.float32),
    "emb": RNG.standard_normal((3, 4)).astype(np.float16),
    "ids": np.arange(5, dtype=np.int64),
    "gone": np.ones(2, np.float32),
}


def changed():
    """BASE with one difference of each kind injected."""
    t = {k: v.copy() for k, v in BASE.items() if k != "gone"}
    t["h.1.w"] = t["h.1.w"].copy()
    t["h.1.w"][2, 3] += 0.25  # value
    t["h.0.b"] = t["h.0.b"].reshape(2, 3)  # shape
    t["emb"] = BASE["emb"].astype(np.float32)  # dtype (values equal)
    t["extra"] = np.zeros(3, np.float32)  # missing on the left
    return t


def parse(text):
    lines = text.splitlines()
    out = {"head": lines[0], "missing_left": [], "missing_right": [], "differs": {}, "dtype": {}}
    for line in lines[1:]:
        if m := re.fullmatch(r"  missing on the left: (\S+)", line):
            out["missing_left"].append(m.group(1))
        elif m := re.fullmatch(r"  missing on the right: (\S+)", line):
            out["missing_right"].append(m.group(1))
        elif m := re.fullmatch(r"  differs: (\S+) vs (\S+): (.*)", line):
            out["differs"][m.group(1)] = (m.group(2), m.group(3))
        elif m := re.fullmatch(r"  dtype: (\S+) vs (\S+): (.*)", line):
            out["dtype"][m.group(1)] = (m.group(2), m.group(3))
        else:
            raise AssertionError(f"unexpected line {line!r}")
    return out


def max_diff(reason):
    return float(re.search(r"max \|a-b\| = ([^\s,]+)", reason).group(1))


@pytest.fixture
def pair(write):
    return write(BASE, name="a.safetensors"), write(changed(), name="b.safetensors")


def run_diff(a, b, payload, check=False):
    plan = {"inputs": [f"a::{a}", f"b::{b}"], "transforms": [{"diff": payload}]}
    report = bs.check(plan) if check else bs.run(plan)
    return parse(report["output"][0])


def test_aliases_report_exactly_the_injected_differences(pair):
    r = run_diff(*pair, {"left_alias": "a", "right_alias": "b"})
    assert r["missing_left"] == ["b::extra"]
    assert r["missing_right"] == ["a::gone"]
    assert set(r["differs"]) == {"a::h.1.w", "a::h.0.b"}
    assert r["differs"]["a::h.0.b"] == ("b::h.0.b", "shape (6,) vs (2, 3)")
    right, reason = r["differs"]["a::h.1.w"]
    want = np.abs(BASE["h.1.w"].astype(np.float64) - changed()["h.1.w"].astype(np.float64)).max()
    assert right == "b::h.1.w" and f"max |a-b| = {np.format_float_scientific(want, precision=2)} > eps 0" in reason
    # A dtype change with equal values is reported as a dtype change (issue 14 item 6).
    assert r["dtype"]["a::emb"][1].startswith("float16 → float32 (max |a-b| = 0, rel = 0")
    assert max_diff(r["dtype"]["a::emb"][1]) == 0.0
    assert r["head"] == (
        "diff a vs b (eps 0): 5 pairs compared, 2 differ, 1 missing on the left, 1 missing on the right, "
        "1 pair with only a dtype change"
    )


def test_eps_hides_small_value_differences(pair):
    r = run_diff(*pair, {"left_alias": "a", "right_alias": "b", "eps": 0.3})
    assert set(r["differs"]) == {"a::h.0.b"} and set(r["dtype"]) == {"a::emb"}


def test_references_with_rewrite(pair):
    r = run_diff(*pair, {"left": r"a::h\..*", "right": r"b::\g<0>"})
    assert set(r["differs"]) == {"a::h.1.w", "a::h.0.b"}
    assert r["missing_left"] == [] and r["missing_right"] == []
    # A renaming rewrite: left h.N.w against b's h.N.w read through a different left pattern.
    r = run_diff(*pair, {"left": r"a::h\.(\d)\.w", "right": r"b::h.\1.w::[:, :]"})
    assert list(r["differs"]) == ["a::h.1.w"]
    # Everything: b's extra tensor is missing on the left, a's `gone` on the right.
    r = run_diff(*pair, {"left": "a::.*", "right": r"b::\g<0>"})
    assert r["missing_left"] == ["b::extra"] and r["missing_right"] == ["b::gone"]


def test_equal_checkpoints_report_no_differences(write):
    a = write(BASE, name="a.safetensors")
    r = run_diff(a, a, {"left_alias": "a", "right_alias": "b"})
    assert r["head"] == f"diff a vs b (eps 0): {len(BASE)} pairs compared, no differences"
    assert not r["differs"] and not r["missing_left"] and not r["missing_right"]


def test_nan_against_number_differs(write):
    x = np.array([1.0, np.nan, 3.0], np.float32)
    y = np.array([1.0, 2.0, 3.0], np.float32)
    a, b = write({"x": x, "n": x}, name="a.safetensors"), write({"x": y, "n": x}, name="b.safetensors")
    r = run_diff(a, b, {"left_alias": "a", "right_alias": "b"})
    assert list(r["differs"]) == ["a::x"] and max_diff(r["differs"]["a::x"][1]) == float("inf")


def test_check_reports_header_differences_and_defers_values(pair):
    r = run_diff(*pair, {"left_alias": "a", "right_alias": "b"}, check=True)
    assert set(r["differs"]) == {"a::h.0.b"}
    assert r["dtype"]["a::emb"][1] == "float16 → float32"
    assert r["missing_left"] == ["b::extra"] and r["missing_right"] == ["a::gone"]
    assert "(values of 4 pairs compared when the plan runs)" in r["head"]


def test_diff_never_fails_the_run_and_output_is_written(pair, tmp_path):
    out = tmp_path / "o.safetensors"
    plan = {"inputs": [f"a::{pair[0]}", f"b::{pair[1]}"], "transforms": [{"diff": {"left_alias": "a", "right_alias": "b"}}], "output": {"path": str(out), "alias": "a"}}
    bs.run(plan)
    assert out.exists()


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"left": "a::x", "left_alias": "b"}, "either `left` and `right`"),
        ({"left": "a::x"}, "either `left` and `right`"),
        ({"left_alias": "a", "right_alias": "b", "eps": -1}, "transforms[0].diff.eps"),
        ({"left_alias": "a", "right_alias": "b", "eps": "abc"}, "transforms[0].diff.eps"),
        ({"left_alias": "a", "right_alias": "nope"}, "nope"),
        ({"left_alias": "a", "rigth_alias": "b"}, "did you mean `right_alias`"),
    ],
)
def test_bad_payloads_are_plan_errors(pair, payload, needle):
    with pytest.raises(bs.PlanError) as info:
        run_diff(*pair, payload)
    assert needle in str(info.value) and "transforms[0]" in str(info.value)


def test_left_matching_nothing_is_a_transform_error(pair):
    with pytest.raises(bs.TransformError) as info:
        run_diff(*pair, {"left": r"a::layers\..*", "right": r"b::\g<0>"})
    assert "transforms[0]" in str(info.value) and r"layers\..*" in str(info.value)


def test_cli_diff_exit_codes(pair, write, tmp_path):
    a, b = pair
    proc = pymod(["diff", a, b], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    body = "\n".join(proc.stdout.splitlines()[2:])
    r = parse(body)
    assert r["missing_left"] == ["right::extra"] and r["missing_right"] == ["left::gone"]
    assert set(r["differs"]) == {"left::h.1.w", "left::h.0.b"} and set(r["dtype"]) == {"left::emb"}
    proc = pymod(["diff", a, a], cwd=tmp_path)
    assert proc.returncode == 0 and "no differences" in proc.stdout, proc.stdout + proc.stderr
    close = write({k: (v + np.asarray(1e-3, v.dtype) if v.dtype.kind == "f" else v) for k, v in BASE.items()}, name="c.safetensors")
    assert pymod(["diff", a, close], cwd=tmp_path).returncode == 1
    proc = pymod(["diff", a, close, "--eps", "0.01"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    proc = pymod(["diff", a, tmp_path / "missing.safetensors"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_issue15_mode_as_the_original_writes_it(pair, tmp_path):
    """Issue 15 item 1: `mode: refs|aliases` (the 0.2 tool's own help example) is accepted and
    reports what the same diff without `mode` reports; a mode that disagrees with the keys is a
    plan error naming the key."""
    from helpers import assert_one_error, cli

    a, b = pair
    plan = tmp_path / "diff.yaml"
    plan.write_text(
        f"inputs:\n  - base::{a}\n  - edited::{b}\n"
        "transforms:\n"
        "  - diff: { mode: aliases, left_alias: base, right_alias: edited }  # whole aliases\n"
        "  - diff: { mode: refs, left: 'base::h\\.1\\..*', right: 'edited::\\g<0>' }  # selected tensors\n"
        "  - diff: { left: 'base::h\\.1\\..*', right: 'edited::\\g<0>' }  # refs is the default\n"
    )
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("diff ")]
    assert len(starts) == 3, proc.stdout
    whole = parse("\n".join(lines[starts[0] : starts[1]]))
    assert whole["missing_left"] == ["edited::extra"] and whole["missing_right"] == ["base::gone"]
    assert set(whole["differs"]) == {"base::h.1.w", "base::h.0.b"} and set(whole["dtype"]) == {"base::emb"}
    report = bs.run(plan.read_text())
    built = bs.Plan(inputs=[f"base::{a}", f"edited::{b}"]).diff(mode="aliases", left_alias="base", right_alias="edited")
    assert built.to_dict()["transforms"] == [{"diff": {"left_alias": "base", "right_alias": "edited", "mode": "aliases"}}]
    assert built.run()["output"] == report["output"][:1]
    assert report["output"][1] == report["output"][2]
    assert parse(report["output"][1])["differs"].keys() == {"base::h.1.w"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"inputs:\n  - base::{a}\n  - edited::{b}\ntransforms:\n  - diff: {{ mode: aliases, left: base::x, right: edited::x }}\n")
    assert_one_error(cli([bad], cwd=tmp_path), 2, "transforms[0].diff.left", "mode `aliases`")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.diff\.mode.*expected refs or aliases"):
        bs.check({"inputs": [f"a::{a}", f"b::{b}"], "transforms": [{"diff": {"mode": "names", "left_alias": "a", "right_alias": "b"}}]})
