"""The memory contract (issue 12): a job larger than the memory budget, timed against the same
job with an ample budget, with peak RSS, in the same batch.

    python benches/memory_bench.py [--repeat 3] [--gib 2] [--budget 256MB]

- transpose: a ``--gib`` GiB BF16 square matrix permuted ``[1, 0]`` through the CLI, with
  ``--max-memory BUDGET`` (read in bands by ``pread``) and with ``--max-memory 64GB`` (mapped).
- product: ``a @ b`` of two 2048×8192 · 8192×2048 F32 operands (64 MiB each) with a 32 MB budget
  (operands and product in the scratch arena) and with an ample one.

The budget's run, the ample run and a ``cp`` of the input alternate in each round (the cost of
writing fresh page-cache pages varies by several times on a VM); best of the rounds. Peak RSS of
each process via ``/usr/bin/time -v`` (helpers of ``run.py``); page cache warm.
Inputs live in ``$BENCH_DIR`` (default ``bench-data/``). Release build only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

MiB = 1 << 20


def transpose_input(data: Path, gib: int) -> Path:
    path = data / f"square-{gib}g.safetensors"
    if not path.exists():
        side = int((gib * (1 << 30) // 2) ** 0.5)
        # BF16 bit patterns written as uint16 rows, then declared BF16 in the header: the values
        # do not matter to a transpose, only their size does.
        rng = np.random.default_rng(0)
        x = rng.integers(0, 1 << 15, size=(side, side), dtype=np.uint16)
        save_file({"w": x}, str(path))
        del x
        raw = bytearray(path.read_bytes()[:4096])
        n = int.from_bytes(raw[:8], "little")
        header = bytes(raw[8 : 8 + n]).replace(b'"U16"', b'"BF16"')
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(header)
    return path


def product_input(data: Path) -> Path:
    path = data / "product-operands.safetensors"
    if not path.exists():
        rng = np.random.default_rng(1)
        save_file(
            {
                "a": rng.standard_normal((2048, 8192), dtype=np.float32),
                "b": rng.standard_normal((8192, 2048), dtype=np.float32),
            },
            str(path),
        )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gib", type=int, default=2)
    parser.add_argument("--budget", default="256MB")
    args = parser.parse_args()
    data = bench.bench_dir()
    data.mkdir(parents=True, exist_ok=True)
    exe = bench.brainsurgery_exe()
    out = data / "memory-out.safetensors"
    jobs = [
        (
            f"transpose {args.gib} GiB BF16",
            transpose_input(data, args.gib),
            ["-e", "permute: from: w, to: t, order: [1, 0]", "-e", "delete: target: w"],
            args.budget,
        ),
        (
            "matmul 64 MiB operands",
            product_input(data),
            ["-e", "matmul: from_a: a, from_b: b, to: c", "-e", "delete: target: '[ab]'"],
            "32MB",
        ),
    ]
    print(
        f"{'job':28} {'budget':>8} {'best s':>8} {'peak RSS':>10}   {'ample s':>8} {'peak RSS':>10}  ratio"
        f"   {'cp s':>6}  (all runs: budget / ample / cp)"
    )
    for name, inp, transforms, budget in jobs:
        small, ample, copy = bench.Measure(), bench.Measure(), bench.Measure()
        bench.warm(inp)
        # Interleaved, with a `cp` of the input in each round: on a VM the cost of writing
        # fresh page-cache pages swings by several times from one minute to the next, so runs
        # compared with each other are taken side by side.
        for _ in range(args.repeat):
            for limit, m in ((budget, small), ("64GB", ample)):
                cmd = [exe, str(inp), *transforms, "-o", str(out), "--max-memory", limit, "--threads", "2"]
                bench.remove(out)
                subprocess.run(["sync"], check=True)
                wall, rss = bench.run_once([*cmd, "--no-progress"])
                m.times.append(wall)
                m.rss_kib.append(rss)
                bench.remove(out)
            subprocess.run(["sync"], check=True)
            wall, _ = bench.run_once(["cp", str(inp), str(out)])
            copy.times.append(wall)
            bench.remove(out)
        print(
            f"{name:28} {budget:>8} {small.best:8.2f} {small.rss_mib:8.0f} MiB   "
            f"{ample.best:8.2f} {ample.rss_mib:8.0f} MiB  {small.best / ample.best:5.2f}×   {copy.best:6.2f}"
            f"  ({', '.join(f'{a:.2f}/{b:.2f}/{c:.2f}' for a, b, c in zip(small.times, ample.times, copy.times))})"
        )


if __name__ == "__main__":
    main()
