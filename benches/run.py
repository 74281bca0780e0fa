"""The performance benchmark (SPEC §8): brainsurgery vs a plain NumPy script vs cp/dd, in one run.

    python benches/run.py [--repeat 3] [--jobs A,B,C,D,A2] [--threads N]

Data lives in ``$BENCH_DIR`` (default ``bench-data/`` at the repo root, gitignored): the
checkpoints are generated there by ``benches/make_checkpoint.py`` when missing (BF16 0.94 GiB,
F32 0.94 GiB, BF16 2× 1.88 GiB), and every output is deleted right after it is timed. Peak disk use
is the three inputs (~3.8 GiB) plus one output (at most 3.2 GiB).

For each job and each tool the page cache is warmed by reading the input once, then the command
runs ``--repeat`` times; before each run the previous output is deleted and ``sync`` is called, so
no write-back of an earlier run overlaps the timing. Reported: the best wall time (from process
start to exit, Python start-up included for both brainsurgery and the baseline) and the largest
peak RSS of the runs, measured with ``/usr/bin/time -v`` ("Maximum resident set size"). If
``/usr/bin/time`` is missing, install it (``apt-get install -y time``); without it the script
falls back to ``os.wait4``'s ``ru_maxrss``, the same number.

Tools:
  ours      ``brainsurgery run benches/plans/<job>.yaml inputs=[m::IN] output.path=OUT``
  baseline  ``python benches/baseline.py`` (safe_open → NumPy op → dict → save_file; see there)
  cp/dd     ``cp IN OUT`` for jobs A and B (coreutils cp: copy_file_range on ext4), and
            ``dd if=/dev/zero of=OUT bs=1M count=<MiB brainsurgery wrote>`` for job C
Jobs:
  A   cast every tensor BF16 → F16 (0.94 GiB in, 0.94 GiB out)
  B   scale every F32 tensor by 0.5 (0.94 GiB in, 0.94 GiB out)
  C   copy every MLP weight into 4 experts, delete the original (0.94 GiB in, 3.19 GiB out)
  D   ``brainsurgery check`` on the plans of A, B and C (headers only; wall time incl. Python start)
  A2  job A on the 2× checkpoint (1.88 GiB), to see that RSS does not grow with the size
  P   convert the BF16 checkpoint to a PyTorch ``.bin`` (0.94 GiB; baseline: baseline_torch.py)
  Q   convert that ``.bin`` back to safetensors (the ``.bin`` is written once by ``torch.save``
      when torch is importable, else by brainsurgery; the baseline needs torch and is skipped
      without it)

Timings on shared 2-core machines vary 2–4× between batches: compare numbers within one run only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLANS = HERE / "plans"
TIME = shutil.which("time", path="/usr/bin") or None
MiB = 1 << 20


def bench_dir() -> Path:
    return Path(os.environ.get("BENCH_DIR") or ROOT / "bench-data").resolve()


def brainsurgery_exe() -> str:
    # The console script beside this interpreter, not a pyenv shim (which adds a bash start-up).
    exe = Path(sys.executable).parent / "brainsurgery"
    return str(exe) if exe.exists() else (shutil.which("brainsurgery") or "brainsurgery")


@dataclass
class Measure:
    times: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    out_bytes: int = 0

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def rss_mib(self) -> float:
        return max(self.rss_kib) / 1024


def run_once(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command."""
    if TIME:
        full = [TIME, "-v", *cmd]
        start = time.perf_counter()
        proc = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        return wall, rss
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"command failed ({child.returncode}): {' '.join(cmd)}\n{child.stderr.read().decode()}")
    return wall, usage.ru_maxrss


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def measure(cmd: list[str], inp: Path | None, out: Path | None, repeat: int) -> Measure:
    m = Measure()
    if inp is not None:
        warm(inp)
    for _ in range(repeat):
        if out is not None:
            remove(out)
        subprocess.run(["sync"], check=True)
        wall, rss = run_once(cmd)
        m.times.append(wall)
        m.rss_kib.append(rss)
        if out is not None:
            m.out_bytes = out.stat().st_size
            remove(out)
    return m


def ensure_checkpoints(data: Path) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    from make_checkpoint import write_checkpoint

    want = {
        "bf16": (data / "ckpt-bf16.safetensors", dict(dtype="bf16")),
        "f32": (data / "ckpt-f32.safetensors", dict(dtype="f32")),
        "bf16x2": (data / "ckpt-bf16-x2.safetensors", dict(dtype="bf16", scale=2)),
    }
    paths = {}
    for key, (path, kwargs) in want.items():
        if not path.exists():
            print(f"generating {path} ...", file=sys.stderr, flush=True)
            write_checkpoint(path, **kwargs)
        paths[key] = path
    return paths


