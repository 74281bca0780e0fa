"""Lazy values (src/value.rs): a dtype without a whole-byte element size (float4/float6, two or
more elements per byte) is carried through unchanged, and refused by name when a transform would
compute on it — never written as zeros."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import brainsurgery as bs
from helpers import listing


def _float4_checkpoint(path: Path) -> Path:
    header = json.dumps(
        {
            "a": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]},
            "b": {"dtype": "F4", "shape": [2, 4], "data_offsets": [4, 8]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(1, 9)))
    return path


@pytest.mark.parametrize(
    "transform",
    [
        {"concat": {"from": ["a", "b"], "to": "c", "dim": 0}},
        {"permute": {"from": "a", "to": "c", "order": [1, 0]}},
    ],
    ids=["concat", "permute"],
)
def test_computing_on_a_dtype_without_byte_size_is_refused_by_name(tmp_path: Path, transform: dict) -> None:
    src = _float4_checkpoint(tmp_path / "in.safetensors")
    plan = {"inputs": [str(src)], "transforms": [transform], "output": str(tmp_path / "out.safetensors")}
    for call in (bs.check, bs.run):
        with pytest.raises(bs.TransformError, match=r"transforms\[0\].*`model::a`.*float4_e2m1fn.*carried through"):
            call(plan)
    assert listing(tmp_path) == ["in.safetensors"]


def test_a_dtype_without_byte_size_is_carried_through_byte_exact(tmp_path: Path) -> None:
    src = _float4_checkpoint(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(src)], "transforms": [{"move": {"from": "a", "to": "z"}}], "output": str(out)})
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    z, b = header["z"]["data_offsets"], header["b"]["data_offsets"]
    assert body[z[0] : z[1]] == bytes(range(1, 5)) and body[b[0] : b[1]] == bytes(range(5, 9))
