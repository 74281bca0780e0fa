"""Start-up time of the command line (issue 14 item 9): wall time of ``brainsurgery --help`` and of
``brainsurgery check`` on the benchmark plans, interpreter start included.

    python benches/startup_bench.py [--runs 11] [--import-time]

Each command runs ``--runs`` times as a fresh process (``subprocess.run``, output captured); the
median and the best wall times, and the median CPU time (user + system, which a loaded machine
inflates less), are printed as a Markdown table. The target is a wall time ≤ 60 ms.

The plans read the checkpoints of ``benches/run.py`` (``$BENCH_DIR``, default ``bench-data/`` at the
repo root); only their headers are read, and ``make_checkpoint.py`` writes them when missing. The
check's output path is a temporary folder's (nothing is written). ``--import-time`` also prints
the slowest imports of ``python -X importtime -m brainsurgery --help``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANS = ["a_cast_bf16_to_f16", "b_scale_f32", "c_experts", "s_split_mlp"]
INPUTS = {"b_scale_f32": "ckpt-f32.safetensors"}


def ensure_checkpoints(data: Path) -> None:
    for name, dtype in [("ckpt-bf16.safetensors", "bf16"), ("ckpt-f32.safetensors", "f32")]:
        if not (data / name).exists():
            data.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(ROOT / "benches" / "make_checkpoint.py"), str(data / name), "--dtype", dtype], check=True)


def timed(argv: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall times and CPU times (user + system, of the child) of `runs` runs."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--import-time", action="store_true")
    args = parser.parse_args()
    exe = shutil.which("brainsurgery")
    if exe is None:
        raise SystemExit("brainsurgery is not on PATH (pip install -e . or maturin develop)")
    data = Path(os.environ.get("BENCH_DIR", ROOT / "bench-data"))
    ensure_checkpoints(data)
    with tempfile.TemporaryDirectory() as tmp:
        commands = {"brainsurgery --help": [exe, "--help"]}
        for plan in PLANS:
            ckpt = data / INPUTS.get(plan, "ckpt-bf16.safetensors")
            commands[f"brainsurgery check {plan}.yaml"] = [
                exe,
                "check",
                str(ROOT / "benches" / "plans" / f"{plan}.yaml"),
                f"inputs=[m::{ckpt}]",
                f"output.path={Path(tmp) / 'out.safetensors'}",
            ]
        commands["python -c pass (interpreter alone)"] = [sys.executable, "-c", "pass"]
        print(f"| command | wall, median of {args.runs} (ms) | wall, best (ms) | CPU, median (ms) |")
        print("|---|---:|---:|---:|")
        for label, argv in commands.items():
            walls, cpus = timed(argv, args.runs)
            print(
                f"| `{label}` | {statistics.median(walls) * 1e3:.1f} | {min(walls) * 1e3:.1f} "
                f"| {statistics.median(cpus) * 1e3:.1f} |"
            )
    if args.import_time:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "brainsurgery", "--help"], capture_output=True, text=True)
        rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:") and "self" not in line]
        rows.sort(key=lambda r: -int(r[1]))
        print("\nslowest imports (cumulative µs):")
        for r in rows[:10]:
            print(f"  {r[1].strip():>8}  {r[2].rstrip()}")


if __name__ == "__main__":
    main()
