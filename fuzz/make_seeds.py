#!/usr/bin/env python3
"""Writes the committed seed inputs under fuzz/seeds/ (a few KB in all); rerun after changing it.

unpickle/: the data.pkl of every zip checkpoint in tests/fixtures/torch (real torch.save output),
the main pickle of every legacy (pre-1.6) one, plus pickle.dumps of plain values at protocols 2-5 (opcodes torch does not use) and a hostile
pickle (os.system), to start from every accepted opcode and from a refusal.

safetensors_header/: the fuzz target's input layout, [data length u64 LE][8-byte header length
LE][JSON header]; one header written by the official `safetensors` package, the rest written
here to cover dtypes, metadata, scalars, empty tensors and holes between tensors.

Needs only the standard library, plus numpy and safetensors for the official-writer seed
(skipped when absent).
"""

import io
import json
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT.parent / "tests" / "fixtures" / "torch"


def write(kind: str, name: str, data: bytes) -> None:
    path = ROOT / "seeds" / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def legacy_main_pickle(data: bytes) -> bytes:
    """The fourth pickle of a legacy file (after magic number, protocol version and sys_info),
    found by walking opcodes to each STOP; nothing is unpickled."""
    stream = io.BytesIO(data)
    for _ in range(3):
        for _ in pickletools.genops(stream):
            pass
    start = stream.tell()
    for _ in pickletools.genops(stream):
        pass
    return data[start : stream.tell()]


def pickle_seeds() -> None:
    for old in (ROOT / "seeds" / "unpickle").glob("torch-*.pkl"):
        old.unlink()  # fixtures come and go; keep the seeds in step
    for pt in sorted(FIXTURES.glob("*.pt")):
        if zipfile.is_zipfile(pt):
            with zipfile.ZipFile(pt) as z:
                pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
                write("unpickle", f"torch-{pt.stem}.pkl", z.read(pkl))
        else:
            write("unpickle", f"torch-{pt.stem}.pkl", legacy_main_pickle(pt.read_bytes()))
    plain = {"a": [1, -2, 300, 70000, 2**40, -(2**63)], "b": (1.5, None, True, False), "c": b"\x00\xff" * 3,
             "d": {"nested": ("x", "y", "x")}, "e": "é" * 3}
    for proto in (2, 3, 4, 5):
        write("unpickle", f"plain-p{proto}.pkl", pickle.dumps(plain, protocol=proto))
    write("unpickle", "os-system.pkl", b"\x80\x02cos\nsystem\nq\x00X\x07\x00\x00\x00touch x\x85Rq\x01.")


def header_seed(name: str, header: dict, data_len: int) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    write("safetensors_header", name, struct.pack("<QQ", data_len, len(text)) + text)


def safetensors_seeds() -> None:
    header_seed("one-f32.bin", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, 24)
    header_seed("dtypes-metadata.bin", {
        "__metadata__": {"format": "pt", "note": "seed"},
        "a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
        "b": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [6, 10]},
        "c": {"dtype": "F4", "shape": [3], "data_offsets": [10, 12]},
        "d": {"dtype": "BOOL", "shape": [], "data_offsets": [12, 13]},
        "e": {"dtype": "I64", "shape": [0, 4], "data_offsets": [13, 13]},
        "f": {"dtype": "C64", "shape": [1], "data_offsets": [16, 24]},
    }, 32)
    header_seed("empty.bin", {}, 0)
    try:
        import numpy as np
        from safetensors.numpy import save
    except ImportError:
        return
    blob = save({"x": np.arange(4, dtype=np.float16), "y": np.ones((2, 1), dtype=np.int32)}, metadata={"k": "v"})
    (n,) = struct.unpack("<Q", blob[:8])
    write("safetensors_header", "official.bin", struct.pack("<Q", len(blob) - 8 - n) + blob[: 8 + n])


if __name__ == "__main__":
    pickle_seeds()
    safetensors_seeds()
