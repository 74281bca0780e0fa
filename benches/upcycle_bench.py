"""upcycle_moe (issue 13): a ~1 GiB dense Llama-style BF16 checkpoint (13 layers of hidden 2048,
intermediate 5632: `o_proj`, norms and the `gate/up/down_proj` MLP, written once into
`$BENCH_DIR` by `make_checkpoint.write_streamed`) upcycled to 8 Mixtral experts
(`plans/u_upcycle_moe.yaml`, ≈ 7 GiB out), against `dd if=/dev/zero` writing as many bytes; best
wall time of `--repeat` runs and peak RSS, measured as ``benches/run.py`` does. Target: within
1.2× of `dd`, peak RSS ≤ 256 MiB.

    python benches/upcycle_bench.py [--repeat 2] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_checkpoint import write_streamed  # noqa: E402
from run import MiB, bench_dir, brainsurgery_exe, measure  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 2048, 5632, 13


def dense_layout() -> list[tuple[str, tuple[int, ...], str]]:
    tensors = []
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        tensors.append((f"{p}.input_layernorm.weight", (HIDDEN,), "norm"))
        tensors.append((f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN), "weight"))
        tensors.append((f"{p}.post_attention_layernorm.weight", (HIDDEN,), "norm"))
        tensors.append((f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), "weight"))
        tensors.append((f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), "weight"))
        tensors.append((f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), "weight"))
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    data = bench_dir()
    src = data / "ckpt-dense-bf16.safetensors"
    if not src.exists():
        print(f"generating {src} ...", file=sys.stderr, flush=True)
        write_streamed(src, dense_layout(), "bf16", generator="benches/upcycle_bench.py")
    out = data / "upcycled.safetensors"
    cmd = [brainsurgery_exe(), "run", "--no-progress", str(HERE / "plans" / "u_upcycle_moe.yaml"),
           f"inputs=[m::{src}]", f"output.path={out}"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    ours = measure(cmd, src, out, args.repeat)
    dd_out = data / "upcycled-dd.bin"
    dd = measure(["dd", "if=/dev/zero", f"of={dd_out}", "bs=1M", f"count={-(-ours.out_bytes // MiB)}", "status=none"],
                 None, dd_out, args.repeat)
    print(f"input {src.stat().st_size / MiB:.0f} MiB, output {ours.out_bytes / MiB:.0f} MiB")
    print("| job | brainsurgery | dd | ratio | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    print(f"| upcycle_moe → 8 experts | {ours.best:.2f} s | {dd.best:.2f} s | {ours.best / dd.best:.2f}× | {ours.rss_mib:.0f} MiB |")


if __name__ == "__main__":
    main()
