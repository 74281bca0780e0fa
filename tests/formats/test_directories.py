"""Directory inputs of every format, and ``inspect`` / ``brainsurgery.open`` on every format (issue 4,
items 5 and 6). Directories are built here from the committed torch fixtures (copied under Hugging
Face names) and from arrays NumPy saves in the test; expected values are those arrays and the
fixtures' ``.npz`` expectations, never our own output."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import brainsurgery as bs
from helpers import assert_one_error, cli, listing, write_st

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "torch"
PLAIN = ["f32", "f16", "bf16", "i64", "flag", "scalar"]
WRAPPED = ["encoder.w", "head.b"]
SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"


def expected(*fixtures: str) -> dict[str, np.ndarray]:
    """The expectations written beside the fixtures (bf16 as raw uint16 under ``NAME::bf16``)."""
    out: dict[str, np.ndarray] = {}
    for name in fixtures:
        with np.load(FIXTURES / f"{name}.npz") as z:
            out.update({k: z[k] for k in z.files})
    return out


def check_values(ck: bs.Checkpoint, want: dict[str, np.ndarray]) -> None:
    """``ck`` holds exactly ``want``: names, dtypes, shapes and values."""
    assert sorted(ck) == sorted(k.removesuffix("::bf16") for k in want)
    for key, value in want.items():
        name = key.removesuffix("::bf16")
        got = ck[name]
        if key.endswith("::bf16"):
            assert ck.info(name)[0] == "bfloat16"
            assert got.shape == value.shape
            np.testing.assert_array_equal(got.view(np.uint16), value)
        else:
            assert got.dtype == value.dtype, name
            assert got.shape == value.shape, name
            np.testing.assert_array_equal(got, value, err_msg=name)


def copy_fixture(fixture: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURES / f"{fixture}.pt", dest)
    return dest


def write_index(directory: Path, weight_map: dict[str, str], name: str = "pytorch_model.bin.index.json") -> None:
    (directory / name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def sharded_bin(directory: Path) -> Path:
    """``plain.pt`` and ``wrapped.pt`` as two Hugging Face shards with their index."""
    copy_fixture("plain", directory / SHARD1)
    copy_fixture("wrapped", directory / SHARD2)
    write_index(directory, {**{n: SHARD1 for n in PLAIN}, **{n: SHARD2 for n in WRAPPED}})
    (directory / "config.json").write_text('{"model_type": "test"}')
    return directory


class TrainingArguments:
    """Stands in for transformers' TrainingArguments: `training_args.bin` pickles one."""

    def __init__(self) -> None:
        self.learning_rate = 1e-4


def trainer_checkpoint(directory: Path) -> Path:
    """What the Hugging Face Trainer leaves in `checkpoint-N/` (weights as pytorch_model.bin)."""
    copy_fixture("plain", directory / "pytorch_model.bin")
    (directory / "training_args.bin").write_bytes(pickle.dumps(TrainingArguments()))
    # Not checkpoints we could read: proves they are never opened.
    for name in ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"]:
        (directory / name).write_bytes(b"training state, never read")
    (directory / "trainer_state.json").write_text('{"global_step": 10}')
    (directory / "config.json").write_text('{"model_type": "test"}')
    return directory


