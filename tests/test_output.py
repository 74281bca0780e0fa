"""Output files (SPEC §6.1, §6.2, §6.3), read back with the official ``safetensors`` package and
by parsing headers by hand; inputs are written by hand, expected values computed with NumPy."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import brainsurgery as bs
from helpers import cli, dump_plan, file_metadata, header_dict, listing, sha256, temporaries, tensor_order, write_st

INPUT = {
    "z.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "a.bias": np.linspace(-2, 2, 7, dtype=np.float32),
    "m.half": np.arange(10, dtype=np.float16).reshape(2, 5),
    "k.ids": np.arange(4, dtype=np.int64),
    "q.int8": np.array([-128, -1, 0, 127], dtype=np.int8),
    "mask": np.array([True, False, True]),
    "u": np.arange(6, dtype=np.uint8).reshape(2, 3),
}
META = {"format": "pt", "note": "kept"}


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_st(tmp_path / "in.safetensors", INPUT, META)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, (name, got[name].dtype, want.dtype)
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def load_dir(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a directory output, via its index when there is one."""
    index = directory / "model.safetensors.index.json"
    files = sorted({v for v in json.loads(index.read_text())["weight_map"].values()}) if index.exists() else ["model.safetensors"]
    out: dict[str, np.ndarray] = {}
    for f in files:
        part = load_file(str(directory / f))
        assert not set(part) & set(out), "a tensor is in two shards"
        out.update(part)
    return out