def convert_job(job: str, src: Path, data: Path, bs: str, py: str, args, have_torch: bool) -> tuple:
    """Job P (safetensors → .bin) or Q (.bin → safetensors), each against cp and, with torch,
    against baseline_torch.py."""
    baseline = str(HERE / "baseline_torch.py")
    plan = str(PLANS / "convert.yaml")
    if job == "P":
        inp, out, label, bjob = src, data / "out.bin", "P safetensors → .bin (0.94 GiB)", "to_bin"
    else:
        inp = data / "ckpt-bf16.bin"
        if not inp.exists():
            print(f"generating {inp} ...", file=sys.stderr, flush=True)
            if have_torch:
                subprocess.run([py, baseline, "to_bin", str(src), str(inp)], check=True)
            else:
                subprocess.run([bs, "run", "--no-progress", plan, f"inputs=[m::{src}]", f"output.path={inp}"],
                               check=True, stdout=subprocess.DEVNULL)
        out, label, bjob = data / "out.safetensors", "Q .bin → safetensors (0.94 GiB)", "from_bin"
    cmd = [bs, "run", "--no-progress", "--threads", str(args.threads), plan, f"inputs=[m::{inp}]",
           f"output.path={out}"]
    print(f"[{job}] brainsurgery ...", file=sys.stderr, flush=True)
    m_ours = measure(cmd, inp, out, args.repeat)
    m_base = None
    if have_torch:
        print(f"[{job}] baseline (torch) ...", file=sys.stderr, flush=True)
        m_base = measure([py, baseline, bjob, str(inp), str(out)], inp, out, args.repeat)
    print(f"[{job}] cp ...", file=sys.stderr, flush=True)
    m_ref = measure(["cp", str(inp), str(out)], inp, out, args.repeat)
    print(f"    ours {m_ours.times}  baseline {m_base.times if m_base else '-'}  cp {m_ref.times}", file=sys.stderr)
    return (label, m_ours.best, m_base.best if m_base else None, m_ref.best, m_ours.rss_mib,
            m_base.rss_mib if m_base else None, m_ours.out_bytes)


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", default="A,B,C,D,A2,P,Q")
    parser.add_argument("--threads", type=int, default=0, help="brainsurgery --threads (0: one per core)")
    args = parser.parse_args()
    jobs = args.jobs.split(",")

    data = bench_dir()
    data.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoints(data)
    out = data / "out.safetensors"
    bs = brainsurgery_exe()
    py = sys.executable
    baseline = str(HERE / "baseline.py")
    print(f"brainsurgery: {bs}; RSS via {'/usr/bin/time -v' if TIME else 'os.wait4'}; "
          f"{os.cpu_count()} CPUs; repeat {args.repeat}; data in {data}", file=sys.stderr)

    def ours(plan: str, inp: Path) -> list[str]:
        return [bs, "run", "--no-progress", "--threads", str(args.threads), str(PLANS / plan),
                f"inputs=[m::{inp}]", f"output.path={out}"]

    spec = {  # job: (label, plan, input, baseline job, reference kind)
        "A": ("A cast BF16→F16 (0.94 GiB)", "a_cast_bf16_to_f16.yaml", ckpt["bf16"], "cast", "cp"),
        "B": ("B scale F32 ×0.5 (0.94 GiB)", "b_scale_f32.yaml", ckpt["f32"], "scale", "cp"),
        "C": ("C MLP → 4 experts (3.19 GiB out)", "c_experts.yaml", ckpt["bf16"], "experts", "dd"),
        "A2": ("A on 2× checkpoint (1.88 GiB)", "a_cast_bf16_to_f16.yaml", ckpt["bf16x2"], "cast", "cp"),
    }
    have_torch = subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0
    rows = []
    for job in jobs:
        if job in ("P", "Q"):
            rows.append(convert_job(job, ckpt["bf16"], data, bs, py, args, have_torch))
            continue
        if job == "D":
            for plan, inp, name in [("a_cast_bf16_to_f16.yaml", ckpt["bf16"], "A"),
                                    ("b_scale_f32.yaml", ckpt["f32"], "B"),
                                    ("c_experts.yaml", ckpt["bf16"], "C")]:
                print(f"[D-{name}] check ...", file=sys.stderr, flush=True)
                cmd = [bs, "check", str(PLANS / plan), f"inputs=[m::{inp}]", f"output.path={out}"]
                m = measure(cmd, None, None, args.repeat)
                rows.append((f"D check plan {name}", m.best, None, None, m.rss_mib, None, 0))
            continue
        label, plan, inp, bjob, ref = spec[job]
        print(f"[{job}] brainsurgery ...", file=sys.stderr, flush=True)
        m_ours = measure(ours(plan, inp), inp, out, args.repeat)
        print(f"[{job}] baseline ...", file=sys.stderr, flush=True)
        m_base = measure([py, baseline, bjob, str(inp), str(out)], inp, out, args.repeat)
        if ref == "cp":
            ref_cmd = ["cp", str(inp), str(out)]
        else:
            ref_cmd = ["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={-(-m_ours.out_bytes // MiB)}", "status=none"]
        print(f"[{job}] {ref} ...", file=sys.stderr, flush=True)
        m_ref = measure(ref_cmd, inp, out, args.repeat)
        rows.append((label, m_ours.best, m_base.best, m_ref.best, m_ours.rss_mib, m_base.rss_mib, m_ours.out_bytes))
        print(f"    ours {m_ours.times}  baseline {m_base.times}  {ref} {m_ref.times}", file=sys.stderr)

    print()
    print("| job | ours s | baseline s | cp/dd s | ours/cp | baseline/ours speedup | ours peak RSS MiB | baseline peak RSS MiB | MiB written |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, t_ours, t_base, t_ref, rss_ours, rss_base, written in rows:
        ratio = t_ours / t_ref if t_ref else None
        speedup = t_base / t_ours if t_base else None
        print(f"| {label} | {fmt(t_ours)} | {fmt(t_base)} | {fmt(t_ref)} | {fmt(ratio)} | {fmt(speedup, 1)} | "
              f"{fmt(rss_ours, 1)} | {fmt(rss_base, 0)} | {written // MiB if written else '–'} |")


if __name__ == "__main__":
    main()
