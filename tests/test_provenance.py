"""Provenance in the output metadata (issue 8, src/plan/mod.rs ``plan_sha256`` and src/write.rs
``brainsurgery.inputs``): the plan hash leaves out where files are, so the same plan over the same
inputs gives the same bytes in any folder; the inputs are identified by file name and header hash.

Every expected hash here is computed independently, from the file bytes with ``struct``,
``pickletools`` and ``hashlib``.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickletools
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import brainsurgery as bs
from helpers import cli, dump_plan, file_metadata, write_st

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch"

TENSORS = {
    "h.0.w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "h.0.b": np.linspace(-1, 1, 4, dtype=np.float32),
    "ids": np.arange(5, dtype=np.int64),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_header_sha(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return sha(data[: 8 + n])


def zip_central_directory_sha(path: Path) -> str:
    data = path.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    size, offset = struct.unpack("<II", data[eocd + 12 : eocd + 20])
    return sha(data[offset : offset + size])


def npy_header_sha(path: Path) -> str:
    data = path.read_bytes()
    if data[6] == 1:
        (n,) = struct.unpack("<H", data[8:10])
        return sha(data[: 10 + n])
    (n,) = struct.unpack("<I", data[8:12])
    return sha(data[: 12 + n])


def legacy_torch_header_sha(path: Path) -> str:
    """The five pickles (magic, protocol, sys_info, object, storage keys) before the storages."""
    data = path.read_bytes()
    stream = io.BytesIO(data)
    for _ in range(5):
        for _op in pickletools.genops(stream):
            pass
    return sha(data[: stream.tell()])


def inputs_of(path: Path) -> list[dict[str, Any]]:
    return json.loads(file_metadata(path)["brainsurgery.inputs"])


def make_workspace(root: Path, out: Path) -> Path:
    """Inputs, a nested plan file and the plan (absolute paths: only the folders differ)."""
    root.mkdir(parents=True)
    write_st(root / "base.safetensors", TENSORS, {"format": "pt"})
    (root / "ft").mkdir()
    write_st(root / "ft" / "model.safetensors", {k: v * 2 for k, v in TENSORS.items()})
    np.save(root / "extra.npy", np.ones((2, 2), np.float32))
    dump_plan(root / "sub.yaml", {"transforms": [{"scale_": {"target": "h.0.b", "by": 3}}]})
    plan = {
        "inputs": [f"base::{root / 'base.safetensors'}", f"ft::{root / 'ft'}"],
        "transforms": [
            {"load": {"path": str(root / "extra.npy"), "to": "base::extra"}},
            {"assign": {"from": "ft::h\\.0\\.w", "to": "base::h.0.w"}},
            {"save": {"path": str(out.parent / "side.safetensors"), "alias": "ft"}},
            {"execute": {"path": str(root / "sub.yaml")}},
            {"execute": {"plan": {"transforms": [{"delete": {"target": "ids"}}], "output": str(out.parent / "nested")}}},
        ],
        "output": {"path": str(out), "alias": "base"},
    }
    return dump_plan(root / "plan.yaml", plan)


def test_same_plan_elsewhere_gives_identical_bytes(tmp_path: Path) -> None:
    # Issue 8, item 7: reproducible means the same bytes wherever it runs.
    out_a = tmp_path / "results" / "o.safetensors"
    out_b = tmp_path / "elsewhere" / "deeper" / "o.safetensors"
    out_a.parent.mkdir(parents=True)
    out_b.parent.mkdir(parents=True)
    plan_a = make_workspace(tmp_path / "a", out_a)
    plan_b = make_workspace(tmp_path / "b" / "c", out_b)
    assert plan_a.read_text() != plan_b.read_text()
    bs.run(plan_a)
    assert cli([plan_b], cwd=tmp_path).returncode == 0
    assert out_a.read_bytes() == out_b.read_bytes()
    for name in ["side.safetensors", "nested/model.safetensors"]:
        assert (out_a.parent / name).read_bytes() == (out_b.parent / name).read_bytes(), name
    meta = file_metadata(out_a)
    assert meta["brainsurgery.plan_sha256"] == file_metadata(out_a.parent / "side.safetensors")["brainsurgery.plan_sha256"]
    # The plan itself still counts: another assignment, another hash.
    other = json.loads(plan_b.read_text())
    other["transforms"][1]["assign"]["to"] = "base::h.0.b"
    other["transforms"][1]["assign"]["from"] = "ft::h\\.0\\.b"
    dump_plan(plan_b, other)
    assert cli([plan_b], cwd=tmp_path).returncode == 0
    assert file_metadata(out_b)["brainsurgery.plan_sha256"] != meta["brainsurgery.plan_sha256"]


def test_editing_a_nested_plan_file_changes_the_hash(tmp_path: Path) -> None:
    # `execute: {path}` names a file whose content the including plan does not hold; the hash
    # must still tell the two plans apart.
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    plan = make_workspace(tmp_path / "w", out)
    bs.run(plan)
    before = file_metadata(out)["brainsurgery.plan_sha256"]
    bs.run(plan)
    assert file_metadata(out)["brainsurgery.plan_sha256"] == before
    dump_plan(tmp_path / "w" / "sub.yaml", {"transforms": [{"scale_": {"target": "h.0.b", "by": 4}}]})
    bs.run(plan)
    assert file_metadata(out)["brainsurgery.plan_sha256"] != before


def test_copied_plan_folder_gives_identical_bytes(tmp_path: Path) -> None:
    # Relative paths: a plan folder copied elsewhere, written to another output folder.
    src = tmp_path / "src"
    src.mkdir()
    write_st(src / "in.safetensors", TENSORS, {"format": "pt", "note": "x"})
    dump_plan(
        src / "p.yaml",
        {"inputs": ["in.safetensors"], "transforms": [{"scale_": {"target": "h\\..*", "by": 0.5}}], "output": "out/o.safetensors"},
    )
    copy = tmp_path / "x" / "y" / "copy"
    shutil.copytree(src, copy)
    assert cli(["p.yaml"], cwd=src).returncode == 0
    assert cli(["p.yaml", "output=../../elsewhere/o.safetensors"], cwd=copy).returncode == 0
    assert (src / "out" / "o.safetensors").read_bytes() == (tmp_path / "x" / "elsewhere" / "o.safetensors").read_bytes()


def test_inputs_are_recorded_by_name_and_header_hash(tmp_path: Path) -> None:
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    plan = make_workspace(tmp_path / "w", out)
    bs.run(plan)
    root = tmp_path / "w"
    assert inputs_of(out) == [
        {"alias": "base", "files": [{"name": "base.safetensors", "header_sha256": safetensors_header_sha(root / "base.safetensors")}]},
        {"alias": "ft", "files": [{"name": "model.safetensors", "header_sha256": safetensors_header_sha(root / "ft" / "model.safetensors")}]},
        {"alias": "base", "files": [{"name": "extra.npy", "header_sha256": npy_header_sha(root / "extra.npy")}]},
    ]
    # A file written before `load` ran records only what was opened by then.
    assert [s["alias"] for s in inputs_of(out.parent / "side.safetensors")] == ["base", "ft", "base"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain.pt", zip_central_directory_sha),
        ("legacy_plain.pt", legacy_torch_header_sha),
    ],
)
def test_torch_inputs_header_hash(tmp_path: Path, name: str, expected: Any) -> None:
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [f"m::{FIXTURES / name}"], "output": str(out)})
    assert inputs_of(out) == [{"alias": "m", "files": [{"name": name, "header_sha256": expected(FIXTURES / name)}]}]


def test_npz_and_sharded_inputs_header_hash(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", w=np.ones(3, np.float32), v=np.zeros(2, np.int32))
    shards = tmp_path / "sharded"
    bs.run({"inputs": [f"{tmp_path / 'a.npz'}"], "output": {"path": str(shards), "shard": "8B"}})
    files = sorted(p.name for p in shards.glob("*.safetensors"))
    assert len(files) == 2
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [f"n::{tmp_path / 'a.npz'}", f"s::{shards}"], "output": {"path": str(out), "alias": "n"}})
    assert inputs_of(out) == [
        {"alias": "n", "files": [{"name": "a.npz", "header_sha256": zip_central_directory_sha(tmp_path / "a.npz")}]},
        {"alias": "s", "files": [{"name": f, "header_sha256": safetensors_header_sha(shards / f)} for f in files]},
    ]