def expected_shards(sizes: list[int], budget: int) -> list[list[int]]:
    """SPEC §6.2: tensors in output order; a shard closes when the next tensor would overflow it;
    a tensor above the budget therefore sits alone."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > budget:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


# ---------------------------------------------------------------- layouts


def test_single_file_output(ws: Path) -> None:
    bs.run({"inputs": ["in.safetensors"], "transforms": [{"scale_": {"target": "z\\.weight", "by": -1.5}}], "output": "o.safetensors"})
    expected = dict(INPUT)
    expected["z.weight"] = INPUT["z.weight"] * np.float32(-1.5)
    assert_same(load_file(str(ws / "o.safetensors")), expected)
    assert sorted(os.listdir(ws)) == ["in.safetensors", "o.safetensors"]
    # header layout: data section 8-byte aligned, offsets contiguous from 0
    raw = (ws / "o.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = header_dict(ws / "o.safetensors")
    header.pop("__metadata__")
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + n + spans[-1][1] == len(raw)


def test_sharded_directory_output(ws: Path) -> None:
    tensors = {f"t{i}": np.full((50, 2), i, np.float32) for i in range(7)}  # 400 B each
    tensors["small"] = np.arange(10, dtype=np.int16)  # 20 B
    write_st(ws / "s.safetensors", tensors, META)
    bs.run({"inputs": ["s.safetensors"], "output": {"path": "out", "shard": "1KiB"}})
    names = list(tensors)
    groups = expected_shards([a.nbytes for a in tensors.values()], 1024)
    n = len(groups)
    assert n == 4
    shard_files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    assert listing(ws / "out") == sorted(shard_files + ["model.safetensors.index.json"])
    index = json.loads((ws / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert index["weight_map"] == {names[i]: shard_files[k] for k, g in enumerate(groups) for i in g}
    for k, group in enumerate(groups):
        assert tensor_order(ws / "out" / shard_files[k]) == [names[i] for i in group]
        with safe_open(str(ws / "out" / shard_files[k]), framework="numpy") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and meta["note"] == "kept" and "brainsurgery.version" in meta
    assert_same(load_dir(ws / "out"), tensors)


def test_tensor_above_budget_gets_its_own_shard(ws: Path) -> None:
    tensors = {
        "a": np.zeros(100, np.float32),  # 400 B
        "huge": np.arange(600, dtype=np.float32),  # 2400 B > 1 KiB
        "b": np.ones(100, np.float32),
        "c": np.ones(100, np.float32),
    }
    write_st(ws / "s.safetensors", tensors)
    bs.run({"inputs": ["s.safetensors"], "output": {"path": "out", "shard": "1KiB"}})
    index = json.loads((ws / "out" / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    assert [k for k, v in wm.items() if v == wm["huge"]] == ["huge"]
    assert len(set(wm.values())) == 3  # [a] [huge] [b c]
    assert wm["b"] == wm["c"] != wm["a"]
    assert index["metadata"]["total_size"] == 400 + 2400 + 800
    assert_same(load_dir(ws / "out"), tensors)


def test_binary_units(ws: Path) -> None:
    # 1KiB = 1024 bytes: two 512-byte tensors fit in one shard exactly, a third does not.
    tensors = {f"t{i}": np.zeros(128, np.float32) for i in range(3)}
    write_st(ws / "s.safetensors", tensors)
    bs.run({"inputs": ["s.safetensors"], "output": {"path": "out", "shard": "1KiB"}})
    wm = json.loads((ws / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert wm["t0"] == wm["t1"] != wm["t2"]


def test_decimal_units_as_transformers_reads_them(ws: Path) -> None:
    # Issue 14 item 4: KB/MB/GB are powers of ten (transformers' "5GB" is 5·10⁹): 1KB = 1000
    # bytes holds one 512-byte tensor, not two; KiB stays 1024. The same for --max-memory.
    tensors = {f"t{i}": np.zeros(128, np.float32) for i in range(3)}
    write_st(ws / "s.safetensors", tensors)
    bs.run({"inputs": ["s.safetensors"], "output": {"path": "out", "shard": "1KB"}})
    wm = json.loads((ws / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(wm.values())) == 3
    assert bs.check({"inputs": ["s.safetensors"]}, max_memory="40MB")["memory_budget"] == 40_000_000
    assert bs.check({"inputs": ["s.safetensors"]}, max_memory="40MiB")["memory_budget"] == 40 << 20
    assert bs.check({"inputs": ["s.safetensors"]}, max_memory="2GB")["memory_budget"] == 2 * 10**9


def test_shard_none_gives_one_file(ws: Path) -> None:
    tensors = {f"t{i}": np.full(300, i, np.float32) for i in range(4)}
    write_st(ws / "s.safetensors", tensors)
    bs.run({"inputs": ["s.safetensors"], "output": {"path": "out", "shard": "none"}})
    assert listing(ws / "out") == ["model.safetensors"]
    assert_same(load_file(str(ws / "out" / "model.safetensors")), tensors)
    # and without any shard key (default 5GB): also one file, no index
    bs.run({"inputs": ["s.safetensors"], "output": "out2"})
    assert listing(ws / "out2") == ["model.safetensors"]


# ---------------------------------------------------------------- order, metadata, determinism


def test_output_order_input_then_creation(ws: Path) -> None:
    bs.run(
        {
            "inputs": ["in.safetensors"],
            "transforms": [
                {"copy": {"from": "m.half", "to": "new.second"}},
                {"copy": {"from": "(z|a)\\.(.*)", "to": "c.\\1.\\2"}},
                {"delete": {"target": "k.ids"}},
                {"scale_": {"target": "a\\.bias", "by": 2}},
                {"copy": {"from": "u", "to": "new.last"}},
            ],
            "output": "o.safetensors",
        }
    )
    inputs_kept = [k for k in INPUT if k != "k.ids"]
    assert tensor_order(ws / "o.safetensors") == inputs_kept + ["new.second", "c.z.weight", "c.a.bias", "new.last"]
    # header order and data order agree
    header = header_dict(ws / "o.safetensors")
    header.pop("__metadata__")
    starts = [v["data_offsets"][0] for v in header.values()]
    assert starts == sorted(starts)


def test_metadata_kept_and_provenance_added(ws: Path) -> None:
    plan = {"inputs": ["in.safetensors"], "transforms": [{"scale_": {"target": "z.weight", "by": 2}}], "output": "o.safetensors"}
    bs.run(plan)
    with safe_open(str(ws / "o.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["note"] == "kept"
    assert meta["brainsurgery.version"] == bs.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", meta["brainsurgery.plan_sha256"]), meta
    assert set(meta) == set(META) | {"brainsurgery.version", "brainsurgery.plan_sha256", "brainsurgery.inputs"}
    # The hash identifies the plan: same plan → same hash; another plan → another hash.
    bs.run(dict(plan, output="o2.safetensors", transforms=[{"scale_": {"target": "z.weight", "by": 3}}]))
    other = file_metadata(ws / "o2.safetensors")["brainsurgery.plan_sha256"]
    assert other != meta["brainsurgery.plan_sha256"] and re.fullmatch(r"[0-9a-f]{64}", other)


def test_metadata_added_when_input_has_none(ws: Path) -> None:
    write_st(ws / "bare.safetensors", {"x": np.zeros(2, np.float32)})
    bs.run({"inputs": ["bare.safetensors"], "output": "o.safetensors"})
    meta = file_metadata(ws / "o.safetensors")
    # `format: pt` too: transformers refuses safetensors metadata without a format.
    assert set(meta) == {"format", "brainsurgery.version", "brainsurgery.plan_sha256", "brainsurgery.inputs"}
    assert meta["format"] == "pt"


def run_in(directory: Path, plan: dict[str, Any], threads: int = 0) -> None:
    """Run ``plan`` from ``directory``. ``brainsurgery.plan_sha256`` leaves locations out (issue 8),
    so outputs are comparable byte for byte."""
    directory.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        bs.run(plan, threads=threads)
    finally:
        os.chdir(cwd)


def test_byte_identical_across_runs_and_threads(ws: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "big": rng.standard_normal((700, 1024)).astype(np.float32),  # 2.7 MiB: several write chunks
        "mid": rng.standard_normal((64, 64)).astype(np.float16),
        "ids": np.arange(1000, dtype=np.int64),
    }
    write_st(ws / "d.safetensors", tensors, META)
    plan = {
        "inputs": ["../d.safetensors"],
        "transforms": [
            {"scale_": {"target": "big", "by": 0.25}},
            {"copy": {"from": "mid", "to": "mid.copy"}},
            {"cast": {"from": "big", "to": "big.half", "dtype": "float16"}},
        ],
        "output": "o.safetensors",
    }
    outs = []
    for i, threads in enumerate([1, 2, 2, 0, 1]):
        run_in(ws / f"r{i}", plan, threads)
        outs.append((ws / f"r{i}" / "o.safetensors").read_bytes())
    (ws / "rc").mkdir()
    dump_plan(ws / "rc" / "p.yaml", plan)
    assert cli(["p.yaml", "--threads", "2"], cwd=ws / "rc").returncode == 0
    outs.append((ws / "rc" / "o.safetensors").read_bytes())
    run_in(ws / "r0", plan, 2)  # rerun over the previous output
    outs.append((ws / "r0" / "o.safetensors").read_bytes())
    assert all(o == outs[0] for o in outs[1:])
    got = load_file(str(ws / "r0" / "o.safetensors"))
    np.testing.assert_array_equal(got["big"], tensors["big"] * np.float32(0.25))
    np.testing.assert_array_equal(got["big.half"], (tensors["big"] * np.float32(0.25)).astype(np.float16))
    np.testing.assert_array_equal(got["mid.copy"], tensors["mid"])
    np.testing.assert_array_equal(got["ids"], tensors["ids"])


def test_sharded_output_identical_across_threads(ws: Path) -> None:
    tensors = {f"t{i}": np.arange(300, dtype=np.float32) * i for i in range(6)}
    write_st(ws / "s.safetensors", tensors)
    plan = {"inputs": ["../s.safetensors"], "output": {"path": "out", "shard": "2KiB"}}
    for threads in (1, 2):
        run_in(ws / f"r{threads}", plan, threads)
    a, b = ws / "r1" / "out", ws / "r2" / "out"
    assert listing(a) == listing(b)
    for name in listing(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert_same(load_dir(a), tensors)


def test_default_alias_with_a_new_output_alias(ws: Path) -> None:
    # The output may name an alias that only a transform creates: just its tensors are written.
    bs.run({"inputs": ["in.safetensors"], "transforms": [{"copy": {"from": "z.weight", "to": "new::z.weight"}}],
            "output": {"path": "o.safetensors", "alias": "new"}})
    assert list(load_file(ws / "o.safetensors")) == ["z.weight"]


# ---------------------------------------------------------------- reruns, sidecars, conversions


def test_rerun_leaves_no_stale_shards(ws: Path) -> None:
    tensors = {f"t{i}": np.full(200, i, np.float32) for i in range(3)}  # 800 B each
    write_st(ws / "s.safetensors", tensors)
    bs.run({"inputs": ["s.safetensors"], "output": {"path": "out", "shard": "1KiB"}})
    assert len([p for p in listing(ws / "out") if p.endswith(".safetensors")]) == 3
    (ws / "out" / "notes.txt").write_text("mine")  # a user's file is not ours to delete
    bs.run({"inputs": ["s.safetensors"], "transforms": [{"delete": {"target": "t[12]"}}], "output": {"path": "out", "shard": "1KiB"}})
    assert listing(ws / "out") == ["model.safetensors", "notes.txt"]
    assert_same(load_file(str(ws / "out" / "model.safetensors")), {"t0": tensors["t0"]})
    # and back: one file → shards leaves no stale model.safetensors
    bs.run({"inputs": ["s.safetensors"], "output": {"path": "out", "shard": "1KiB"}})
    files = listing(ws / "out")
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert_same(load_dir(ws / "out"), tensors)
    assert temporaries(ws) == []


def _foreign_model(directory: Path) -> dict[str, bytes]:
    """Another tool's sharded checkpoint: shards and an index without our mark."""
    directory.mkdir()
    write_st(directory / "model-00001-of-00002.safetensors", {"x": np.ones(3, np.float32)}, {"format": "pt"})
    write_st(directory / "model-00002-of-00002.safetensors", {"y": np.zeros(3, np.float32)}, {"format": "pt"})
    index = {"metadata": {"total_size": 24}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_directory_output_refuses_to_replace_another_tools_checkpoint(ws: Path) -> None:
    before = _foreign_model(ws / "theirs")
    proc = cli(["in.safetensors", "-o", "theirs"], ws)
    assert proc.returncode == 2, proc.stderr
    assert "brainsurgery did not write" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in (ws / "theirs").iterdir()} == before
    with pytest.raises(bs.PlanError, match="did not write"):
        bs.check({"inputs": ["in.safetensors"], "transforms": [{"save": {"path": "theirs", "alias": "model"}}]})
    # Asked for: replaced, and the other tool's shards removed.
    proc = cli(["in.safetensors", "-o", "theirs", "--overwrite"], ws)
    assert proc.returncode == 0, proc.stderr
    assert listing(ws / "theirs") == ["model.safetensors"]
    assert_same(load_file(str(ws / "theirs" / "model.safetensors")), INPUT)
    assert temporaries(ws) == []


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_directory_output_replaces_its_own_earlier_output(ws: Path, fmt: str) -> None:
    for shard in ["100B", "none", "100B"]:
        bs.run({"inputs": ["in.safetensors"], "output": {"path": "out", "format": fmt, "shard": shard}})
    files = listing(ws / "out")
    assert any(".index.json" in f for f in files), files
    # A file another tool wrote under one of the names is in the way.
    name = "pytorch_model.bin" if fmt == "torch" else "model.safetensors"
    if fmt == "torch":
        import zipfile

        with zipfile.ZipFile(ws / "out" / name, "w") as z:
            z.writestr("archive/data.pkl", b"")
    else:
        write_st(ws / "out" / name, {"x": np.ones(2, np.float32)})
    with pytest.raises(bs.PlanError, match=f"holds `{name}`"):
        bs.run({"inputs": ["in.safetensors"], "output": {"path": "out", "format": fmt, "shard": "none"}})