def inspect_rows(stdout: str) -> dict[str, list[str]]:
    """Rows of the `inspect` table by tensor name: [dtype, shape..., size, unit]."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and not line.startswith(("total: ", "metadata ")):
            rows[fields[0]] = fields[1:]
    return rows


# ---- safetensors and PyTorch in one directory -------------------------------------------


def test_safetensors_win_over_pytorch_with_a_notice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck_dir = tmp_path / "ck"
    st = {"w": np.arange(4, dtype=np.float32), "b": np.ones(2, dtype=np.float16)}
    write_st(ck_dir / "model.safetensors", st)
    copy_fixture("plain", ck_dir / "pytorch_model.bin")
    (ck_dir / "config.json").write_text("{}")

    ck = bs.open(ck_dir)
    assert ck.format == "safetensors"
    assert sorted(ck) == ["b", "w"]
    np.testing.assert_array_equal(ck["w"], st["w"])
    assert len(ck.notices) == 1
    assert "both safetensors and PyTorch weights; loading the safetensors" in ck.notices[0]
    assert "pytorch_model.bin" in ck.notices[0]

    out = tmp_path / "out"
    report = bs.run({"inputs": [str(ck_dir)], "output": str(out)})
    assert report["notices"] == ck.notices
    assert "notice: " + ck.notices[0] in capsys.readouterr().err
    assert listing(out) == ["config.json", "model.safetensors"]  # the PyTorch weights are not copied
    got = load_file(str(out / "model.safetensors"))
    for name, value in st.items():
        np.testing.assert_array_equal(got[name], value)
    # quiet=True prints nothing but still reports.
    report = bs.check({"inputs": [str(ck_dir)]}, quiet=True)
    assert report["notices"] == ck.notices
    assert capsys.readouterr().err == ""

    # The command line prints the notice on stderr (stdout stays the plan's output) and succeeds.
    proc = cli(["run", str(ck_dir), "-o", str(tmp_path / "o.safetensors")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^notice: .*both safetensors and PyTorch weights; loading the safetensors", proc.stderr, re.M)
    assert "notice" not in proc.stdout
    proc = cli(["inspect", str(ck_dir)], cwd=tmp_path)
    assert proc.returncode == 0 and "notice: " in proc.stderr
    assert sorted(inspect_rows(proc.stdout)) == ["b", "w"]
    assert "safetensors file" in proc.stdout


def test_load_reports_the_notice(tmp_path: Path) -> None:
    write_st(tmp_path / "base.safetensors", {"x": np.zeros(2, np.float32)})
    ck_dir = tmp_path / "ck"
    write_st(ck_dir / "model.safetensors", {"w": np.zeros(2, np.float32)})
    copy_fixture("plain", ck_dir / "pytorch_model.bin")
    report = bs.check(
        {"inputs": [str(tmp_path / "base.safetensors")], "transforms": [{"load": {"path": str(ck_dir), "alias": "other"}}]},
        quiet=True,
    )
    assert len(report["notices"]) == 1 and "loading the safetensors" in report["notices"][0]


# ---- PyTorch directories -------------------------------------------------------------------


def test_bin_shards_with_index(tmp_path: Path) -> None:
    ck_dir = sharded_bin(tmp_path / "ck")
    # A stale shard the index does not name is not read.
    (ck_dir / "pytorch_model-00003-of-00003.bin").write_bytes(b"stale")
    ck = bs.open(ck_dir)
    assert ck.format == "PyTorch"
    # Only the wrapped shard's own notice: its `epoch` and `lr` are not tensors.
    assert len(ck.notices) == 1 and ck.notices[0].endswith("skipped (epoch, lr)")
    check_values(ck, expected("plain", "wrapped"))

    out = tmp_path / "out"
    bs.run({"inputs": [str(ck_dir)], "output": {"path": str(out), "shard": "none"}}, quiet=True)
    assert listing(out) == ["config.json", "model.safetensors"]
    check_values(bs.open(out / "model.safetensors"), expected("plain", "wrapped"))

    proc = cli(["inspect", str(ck_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = inspect_rows(proc.stdout)
    assert sorted(rows) == sorted(PLAIN + WRAPPED)
    assert rows["f32"][0] == "float32" and rows["bf16"][0] == "bfloat16"
    assert re.search(r"\b8 tensors\b.* in 2 PyTorch file", proc.stdout), proc.stdout


def test_bin_shards_without_index(tmp_path: Path) -> None:
    ck_dir = tmp_path / "ck"
    copy_fixture("plain", ck_dir / SHARD1)
    copy_fixture("wrapped", ck_dir / SHARD2)
    # Not a Hugging Face name: left out, with a notice, while Hugging Face weights are there.
    (ck_dir / "adapter_model.bin").write_bytes(b"never read")
    ck = bs.open(ck_dir)
    check_values(ck, expected("plain", "wrapped"))
    assert sorted(list(ck)[-2:]) == WRAPPED  # shard 2 last
    assert len(ck.notices) == 2 and "adapter_model.bin" in ck.notices[0]
    assert ck.notices[1].endswith("skipped (epoch, lr)")


def test_directory_of_pt_and_pth_files(tmp_path: Path) -> None:
    ck_dir = tmp_path / "ck"
    copy_fixture("plain", ck_dir / "encoder.pt")
    copy_fixture("parameter", ck_dir / "head.pth")
    ck = bs.open(ck_dir)
    check_values(ck, expected("plain", "parameter"))
    assert ck.notices == []


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    ck_dir = sharded_bin(tmp_path / "ck")
    (ck_dir / SHARD2).unlink()
    with pytest.raises(bs.FormatError, match=re.escape(SHARD2)) as info:
        bs.open(ck_dir)
    assert "missing shard" in str(info.value)
    proc = cli(["inspect", str(ck_dir)], cwd=tmp_path)
    assert_one_error(proc, 2, "pytorch_model.bin.index.json", "missing shard", SHARD2)
    out = tmp_path / "out.safetensors"
    proc = cli(["run", str(ck_dir), "-o", str(out)], cwd=tmp_path)
    assert_one_error(proc, 2, "missing shard")
    assert not out.exists()


def test_index_naming_a_tensor_not_in_its_shard(tmp_path: Path) -> None:
    ck_dir = sharded_bin(tmp_path / "ck")
    weight_map = {**{n: SHARD1 for n in PLAIN}, **{n: SHARD2 for n in WRAPPED}}
    weight_map["encoder.w"] = SHARD1  # it is in shard 2
    write_index(ck_dir, weight_map)
    with pytest.raises(bs.FormatError, match=r"puts tensor \"encoder.w\" in .*00001-of-00002.bin"):
        bs.open(ck_dir)
    write_index(ck_dir, {**weight_map, "encoder.w": SHARD2, "ghost": SHARD2})
    proc = cli(["check", str(ck_dir)], cwd=tmp_path)
    assert_one_error(proc, 2, '"ghost"', SHARD2, "does not contain it")


def test_index_shard_outside_the_directory(tmp_path: Path) -> None:
    ck_dir = sharded_bin(tmp_path / "ck")
    copy_fixture("plain", tmp_path / "outside.bin")
    write_index(ck_dir, {"f32": "../outside.bin"})
    with pytest.raises(bs.FormatError, match="not a file in the directory"):
        bs.open(ck_dir)


def test_duplicate_tensor_across_bin_files(tmp_path: Path) -> None:
    ck_dir = tmp_path / "ck"
    copy_fixture("plain", ck_dir / SHARD1)
    copy_fixture("plain", ck_dir / SHARD2)
    with pytest.raises(bs.FormatError, match=r'tensor "f32" is in both .*00001.* and .*00002'):
        bs.open(ck_dir)


def test_trainer_checkpoint_loads_only_the_model(tmp_path: Path) -> None:
    ck_dir = trainer_checkpoint(tmp_path / "checkpoint-10")
    ck = bs.open(ck_dir)
    check_values(ck, expected("plain"))
    assert len(ck.notices) == 1
    notice = ck.notices[0]
    for name in ["optimizer.pt", "rng_state.pth", "scaler.pt"]:
        assert name in notice, notice
    assert "training state" in notice and "neither loaded nor copied" in notice

    out = tmp_path / "edited"
    report = bs.run(
        {"inputs": [str(ck_dir)], "transforms": [{"scale_": {"target": "f32", "by": 2}}], "output": str(out)},
        quiet=True,
    )
    assert report["notices"] == [notice]
    # training_args.bin is metadata (copied byte for byte); the training state is not copied.
    assert listing(out) == ["config.json", "model.safetensors", "trainer_state.json", "training_args.bin"]
    assert (out / "training_args.bin").read_bytes() == (ck_dir / "training_args.bin").read_bytes()
    got = load_file(str(out / "model.safetensors"))
    want = expected("plain")
    np.testing.assert_array_equal(got["f32"], want["f32"] * np.float32(2))
    np.testing.assert_array_equal(got["i64"], want["i64"])

    proc = cli(["run", str(ck_dir), "-o", str(tmp_path / "cli_out")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "notice: " in proc.stderr and "optimizer.pt" in proc.stderr


def test_training_args_alone_is_not_weights(tmp_path: Path) -> None:
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    (ck_dir / "training_args.bin").write_bytes(pickle.dumps(TrainingArguments()))
    (ck_dir / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(bs.FormatError, match=r"no weight files .* in directory"):
        bs.open(ck_dir)
    assert_one_error(cli(["inspect", str(ck_dir)], cwd=tmp_path), 2, "no weight files", str(ck_dir))


def test_empty_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(bs.FormatError, match="no weight files"):
        bs.open(empty)
    out = tmp_path / "o.safetensors"
    assert_one_error(cli(["run", str(empty), "-o", str(out)], cwd=tmp_path), 2, "no weight files", "empty")
    assert not out.exists()


def test_garbage_bin_weights_are_a_format_error(tmp_path: Path) -> None:
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    (ck_dir / "pytorch_model.bin").write_bytes(b"not a zip")
    assert_one_error(cli(["inspect", str(ck_dir)], cwd=tmp_path), 2, "pytorch_model.bin")


# ---- NumPy directories -----------------------------------------------------------------------

NP = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3) / 3,
    "ids": np.array([3, -1, 7], dtype=np.int64),
    "emb": np.linspace(-1, 1, 8, dtype=np.float16).reshape(4, 2),
    "mask": np.array([True, False]),
}


def numpy_dir(directory: Path) -> Path:
    directory.mkdir()
    np.save(directory / "a.npy", NP["a"])
    np.save(directory / "ids.npy", NP["ids"])
    np.savez(directory / "rest.npz", emb=NP["emb"], mask=NP["mask"])
    (directory / "README.md").write_text("arrays")
    return directory


def test_numpy_directory(tmp_path: Path) -> None:
    ck_dir = numpy_dir(tmp_path / "np")
    ck = bs.open(ck_dir)
    assert ck.format == "NumPy"
    assert list(ck) == ["a", "ids", "emb", "mask"]  # files by name, members by offset
    for name, value in NP.items():
        assert ck.info(name) == (value.dtype.name, list(value.shape))
        np.testing.assert_array_equal(ck[name], value)

    out = tmp_path / "out"
    bs.run({"inputs": [str(ck_dir)], "output": str(out)}, quiet=True)
    assert listing(out) == ["README.md", "model.safetensors"]
    got = load_file(str(out / "model.safetensors"))
    for name, value in NP.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)

    proc = cli(["inspect", str(ck_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = inspect_rows(proc.stdout)
    assert sorted(rows) == sorted(NP)
    assert rows["emb"][0] == "float16" and rows["emb"][-2:] == [str(NP["emb"].nbytes), "B"]
    assert "in 3 NumPy file(s)" in proc.stdout


def test_pytorch_wins_over_numpy(tmp_path: Path) -> None:
    ck_dir = numpy_dir(tmp_path / "np")
    copy_fixture("parameter", ck_dir / "model.pt")
    ck = bs.open(ck_dir)
    check_values(ck, expected("parameter"))
    assert len(ck.notices) == 1
    assert "both PyTorch and NumPy weights; loading the PyTorch" in ck.notices[0]
    assert "a.npy, ids.npy, rest.npz" in ck.notices[0]


def test_duplicate_tensor_across_npy_files(tmp_path: Path) -> None:
    ck_dir = tmp_path / "np"
    ck_dir.mkdir()
    np.save(ck_dir / "w.npy", np.zeros(2, np.float32))
    np.savez(ck_dir / "more.npz", w=np.ones(2, np.float32), v=np.ones(1, np.float32))
    with pytest.raises(bs.FormatError, match=r'tensor "w" is in both .*more.npz and .*w.npy'):
        bs.open(ck_dir)
    out = tmp_path / "o.safetensors"
    proc = cli(["run", str(ck_dir), "-o", str(out)], cwd=tmp_path)
    assert_one_error(proc, 2, '"w"', "more.npz", "w.npy")
    assert not out.exists()
    # Two .npy files named alike but for the case of the extension.
    other = tmp_path / "np2"
    other.mkdir()
    np.save(other / "x.npy", np.zeros(1, np.float32))
    with open(other / "x.NPY", "wb") as f:
        np.save(f, np.ones(1, np.float32))
    assert_one_error(cli(["inspect", str(other)], cwd=tmp_path), 2, '"x"', "x.NPY", "x.npy")


# ---- single files of every format: open() and inspect -----------------------------------------


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_open_and_inspect_pytorch_file(tmp_path: Path, suffix: str) -> None:
    path = copy_fixture("plain", tmp_path / f"model{suffix}")
    ck = bs.open(path)
    assert ck.format == "PyTorch" and ck.notices == [] and ck.metadata == {}
    check_values(ck, expected("plain"))
    proc = cli(["inspect", path.name], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = inspect_rows(proc.stdout)
    assert sorted(rows) == sorted(PLAIN)
    want = expected("plain")
    for name in PLAIN:
        value = want.get(name, want.get(name + "::bf16"))
        row = rows[name]
        assert [int(d) for d in re.findall(r"\d+", " ".join(row[1:-2]))] == list(value.shape), row
        # Sizes in binary units (issue 14 item 5): bytes below 1 KiB.
        want_size = f"{value.nbytes} B" if value.nbytes < 1024 else f"{value.nbytes / 1024:.2f} KiB"
        assert " ".join(row[-2:]) == want_size, row
    assert rows["f32"][0] == "float32" and rows["i64"][0] == "int64" and rows["flag"][0] == "bool"
    assert rows["bf16"][0] == "bfloat16"
    assert "in 1 PyTorch file(s)" in proc.stdout


def test_open_and_inspect_wrapped_pytorch_file(tmp_path: Path) -> None:
    path = copy_fixture("wrapped", tmp_path / "last.ckpt.pt")
    check_values(bs.open(path), expected("wrapped"))
    proc = cli(["inspect", str(path)], cwd=tmp_path)
    assert sorted(inspect_rows(proc.stdout)) == WRAPPED


def test_open_and_inspect_npy_and_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "emb.npy", NP["emb"])
    ck = bs.open(tmp_path / "emb.npy")
    assert ck.format == "NumPy" and list(ck) == ["emb"]
    np.testing.assert_array_equal(ck["emb"], NP["emb"])
    proc = cli(["inspect", "emb.npy"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert inspect_rows(proc.stdout)["emb"][0] == "float16"
    assert "in 1 NumPy file(s)" in proc.stdout

    np.savez(tmp_path / "all.npz", **NP)
    ck = bs.open(tmp_path / "all.npz")
    assert sorted(ck) == sorted(NP)
    for name, value in NP.items():
        assert ck.info(name) == (value.dtype.name, list(value.shape))
        np.testing.assert_array_equal(ck[name], value)
    proc = cli(["inspect", "all.npz"], cwd=tmp_path)
    assert sorted(inspect_rows(proc.stdout)) == sorted(NP)


def test_torch_loads_what_a_bin_directory_converts_to(tmp_path: Path) -> None:
    """With torch installed, the values we read from a sharded directory are torch's own."""
    torch = pytest.importorskip("torch")
    ck_dir = sharded_bin(tmp_path / "ck")
    ck = bs.open(ck_dir)
    for shard in [SHARD1, SHARD2]:
        obj = torch.load(ck_dir / shard, map_location="cpu", weights_only=True)
        state = obj.get("state_dict", obj)
        flat = {}
        for key, value in state.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        for name, tensor in flat.items():
            tensor = tensor.detach().contiguous()
            if tensor.dtype == torch.bfloat16:
                np.testing.assert_array_equal(ck[name].view(np.uint16), tensor.view(torch.int16).numpy().view(np.uint16))
            else:
                np.testing.assert_array_equal(ck[name], tensor.numpy())


def test_other_frameworks_weights_are_not_sidecars(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_st(src / "model.safetensors", {"w": np.ones(2, np.float32)})
    for name in ["config.json", "tf_model.h5", "flax_model.msgpack", "model.onnx", "model.gguf"]:
        (src / name).write_text("x")
    bs.run({"inputs": [str(src)], "output": str(tmp_path / "out")})
    assert listing(tmp_path / "out") == ["config.json", "model.safetensors"]
