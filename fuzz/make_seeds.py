#!/usr/bin/env python3
"""Writes the committed seed inputs under fuzz/seeds/ (a few KB in all); rerun after changing it.

unpickle/: the data.pkl of every zip checkpoint in tests/fixtures/torch (real torch.save output),
the main pickle of every legacy (pre-1.6) one, plus pickle.dumps of plain values at protocols 2-5 (opcodes torch does not use) and a hostile
pickle (os.system), to start from every accepted opcode and from a refusal.

safetensors_header/: the fuzz target's input layout, [data length u64 LE][8-byte header length
LE][JSON header]; one header written by the official `safetensors` package, the rest written
here to cover dtypes, metadata, scalars, empty tensors and holes between tensors.

zip/: archives as checkpoints store them: a few .npz fixtures (np.savez output) and one PyTorch
zip (ZIP64 end records, entries aligned with "FB" padding extra fields) from tests/fixtures/torch,
plus archives written here with zipfile: an empty one, one with a comment, one whose entries
carry ZIP64 local extra fields (force_zip64), a compressed one (refused: not stored) and one with
an entry that is not a .npy.

npy_header/: whole .npy files written here by hand the way np.save lays them out (version 1.0,
and 2.0 / 3.0 prefixes), covering every dtype read, a scalar, an empty shape, fortran order,
the old `L` suffix, and refusals (big-endian, object, raw-bytes dtypes).

plan_value/: graphs of host values in that target's encoding: a small plan-like mapping, lists and
mappings inside themselves, a shared child, nesting at and past the depth limit, a list sharing
its child 20 times over (2**20 values unfolded), a refused value and a NaN.

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
    # A field readers skip holding a number beyond f64 (found by the fuzzer): JSON by the grammar,
    # refused as the official loader refuses it.
    text = b'{"t":{"dtype":"F16","shape":[4],"extra":[1E400],"data_offsets":[0,8]}}'
    write("safetensors_header", "huge-exponent-in-a-skipped-field.bin", struct.pack("<QQ", 8, len(text)) + text)
    try:
        import numpy as np
        from safetensors.numpy import save
    except ImportError:
        return
    blob = save({"x": np.arange(4, dtype=np.float16), "y": np.ones((2, 1), dtype=np.int32)}, metadata={"k": "v"})
    (n,) = struct.unpack("<Q", blob[:8])
    write("safetensors_header", "official.bin", struct.pack("<Q", len(blob) - 8 - n) + blob[: 8 + n])


def zip_seeds() -> None:
    for name in ["plain.npz", "shared.npz", "wrapped.npz", "cuda.pt"]:
        write("zip", name.replace(".", "-") + ".zip", (FIXTURES / name).read_bytes())
    one = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", b"\x00\x00\x80?\x00\x00\x00@")

    def archive(name: str, entries: dict[str, bytes], **options) -> None:
        buffer = io.BytesIO()
        comment = options.pop("comment", b"")
        with zipfile.ZipFile(buffer, "w", **options) as z:
            z.comment = comment
            for entry, data in entries.items():
                with z.open(entry, "w", force_zip64=options.get("allowZip64", False)) as f:
                    f.write(data)
        write("zip", name, buffer.getvalue())

    archive("empty.zip", {})
    archive("comment.zip", {"x.npy": one}, comment=b"a comment at the very end")
    archive("zip64-local.zip", {"x.npy": one, "y.npy": one}, allowZip64=True)
    archive("deflated.zip", {"x.npy": one}, compression=zipfile.ZIP_DEFLATED)
    archive("not-npy.zip", {"x.npy": one, "notes.txt": b"hello"})


def npy(header: str, data: bytes, version: int = 1) -> bytes:
    """A .npy file: magic, version, header length, the dict padded to 64 bytes with a newline."""
    prefix = 10 if version == 1 else 12
    while (prefix + len(header) + 1) % 64 != 0:
        header += " "
    header += "\n"
    length = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + length + header.encode() + data


def npy_seeds() -> None:
    def seed(name: str, descr: str, shape: str, data: bytes, version: int = 1, fortran: str = "False") -> None:
        header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
        write("npy_header", name, npy(header, data, version))

    seed("f4.npy", "<f4", "(2, 3)", bytes(24))
    for descr in ["<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "<u8", "<u4", "<u2", "|u1", "|b1", "<c8"]:
        seed(f"{descr[1:]}.npy", descr, "(2,)", bytes(2 * int(descr[2:])))
    seed("scalar.npy", "<f8", "()", bytes(8))
    seed("empty.npy", "<i8", "(0, 4)", b"")
    seed("fortran.npy", "<f4", "(1, 3)", bytes(12), fortran="True")
    seed("fortran-2d.npy", "<f4", "(2, 3)", bytes(24), fortran="True")
    seed("v2.npy", "<f4", "(3,)", bytes(12), version=2)
    seed("v3.npy", "<f4", "(3,)", bytes(12), version=3)
    seed("long-suffix.npy", "<i4", "(2L, 1L)", bytes(8))
    seed("big-endian.npy", ">f4", "(1,)", bytes(4))
    seed("object.npy", "|O", "(1,)", bytes(8))
    seed("void.npy", "|V2", "(1,)", bytes(2))
    write("npy_header", "structured.npy", npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", bytes(4)))


def plan_value_seeds() -> None:
    """Graphs of host values in the plan_value target's encoding (see its doc comment)."""
    alphabet = "abcxyz019_.:- "

    def u16(i: int) -> bytes:
        return struct.pack("<H", i)

    def null() -> bytes:
        return b"\x00"

    def integer(i: int) -> bytes:
        return b"\x02" + struct.pack("<q", i)

    def real(f: float) -> bytes:
        return b"\x03" + struct.pack("<d", f)

    def text(t: str) -> bytes:
        return b"\x04" + bytes([len(t)] + [alphabet.index(c) for c in t])

    def seq(*items: int) -> bytes:
        return b"\x05" + bytes([len(items)]) + b"".join(map(u16, items))

    def mapping(*entries: tuple[str, int]) -> bytes:
        body = b"".join(bytes([len(k) - 1] + [alphabet.index(c) for c in k]) + u16(i) for k, i in entries)
        return b"\x06" + bytes([len(entries)]) + body

    def wrap(levels: int, child: int) -> bytes:
        return b"\x07" + u16(levels - 1) + u16(child)

    def seed(name: str, *nodes: bytes) -> None:
        write("plan_value", name, b"".join(nodes))

    seed("plan.bin", mapping(("a", 1), ("b", 2)), seq(3, 4, 5), null(), integer(7), real(0.5), text("x.y"))
    seed("list-inside-itself.bin", seq(0))
    seed("dict-inside-itself.bin", mapping(("a", 1)), mapping(("b", 0)))
    seed("shared-child.bin", seq(1, 1), seq(2), integer(1))
    seed("depth-64.bin", wrap(64, 1), integer(1))
    seed("depth-65.bin", wrap(65, 1), integer(1))
    seed("depth-10000.bin", mapping(("a", 1)), wrap(10000, 2), null())
    # 2**20 values unfolded from 21 nodes.
    seed("shared-20-times.bin", *[seq(i + 1, i + 1) for i in range(20)], integer(0))
    seed("refused.bin", mapping(("a", 1)), b"\x08")
    seed("nan.bin", seq(1), real(float("nan")))


if __name__ == "__main__":
    pickle_seeds()
    safetensors_seeds()
    zip_seeds()
    npy_seeds()
    plan_value_seeds()