def test_an_index_written_before_it_was_marked_is_ours_when_its_shards_are(ws: Path) -> None:
    bs.run({"inputs": ["in.safetensors"], "output": {"path": "out", "shard": "100B"}})
    index_path = ws / "out" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["metadata"]["brainsurgery.version"]  # as brainsurgery 0.3.0 before issue 9 wrote it
    index_path.write_text(json.dumps(index))
    bs.run({"inputs": ["in.safetensors"], "output": {"path": "out", "shard": "none"}})
    assert listing(ws / "out") == ["model.safetensors"]


def _checkpoint_dir(root: Path) -> dict[str, np.ndarray]:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}
    write_st(root / "model.safetensors", tensors, META)
    (root / "config.json").write_text(json.dumps({"model_type": "toy", "hidden": 3}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}}))
    (root / "generation_config.json").write_text("{}")
    return tensors


def test_sidecars_copied_to_directory_output(ws: Path) -> None:
    tensors = _checkpoint_dir(ws / "ck")
    bs.run({"inputs": ["ck"], "transforms": [{"scale_": {"target": "w", "by": 2}}], "output": "out"})
    assert listing(ws / "out") == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    for side in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (ws / "out" / side).read_bytes() == (ws / "ck" / side).read_bytes()
    assert_same(load_file(str(ws / "out" / "model.safetensors")), {"w": tensors["w"] * 2, "b": tensors["b"]})


