"""upcycle_moe (src/transforms/upcycle.rs): dense Llama/Mistral, Qwen2, Qwen3, OLMo and OLMo2
checkpoints turned into Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and FlexOlmo layouts, checked by a
NumPy forward pass of each MoE block written here (softmax router, top-k, weights renormalized
as the layouts do with ``norm_topk_prob: true``), the seeded noise and random routers against
the generator docs/semantics.md documents, MergeKit's cheap-embed router against the normalized
mean of embedding rows, and, when torch and transformers are installed, the upcycled checkpoint
loaded with ``AutoModelForCausalLM`` against the dense model's logits.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import brainsurgery as bs
from conftest import read
from helpers import assert_one_error, cli, dump_plan
from safetensors.numpy import save_file

F32 = np.float32
V, H, I, L, HEADS, KV, HD = 32, 16, 24, 2, 2, 1, 8
MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


# --- the documented generator (kernels/random.rs) ----------------------------------------------


def mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def tensor_seed(seed: int, name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return mix_int(mix_int(seed) ^ h)


def bits(seed: int, counters: np.ndarray) -> np.ndarray:
    z = np.full(counters.shape, seed, dtype=np.uint64) + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def normal(seed: int, n: int) -> np.ndarray:
    """Value i: Box–Muller on counters 2i and 2i+1 (the first uniform in (0, 1])."""
    i = np.arange(n, dtype=np.uint64)
    u1 = ((bits(seed, 2 * i) >> np.uint64(11)) + np.uint64(1)).astype(np.float64) / float(1 << 53)
    u2 = (bits(seed, 2 * i + np.uint64(1)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


# --- tiny dense checkpoints --------------------------------------------------------------------

FAMILIES = {
    # model_type: (architecture, MoE layout, router name, expert names gate/up/down)
    "llama": ("LlamaForCausalLM", "mixtral"),
    "mistral": ("MistralForCausalLM", "mixtral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2_moe"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3_moe"),
    "olmo": ("OlmoForCausalLM", "olmoe"),
    "olmo2": ("Olmo2ForCausalLM", "flex_olmo"),
}


def dense_tensors(model_type: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(F32)

    t = {"model.embed_tokens.weight": w(V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        if model_type != "olmo":
            norms = ["post_attention_layernorm", "post_feedforward_layernorm"] if model_type == "olmo2" else ["input_layernorm", "post_attention_layernorm"]
            for n in norms:
                t[p + n + ".weight"] = (1 + 0.1 * rng.standard_normal(H)).astype(F32)
        t[p + "self_attn.q_proj.weight"] = w(HEADS * HD, H)
        t[p + "self_attn.k_proj.weight"] = w(KV * HD, H)
        t[p + "self_attn.v_proj.weight"] = w(KV * HD, H)
        t[p + "self_attn.o_proj.weight"] = w(H, HEADS * HD)
        if model_type == "qwen2":
            t[p + "self_attn.q_proj.bias"] = w(HEADS * HD)
            t[p + "self_attn.k_proj.bias"] = w(KV * HD)
            t[p + "self_attn.v_proj.bias"] = w(KV * HD)
        if model_type == "qwen3":
            t[p + "self_attn.q_norm.weight"] = (1 + 0.1 * rng.standard_normal(HD)).astype(F32)
            t[p + "self_attn.k_norm.weight"] = (1 + 0.1 * rng.standard_normal(HD)).astype(F32)
        if model_type == "olmo2":
            t[p + "self_attn.q_norm.weight"] = (1 + 0.1 * rng.standard_normal(HEADS * HD)).astype(F32)
            t[p + "self_attn.k_norm.weight"] = (1 + 0.1 * rng.standard_normal(KV * HD)).astype(F32)
        t[p + "mlp.gate_proj.weight"] = w(I, H)
        t[p + "mlp.up_proj.weight"] = w(I, H)
        t[p + "mlp.down_proj.weight"] = w(H, I)
    if model_type != "olmo":
        t["model.norm.weight"] = np.ones(H, F32)
    t["lm_head.weight"] = w(V, H)
    return t


def dense_config(model_type: str) -> dict[str, Any]:
    return {
        "architectures": [FAMILIES[model_type][0]],
        "model_type": model_type,
        "vocab_size": V,
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": L,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HD,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }


def make_dense(root: Path, model_type: str, seed: int = 0, config: bool = True) -> tuple[Path, dict[str, np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    tensors = dense_tensors(model_type, np.random.default_rng(seed))
    save_file(tensors, str(root / "model.safetensors"))
    if config:
        (root / "config.json").write_text(json.dumps(dense_config(model_type)))
    return root, tensors


def upcycle(tmp_path: Path, inputs: list[str], keys: dict[str, Any], out: str = "out", **run: Any) -> Path:
    target = tmp_path / out
    bs.run({"inputs": inputs, "transforms": [{"upcycle_moe": keys}], "output": {"path": str(target), "alias": keys.get("alias", "m")}}, **run)
    return target


def out_tensors(path: Path) -> dict[str, np.ndarray]:
    return read(path / "model.safetensors") if (path / "model.safetensors").exists() else read(path)


# --- the NumPy forward pass --------------------------------------------------------------------


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (silu(x @ gate.T.astype(np.float64)) * (x @ up.T.astype(np.float64))) @ down.T.astype(np.float64)


def moe(x: np.ndarray, router: np.ndarray, experts: list[tuple[np.ndarray, ...]], k: int, renormalize: bool) -> np.ndarray:
    """Softmax over every expert's logit, the top k kept (renormalized to sum to 1 when the layout
    does: Mixtral always, Qwen/OLMoE/FlexOlmo with norm_topk_prob), experts' outputs summed."""
    logits = x.astype(np.float64) @ router.T.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros((x.shape[0], experts[0][2].shape[0]))
    for row in range(x.shape[0]):
        top = np.argsort(-probs[row], kind="stable")[:k]
        weights = probs[row, top]
        if renormalize:
            weights = weights / weights.sum()
        for e, wgt in zip(top, weights):
            out[row] += wgt * mlp(x[row : row + 1], *experts[e])[0]
    return out


