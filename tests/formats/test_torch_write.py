"""Writing PyTorch zip-format checkpoints (issue 4, item 3): safetensors inputs written here by
hand are converted to ``.bin/.pt/.pth``; the archive is checked with ``zipfile`` (every CRC),
read back with ``brainsurgery.open`` and, when torch is installed, loaded by ``torch.load``
(``weights_only=True``, with and without ``mmap``). Expected values are the NumPy arrays built in
the test, compared bit for bit."""

from __future__ import annotations

import io
import json
import signal
import struct
import subprocess
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from helpers import assert_one_error, cli, dump_plan, listing, temporaries, write_st

def random_bits(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Random bit patterns viewed as ``dtype`` (NaN payloads, infinities and -0.0 included)."""
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def source_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    tensors: dict[str, np.ndarray] = {}
    for dtype in [
        np.float64,
        np.float32,
        np.float16,
        ml_dtypes.bfloat16,
        np.int64,
        np.int32,
        np.int16,
        np.int8,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.complex64,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
        ml_dtypes.float8_e8m0fnu,
    ]:
        tensors[f"{np.dtype(dtype).name}.weight"] = random_bits(rng, (3, 5), dtype)
    tensors["mask"] = rng.integers(0, 2, size=(2, 7)).astype(bool)
    tensors["scalar"] = np.array(-2.5, np.float32)
    tensors["scalar.i64"] = np.array(-(2**40), np.int64)
    tensors["empty"] = np.zeros((0, 5), np.float32)
    tensors["empty.mid"] = np.zeros((2, 0, 3), ml_dtypes.bfloat16)
    tensors["model.layers.0.self_attn.q_proj.weight"] = random_bits(rng, (2, 3, 4, 5, 6), np.float16)
    tensors["ünïcødé.名前"] = np.arange(4, dtype=np.int32)
    # 3.5 MiB: several of the executor's 1 MiB chunks, CRCs combined across them.
    tensors["big"] = rng.standard_normal((896, 1024)).astype(np.float32)
    return tensors


SOURCE = source_tensors()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_st(tmp_path_factory.mktemp("src") / "in.safetensors", SOURCE)


def convert(source: Path, out: Path, threads: int = 2, **output: Any) -> dict[str, Any]:
    return bs.run({"inputs": [str(source)], "output": {"path": str(out), **output} if output else str(out)}, threads=threads)


def assert_same(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.dtype == want.dtype, name
    assert got.shape == want.shape, name
    assert got.tobytes() == want.tobytes(), name


def check_with_torch(torch: Any, path: Path, want: dict[str, np.ndarray]) -> None:
    """``torch.load`` (weights only, with and without mmap) gives exactly ``want``."""
    for mmap in (False, True):
        state = torch.load(path, weights_only=True, mmap=mmap)
        assert list(state) == list(want)
        for name, array in want.items():
            t = state[name]
            assert t.dtype == getattr(torch, array.dtype.name), name
            assert tuple(t.shape) == array.shape, name
            assert t.is_contiguous() and t.storage_offset() == 0, name
            assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == array.tobytes(), name


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_every_dtype_converts_and_reads_back(source: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    report = convert(source, out)
    assert report["written"] == [str(out)]
    assert listing(tmp_path) == [out.name]
    # (a) a valid zip: every entry's CRC checks, every entry stored and 64-byte aligned.
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
        names = z.namelist()
        assert names == ["archive/data.pkl", "archive/byteorder", *[f"archive/data/{i}" for i in range(len(SOURCE))], "archive/version"]
        assert z.read("archive/byteorder") == b"little"
        assert z.read("archive/version") == b"3\n"
        raw = out.read_bytes()
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            (name_len, extra_len) = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        for i, array in enumerate(SOURCE.values()):
            assert z.read(f"archive/data/{i}") == array.tobytes()
    # (b) our reader gives the same bytes, names and order.
    ck = bs.open(out)
    assert list(ck) == list(SOURCE)
    for name, array in SOURCE.items():
        assert_same(np.asarray(ck[name]), array, name)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_torch_loads_every_dtype(source: Path, tmp_path: Path, suffix: str) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / f"model{suffix}"
    convert(source, out)
    check_with_torch(torch, out, SOURCE)


def test_pickle_and_storages_equal_what_torch_save_writes(source: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "m.bin"
    convert(source, out)
    state = {}
    for name, array in SOURCE.items():
        # A fresh torch tensor (torch's own strides, also for empty shapes) holding the bytes.
        t = torch.zeros(array.shape, dtype=getattr(torch, array.dtype.name))
        t.reshape(-1).view(torch.uint8).copy_(torch.from_numpy(array.reshape(-1).view(np.uint8)))
        state[name] = t
    # `torch.save` to a buffer names the archive folder `archive`, as we always do.
    buffer = io.BytesIO()
    torch.save(OrderedDict(state), buffer)
    with zipfile.ZipFile(buffer) as theirs, zipfile.ZipFile(out) as ours:
        assert ours.read("archive/data.pkl") == theirs.read("archive/data.pkl")
        for i in range(len(SOURCE)):
            assert ours.read(f"archive/data/{i}") == theirs.read(f"archive/data/{i}")


def test_output_is_byte_identical_across_runs_and_threads(source: Path, tmp_path: Path) -> None:
    outputs = []
    for i, threads in enumerate([1, 2, 2]):
        out = tmp_path / f"run{i}.pt"
        convert(source, out, threads=threads)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_round_trip_back_to_safetensors_keeps_every_byte(source: Path, tmp_path: Path) -> None:
    mid = tmp_path / "m.bin"
    back = tmp_path / "back.safetensors"
    convert(source, mid)
    convert(mid, back)
    ck = bs.open(back)
    assert list(ck) == list(SOURCE)
    for name, array in SOURCE.items():
        assert_same(np.asarray(ck[name]), array, name)


def write_computed(source: Path, out: Path) -> dict[str, np.ndarray]:
    """Runs a plan computing tensors into ``out``; returns what it must hold (NumPy)."""
    bs.run(
        {
            "inputs": [str(source)],
            "transforms": [
                {"scale_": {"target": "big", "by": 2}},
                {"cast": {"from": "big", "to": "big.bf16", "dtype": "bfloat16"}},
                {"copy": {"from": "scalar", "to": "scalar.copy"}},
            ],
            "output": str(out),
        }
    )
    want = dict(SOURCE)
    want["big"] = SOURCE["big"] * 2
    want["big.bf16"] = want["big"].astype(ml_dtypes.bfloat16)
    want["scalar.copy"] = SOURCE["scalar"]
    return want


def test_computed_tensors_are_written(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    want = write_computed(source, out)
    ck = bs.open(out)
    assert list(ck) == list(want)
    for name, array in want.items():
        assert_same(np.asarray(ck[name]), array, name)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None


def test_torch_loads_computed_tensors(source: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "m.pt"
    check_with_torch(torch, out, write_computed(source, out))


def test_format_key_and_empty_checkpoint(tmp_path: Path) -> None:
    src = write_st(tmp_path / "in.safetensors", {"w": np.arange(3, dtype=np.int16)})
    out = tmp_path / "weights.ckpt.pt"
    convert(src, out, format="torch")
    assert_same(np.asarray(bs.open(out)["w"]), np.arange(3, dtype=np.int16), "w")
    empty = tmp_path / "empty.bin"
    bs.run({"inputs": [str(src)], "transforms": [{"delete": {"target": "w"}}], "output": str(empty)})
    with zipfile.ZipFile(empty) as z:
        assert z.testzip() is None
        assert z.namelist() == ["archive/data.pkl", "archive/byteorder", "archive/version"]
    assert len(bs.open(empty)) == 0


def test_torch_loads_an_empty_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    src = write_st(tmp_path / "in.safetensors", {"w": np.arange(3, dtype=np.int16)})
    empty = tmp_path / "empty.bin"
    bs.run({"inputs": [str(src)], "transforms": [{"delete": {"target": "w"}}], "output": str(empty)})
    for mmap in (False, True):
        assert torch.load(empty, weights_only=True, mmap=mmap) == {}


def test_dtype_torch_lacks_is_refused_at_check_time(tmp_path: Path) -> None:
    # A float4 tensor (two per byte), which torch has no dtype for.
    header = json.dumps({"q.packed": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    header += b" " * (-len(header) % 8)
    src = tmp_path / "in.safetensors"
    src.write_bytes(struct.pack("<Q", len(header)) + header + b"\x12\x34")
    plan = {"inputs": [str(src)], "output": str(tmp_path / "out.bin")}
    for call in (bs.check, bs.run):
        with pytest.raises(bs.FormatError, match=r'"q\.packed".*float4_e2m1fn.*PyTorch.*cast'):
            call(plan)
    save = {"inputs": [str(src)], "transforms": [{"save": {"path": str(tmp_path / "s.pt"), "alias": "model"}}]}
    with pytest.raises(bs.FormatError, match=r"transforms\[0\].*q\.packed"):
        bs.check(save)
    assert listing(tmp_path) == ["in.safetensors"]


def test_failed_write_leaves_nothing(source: Path, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file, not a directory")
    with pytest.raises(bs.FormatError, match="blocker"):
        convert(source, tmp_path / "blocker" / "sub" / "m.bin")
    assert listing(tmp_path) == ["blocker"]


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    write_st(tmp_path / "in.safetensors", {"w": np.zeros(8 << 20, np.float32)})
    # 300 equal-assertions over a 32 MiB tensor keep the engine busy for seconds.
    checks = "".join("  - assert: {equal: {left: w, right: w}}\n" for _ in range(300))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"inputs: [in.safetensors]\ntransforms:\n{checks}output: out.bin\n")
    proc = subprocess.Popen(["brainsurgery", str(plan), "--threads", "1"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "_core" not in Path(f"/proc/{proc.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the plan finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "plan.yaml"]


def save_plan(source: Path, tmp_path: Path) -> dict[str, Any]:
    whole = tmp_path / "whole.pt"
    one = tmp_path / "one.pth"
    return bs.run(
        {
            "inputs": [str(source)],
            "transforms": [
                {"save": {"path": str(whole), "alias": "model"}},
                {"save": {"path": str(one), "target": "ünïcødé.名前"}},
                {"delete": {"target": "big"}},
            ],
            "output": str(tmp_path / "rest.bin"),
        }
    )


def test_save_transform_writes_a_pt_file(source: Path, tmp_path: Path) -> None:
    report = save_plan(source, tmp_path)
    assert "save:" in "\n".join(report["notes"])
    ck = bs.open(tmp_path / "whole.pt")
    assert list(ck) == list(SOURCE)
    for name, array in SOURCE.items():
        assert_same(np.asarray(ck[name]), array, name)
    assert_same(np.asarray(bs.open(tmp_path / "one.pth")["ünïcødé.名前"]), SOURCE["ünïcødé.名前"], "one")
    assert "big" not in bs.open(tmp_path / "rest.bin")
    # A check writes nothing.
    bs.check({"inputs": [str(source)], "transforms": [{"save": {"path": str(tmp_path / "c.pt"), "alias": "model"}}]})
    assert not (tmp_path / "c.pt").exists()


def test_torch_loads_saved_files(source: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    save_plan(source, tmp_path)
    check_with_torch(torch, tmp_path / "whole.pt", SOURCE)
    check_with_torch(torch, tmp_path / "one.pth", {"ünïcødé.名前": SOURCE["ünïcødé.名前"]})


def test_nested_plan_output_can_be_pytorch(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested.pt"
    bs.run({"inputs": [str(source)], "transforms": [{"execute": {"plan": {"inputs": [f"n::{source}"], "output": str(out)}}}]})
    assert list(bs.open(out)) == list(SOURCE)


def test_cli_plan_with_bin_output(source: Path, tmp_path: Path) -> None:
    plan = dump_plan(tmp_path / "plan.yaml", {"inputs": [str(source)], "output": "out.bin"})
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.bin").exists() and temporaries(tmp_path) == []
    with zipfile.ZipFile(tmp_path / "out.bin") as z:
        assert z.testzip() is None


DIR_TENSORS = {f"layer.{i}.weight": np.random.default_rng(i).standard_normal((64, 64)).astype(np.float32) for i in range(5)}  # 16 KiB each
SHARDS = [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]


def source_dir(tmp_path: Path) -> Path:
    """A directory checkpoint: model.safetensors and config.json."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    write_st(src_dir / "model.safetensors", DIR_TENSORS)
    (src_dir / "config.json").write_text('{"model_type": "x"}')
    return src_dir


def test_directory_output_follows_hugging_face_names(tmp_path: Path) -> None:
    tensors = DIR_TENSORS
    src_dir = source_dir(tmp_path)
    single = tmp_path / "single"
    convert(src_dir, single, format="torch")
    assert listing(single) == ["config.json", "pytorch_model.bin"]
    assert list(bs.open(single / "pytorch_model.bin")) == list(tensors)

    sharded = tmp_path / "sharded"
    report = convert(src_dir, sharded, format="torch", shard="40KiB")
    shards = SHARDS
    assert listing(sharded) == sorted(["config.json", *shards, "pytorch_model.bin.index.json"])
    assert len(report["written"]) == 5
    index = json.loads((sharded / "pytorch_model.bin.index.json").read_text())
    # The version marks the output as ours, so a later run may replace it.
    assert index["metadata"] == {"total_size": 5 * 64 * 64 * 4, "brainsurgery.version": bs.__version__}
    assert index["weight_map"] == {name: shards[i // 2] for i, name in enumerate(tensors)}
    seen = {}
    for shard in shards:
        with zipfile.ZipFile(sharded / shard) as z:
            assert z.testzip() is None
        ck = bs.open(sharded / shard)
        seen.update({name: np.asarray(ck[name]) for name in ck})
    assert list(seen) == list(tensors)
    for name, array in tensors.items():
        assert_same(seen[name], array, name)

    # Unsharded over the sharded run: the stale shards and index go, config.json stays.
    convert(src_dir, sharded, format="torch")
    assert listing(sharded) == ["config.json", "pytorch_model.bin"]


def test_torch_loads_every_shard(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    sharded = tmp_path / "sharded"
    convert(source_dir(tmp_path), sharded, format="torch", shard="40KiB")
    for i, shard in enumerate(SHARDS):
        check_with_torch(torch, sharded / shard, dict(list(DIR_TENSORS.items())[2 * i : 2 * i + 2]))


def test_directory_with_safetensors_weights_is_refused(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(source, out)  # safetensors directory output
    before = listing(tmp_path)
    with pytest.raises(bs.FormatError, match=r"model\.safetensors.*prefer"):
        convert(source, out, format="torch")
    assert listing(tmp_path) == before


def test_npz_directory_output_is_a_plan_error(source: Path, tmp_path: Path) -> None:
    with pytest.raises(bs.PlanError, match=r"output\.format.*\.npz"):
        bs.check({"inputs": [str(source)], "output": {"path": str(tmp_path / "d"), "format": "npz"}})
    proc = cli(["-o", tmp_path / "x.bin", source], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_one_error(cli(["-o", tmp_path / "y.bin", tmp_path / "missing.safetensors"], cwd=tmp_path), 2, "missing.safetensors")