def test_sidecars_false(ws: Path) -> None:
    tensors = _checkpoint_dir(ws / "ck")
    bs.run({"inputs": ["ck"], "output": {"path": "out", "sidecars": False}})
    assert listing(ws / "out") == ["model.safetensors"]
    assert_same(load_file(str(ws / "out" / "model.safetensors")), tensors)


def test_no_transforms_copies_input(ws: Path) -> None:
    bs.run({"inputs": ["in.safetensors"], "output": "copy.safetensors"})
    assert_same(load_file(str(ws / "copy.safetensors")), INPUT)
    assert tensor_order(ws / "copy.safetensors") == list(INPUT)
    # Same through the CLI, with an `inputs` entry carrying an alias and an empty transforms list.
    dump_plan(ws / "p.yaml", {"inputs": ["src::in.safetensors"], "transforms": [], "output": "dir"})
    assert cli(["p.yaml"], cwd=ws).returncode == 0
    assert_same(load_file(str(ws / "dir" / "model.safetensors")), INPUT)


def test_inputs_never_modified(ws: Path) -> None:
    ck = _checkpoint_dir(ws / "ck")
    paths = [ws / "in.safetensors"] + [ws / "ck" / p for p in listing(ws / "ck")]
    past = 1_000_000_000  # set an old mtime so any rewrite is visible
    for p in paths:
        os.utime(p, (past, past))
    before = {p: (sha256(p), p.stat().st_mtime_ns) for p in paths}
    bs.run(
        {
            "inputs": ["x::in.safetensors", "y::ck"],
            "transforms": [
                {"scale_": {"target": "x::z\\.weight", "by": 2}},
                {"scale_": {"target": "y::w", "by": 3}},
                {"delete": {"target": "y::b"}},
                {"cast_": {"target": "x::.*", "dtype": "float32", "only": "float"}},
            ],
            "output": {"path": "out", "alias": "y"},
        }
    )
    after = {p: (sha256(p), p.stat().st_mtime_ns) for p in paths}
    assert after == before
    assert_same(load_file(str(ws / "out" / "model.safetensors")), {"w": ck["w"] * 3})