def expert_names(layout: str, layer: int, e: int) -> tuple[str, str, str]:
    p = f"model.layers.{layer}."
    if layout == "mixtral":
        return tuple(f"{p}block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))  # type: ignore[return-value]
    return tuple(f"{p}mlp.experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down"))  # type: ignore[return-value]


def router_name(layout: str, layer: int) -> str:
    return f"model.layers.{layer}.{'block_sparse_moe' if layout == 'mixtral' else 'mlp'}.gate.weight"


DENSE_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


# --- identical experts keep the dense outputs ----------------------------------------------------


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("router", ["zeros", "random"])
def test_identical_experts_keep_each_mlp_block(tmp_path: Path, model_type: str, router: str) -> None:
    src, dense = make_dense(tmp_path / "dense", model_type)
    layout = FAMILIES[model_type][1]
    out = upcycle(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 4, "experts_per_token": 2, "router": router, "seed": 3})
    got = out_tensors(out)
    x = np.random.default_rng(1).standard_normal((5, H)).astype(F32)
    for layer in range(L):
        p = f"model.layers.{layer}."
        assert not any(p + n in got for n in DENSE_MLP)
        experts = [tuple(got[n] for n in expert_names(layout, layer, e)) for e in range(4)]
        for e in experts:
            for a, n in zip(e, DENSE_MLP):
                np.testing.assert_array_equal(a, dense[p + n])
        r = got[router_name(layout, layer)]
        assert r.shape == (4, H) and r.dtype == F32
        if router == "zeros":
            assert not r.any()
        reference = mlp(x, *(dense[p + n] for n in DENSE_MLP))
        np.testing.assert_allclose(moe(x, r, experts, 2, renormalize=True), reference, rtol=1e-12, atol=1e-12)
        if router == "zeros":
            # Without renormalizing (Qwen/OLMoE's default norm_topk_prob: false) the block would
            # give k/E of the dense output: why the rewritten config sets norm_topk_prob.
            np.testing.assert_allclose(moe(x, r, experts, 2, renormalize=False), reference * 2 / 4, rtol=1e-12, atol=1e-12)
    # Everything else is carried unchanged.
    for name, value in dense.items():
        if not name.endswith(DENSE_MLP):
            np.testing.assert_array_equal(got[name], value)
    extra = {n for n in got if n not in dense}
    per_layer = 1 + 4 * 3 + (4 if layout == "qwen2_moe" else 0)
    assert len(extra) == L * per_layer
    if layout == "qwen2_moe":
        assert got["model.layers.0.mlp.shared_expert.gate_proj.weight"].shape == (0, H)
        assert got["model.layers.0.mlp.shared_expert.down_proj.weight"].shape == (H, 0)
        assert not got["model.layers.0.mlp.shared_expert_gate.weight"].any()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_config_json_is_rewritten(tmp_path: Path, model_type: str) -> None:
    src, _ = make_dense(tmp_path / "dense", model_type)
    (src / "tokenizer.json").write_text('{"model": {}}')
    out = upcycle(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 8, "experts_per_token": 2})
    config = json.loads((out / "config.json").read_text())
    dense = dense_config(model_type)
    layout = FAMILIES[model_type][1]
    assert config["model_type"] == layout
    assert config["architectures"] == [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "flex_olmo": "FlexOlmoForCausalLM"}[layout]]
    assert config["num_experts_per_tok"] == 2
    assert config["num_local_experts" if layout == "mixtral" else "num_experts"] == 8
    if layout != "mixtral":
        assert config["norm_topk_prob"] is True
    if layout in ("qwen2_moe", "qwen3_moe"):
        assert config["moe_intermediate_size"] == I
    if layout == "qwen2_moe":
        assert config["shared_expert_intermediate_size"] == 0
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "head_dim"):
        assert config[key] == dense[key]
    # Other sidecars are carried; the input's config is not touched.
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    assert json.loads((src / "config.json").read_text()) == dense


