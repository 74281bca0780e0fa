"""How close `check`'s peak memory estimate comes to the peak a run measures (issue 12).

    python benches/estimate_bench.py [--repeat 2]

For each job: the estimate `bs.check` gives (`peak_memory_estimate`, the engine's own memory),
and the peak RSS of the CLI running the job minus the peak RSS of the CLI checking it (the
program, its libraries and the headers: what is there before any work). Jobs: the benchmark
plans of `run.py` (convert, cast, upcycle on the 1 GiB BF16 checkpoint) and those of
`memory_bench.py` (a product and a transpose, under a small budget and an ample one), a
randomized factorization, and ``extract_lora`` over ``lora_bench.py``'s 0.94 GiB BF16 pair. Page cache warm; inputs in ``$BENCH_DIR`` (default ``bench-data/``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import memory_bench  # noqa: E402
import yaml  # noqa: E402
import run as bench  # noqa: E402

import brainsurgery as bs  # noqa: E402

MiB = 1 << 20


def cli_plan(inp: Path, transforms: list[str], out: Path) -> list[str]:
    args = [str(inp)]
    for t in transforms:
        args += ["-e", t]
    return [*args, "-o", str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    data = bench.bench_dir()
    data.mkdir(parents=True, exist_ok=True)
    ckpt = bench.ensure_checkpoints(data)["bf16"]
    product = memory_bench.product_input(data)
    square = memory_bench.transpose_input(data, 2)
    out = data / "estimate-out.safetensors"
    experts = [
        f"copy: {{from: 'model\\.layers\\.(\\d+)\\.mlp\\.up_proj\\.weight', to: 'model.layers.\\1.mlp.experts.{i}.up_proj.weight'}}"
        for i in range(4)
    ]
    jobs = [
        ("convert 1 GiB BF16", ckpt, [], "64GB"),
        ("cast BF16 → F16", ckpt, ["cast_: {target: '.*', dtype: float16}"], "64GB"),
        ("upcycle to 4 experts", ckpt, experts, "64GB"),
        ("matmul, 32 MB budget", product, ["matmul: {from_a: a, from_b: b, to: c}", "delete: {target: '[ab]'}"], "32MB"),
        ("matmul, ample", product, ["matmul: {from_a: a, from_b: b, to: c}", "delete: {target: '[ab]'}"], "64GB"),
        ("transpose 2 GiB, 256 MB", square, ["permute: {from: w, to: t, order: [1, 0]}", "delete: {target: w}"], "256MB"),
        ("transpose 2 GiB, ample", square, ["permute: {from: w, to: t, order: [1, 0]}", "delete: {target: w}"], "64GB"),
        (
            "phlora r64 2048×8192",
            product,
            ["phlora: {target: a, target_a: a_A, target_b: a_B, rank: 64}", "delete: {target: '[ab]'}"],
            "64GB",
        ),
    ]
    # An extraction writes its adapter from a step: a plan with two inputs and no output.
    import lora_bench  # noqa: E402

    base, ft = lora_bench.gib_pair(data)
    adapter = data / "estimate-adapter"
    extract = f"extract_lora: {{base: base, finetuned: ft, target: '{lora_bench.PROJ}', rank: 16, path: '{adapter}'}}"
    jobs.append(("extract_lora r16, 0.94 GiB pair", (base, ft), [extract], "64GB"))
    exe = bench.brainsurgery_exe()
    print(f"{'job':26} {'budget':>7} {'estimate':>10} {'measured':>10} {'run RSS':>9} {'check RSS':>9}  est/meas")
    for name, inp, transforms, budget in jobs:
        if isinstance(inp, tuple):
            inputs, written = [f"base::{inp[0]}", f"ft::{inp[1]}"], adapter
            plan = [f"inputs=[{','.join(inputs)}]", *(a for t in transforms for a in ("-e", t))]
            spec = {"inputs": inputs, "transforms": [yaml.safe_load(t) for t in transforms]}
            inp = inp[1]
        else:
            inputs, written = [str(inp)], out
            plan = cli_plan(inp, transforms, out)
            spec = {"inputs": inputs, "transforms": [yaml.safe_load(t) for t in transforms], "output": str(out)}
        common = ["--max-memory", budget, "--threads", "2"]
        estimate = bs.check(spec, threads=2, max_memory=budget)["peak_memory_estimate"]
        checked = bench.measure([exe, "check", *plan, *common], inp, None, args.repeat)
        ran = bench.measure([exe, *plan, *common, "--no-progress"], inp, written, args.repeat)
        measured = (ran.rss_mib - checked.rss_mib) * MiB
        print(
            f"{name:26} {budget:>7} {estimate / MiB:8.1f} Mi {measured / MiB:8.1f} Mi {ran.rss_mib:7.0f} Mi "
            f"{checked.rss_mib:7.0f} Mi  {estimate / max(measured, 1):6.2f}"
        )
    subprocess.run(["rm", "-rf", str(out), str(adapter)], check=False)


if __name__ == "__main__":
    main()
