"""dump (src/transforms/dump.rs): compact folding, tree, json, statistics and values against NumPy."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from helpers import write_raw_st

RNG = np.random.default_rng(5)


def run_dump(path, payload, *, check=False, extra_inputs=()):
    plan = {"inputs": [str(path), *extra_inputs], "transforms": [{"dump": payload}]}
    report = bs.check(plan) if check else bs.run(plan)
    assert len(report["output"]) == 1
    return report["output"][0]


def fold_set(indices):
    """Reference folding of a set of layer numbers: `[0-3,5,7-9]`, a single number bare."""
    indices = sorted(set(indices))
    if len(indices) == 1:
        return str(indices[0])
    runs = []
    for i in indices:
        if runs and runs[-1][1] + 1 == i:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "[" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) + "]"


def shape_text(shape):
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def compact_rows(text):
    """`name -> (dtype, shape text, rest)` of the entry lines of a compact dump."""
    rows = {}
    for line in text.splitlines()[1:]:
        if not line.startswith("  ") or line.startswith("    "):
            continue
        m = re.match(r"^  (\S+)\s+(\S+)\s+(\([^)]*\))\s*(.*)$", line)
        assert m, line
        rows[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    return rows


def test_compact_folds_24_layers_with_gaps_and_mixed_names(write):
    present = [i for i in range(24) if i not in (4, 6)]
    tensors = {}
    for i in present:
        tensors[f"h.{i}.attn"] = np.zeros((2, 3), np.float32)
        tensors[f"h.{i}.mlp"] = np.zeros(3, np.float32)
    tensors["h.10.mlp"] = np.zeros(5, np.float32)  # a different shape breaks the run
    tensors["wte"] = np.zeros((4, 2), np.float16)
    tensors["blocks.007.w"] = np.zeros(1, np.float32)
    path = write(tensors)
    text = run_dump(path, {"format": "compact"})
    header = text.splitlines()[0]
    assert header.startswith(f"model: {len(tensors)} tensors"), header
    rows = compact_rows(text)
    mlp_same = [i for i in present if i != 10]
    expected = {
        f"h.{fold_set(present)}.attn": ("float32", "(2, 3)"),
        f"h.{fold_set(mlp_same)}.mlp": ("float32", "(3,)"),
        "h.10.mlp": ("float32", "(5,)"),
        "wte": ("float16", "(4, 2)"),
        "blocks.007.w": ("float32", "(1,)"),
    }
    assert {k: v[:2] for k, v in rows.items()} == expected
    assert "h.[0-3,5,7-23].attn" in rows
    assert "h.[0-3,5,7-9,11-23].mlp" in rows


def test_compact_folds_grids_and_full_range(write):
    tensors = {f"layers.{i}.experts.{j}.w": np.zeros((2, 2), np.float32) for i in range(24) for j in range(4)}
    tensors.update({f"layers.{i}.norm": np.ones(2, np.float32) for i in range(24)})
    rows = compact_rows(run_dump(write(tensors), {}))
    assert set(rows) == {"layers.[0-23].experts.[0-3].w", "layers.[0-23].norm"}


def test_shorthands_and_default_target(write, tmp_path):
    a = write({"x": np.ones(2, np.float32), "y": np.ones(3, np.int32)}, name="a.safetensors")
    assert set(compact_rows(run_dump(a, "x"))) == {"x"}
    plan = {"inputs": [str(a)], "transforms": ["dump"]}
    assert set(compact_rows(bs.run(plan)["output"][0])) == {"x", "y"}
    # No default alias with two inputs: every alias gets a section.
    b = write({"z": np.ones(1, np.float64)}, name="b.safetensors")
    out = bs.run({"inputs": [f"a::{a}", f"b::{b}"], "transforms": [{"dump": {"format": "json"}}]})["output"][0]
    doc = json.loads(out)
    assert [(s["alias"], [t["name"] for t in s["tensors"]]) for s in doc["aliases"]] == [("a", ["x", "y"]), ("b", ["z"])]


def test_tree_orders_numeric_segments_numerically(write):
    tensors = {}
    for i in (10, 2, 0, 1):
        tensors[f"h.{i}.attn.w"] = np.zeros((2, 2), np.float32)
    tensors["wte"] = np.zeros(3, np.float32)
    text = run_dump(write(tensors), {"format": "tree"})
    lines = text.splitlines()[1:]
    layer_lines = [l.strip() for l in lines if re.fullmatch(r"    \d+", l)]
    assert layer_lines == ["0", "1", "2", "10"]
    assert lines[0] == "  h"
    leaf = [l for l in lines if l.strip().startswith("w ")]
    assert len(leaf) == 4 and all(l.startswith("        w") and "float32" in l and "(2, 2)" in l for l in leaf)
    assert any(l.startswith("  wte") and "(3,)" in l for l in lines)


STAT_TENSORS = {
    "f32": RNG.standard_normal((7, 9)).astype(np.float32),
    "f16": (RNG.standard_normal(33) * 100).astype(np.float16),
    "bf": RNG.standard_normal((4, 5)).astype(ml_dtypes.bfloat16),
    "ids": RNG.integers(-1000, 1000, 20).astype(np.int64),
    "bad": np.array([1.5, np.nan, np.inf, -np.inf, -2.0, np.nan, 3.0], np.float32),
}


def numpy_stats(a):
    x = np.asarray(a, dtype=np.float64).ravel()
    finite = x[np.isfinite(x)]
    return {
        "min": np.nanmin(x),
        "max": np.nanmax(x),
        "mean": finite.mean(),
        "std": finite.std(),
        "nan": int(np.isnan(x).sum()),
        "inf": int(np.isinf(x).sum()),
    }


def close(got, want):
    if isinstance(got, str):
        got = float(got)
    if not np.isfinite(want):
        return got == want
    return abs(got - want) <= 1e-6 * max(abs(want), 1e-30)


@pytest.mark.parametrize("fmt", ["compact", "tree", "json"])
def test_stat_matches_numpy(write, fmt):
    path = write(STAT_TENSORS)
    text = run_dump(path, {"format": fmt, "verbosity": "stat"})
    if fmt == "json":
        doc = json.loads(text)
        assert doc["verbosity"] == "stat" and doc["deferred"] is False
        got = {t["name"]: t["stats"] for t in doc["aliases"][0]["tensors"]}
        for name, a in STAT_TENSORS.items():
            want = numpy_stats(a)
            assert got[name]["count"] == a.size
            for key in ("min", "max", "mean", "std"):
                assert close(got[name][key], want[key]), (name, key, got[name][key], want[key])
            assert (got[name]["nan"], got[name]["inf"]) == (want["nan"], want["inf"])
        return
    for name, a in STAT_TENSORS.items():
        line = next(l for l in text.splitlines() if re.match(rf"^\s+{name}\s", l))
        values = dict(re.findall(r"(\w+)=(\S+)", line))
        want = numpy_stats(a)
        for key in ("min", "max", "mean", "std"):
            assert close(values[key], want[key]), (name, key, values[key], want[key])
        assert (int(values["nan"]), int(values["inf"])) == (want["nan"], want["inf"])


def test_stat_on_a_slice_and_after_a_transform(write):
    a = STAT_TENSORS["f32"]
    path = write({"w": a})
    plan = {
        "inputs": [str(path)],
        "transforms": [{"scale_": {"target": "w", "by": 2.0}}, {"dump": {"target": "w::[1:3, ::2]", "verbosity": "stat", "format": "json"}}],
    }
    t = json.loads(bs.run(plan)["output"][0])["aliases"][0]["tensors"][0]
    want = numpy_stats((a * np.float32(2))[1:3, ::2])
    assert t["name"] == "w::[1:3, ::2]" and t["shape"] == [2, 5]
    for key in ("min", "max", "mean", "std"):
        assert close(t["stats"][key], want[key])


def test_check_defers_statistics(write):
    path = write(STAT_TENSORS)
    text = run_dump(path, {"verbosity": "stat"}, check=True)
    assert "read when the plan runs" in text.splitlines()[0]
    assert "min=" not in text
    doc = json.loads(run_dump(path, {"verbosity": "full", "format": "json"}, check=True))
    assert doc["deferred"] is True
    assert all("stats" not in t and "values" not in t for t in doc["aliases"][0]["tensors"])


def test_full_small_values_match_numpy(write):
    a = RNG.standard_normal((2, 3)).astype(np.float32)
    ids = np.arange(-3, 4, dtype=np.int64) * 10**15
    flags = np.array([True, False, True])
    path = write({"a": a, "ids": ids, "flags": flags})
    doc = json.loads(run_dump(path, {"verbosity": "full", "format": "json"}))
    got = {t["name"]: t for t in doc["aliases"][0]["tensors"]}
    np.testing.assert_array_equal(np.array(got["a"]["values"], np.float32), a)
    assert got["ids"]["values"] == ids.tolist()  # exact beyond 2^53
    assert got["flags"]["values"] == [True, False, True]
    assert not any(t["truncated"] for t in got.values())
    text = run_dump(path, {"verbosity": "full"})
    block = text.split("\n")
    i = next(k for k, l in enumerate(block) if l.lstrip().startswith("a "))
    rows = [block[i + 1], block[i + 2]]
    assert rows[0].lstrip().startswith("[[") and rows[1].rstrip().endswith("]]")
    parsed = np.array([[float(v) for v in r.replace("[", " ").replace("]", " ").split()] for r in rows])
    np.testing.assert_allclose(parsed, a, rtol=1e-5)
    assert "[-3000000000000000 -2000000000000000" in text
    assert "[ True False  True]" in text


def test_full_truncates_large_tensors_like_numpy(write):
    a = np.arange(2 * 3 * 400, dtype=np.float32).reshape(2, 3, 400)
    path = write({"big": a})
    t = json.loads(run_dump(path, {"verbosity": "full", "format": "json"}))["aliases"][0]["tensors"][0]
    assert t["truncated"] is True
    values = t["values"]
    assert len(values) == 2 and len(values[0]) == 3  # dimensions of at most 6 are kept whole
    row = values[1][2]
    assert row[3] == "..." and len(row) == 7
    assert row[:3] == a[1, 2, :3].tolist() and row[4:] == a[1, 2, -3:].tolist()
    text = run_dump(path, {"verbosity": "full"})
    assert "[[[   0    1    2 ...  397  398  399]" in text
    assert "[2000 2001 2002 ... 2397 2398 2399]]]" in text


def test_issue9_full_prints_values_instead_of_statistics(write):
    """Issue 9 item 11d: `full` read every element for its statistics although only the printed
    ones are promised to be read; it now prints the values alone (`stat` prints statistics)."""
    a = np.arange(3000, dtype=np.float32).reshape(3, 1000)
    path = write({"big": a, "small": np.ones(3, np.float32)})
    doc = json.loads(run_dump(path, {"verbosity": "full", "format": "json"}))
    for t in doc["aliases"][0]["tensors"]:
        assert "stats" not in t and "values" in t, t
    text = run_dump(path, {"verbosity": "full"})
    assert "min=" not in text and "[[   0    1    2 ...  997  998  999]" in text
    assert "min=0 max=2999" in run_dump(path, {"verbosity": "stat"})


def test_full_in_compact_folds_identical_values(write):
    path = write({f"h.{i}.b": np.zeros(3, np.float32) for i in range(4)} | {"h.4.b": np.ones(3, np.float32)})
    text = run_dump(path, {"verbosity": "full"})
    rows = compact_rows(text)
    assert set(rows) == {"h.[0-3].b", "h.4.b"}
    assert "    [0 0 0]" in text and "    [1 1 1]" in text


def test_issue9_a_22000_dim_shape_and_a_long_name_print_shortened(tmp_path):
    """Issue 9 item 2: the shape column of a 22,000-dimension tensor panicked (width > 65,535);
    names and shapes beyond 100 characters are cut in the middle, `json` keeps them whole."""
    long = "h." + "x" * 70_000 + ".w"
    header = {
        "deep": {"dtype": "F32", "shape": [1] * 22_000, "data_offsets": [0, 4]},
        long: {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = write_raw_st(tmp_path / "deep.safetensors", json.dumps(header).encode(), bytes(12))
    for fmt in ("compact", "tree"):
        text = run_dump(path, {"format": fmt})
        lines = text.splitlines()
        deep = next(l for l in lines if l.lstrip().startswith("deep"))
        shape = deep.split("float32", 1)[1].strip()
        assert len(shape) == 100 and shape.startswith("(1, 1") and shape.endswith("1, 1)") and "…" in shape
        assert max(map(len, lines)) < 250, fmt
    text = run_dump(path, {"verbosity": "full"})
    assert "\n    [0]\n" in text  # beyond 64 dimensions (NumPy's limit) values print flattened
    doc = json.loads(run_dump(path, {"format": "json"}))
    tensors = {t["name"]: t for t in doc["aliases"][0]["tensors"]}
    assert tensors["deep"]["shape"] == [1] * 22_000 and long in tensors


def test_full_of_a_million_dimensions_prints_flattened(tmp_path):
    """Printing recursed once per dimension: a 1,000,000-dimension tensor (a 3 MB header)
    overflowed the stack."""
    header = {"deep": {"dtype": "F32", "shape": [1] * 1_000_000, "data_offsets": [0, 4]}}
    path = write_raw_st(tmp_path / "deep.safetensors", json.dumps(header).encode(), bytes(4))
    doc = json.loads(run_dump(path, {"verbosity": "full", "format": "json"}))
    assert doc["aliases"][0]["tensors"][0]["values"] == [0]
    assert "\n    [0]" in run_dump(path, {"verbosity": "full", "format": "tree"})


def test_tree_nests_at_most_32_levels(tmp_path):
    """A name of 70,000 dots would print 70,000 ever deeper lines; deeper segments stay joined."""
    header = {"." * 70_000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    path = write_raw_st(tmp_path / "dots.safetensors", json.dumps(header).encode(), bytes(4))
    lines = run_dump(path, {"format": "tree"}).splitlines()
    assert len(lines) == 33 and max(map(len, lines)) < 250


def test_unknown_format_and_verbosity_are_plan_errors(write):
    path = write({"x": np.ones(2, np.float32)})
    with pytest.raises(bs.PlanError) as info:
        run_dump(path, {"format": "tabel"})
    assert "transforms[0].dump.format" in str(info.value) and "tabel" in str(info.value)
    with pytest.raises(bs.PlanError) as info:
        run_dump(path, {"verbosity": "stats"})
    assert "transforms[0].dump.verbosity" in str(info.value) and "did you mean `stat`" in str(info.value)
    with pytest.raises(bs.PlanError) as info:
        run_dump(path, {"targt": "x"})
    assert "transforms[0].dump" in str(info.value) and "did you mean `target`" in str(info.value)


def test_target_matching_nothing_is_a_transform_error(write):
    path = write({"x": np.ones(2, np.float32)})
    with pytest.raises(bs.TransformError) as info:
        run_dump(path, {"target": r"layers\..*"})
    assert "transforms[0]" in str(info.value) and r"layers\..*" in str(info.value)
