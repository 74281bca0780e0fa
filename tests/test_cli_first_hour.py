"""Issue 14 items 2, 5, 6, 8 and 9: the command line as a new user types it in the first hour:
help, mistyped commands and checkpoints given as plans, `inspect` (pattern, natural order,
sizes, total, --compact, --json), `diff` across dtypes with NumPy-computed figures, the
`prefixes` notice, and the start-up imports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from helpers import assert_one_error, cli, write_st

RNG = np.random.default_rng(14)


def natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|\D+", name)]


def layered() -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {"embed.weight": RNG.standard_normal((8, 4)).astype(np.float32)}
    for i in range(12):
        t[f"layers.{i}.mlp.w"] = RNG.standard_normal((4, 6)).astype(ml_dtypes.bfloat16)
        t[f"layers.{i}.norm"] = np.ones(4, np.float32)
    t["head.weight"] = np.zeros(384, np.float32)  # 1.50 KiB
    return t


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    write_st(tmp_path / "m.safetensors", layered())
    return tmp_path


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


# Item 2: help, mistyped commands, checkpoints given as plans.


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_item2_help_shows_the_main_form_first_then_the_commands(ws: Path, flag: str) -> None:
    out = ok(cli([flag], cwd=ws)).stdout
    usage = out.index("Usage: brainsurgery PLAN.yaml [-e STEP]... [-i] [-o OUT] [--summarize]")
    options = [out.index(o) for o in ("--execute", "--interactive", "--output", "--summarize", "--max-memory")]
    commands = out.index("Commands:")
    assert usage < min(options) and max(options) < commands, out
    listed = re.findall(r"^  (\w+)  ", out[commands:], re.M)
    assert listed == ["run", "check", "inspect", "diff", "mergekit", "help"], out[commands:]
    # `help` without a name opens the same way, then lists the transforms.
    text = ok(cli(["help"], cwd=ws)).stdout
    assert text.index("Usage: brainsurgery PLAN.yaml") < text.index("Commands:") < text.index("merge_lora"), text[:2000]


def test_item2_a_mistyped_command_suggests_the_command(ws: Path) -> None:
    message = assert_one_error(cli(["inspekt", "m.safetensors"], cwd=ws), 2, "did you mean `inspect`?")
    assert "inspekt" in message
    assert_one_error(cli(["chekc", "plan.yaml"], cwd=ws), 2, "did you mean `check`?")
    # A plan name far from every command keeps the plain error.
    proc = cli(["myplan.yaml"], cwd=ws)
    assert proc.returncode == 2 and "did you mean" not in proc.stderr and "myplan.yaml" in proc.stderr


def test_item2_a_checkpoint_given_as_the_plan_points_to_inspect(ws: Path) -> None:
    for item in ["m.safetensors", "."]:
        message = assert_one_error(cli([item], cwd=ws), 2, "looks like a checkpoint, not a plan")
        assert f"to look inside it: brainsurgery inspect {item}" in message
    assert_one_error(cli(["run", "m::m.safetensors"], cwd=ws), 2, "brainsurgery inspect m.safetensors")
    # `check CHECKPOINT` still validates its headers; with something to do, a checkpoint is an
    # input as before: a conversion, a one-liner.
    assert "plan is valid" in ok(cli(["check", "m.safetensors"], cwd=ws)).stdout
    ok(cli(["m.safetensors", "-o", "copy.safetensors"], cwd=ws))
    assert (ws / "copy.safetensors").exists()
    ok(cli(["check", "m.safetensors", "-e", "scale_: target: head.weight, by: 2"], cwd=ws))


# Item 5: inspect.


def table_names(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert lines[0].split() == ["name", "dtype", "shape", "size"], lines[0]
    return [line.split()[0] for line in lines[1:] if not line.startswith(("total:", "metadata "))]


def test_item5_inspect_natural_order_sizes_and_total(ws: Path) -> None:
    t = layered()
    out = ok(cli(["inspect", "m.safetensors"], cwd=ws)).stdout
    assert table_names(out) == sorted(t, key=natural_key)
    assert table_names(out).index("layers.2.mlp.w") < table_names(out).index("layers.10.mlp.w")
    head = next(line for line in out.splitlines() if line.startswith("head.weight"))
    assert head.split()[-2:] == ["1.50", "KiB"], head
    total = next(line for line in out.splitlines() if line.startswith("total:"))
    params = sum(a.size for a in t.values())
    by_dtype: dict[str, int] = {}
    for a in t.values():
        by_dtype[a.dtype.name] = by_dtype.get(a.dtype.name, 0) + a.nbytes
    assert f"total: {len(t)} tensors, {params} parameters" in total, total
    # Bytes by dtype, largest first, in the units of the size column.
    shown = re.findall(r"(\w+) ([\d.]+ \w*B)", total.split("(", 1)[1])
    assert [d for d, _ in shown] == sorted(by_dtype, key=lambda d: -by_dtype[d]), total
    assert dict(shown)["float32"] == f"{by_dtype['float32'] / 1024:.2f} KiB", total


def test_item5_inspect_pattern_regex_and_structured(ws: Path) -> None:
    t = layered()
    out = ok(cli(["inspect", "m.safetensors", r"layers\.1\d?\.mlp\.w"], cwd=ws)).stdout
    want = sorted((n for n in t if re.fullmatch(r"layers\.1\d?\.mlp\.w", n)), key=natural_key)
    assert table_names(out) == want == ["layers.1.mlp.w", "layers.10.mlp.w", "layers.11.mlp.w"]
    assert f"total: 3 of {len(t)} tensors, {sum(t[n].size for n in want)} parameters" in out
    out = ok(cli(["inspect", "m.safetensors", '[layers, $i, "~norm|mlp", "*rest"]'], cwd=ws)).stdout
    assert table_names(out) == sorted((n for n in t if n.startswith("layers.")), key=natural_key)
    # A regex that opens with a character class is still a regex.
    out = ok(cli(["inspect", "m.safetensors", r"[eh][a-z]+\.weight"], cwd=ws)).stdout
    assert table_names(out) == ["embed.weight", "head.weight"]
    message = assert_one_error(cli(["inspect", "m.safetensors", r"layer\.0\..*"], cwd=ws), 2, "matches no tensor")
    assert "closest names" in message and "layers.0." in message
    assert_one_error(cli(["inspect", "m.safetensors", "[layers, $i"], cwd=ws), 2, "inspect PATTERN")


def test_item5_inspect_compact_folds_layers_as_dump_compact(ws: Path) -> None:
    out = ok(cli(["inspect", "m.safetensors", "--compact"], cwd=ws)).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if not line.startswith("total:")}
    assert list(rows) == ["embed.weight", "head.weight", "layers.[0-11].mlp.w", "layers.[0-11].norm"]
    assert rows["layers.[0-11].mlp.w"].split()[-4:] == ["12", "×", "48", "B"], rows
    # The same folding as the `dump compact` transform.
    dump = bs.check({"inputs": [str(ws / "m.safetensors")], "transforms": [{"dump": {"format": "compact"}}]})
    assert "layers.[0-11].mlp.w" in dump["output"][0] and "layers.[0-11].norm" in dump["output"][0]
    doc = json.loads(ok(cli(["inspect", "m.safetensors", "--compact", "--json", r"layers\..*"], cwd=ws)).stdout)
    assert [(r["name"], r["count"], r["nbytes"]) for r in doc["tensors"]] == [
        ("layers.[0-11].mlp.w", 12, 12 * 48),
        ("layers.[0-11].norm", 12, 12 * 16),
    ]


def test_item5_inspect_json_with_pattern(ws: Path) -> None:
    t = layered()
    doc = json.loads(ok(cli(["inspect", "m.safetensors", r".*\.weight", "--json"], cwd=ws)).stdout)
    want = sorted((n for n in t if n.endswith(".weight")), key=natural_key)
    assert [r["name"] for r in doc["tensors"]] == want
    for r in doc["tensors"]:
        assert r["shape"] == list(t[r["name"]].shape) and r["nbytes"] == t[r["name"]].nbytes
    assert doc["parameters"] == sum(t[n].size for n in want)
    assert doc["nbytes"] == sum(t[n].nbytes for n in want)
    assert doc["dtypes"] == {"float32": {"nbytes": doc["nbytes"], "parameters": doc["parameters"]}}


def test_item5_python_info_takes_the_pattern_too(ws: Path) -> None:
    t = layered()
    ck = bs.open(ws / "m.safetensors")
    rows = ck.info(pattern=r"layers\.1\d?\.mlp\.w")
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    # File order (the order `info()` always had), the tensors the CLI's pattern selects.
    assert [r["name"] for r in rows] == [n for n in t if re.fullmatch(r"layers\.1\d?\.mlp\.w", n)]
    assert all(r["nbytes"] == t[r["name"]].nbytes for r in rows)
    rows = ck.info(pattern=["layers", "$i", "norm"])
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert [r["name"] for r in rows] == [f"layers.{i}.norm" for i in range(12)]
    with pytest.raises(bs.PlanError, match="no `alias::` or slice"):
        ck.info(pattern="m::layers.*")
    with pytest.raises(TypeError):
        ck.info("head.weight", pattern=".*")


# Item 6: diff across dtypes, NumPy's figures and formatting, --json.


def sci(x: float) -> str:
    return "0" if x == 0 else np.format_float_scientific(x, precision=2)


def figures(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """max |a-b|, ‖a-b‖/‖a‖ and cosine of both sides cast to float32 (computed in float64)."""
    x = a.astype(np.float32).astype(np.float64).ravel()
    y = b.astype(np.float32).astype(np.float64).ravel()
    rel = np.linalg.norm(x - y) / np.linalg.norm(x)
    return float(np.abs(x - y).max()), float(rel), float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def diff_pair(tmp_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    a = {
        "w": w,
        "exact": np.array([0.5, -2.0, 1.25], np.float32),
        "noisy": RNG.standard_normal(50).astype(np.float32),
        "same": np.arange(4, dtype=np.int64),
    }
    noisy = a["noisy"] + RNG.standard_normal(50).astype(np.float32) * 0.5
    b = {"w": w.astype(ml_dtypes.bfloat16), "exact": a["exact"].astype(np.float16), "noisy": noisy, "same": a["same"]}
    write_st(tmp_path / "a.safetensors", a)
    write_st(tmp_path / "b.safetensors", b)
    return a, b


def test_item6_diff_across_dtypes_with_numpy_figures(tmp_path: Path) -> None:
    a, b = diff_pair(tmp_path)
    proc = cli(["diff", "a.safetensors", "b.safetensors"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].startswith("diff left vs right (eps 0): 4 pairs compared, 2 differ, 0 missing on the left, "), lines[2]
    assert lines[2].endswith("1 pair with only a dtype change"), lines[2]
    by_name = {re.match(r"  \w+: left::(\S+)", line).group(1): line for line in lines[3:]}
    assert set(by_name) == {"w", "exact", "noisy"}
    # A dtype change with equal values is reported as such, not as a difference.
    assert by_name["exact"] == "  dtype: left::exact vs right::exact: float32 → float16 (max |a-b| = 0, rel = 0, cos = 1.e+00)"
    m, r, c = figures(a["w"], b["w"])
    assert by_name["w"] == (
        f"  differs: left::w vs right::w: dtype float32 → bfloat16; max |a-b| = {sci(m)} > eps 0, rel = {sci(r)}, cos = {sci(c)}"
    )
    m, r, c = figures(a["noisy"], b["noisy"])
    assert by_name["noisy"] == f"  differs: left::noisy vs right::noisy: max |a-b| = {sci(m)} > eps 0, rel = {sci(r)}, cos = {sci(c)}"
    # --eps applies to the float32 values: the bfloat16 rounding then is a dtype change only.
    eps = figures(a["w"], b["w"])[0]
    proc = cli(["diff", "a.safetensors", "b.safetensors", "--eps", repr(eps), "--json"], cwd=tmp_path)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["equal"] is False and doc["compared"] == 4
    got = {d["left"]: d for d in doc["differing"]}
    assert got["left::w"]["only_dtype"] is True and got["left::w"]["dtype"] == ["float32", "bfloat16"]
    assert got["left::noisy"]["only_dtype"] is False and got["left::noisy"]["over_eps"] is True
    for name in ["w", "noisy"]:
        want = figures(a[name], b[name])
        assert [got[f"left::{name}"][k] for k in ("max_abs", "rel", "cos")] == pytest.approx(want, rel=1e-9)
    assert doc["left_path"] == "a.safetensors" and doc["right_path"] == "b.safetensors"


def test_item6_the_diff_transform_reports_the_same_figures(tmp_path: Path) -> None:
    diff_pair(tmp_path)
    cli_lines = cli(["diff", "a.safetensors", "b.safetensors"], cwd=tmp_path).stdout.splitlines()[3:]
    plan = {
        "inputs": [f"left::{tmp_path / 'a.safetensors'}", f"right::{tmp_path / 'b.safetensors'}"],
        "transforms": [{"diff": {"left_alias": "left", "right_alias": "right"}}],
    }
    report = bs.run(plan, quiet=True)
    assert report["output"][0].splitlines()[1:] == cli_lines
    # A check finds the dtype changes from the headers and defers the values.
    checked = bs.check(plan)["output"][0].splitlines()
    assert "  dtype: left::exact vs right::exact: float32 → float16" in checked
    assert "(values of 4 pairs compared when the plan runs)" in checked[0]


# Item 8: prefixes manages aliases.


def test_item8_prefixes_help_and_an_alias_ending_with_a_dot_warns(ws: Path) -> None:
    text = ok(cli(["help", "prefixes"], cwd=ws)).stdout
    assert "aliases" in text and "not name prefixes" in text and "`move`" in text
    proc = ok(cli(["check", "m.safetensors", "-e", "prefixes: mode: add, alias: model."], cwd=ws))
    notice = [line for line in proc.stderr.splitlines() if line.startswith("notice: ")]
    assert len(notice) == 1 and "alias `model.` ends with `.`" in notice[0] and "`move`" in notice[0], proc.stderr
    proc = ok(cli(["check", "m.safetensors", "-e", "prefixes: mode: rename, from: model, to: base."], cwd=ws))
    assert "alias `base.` ends with `.`" in proc.stderr
    proc = ok(cli(["check", "m.safetensors", "-e", "prefixes: mode: add, alias: extra"], cwd=ws))
    assert "notice" not in proc.stderr
    # Python: the notice is in the report.
    report = bs.check({"inputs": [str(ws / "m.safetensors")], "transforms": [{"prefixes": {"mode": "add", "alias": "x."}}]})
    assert any("alias `x.` ends with `.`" in n for n in report["notices"])


# Item 9: start-up imports and the summary of a plan without output.


def test_item9_the_command_line_imports_only_the_engine() -> None:
    code = "import sys, brainsurgery.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('brainsurgery', 'typing', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['brainsurgery', 'brainsurgery._core', 'brainsurgery.cli']"
    # Every public name still resolves, and `import *` gives them all.
    code = "import brainsurgery as bs; ns = {}; exec('from brainsurgery import *', ns); print(all(n in ns for n in bs.__all__), bs.Plan.__name__, bs.run.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "Plan", "brainsurgery._run"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bs.nope  # noqa: B018


def test_item9_a_plan_without_output_says_nothing_was_written(ws: Path) -> None:
    out = ok(cli(["m.safetensors", "-e", "scale_: target: head.weight, by: 2"], cwd=ws)).stdout
    assert "no output: nothing written" in out.splitlines()
    out = ok(cli(["check", "m.safetensors", "-e", "scale_: target: head.weight, by: 2"], cwd=ws)).stdout
    assert "no output: nothing would be written" in out.splitlines()
