"""DCP → safetensors (issue 15 item 9): brainsurgery reading a PyTorch Distributed Checkpoint of
the ~1 GiB benchmark checkpoint (`ckpt-bf16.safetensors`, see README) and writing safetensors,
against `cp` of the `.distcp` data; best wall time of `--repeat` runs and peak RSS, as
``benches/run.py`` measures them. Target: within 1.5× of `cp`, peak RSS ≤ 128 MiB.

The DCP is written once into `$BENCH_DIR` (default `bench-data/`) by
`torch.distributed.checkpoint.save(no_dist=True)` when torch is installed, else by brainsurgery
(`format: dcp`); nothing else of it is timed. `--sharded` instead saves it as two FSDP ranks would (torch needed):
every tensor in two chunks along dim 0, one per rank's `__<rank>_0.distcp`, each chunk the
`torch.save` archive of its rows and `.metadata` built from torch's own dataclasses, so the
reading assembles every tensor from its chunks.

    python benches/dcp_bench.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import bench_dir, brainsurgery_exe, ensure_checkpoints, measure, warm  # noqa: E402


def make_dcp(src: Path, out: Path) -> str:
    if (out / ".metadata").exists():
        return "existing"
    try:
        import torch  # noqa: F401
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
    except ImportError:
        import brainsurgery as bs

        bs.run({"inputs": [str(src)], "transforms": [], "output": {"path": str(out), "format": "dcp"}})
        return "brainsurgery"
    dcp.save(load_file(str(src)), checkpoint_id=str(out), no_dist=True)
    return "torch"


def make_sharded_dcp(src: Path, out: Path) -> str:
    """`src` saved as two ranks of FSDP would save it (see the module docs)."""
    if (out / ".metadata").exists():
        return "existing"
    import io
    import pickle

    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    out.mkdir(parents=True)
    state = load_file(str(src))
    files = [open(out / f"__{rank}_0.distcp", "wb") for rank in range(2)]
    entries, storage = {}, {}
    for name, t in state.items():
        half = (t.shape[0] + 1) // 2
        chunks = []
        for rank, (start, rows) in enumerate([(0, half), (half, t.shape[0] - half)]):
            offsets = torch.Size([start] + [0] * (t.dim() - 1))
            sizes = torch.Size([rows, *t.shape[1:]])
            buf = io.BytesIO()
            torch.save(t[start : start + rows].clone(), buf)
            at = files[rank].tell()
            files[rank].write(buf.getvalue())
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
            storage[MetadataIndex(name, offsets, len(chunks) - 1)] = _StorageInfo(
                f"__{rank}_0.distcp", at, len(buf.getvalue())
            )
        entries[name] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape, chunks)
    for f in files:
        f.close()
    with open(out / ".metadata", "wb") as f:
        pickle.dump(Metadata(entries, storage_data=storage, version="1.0.0"), f)
    return "torch (two ranks, by hand)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sharded", action="store_true")
    args = parser.parse_args()
    data = bench_dir()
    src = ensure_checkpoints(data)["bf16"]
    ckpt = data / ("ckpt-bf16-sharded.dcp" if args.sharded else "ckpt-bf16.dcp")
    made = make_sharded_dcp(src, ckpt) if args.sharded else make_dcp(src, ckpt)
    out = data / "dcp-out.safetensors"
    exe = brainsurgery_exe()
    cmd = [exe, "run", "--no-progress", str(HERE / "plans" / "convert.yaml"), f"inputs=[m::{ckpt}]",
           f"output.path={out}"]
    for f in sorted(ckpt.glob("*.distcp")):
        warm(f)
    ours = measure(cmd, None, out, args.repeat)
    # `cp` of all the data (both ranks' files when sharded) into one directory.
    cp_out = data / "dcp-cp"
    cp_out.mkdir(exist_ok=True)
    datafiles = sorted(ckpt.glob("*.distcp"))
    cp = measure(["cp", *map(str, datafiles), str(cp_out)], None, None, args.repeat)
    for f in cp_out.iterdir():
        f.unlink()
    cp_out.rmdir()
    print(f"DCP written by {made}; {len(list(ckpt.glob('*.distcp')))} data file(s)")
    print("| job | brainsurgery | cp | ratio | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    print(f"| DCP → safetensors | {ours.best:.2f} s | {cp.best:.2f} s | {ours.best / cp.best:.2f}× | {ours.rss_mib:.0f} MiB |")
    if out.exists():
        out.unlink()


if __name__ == "__main__":
    main()
