"""What ``check`` tells about a run's I/O before a byte is read (issue 12 item 4): bytes to read
and write, the output's files and their sizes, free space per filesystem; a run refused when the
output's filesystem is short, and one that fills the disk leaving nothing."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import brainsurgery as bs
from helpers import assert_one_error, cli, listing, write_st

TENSORS = {
    "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b.weight": np.linspace(-1, 1, 8, dtype=np.float32),
    "ids": np.arange(5, dtype=np.int64),
}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A directory checkpoint with a sidecar."""
    d = tmp_path / "ck"
    d.mkdir()
    write_st(d / "model.safetensors", TENSORS, {"format": "pt"})
    (d / "config.json").write_text('{"model_type": "tiny"}')
    return d


@pytest.mark.parametrize("output", ["out.safetensors", "out.pt", "out.npz", "sharded", "torch_dir"])
def test_check_lists_the_files_a_run_writes_with_their_exact_sizes(tmp_path: Path, ckpt: Path, output: str) -> None:
    spec: dict[str, object] = {"path": str(tmp_path / output)}
    if output in ("sharded", "torch_dir"):
        spec["shard"] = 40
    if output == "torch_dir":
        spec["format"] = "torch"
    plan = {"inputs": [str(ckpt)], "transforms": [{"scale_": {"target": "b.weight", "by": 2}}], "output": spec}
    checked = bs.check(plan)
    assert not (tmp_path / output).exists()
    result = bs.run(plan, quiet=True)
    on_disk = [(p, Path(p).stat().st_size) for p in result["written"]]
    assert checked["output_files"] == on_disk
    assert checked["bytes_to_write"] == sum(size for _, size in on_disk)
    # Every input byte is read once: the estimate is the run's count.
    assert checked["bytes_to_read"] == result["bytes_read"] == 48 + 32 + 40
    (fs,) = checked["filesystems"]
    assert fs["roles"] == ["output"] and fs["needed"] == checked["bytes_to_write"]
    assert fs["enough"] and fs["available"] is not None and fs["available"] >= fs["needed"]
    if output == "sharded":
        names = [Path(p).name for p, _ in on_disk]
        assert names[-2:] == ["model.safetensors.index.json", "config.json"] and len(names) > 3


def test_cli_check_prints_io_and_folds_long_shard_lists(tmp_path: Path, ckpt: Path) -> None:
    many = {f"t{i}": np.full(4, i, dtype=np.float32) for i in range(12)}
    write_st(tmp_path / "many.safetensors", many)
    proc = cli(["check", "many.safetensors", "-o", "sharded", "--shard-size", "16"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "bytes to read: 192 B (estimated, from the inputs)" in out
    assert "in 13 files" in out  # 12 shards and the index
    assert "model-00001-of-00012.safetensors" in out
    assert "model-00012-of-00012.safetensors" not in out
    assert "… 8 more" in out
    assert "output filesystem: " in out and " free, " in out and " needed" in out
    assert not (tmp_path / "sharded").exists()


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted under ``tmp_path``; skips the test where none can be mounted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("a tmpfs cannot be mounted here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_filesystem_refuses_the_run_or_fails_it_leaving_nothing(tmp_path: Path) -> None:
    big = write_st(tmp_path / "big.safetensors", {"w": np.ones((512, 1024), dtype=np.float32)})
    before = big.read_bytes()
    with small_tmpfs(tmp_path, "1m") as mnt:
        out = mnt / "out"
        plan = {"inputs": [str(big)], "output": {"path": str(out), "shard": "1MiB"}}
        (fs,) = bs.check(plan)["filesystems"]
        assert not fs["enough"] and fs["needed"] > fs["available"]
        with pytest.raises(bs.FormatError, match="not enough free space") as refused:
            bs.run(plan, quiet=True)
        assert str(out) in str(refused.value) and f"needs {fs['needed']} bytes" in str(refused.value)
        assert listing(mnt) == []
        with pytest.raises(bs.FormatError, match="the disk is full") as full:
            bs.run(plan, quiet=True, space_check=False)
        assert str(mnt) in str(full.value)
        assert listing(mnt) == []
        # The command line: exit status 2 either way, nothing left.
        args = ["big.safetensors", "-o", str(mnt / "o.safetensors"), "--no-progress"]
        assert_one_error(cli(args, cwd=tmp_path), 2, "not enough free space", str(mnt / "o.safetensors"))
        assert_one_error(cli([*args, "--no-space-check"], cwd=tmp_path), 2, "the disk is full")
        assert listing(mnt) == []
    assert big.read_bytes() == before


def test_saves_during_the_run_count_in_the_space_check(tmp_path: Path) -> None:
    """A `save` step writes during the run: its filesystem is checked with the output's (issue 12
    item 4), also in a plan without output, and a short one refuses the run before any write."""
    big = write_st(tmp_path / "big.safetensors", {"w": np.ones((512, 1024), dtype=np.float32)})
    saved = tmp_path / "mid.safetensors"
    plan = {"inputs": [str(big)], "transforms": [{"save": {"path": str(saved)}}]}
    (fs,) = bs.check(plan)["filesystems"]
    assert fs["roles"] == ["save"] and fs["needed"] == 512 * 1024 * 4 and fs["enough"]
    with_output = {**plan, "output": str(tmp_path / "out.safetensors")}
    (fs,) = bs.check(with_output)["filesystems"]
    assert fs["roles"] == ["output", "save"] and fs["needed"] > 2 * 512 * 1024 * 4
    with small_tmpfs(tmp_path, "1m") as mnt:
        short = {**with_output, "transforms": [{"save": {"path": str(mnt / "mid.safetensors")}}]}
        by_role = {tuple(f["roles"]): f for f in bs.check(short)["filesystems"]}
        assert not by_role[("save",)]["enough"] and by_role[("output",)]["enough"]
        with pytest.raises(bs.FormatError, match="not enough free space"):
            bs.run(short, quiet=True)
        assert listing(mnt) == [] and not (tmp_path / "out.safetensors").exists()


def test_a_saved_alias_counts_its_sidecars_and_a_dry_run_output_needs_no_space(tmp_path: Path, ckpt: Path) -> None:
    big = "x" * 100_000
    (ckpt / "tokenizer.json").write_text(big)
    saved = tmp_path / "mid"
    plan = {"inputs": [str(ckpt)], "transforms": [{"save": {"path": str(saved)}}]}
    (fs,) = bs.check(plan)["filesystems"]
    tensors = sum(a.nbytes for a in TENSORS.values())
    assert fs["needed"] >= tensors + len(big)
    # Dry-run on at the end: nothing is written, so neither files nor space are asked for.
    dry = {"inputs": [str(ckpt)], "transforms": [{"set": {"dry-run": True}}], "output": str(tmp_path / "o.safetensors")}
    checked = bs.check(dry)
    assert checked["output_files"] == [] and checked["filesystems"] == [] and checked["bytes_to_write"] == 0
    bs.run(dry, quiet=True)
    assert not (tmp_path / "o.safetensors").exists()
