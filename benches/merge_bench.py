"""A 3-model TIES merge (issue 13): one MergeKit config, run by `brainsurgery mergekit` and by
MergeKit 0.1.5's `mergekit-yaml` in the same batch, against `cp` of the output's bytes.

Three Llama-style BF16 directories (`config.json` LlamaForCausalLM + `model.safetensors`,
independent seeded weights; `--layers` sets the size: hidden 2048 / intermediate 5632 with a
32k vocabulary, 2.4 GiB each at 22 layers, 1.0 GiB at 7) are written once into `$BENCH_DIR/merge-llama-L{layers}/`.
The config is MergeKit's TIES example (`base_model` + two models, weight 0.5 and density 0.5
each, `dtype: bfloat16`). Best wall time of `--repeat` runs and peak RSS, as benches/run.py
measures them. Targets: within 3× `cp`, peak RSS ≤ 512 MiB; ≥ 5× faster than MergeKit at ≤ ¼ of
its RSS.

    python benches/merge_bench.py [--layers 22] [--repeat 2] [--mergekit-repeat 1]
    MERGEKIT_VENV=/work/venv-mk (default) holds mergekit; it is skipped when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_checkpoint import write_streamed  # noqa: E402
from run import MiB, bench_dir, brainsurgery_exe, measure  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 2048, 5632, 32000, 16


def layout(layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "weight")]
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors += [
            (f"{p}.input_layernorm.weight", (HIDDEN,), "norm"),
            (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN), "weight"),
            (f"{p}.self_attn.k_proj.weight", (HIDDEN, HIDDEN), "weight"),
            (f"{p}.self_attn.v_proj.weight", (HIDDEN, HIDDEN), "weight"),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN), "weight"),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,), "norm"),
            (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), "weight"),
            (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), "weight"),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), "weight"),
        ]
    tensors += [("model.norm.weight", (HIDDEN,), "norm"), ("lm_head.weight", (VOCAB, HIDDEN), "weight")]
    return tensors


def config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 2048, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    }


def models(data: Path, layers: int) -> dict[str, Path]:
    root = data / f"merge-llama-L{layers}"
    dirs = {name: root / name for name in ("base", "ft1", "ft2")}
    for seed, d in enumerate(dirs.values()):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")
        if not (d / "model.safetensors").exists():
            print(f"generating {d}/model.safetensors ...", file=sys.stderr, flush=True)
            write_streamed(d / "model.safetensors", layout(layers), "bf16", seed=30 + seed, generator="benches/merge_bench.py")
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--mergekit-repeat", type=int, default=1)
    args = parser.parse_args()
    data = bench_dir()
    dirs = models(data, args.layers)
    cfg = data / f"ties-L{args.layers}.yml"
    cfg.write_text(json.dumps({
        "merge_method": "ties", "base_model": str(dirs["base"]), "dtype": "bfloat16",
        "models": [{"model": str(dirs[m]), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("ft1", "ft2")],
    }, indent=2) + "\n")
    size = (dirs["base"] / "model.safetensors").stat().st_size
    out = data / "ties-ours"
    rows = []
    for d in dirs.values():
        subprocess.run(["cat", str(d / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)
    ours = measure([brainsurgery_exe(), "mergekit", str(cfg), "-o", str(out), "--no-progress"], None, out, args.repeat)
    rows.append(("brainsurgery mergekit", ours))
    cp_out = data / "ties-cp.safetensors"
    cp = measure(["cp", str(dirs["base"] / "model.safetensors"), str(cp_out)], dirs["base"] / "model.safetensors", cp_out, args.repeat)
    rows.append(("cp of one model", cp))
    mk_exe = Path(os.environ.get("MERGEKIT_VENV", "/work/venv-mk")) / "bin" / "mergekit-yaml"
    mk = None
    if mk_exe.exists():
        mk_out = data / "ties-mergekit"
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        mk = measure([str(mk_exe), str(cfg), str(mk_out), "--no-copy-tokenizer"], None, mk_out, args.mergekit_repeat)
        rows.append(("mergekit-yaml 0.1.5", mk))
        shutil.rmtree(mk_out, ignore_errors=True)
    print(f"3 models of {size / MiB:.0f} MiB BF16 ({args.layers} layers), TIES density 0.5")
    print("| tool | best wall s | peak RSS MiB |")
    print("|---|---:|---:|")
    for name, m in rows:
        print(f"| {name} | {m.best:.2f} | {m.rss_mib:.0f} |")
    print(f"ours / cp: {ours.best / cp.best:.1f}× (target ≤ 3×); peak RSS {ours.rss_mib:.0f} MiB (target ≤ 512)")
    if mk is not None:
        print(f"MergeKit / ours: {mk.best / ours.best:.1f}× time, ours / MergeKit RSS {ours.rss_mib / mk.rss_mib:.2f} (targets ≥ 5×, ≤ 0.25)")


if __name__ == "__main__":
    main()