def test_an_edited_config_is_the_one_upcycled(tmp_path: Path) -> None:
    src, _ = make_dense(tmp_path / "dense", "llama")
    bs.run({"inputs": [f"m::{src}"], "transforms": [{"config": {"set": {"rope_theta": 12345.0}}}, {"upcycle_moe": {"experts": 2}}], "output": str(tmp_path / "out")})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_theta"] == 12345.0 and config["num_local_experts"] == 2


def test_a_config_that_rules_the_layout_out_is_refused(tmp_path: Path) -> None:
    src, _ = make_dense(tmp_path / "dense", "llama")
    (src / "config.json").write_text(json.dumps(dense_config("llama") | {"attention_bias": True}))
    proc = run_plan(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 2})
    assert_one_error(proc, 2, "upcycle_moe", "attention_bias", "Mixtral's attention has no biases")


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "olmo", "olmo2"])
def test_layout_from_names_without_config(tmp_path: Path, model_type: str) -> None:
    src, _ = make_dense(tmp_path / "dense", model_type, config=False)
    out = upcycle(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 2})
    layout = FAMILIES[model_type][1]
    got = out_tensors(out)
    assert router_name(layout, 0) in got
    assert expert_names(layout, 1, 1)[2] in got


def test_explicit_layout_wins_over_the_config(tmp_path: Path) -> None:
    src, _ = make_dense(tmp_path / "dense", "qwen3")
    got = out_tensors(upcycle(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 2, "layout": "mixtral"}))
    assert "model.layers.0.block_sparse_moe.experts.1.w2.weight" in got