def _sharded_input(root: Path, with_index: bool) -> dict[str, np.ndarray]:
    part1 = {"layer.0.w": np.arange(4, dtype=np.float32), "layer.0.b": np.zeros(2, np.float16)}
    part2 = {"layer.1.w": np.arange(4, dtype=np.float32) * 2, "ids": np.arange(3, dtype=np.int32)}
    write_st(root / "model-00001-of-00002.safetensors", part1, META)
    write_st(root / "model-00002-of-00002.safetensors", part2, META)
    if with_index:
        wm = {k: "model-00001-of-00002.safetensors" for k in part1} | {k: "model-00002-of-00002.safetensors" for k in part2}
        total = sum(a.nbytes for a in {**part1, **part2}.values())
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return {**part1, **part2}


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "no-index"])
def test_sharded_directory_input(ws: Path, with_index: bool) -> None:
    tensors = _sharded_input(ws / "ck", with_index)
    bs.run({"inputs": ["ck"], "transforms": [{"scale_": {"target": "layer\\.1\\.w", "by": 0.5}}], "output": "o.safetensors"})
    expected = dict(tensors)
    expected["layer.1.w"] = tensors["layer.1.w"] * np.float32(0.5)
    assert_same(load_file(str(ws / "o.safetensors")), expected)
    # multi-file loads have a deterministic order: shard order, then header order
    assert tensor_order(ws / "o.safetensors") == list(tensors)
    assert file_metadata(ws / "o.safetensors")["format"] == "pt"
    # and reading it again from elsewhere with the same document gives the same bytes
    run_in(ws / "again", {"inputs": ["../ck"], "output": "o.safetensors"})
    run_in(ws / "again2", {"inputs": ["../ck"], "output": "o.safetensors"})
    assert (ws / "again" / "o.safetensors").read_bytes() == (ws / "again2" / "o.safetensors").read_bytes()
    assert_same(load_file(str(ws / "again" / "o.safetensors")), tensors)


def test_report_matches_file(ws: Path) -> None:
    report: dict[str, Any] = bs.run({"inputs": ["in.safetensors"], "output": {"path": "out", "shard": "64B"}})
    files = [Path(p).name for p in report["written"]]
    assert sorted(files) == listing(ws / "out")
    index = json.loads((ws / "out" / "model.safetensors.index.json").read_text())
    assert report["total_bytes"] == index["metadata"]["total_size"] == sum(a.nbytes for a in INPUT.values())
    assert [t["name"] for t in report["tensors"]] == list(INPUT)
