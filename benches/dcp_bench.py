"""DCP → safetensors (issue 15 item 9): brainsurgery reading a PyTorch Distributed Checkpoint of
the ~1 GiB benchmark checkpoint (`ckpt-bf16.safetensors`, see README) and writing safetensors,
against `cp` of the `.distcp` data; best wall time of `--repeat` runs and peak RSS, as
``benches/run.py`` measures them. Target: within 1.5× of `cp`, peak RSS ≤ 128 MiB.

The DCP is written once into `$BENCH_DIR` (default `bench-data/`) by
`torch.distributed.checkpoint.save(no_dist=True)` when torch is installed, else by brainsurgery
(`format: dcp`); nothing else of it is timed.

    python benches/dcp_bench.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import bench_dir, brainsurgery_exe, ensure_checkpoints, measure  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = bench_dir()
    src = ensure_checkpoints(data)["bf16"]
    ckpt = data / "ckpt-bf16.dcp"
    made = make_dcp(src, ckpt)
    out = data / "dcp-out.safetensors"
    (distcp,) = sorted(ckpt.glob("*.distcp"))[:1] or [None]
    exe = brainsurgery_exe()
    cmd = [exe, "run", "--no-progress", str(HERE / "plans" / "convert.yaml"), f"inputs=[m::{ckpt}]",
           f"output.path={out}"]
    ours = measure(cmd, distcp, out, args.repeat)
    cp_out = data / "dcp-cp.distcp"
    cp = measure(["cp", str(distcp), str(cp_out)], distcp, cp_out, args.repeat)
    print(f"DCP written by {made}; {len(list(ckpt.glob('*.distcp')))} data file(s)")
    print("| job | brainsurgery | cp | ratio | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    print(f"| DCP → safetensors | {ours.best:.2f} s | {cp.best:.2f} s | {ours.best / cp.best:.2f}× | {ours.rss_mib:.0f} MiB |")
    if out.exists():
        out.unlink()


if __name__ == "__main__":
    main()