def test_single_file_input_and_default_alias(tmp_path: Path) -> None:
    _, dense = make_dense(tmp_path / "dense", "llama")
    out = tmp_path / "moe.safetensors"
    bs.run({"inputs": [str(tmp_path / "dense" / "model.safetensors")], "transforms": [{"upcycle_moe": {"experts": 3, "experts_per_token": 1}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["model.layers.1.block_sparse_moe.experts.2.w3.weight"], dense["model.layers.1.mlp.up_proj.weight"])


# --- noise and random routers: seeded per tensor name ------------------------------------------


def test_noise_is_relative_and_seeded_per_expert(tmp_path: Path) -> None:
    src, dense = make_dense(tmp_path / "dense", "llama")
    keys = {"alias": "m", "experts": 2, "noise": 0.05, "seed": 11, "router": "random", "router_std": 0.5}
    got = out_tensors(upcycle(tmp_path, [f"m::{src}"], keys))
    for layer in range(L):
        for e in range(2):
            for name, dense_name in zip(expert_names("mixtral", layer, e), DENSE_MLP):
                w = dense[f"model.layers.{layer}.{dense_name}"]
                z = normal(tensor_seed(11, name), w.size).reshape(w.shape)
                np.testing.assert_allclose(got[name], (w.astype(np.float64) * (1 + 0.05 * z)).astype(F32), rtol=1e-6)
        r = router_name("mixtral", layer)
        np.testing.assert_allclose(got[r], (0.5 * normal(tensor_seed(11, r), 2 * H)).reshape(2, H).astype(F32), rtol=1e-6)
    # Two experts of one layer get different noise.
    a, b = (got[expert_names("mixtral", 0, e)[0]] for e in range(2))
    assert not np.array_equal(a, b)


def test_noise_is_identical_for_any_thread_count_and_differs_by_seed(tmp_path: Path) -> None:
    src, _ = make_dense(tmp_path / "dense", "qwen2")

    def bytes_of(seed: int, threads: int, out: str) -> bytes:
        plan = dump_plan(tmp_path / f"{out}.yaml", {
            "inputs": [f"m::{src}"],
            "transforms": [{"upcycle_moe": {"alias": "m", "experts": 4, "noise": 0.01, "seed": seed, "router": "random"}}],
            "output": str(tmp_path / out),
        })
        env = os.environ | {"RAYON_NUM_THREADS": str(threads)}
        proc = subprocess.run(["brainsurgery", "run", str(plan), "--threads", str(threads)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return (tmp_path / out / "model.safetensors").read_bytes()

    one, two = bytes_of(5, 1, "t1"), bytes_of(5, 2, "t2")
    assert one == two
    assert bytes_of(6, 2, "t3") != one


# --- given routers ------------------------------------------------------------------------------


def test_cheap_embed_router_is_the_normalized_mean_of_embedding_rows(tmp_path: Path) -> None:
    src, dense = make_dense(tmp_path / "dense", "llama")
    ids = [[1, 2, 3], [4], [5, 5, 30], [0, 31]]
    got = out_tensors(upcycle(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 4, "router": {"embed": ids}}))
    embed = dense["model.embed_tokens.weight"].astype(np.float64)
    expected = np.stack([embed[i].mean(0) / max(np.linalg.norm(embed[i].mean(0)), 1e-8) for i in ids]).astype(F32)
    for layer in range(L):
        np.testing.assert_allclose(got[router_name("mixtral", layer)], expected, rtol=1e-6)


def test_values_and_alias_routers(tmp_path: Path) -> None:
    src, _ = make_dense(tmp_path / "dense", "qwen3")
    values = np.arange(2 * H, dtype=F32).reshape(2, H) / 7
    got = out_tensors(upcycle(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 2, "router": {"values": values.tolist()}}))
    for layer in range(L):
        np.testing.assert_allclose(got[router_name("qwen3_moe", layer)], values, rtol=1e-6)
    gates = {router_name("qwen3_moe", layer): np.full((2, H), layer + 0.5, np.float64) for layer in range(L)}
    save_file(gates, str(tmp_path / "gates.safetensors"))
    got = out_tensors(upcycle(tmp_path, [f"m::{src}", f"g::{tmp_path / 'gates.safetensors'}"], {"alias": "m", "experts": 2, "router": {"alias": "g"}}, out="out2"))
    for name, value in gates.items():
        assert got[name].dtype == F32
        np.testing.assert_array_equal(got[name], value.astype(F32))


def test_experts_from_several_aliases(tmp_path: Path) -> None:
    paths, models = [], []
    for s in range(3):
        p, t = make_dense(tmp_path / f"ft{s}", "mistral", seed=s)
        paths.append(f"a{s}::{p}")
        models.append(t)
    got = out_tensors(upcycle(tmp_path, paths, {"alias": "a0", "experts_from": ["a1", "a2", "a0"], "experts_per_token": 2}))
    x = np.random.default_rng(2).standard_normal((4, H)).astype(F32)
    for layer in range(L):
        p = f"model.layers.{layer}."
        experts = []
        for e, source in enumerate([1, 2, 0]):
            names = expert_names("mixtral", layer, e)
            for n, d in zip(names, DENSE_MLP):
                np.testing.assert_array_equal(got[n], models[source][p + d])
            experts.append(tuple(got[n] for n in names))
        # A zero router picks the first two experts on ties (stable top-k): their mean.
        r = got[router_name("mixtral", layer)]
        expected = (mlp(x, *experts[0]) + mlp(x, *experts[1])) / 2
        np.testing.assert_allclose(moe(x, r, experts, 2, renormalize=True), expected, rtol=1e-12)
    # Attention comes from the upcycled alias.
    np.testing.assert_array_equal(got["model.layers.0.self_attn.q_proj.weight"], models[0]["model.layers.0.self_attn.q_proj.weight"])


def test_explicit_mlp_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    t = {}
    for i in range(2):
        t[f"transformer.h.{i}.ffn.w1"] = rng.standard_normal((I, H)).astype(F32)
        t[f"transformer.h.{i}.ffn.w3"] = rng.standard_normal((I, H)).astype(F32)
        t[f"transformer.h.{i}.ffn.w2"] = rng.standard_normal((H, I)).astype(F32)
    save_file(t, str(tmp_path / "m.safetensors"))
    mlp_names = {"gate": r"transformer\.h\.(?P<layer>\d+)\.ffn\.w1", "up": r"transformer\.h\.(\d+)\.ffn\.w3", "down": r"transformer\.h\.(\d+)\.ffn\.w2"}
    out = tmp_path / "moe.safetensors"
    bs.run({"inputs": [f"m::{tmp_path / 'm.safetensors'}"], "transforms": [{"upcycle_moe": {"experts": 2, "layout": "mixtral", "mlp": mlp_names}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["transformer.h.1.block_sparse_moe.experts.1.w2.weight"], t["transformer.h.1.ffn.w2"])
    assert got["transformer.h.0.block_sparse_moe.gate.weight"].shape == (2, H)
    assert not any(n.endswith(("w1", "w2", "w3")) for n in got)


# --- check, Python builder, help ----------------------------------------------------------------


def test_check_plans_it_on_headers(tmp_path: Path) -> None:
    src, _ = make_dense(tmp_path / "dense", "llama")
    plan = dump_plan(tmp_path / "p.yaml", {
        "inputs": [f"m::{src}"],
        "transforms": [{"upcycle_moe": {"alias": "m", "experts": 8, "router": {"embed": [[e] for e in range(8)]}, "noise": 0.01}},
                       {"assert": {"count": {"of": r"m::.*experts\.\d+\.w1\.weight", "is": 8 * L}}}],
        "output": str(tmp_path / "out"),
    })
    proc = cli(["check", plan], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "upcycle_moe" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_builder_and_help(tmp_path: Path) -> None:
    src, dense = make_dense(tmp_path / "dense", "llama")
    out = tmp_path / "built"
    plan = bs.Plan(inputs=[f"m::{src}"], output={"path": str(out), "alias": "m"})
    plan.upcycle_moe(alias="m", experts=4, experts_per_token=2, layout="mixtral", router="zeros")
    assert plan.to_dict()["transforms"] == [{"upcycle_moe": {"alias": "m", "experts": 4, "experts_per_token": 2, "layout": "mixtral", "router": "zeros"}}]
    bs.run(plan.to_dict())
    np.testing.assert_array_equal(out_tensors(out)["model.layers.0.block_sparse_moe.experts.3.w1.weight"], dense["model.layers.0.mlp.gate_proj.weight"])
    (text,) = bs.check({"inputs": [f"m::{src}"], "transforms": [{"help": "upcycle_moe"}]})["output"]
    for key in ("experts_from", "router", "noise", "mlp", "layout", "list of aliases"):
        assert key in text


# --- bad input ---------------------------------------------------------------------------------


def run_plan(tmp_path: Path, inputs: list[str], keys: Any) -> Any:
    plan = dump_plan(tmp_path / "bad.yaml", {"inputs": inputs, "transforms": [{"upcycle_moe": keys}], "output": str(tmp_path / "bad_out")})
    return cli(["run", plan], tmp_path)


def test_unrecognised_mlp_names_list_what_was_found(tmp_path: Path) -> None:
    t = {f"transformer.h.0.ffn.{w}": np.zeros((4, 4), F32) for w in ("w1", "w2", "w3")}
    t["transformer.h.0.attn.weight"] = np.zeros((4, 4), F32)
    save_file(t, str(tmp_path / "m.safetensors"))
    proc = run_plan(tmp_path, [f"m::{tmp_path / 'm.safetensors'}"], {"experts": 2})
    msg = assert_one_error(proc, 2, "transforms[0]", "upcycle_moe", "no dense MLP found", "transformer.h.0.ffn.w1", "transformer.h.0.ffn.w3", "mlp:")
    assert "attn" not in msg
    assert not (tmp_path / "bad_out").exists()


@pytest.mark.parametrize(
    ("keys", "needles"),
    [
        ({"experts": 0}, ["experts", "at least one expert"]),
        ({"experts": 2, "experts_per_token": 3}, ["experts_per_token", "between 1 and the 2 experts"]),
        ({"experts": 2, "experts_per_token": 0}, ["experts_per_token"]),
        ({}, ["experts"]),
        ({"experts": 2, "layout": "deepseek"}, ["layout", "unknown layout `deepseek`", "mixtral"]),
        ({"experts": 2, "router": "uniform"}, ["router", "expected zeros, random"]),
        ({"experts": 2, "router": {"embed": [[1]]}}, ["router.embed", "1 lists of token ids for 2 experts"]),
        ({"experts": 2, "router": {"embed": [[1], [99]]}}, ["router.embed[1]", "token id 99", "model.embed_tokens.weight", "32 rows"]),
        ({"experts": 2, "router": {"values": [[1, 2], [3, 4]]}}, ["router", "rows of 2 values but the hidden size is 16"]),
        ({"experts": 2, "router_std": 0.1}, ["router_std", "only a random router"]),
        ({"experts": 2, "noise": -1}, ["noise", "≥ 0"]),
        ({"experts": 3, "experts_from": ["m", "m"]}, ["experts", "3 experts but experts_from lists 2 aliases"]),
        ({"experts": 2, "experts_from": ["m", "nope"]}, ["experts_from", "nope"]),
        ({"experts": 2, "mlp": {"gate": "x"}}, ["mlp", "layer index"]),
        ({"experts": 2, "bogus": 1}, ["bogus"]),
    ],
)
def test_bad_keys_are_plan_errors(tmp_path: Path, keys: dict[str, Any], needles: list[str]) -> None:
    src, _ = make_dense(tmp_path / "dense", "llama")
    proc = run_plan(tmp_path, [f"m::{src}"], {"alias": "m", **keys})
    assert_one_error(proc, 2, "upcycle_moe", *needles)


def test_experts_from_of_another_shape_names_the_tensor(tmp_path: Path) -> None:
    a, _ = make_dense(tmp_path / "a", "llama")
    b = tmp_path / "b"
    b.mkdir()
    t = dense_tensors("llama", np.random.default_rng(0))
    t["model.layers.1.mlp.down_proj.weight"] = np.zeros((H, I + 1), F32)
    save_file(t, str(b / "model.safetensors"))
    proc = run_plan(tmp_path, [f"m::{a}", f"b::{b}"], {"alias": "m", "experts_from": ["m", "b"]})
    assert_one_error(proc, 2, "experts_from", "expert 1", "b::model.layers.1.mlp.down_proj.weight", "(16, 25)", "(16, 24)")


def test_an_already_upcycled_model_is_refused(tmp_path: Path) -> None:
    src, _ = make_dense(tmp_path / "dense", "llama", config=False)
    plan = dump_plan(tmp_path / "twice.yaml", {
        "inputs": [f"m::{src}"],
        "transforms": [{"upcycle_moe": {"experts": 2}}, {"copy": {"from": r"model\.layers\.0\.block_sparse_moe\.experts\.0\.(w\d)\.weight", "to": r"model.layers.0.mlp.\1"}},
                       {"move": {"from": r"model\.layers\.0\.mlp\.w1", "to": "model.layers.0.mlp.gate_proj.weight"}},
                       {"move": {"from": r"model\.layers\.0\.mlp\.w3", "to": "model.layers.0.mlp.up_proj.weight"}},
                       {"move": {"from": r"model\.layers\.0\.mlp\.w2", "to": "model.layers.0.mlp.down_proj.weight"}},
                       {"upcycle_moe": {"experts": 2}}],
        "output": str(tmp_path / "o"),
    })
    proc = cli(["check", plan], tmp_path)
    assert_one_error(proc, 2, "transforms[5]", "model.layers.0.block_sparse_moe.gate.weight", "already exists")


def test_config_of_an_unknown_family_asks_for_a_layout(tmp_path: Path) -> None:
    src, _ = make_dense(tmp_path / "dense", "llama")
    cfg = dense_config("llama") | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (src / "config.json").write_text(json.dumps(cfg))
    proc = run_plan(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 2})
    assert_one_error(proc, 2, "model_type `gpt2`", "layout")
    proc = run_plan(tmp_path, [f"m::{src}"], {"alias": "m", "experts": 2, "layout": "mixtral"})
    assert proc.returncode == 0, proc.stderr


# --- transformers loads the result --------------------------------------------------------------


# Qwen2-MoE's empty shared expert: torch warns that initializing it is a no-op.
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "olmo2"])
def test_transformers_loads_the_upcycled_model_with_the_dense_logits(tmp_path: Path, model_type: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=HEADS,
        num_key_value_heads=KV, head_dim=HD, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    dense.save_pretrained(tmp_path / "dense")
    out = upcycle(tmp_path, [f"m::{tmp_path / 'dense'}"], {"alias": "m", "experts": 4, "experts_per_token": 2, "router": "random", "noise": 0})
    moe = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(moe).__name__ == {"llama": "Mixtral", "mistral": "Mixtral", "qwen2": "Qwen2Moe", "qwen3": "Qwen3Moe", "olmo2": "FlexOlmo"}[model_type] + "ForCausalLM"
    assert moe.config.num_experts_per_tok == 2
    ids = torch.tensor([[1, 5, 9, 2, 30, 7]])
    with torch.no_grad():
        want = dense(ids).logits
        got = moe(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_noise_and_routers_in_half_precision(tmp_path: Path, dtype: str) -> None:
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    root = tmp_path / "dense"
    root.mkdir()
    dense = {k: v.astype(np_dtype) for k, v in dense_tensors("llama", np.random.default_rng(0)).items()}
    save_file(dense, str(root / "model.safetensors"))
    got = out_tensors(upcycle(tmp_path, [f"m::{root}"], {"alias": "m", "experts": 2, "noise": 0.1, "seed": 1, "router": {"embed": [[1, 2], [3]]}}))
    ulp = 2.0**-7 if dtype == "bfloat16" else 2.0**-10
    for e in range(2):
        name = expert_names("mixtral", 0, e)[0]
        w = dense["model.layers.0.mlp.gate_proj.weight"].astype(np.float64)
        expected = w * (1 + 0.1 * normal(tensor_seed(1, name), w.size).reshape(w.shape))
        assert got[name].dtype == np_dtype
        np.testing.assert_allclose(got[name].astype(np.float64), expected, rtol=ulp, atol=0)
    embed = dense["model.embed_tokens.weight"].astype(np.float64)
    rows = [embed[[1, 2]].mean(0), embed[[3]].mean(0)]
    expected = np.stack([r / np.linalg.norm(r) for r in rows])
    router = got[router_name("mixtral", 1)]
    assert router.dtype == np_dtype
    np.testing.assert_allclose(router.astype(np.float64), expected, rtol=ulp, atol=1e-6)
