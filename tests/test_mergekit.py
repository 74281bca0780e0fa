"""`brainsurgery mergekit CONFIG.yml` and `bs.from_mergekit` (issue 13 item 3): MergeKit configs,
written here in MergeKit's own syntax, translated into plans and run on small checkpoints made
here; results compared with NumPy references computed here, or (for the seeded methods, whose
numerics tests/transforms/test_merge.py checks) with the `merge` step written by hand.
src/plan/mergekit.rs holds the translator and its unit tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest
import yaml

import brainsurgery as bs
from conftest import read
from helpers import assert_one_error, cli, sha256, write_st

F32 = np.float32
LAYERS = 3
H, I, V = 8, 12, 16

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": H,
    "intermediate_size": I,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": V,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def shapes() -> dict[str, tuple[int, ...]]:
    s = {"model.embed_tokens.weight": (V, H)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        for proj in ("q", "k", "v", "o"):
            s[p + f"self_attn.{proj}_proj.weight"] = (H, H)
        s[p + "mlp.gate_proj.weight"] = (I, H)
        s[p + "mlp.up_proj.weight"] = (I, H)
        s[p + "mlp.down_proj.weight"] = (H, I)
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
    s["model.norm.weight"] = (H,)
    s["lm_head.weight"] = (V, H)
    return s


@pytest.fixture
def models(tmp_path):
    """Three Llama-shaped model folders (MergeKit's layout: model.safetensors + config.json):
    `base`, and the fine-tunes `ft1`, `ft2` (the base plus noise). Returns (tensors, folders)."""
    rng = np.random.default_rng(13)
    tensors: dict[str, dict[str, np.ndarray]] = {"base": {}, "ft1": {}, "ft2": {}}
    for name, shape in shapes().items():
        base = rng.standard_normal(shape)
        tensors["base"][name] = base.astype(F32)
        for ft in ("ft1", "ft2"):
            tensors[ft][name] = (base + 0.2 * rng.standard_normal(shape)).astype(F32)
    dirs = {}
    for alias, ts in tensors.items():
        d = tmp_path / alias
        write_st(d / "model.safetensors", ts)
        (d / "config.json").write_text(json.dumps(LLAMA_CONFIG))
        dirs[alias] = d
    return tensors, dirs


def write_config(tmp_path, config, name="mk.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_config(tmp_path, config, out_name="out.safetensors"):
    """`brainsurgery mergekit CONFIG -o OUT`, read back."""
    out = tmp_path / out_name
    proc = cli(["mergekit", write_config(tmp_path, config), "-o", out], tmp_path)
    assert proc.returncode == 0, proc.stderr
    return read(out)


def layer_t(name: str) -> float:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b) / (LAYERS - 1)
    return 0.0


def gradient(values, t):
    """MergeKit's gradient: values at evenly spaced points of [0, 1], interpolated linearly."""
    if np.isscalar(values):
        return values
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def assert_close(got, expected, name):
    assert got.dtype == F32, name
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=2e-6, atol=2e-6, err_msg=name)


# --- numerics against NumPy ----------------------------------------------------------------------


def test_linear(tmp_path, models):
    tensors, dirs = models
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(dirs["ft1"]), "parameters": {"weight": 0.3}},
            {"model": str(dirs["ft2"]), "parameters": {"weight": [0.2, 1.0]}},
        ],
        "dtype": "float32",
    }
    got = run_config(tmp_path, config)
    assert set(got) == set(tensors["base"])
    for name in shapes():
        w2 = gradient([0.2, 1.0], layer_t(name))
        want = (0.3 * tensors["ft1"][name].astype(np.float64) + w2 * tensors["ft2"][name]) / (0.3 + w2)
        assert_close(got[name], want, name)


def test_task_arithmetic_with_base_listed_and_lambda(tmp_path, models):
    tensors, dirs = models
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(dirs["base"]),
        "models": [
            {"model": str(dirs["base"])},
            {"model": str(dirs["ft1"]), "parameters": {"weight": 0.6}},
            {"model": str(dirs["ft2"]), "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 0.8},
    }
    got = run_config(tmp_path, config)
    for name in shapes():
        b = tensors["base"][name]
        d1 = (tensors["ft1"][name] - b).astype(np.float64)
        d2 = (tensors["ft2"][name] - b).astype(np.float64)
        assert_close(got[name], b + 0.8 * (0.6 * d1 + 0.5 * d2), name)


def magnitude_prune(delta, density):
    """Keep the ⌊density·n⌋ entries of largest |δ| (ties by index, as a stable sort)."""
    flat = delta.ravel()
    k = int(np.floor(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return np.where(keep, flat.astype(np.float64), 0.0).reshape(delta.shape)


def test_ties_with_density_and_weight_per_model(tmp_path, models):
    tensors, dirs = models
    per_model = {"ft1": (0.6, 0.5), "ft2": (0.4, 0.3)}
    config = {
        "merge_method": "ties",
        "base_model": str(dirs["base"]),
        "models": [{"model": str(dirs[a]), "parameters": {"weight": w, "density": d}} for a, (w, d) in per_model.items()],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }
    got = run_config(tmp_path, config)
    for name in shapes():
        b = tensors["base"][name]
        weighted = np.stack([w * magnitude_prune(tensors[a][name] - b, d) for a, (w, d) in per_model.items()])
        ws = np.array([w for w, _ in per_model.values()]).reshape((-1,) + (1,) * b.ndim)
        sign = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
        agree = np.sign(weighted) == sign
        divisor = (ws * agree).sum(axis=0)
        divisor[divisor == 0] = 1
        assert_close(got[name], b + (weighted * agree).sum(axis=0) / divisor, name)


def slerp(t, a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    dot = np.sum(a / np.linalg.norm(a) * (b / np.linalg.norm(b)))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


# MergeKit's README slerp example, shape for shape.
SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def slerp_config(dirs, end=LAYERS):
    return {
        "slices": [{"sources": [{"model": str(dirs["base"]), "layer_range": [0, end]},
                                {"model": str(dirs["ft1"]), "layer_range": [0, end]}]}],
        "merge_method": "slerp",
        "base_model": str(dirs["base"]),
        "parameters": {"t": SLERP_T},
        "dtype": "float32",
    }


def test_slerp_with_t_gradients_and_filters_in_slices(tmp_path, models):
    tensors, dirs = models
    got = run_config(tmp_path, slerp_config(dirs))
    for name in shapes():
        t = layer_t(name)
        tv = gradient(SLERP_T[0]["value"], t) if "self_attn" in name else gradient(SLERP_T[1]["value"], t) if "mlp" in name else 0.5
        assert_close(got[name], slerp(tv, tensors["base"][name], tensors["ft1"][name]), name)


def test_slerp_slice_not_spanning_the_model_fails_its_assertion(tmp_path, models):
    _, dirs = models
    proc = cli(["mergekit", write_config(tmp_path, slerp_config(dirs, end=2)), "-o", tmp_path / "x.safetensors"], tmp_path)
    assert_one_error(proc, 1, "assert", r"layers|layer|h|blocks)\.2")
    assert not (tmp_path / "x.safetensors").exists()


def test_passthrough_frankenmerge(tmp_path, models):
    tensors, dirs = models
    config = {
        "slices": [
            {"sources": [{"model": str(dirs["base"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(dirs["ft1"]), "layer_range": [1, 3]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    }
    got = run_config(tmp_path, config)
    sources = [("base", 0), ("base", 1), ("ft1", 1), ("ft1", 2)]
    # MergeKit's pre weights (embeddings) from the first slice's model, post weights (final norm,
    # lm_head) from the last's.
    expected = {n: (tensors["base"] if "embed" in n else tensors["ft1"])[n] for n in tensors["base"] if ".layers." not in n}
    for k, (alias, layer) in enumerate(sources):
        for name, v in tensors[alias].items():
            if f".layers.{layer}." in name:
                expected[name.replace(f".layers.{layer}.", f".layers.{k}.")] = v
    assert set(got) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want.astype(ml_dtypes.bfloat16), err_msg=name)


def test_directory_output_carries_the_base_models_config_and_tokenizer(tmp_path, models):
    """MergeKit writes the base model's config and tokenizer beside the merged weights; so does
    the translated plan (for linear, whose `merge` default would be the first model, through
    `sidecars:`), with the result's dtype and, for passthrough, layer count."""
    tensors, dirs = models
    for alias in dirs:
        (dirs[alias] / "config.json").write_text(json.dumps(dict(LLAMA_CONFIG, marker=alias)))
        (dirs[alias] / "tokenizer.json").write_text(json.dumps({"marker": alias}))
    linear = {"merge_method": "linear", "base_model": str(dirs["base"]), "tokenizer_source": "base", "dtype": "bfloat16",
              "parameters": {"weight": 1.0},
              "models": [{"model": str(dirs["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(dirs["ft2"]), "parameters": {"weight": 0.5}}]}
    passthrough = {"merge_method": "passthrough", "base_model": str(dirs["ft2"]),
                   "slices": [{"sources": [{"model": str(dirs["base"]), "layer_range": [0, 2]}]},
                              {"sources": [{"model": str(dirs["ft1"]), "layer_range": [0, 3]}]}]}
    for config, marker, layers, dtype in ((linear, "base", LAYERS, "bfloat16"), (passthrough, "ft2", 5, "float32")):
        out = tmp_path / f"out-{config['merge_method']}"
        proc = cli(["mergekit", write_config(tmp_path, config), "-o", out], tmp_path)
        assert proc.returncode == 0, proc.stderr
        written = json.loads((out / "config.json").read_text())
        assert written["marker"] == marker
        assert written["num_hidden_layers"] == layers
        assert written["torch_dtype"] == dtype
        assert json.loads((out / "tokenizer.json").read_text()) == {"marker": marker}
    got = {}
    for f in sorted((tmp_path / "out-linear").glob("*.safetensors")):
        got.update(read(f))
    # MergeKit merges a base not listed among linear's models as one more model, weighted by the
    # top-level weight.
    for name in shapes():
        want = (tensors["base"][name].astype(np.float64) + 0.5 * tensors["ft1"][name] + 0.5 * tensors["ft2"][name]) / 2
        assert got[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_allclose(got[name].astype(np.float64), want.astype(ml_dtypes.bfloat16).astype(np.float64),
                                   rtol=2**-7, atol=1e-6, err_msg=name)


def test_model_stock(tmp_path, models):
    tensors, dirs = models
    config = {"merge_method": "model_stock", "base_model": str(dirs["base"]),
              "models": [{"model": str(dirs["ft1"])}, {"model": str(dirs["ft2"])}], "parameters": {"filter_wise": False}}
    got = run_config(tmp_path, config)
    for name in shapes():
        w0 = tensors["base"][name].astype(np.float64)
        d1, d2 = ((tensors[a][name] - tensors["base"][name]).astype(np.float64) for a in ("ft1", "ft2"))
        cos = np.dot(d1.ravel(), d2.ravel()) / max(np.linalg.norm(d1) * np.linalg.norm(d2), 1e-6)
        t = 2 * cos / (1 + cos)
        mean = (tensors["ft1"][name].astype(np.float64) + tensors["ft2"][name]) / 2
        np.testing.assert_allclose(got[name], t * mean + (1 - t) * w0, rtol=1e-5, atol=1e-5, err_msg=name)


# --- seeded methods: the same bytes as the `merge` step written by hand ---------------------------


@pytest.mark.parametrize(
    ("config", "step"),
    [
        (
            {"merge_method": "dare_ties", "parameters": {"density": 0.5, "weight": 0.5}},
            {"method": "dare_ties", "base": "base", "models": ["ft1", "ft2"], "density": 0.5, "weight": 0.5},
        ),
        (
            {"merge_method": "della", "parameters": {"density": 0.6, "epsilon": 0.1, "lambda": 0.9}},
            {"method": "della", "base": "base", "models": {"ft1": {"weight": 0.7}, "ft2": {"weight": 0.3}},
             "density": 0.6, "epsilon": 0.1, "lambda": 0.9},
        ),
    ],
    ids=["dare_ties", "della"],
)
def test_seeded_methods_equal_the_merge_step(tmp_path, models, config, step):
    _, dirs = models
    config = dict(config, base_model=str(dirs["base"]), dtype="bfloat16")
    if step["method"] == "della":
        config["models"] = [{"model": str(dirs["ft1"]), "parameters": {"weight": 0.7}},
                            {"model": str(dirs["ft2"]), "parameters": {"weight": 0.3}}]
    else:
        config["models"] = [{"model": str(dirs["ft1"])}, {"model": str(dirs["ft2"])}]
    ours = tmp_path / "ours.safetensors"
    proc = cli(["mergekit", write_config(tmp_path, config), "-o", ours, "--threads", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    by_hand = tmp_path / "hand.safetensors"
    bs.run({"inputs": [f"{a}::{d}" for a, d in dirs.items()],
            "transforms": [{"merge": dict(step, to="merged", dtype="bfloat16")}],
            "output": {"path": str(by_hand), "alias": "merged"}}, threads=1)
    got, want = read(ours), read(by_hand)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name].view(np.uint16), want[name].view(np.uint16), err_msg=name)


# --- the plan: --print-plan, from_mergekit --------------------------------------------------------


def test_print_plan_round_trips_to_the_same_bytes(tmp_path, models):
    _, dirs = models
    cfg = write_config(tmp_path, slerp_config(dirs) | {"tokenizer_source": "base"})
    proc = cli(["mergekit", cfg, "--print-plan", "-o", tmp_path / "printed.safetensors"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# translated from the MergeKit config")
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(proc.stdout)
    assert yaml.safe_load(proc.stdout) == bs.from_mergekit(cfg, output=tmp_path / "printed.safetensors")
    run_proc = cli(["run", plan_path], tmp_path)
    assert run_proc.returncode == 0, run_proc.stderr
    direct = cli(["mergekit", cfg, "-o", tmp_path / "direct.safetensors"], tmp_path)
    assert direct.returncode == 0, direct.stderr
    # The plan's sha256 (recorded in the metadata) is the same document's, so the bytes match.
    assert sha256(tmp_path / "printed.safetensors") == sha256(tmp_path / "direct.safetensors")


def test_print_plan_reads_no_model(tmp_path):
    """Models that do not exist locally and repo ids: the plan is printed all the same."""
    config = {
        "merge_method": "ties",
        "base_model": "mistralai/Mistral-7B-v0.1",
        "models": [
            {"model": "mistralai/Mistral-7B-v0.1"},
            {"model": "teknium/OpenHermes-2.5-Mistral-7B@main", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {"model": "./not-here/zephyr", "parameters": {"density": 0.5, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float16",
    }
    proc = cli(["mergekit", write_config(tmp_path, config), "--print-plan"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = yaml.safe_load(proc.stdout)
    assert plan["inputs"] == [
        "Mistral-7B-v0.1::hf://mistralai/Mistral-7B-v0.1",
        "OpenHermes-2.5-Mistral-7B::hf://teknium/OpenHermes-2.5-Mistral-7B@main",
        f"zephyr::{tmp_path / 'not-here' / 'zephyr'}",
    ]
    assert "output" not in plan
    assert plan["transforms"] == [{"merge": {
        "method": "ties", "base": "Mistral-7B-v0.1",
        "models": {"OpenHermes-2.5-Mistral-7B": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]},
                   "zephyr": {"density": 0.5, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
        "to": "merged", "dtype": "float16", "normalize": True,
    }}]


def test_overrides_and_one_line_transforms_apply_to_the_translated_plan(tmp_path):
    config = {"merge_method": "linear", "models": [{"model": "o/a", "parameters": {"weight": 1}}, {"model": "o/b", "parameters": {"weight": 1}}]}
    proc = cli(["mergekit", write_config(tmp_path, config), "--print-plan", "transforms[0].merge.dtype=float16",
                "-e", "dump: {target: 'merged::.*'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = yaml.safe_load(proc.stdout)
    assert plan["transforms"][0]["merge"]["dtype"] == "float16"
    assert plan["transforms"][1] == {"dump": {"target": "merged::.*"}}


def test_moe_config_translates_to_upcycle_moe(tmp_path):
    """mergekit-moe configs become one `upcycle_moe` step (checked as a plan structure: the
    transform itself is another branch's work)."""
    config = {
        "base_model": "mistralai/Mistral-7B-Instruct-v0.2",
        "gate_mode": "random",
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [
            {"source_model": "mistralai/Mistral-7B-Instruct-v0.2", "positive_prompts": ["chat"]},
            {"source_model": "meta-math/MetaMath-Mistral-7B", "positive_prompts": ["math"]},
            {"source_model": "mistralai/Mistral-7B-Instruct-v0.2"},
            {"source_model": "beowolx/CodeNinja-1.0-OpenChat-7B", "positive_prompts": ["code"]},
        ],
    }
    proc = cli(["mergekit", write_config(tmp_path, config), "--print-plan", "-o", "out/moe"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = yaml.safe_load(proc.stdout)
    base = "Mistral-7B-Instruct-v0.2"
    assert plan == {
        "inputs": [f"{base}::hf://mistralai/Mistral-7B-Instruct-v0.2", "MetaMath-Mistral-7B::hf://meta-math/MetaMath-Mistral-7B",
                   "CodeNinja-1.0-OpenChat-7B::hf://beowolx/CodeNinja-1.0-OpenChat-7B"],
        "transforms": [
            {"upcycle_moe": {"alias": base, "experts": 4, "experts_per_token": 2, "router": "random",
                             "experts_from": [base, "MetaMath-Mistral-7B", base, "CodeNinja-1.0-OpenChat-7B"]}},
            {"cast_": {"target": f"{base}::.*", "dtype": "bfloat16", "only": "float"}},
            {"config": {"alias": base, "set": {"torch_dtype": "bfloat16"}}},
        ],
        "output": {"path": "out/moe", "alias": base},
    }
    cheap = dict(config, gate_mode="cheap_embed")
    proc = cli(["mergekit", write_config(tmp_path, cheap), "--print-plan"], tmp_path)
    assert_one_error(proc, 2, "`gate_mode`", "tokenizer", "router: {embed: [[token ids], ...]}")
    proc = cli(["mergekit", write_config(tmp_path, dict(config, gate_mode="hidden")), "--print-plan"], tmp_path)
    assert_one_error(proc, 2, "`gate_mode`", "hidden")


def test_from_mergekit_accepts_a_dict_text_or_path_and_runs(tmp_path, models):
    tensors, dirs = models
    config = {"merge_method": "linear", "models": [{"model": str(dirs["ft1"]), "parameters": {"weight": 1.0}},
                                                   {"model": str(dirs["ft2"]), "parameters": {"weight": 3.0}}]}
    path = write_config(tmp_path, config)
    plans = [bs.from_mergekit(config), bs.from_mergekit(path), bs.from_mergekit(str(path)), bs.from_mergekit(path.read_text())]
    assert all(p == plans[0] for p in plans)
    assert plans[0]["inputs"] == [f"ft1::{dirs['ft1']}", f"ft2::{dirs['ft2']}"]
    out = tmp_path / "py.safetensors"
    bs.run(bs.from_mergekit(config, output=out), quiet=True)
    got = read(out)
    for name in shapes():
        assert_close(got[name], (tensors["ft1"][name].astype(np.float64) + 3 * tensors["ft2"][name]) / 4, name)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ({"merge_method": "frankenstein", "models": [{"model": "a/b"}]}, ["`merge_method`", "frankenstein", "not translated"]),
        ({"merge_method": "ties", "models": [{"model": "a/b"}], "base_modle": "a/b"}, ["unknown MergeKit key `base_modle`", "base_model"]),
        ({"merge_method": "ties", "models": [{"model": "a/b+c/lora"}]}, ["`models[0].model`", "LoRA"]),
        ({"merge_method": "ties", "models": [{"model": "a/b"}], "parameters": {"dnsity": 0.5}}, ["`parameters.dnsity`", "density"]),
        ({"merge_method": "ties", "models": [{"model": "a/b"}], "tokenizer_source": "union"}, ["`tokenizer_source`"]),
        ({"merge_method": "ties", "models": [{"model": "a/b"}], "modules": {}}, ["`modules`"]),
        ({"merge_method": "slerp", "models": [{"model": "a/b", "parameters": {"t": 0.5}}]}, ["`models[0].parameters.t`", "top-level"]),
        ({"merge_method": "ties", "models": [{"model": "a/b"}], "parameters": {"rescale": [{"filter": "mlp", "value": True}]}},
         ["`parameters.rescale`", "per tensor"]),
    ],
    ids=["method", "key", "lora", "parameter", "tokenizer", "modules", "shared-per-model", "bool-per-tensor"],
)
def test_untranslatable_configs_exit_2_naming_the_key(tmp_path, config, needles):
    proc = cli(["mergekit", write_config(tmp_path, config), "-o", tmp_path / "x.safetensors"], tmp_path)
    assert_one_error(proc, 2, "(MergeKit config)", *needles)
    with pytest.raises(bs.PlanError, match="MergeKit config"):
        bs.from_mergekit(config)


def test_help(tmp_path):
    proc = cli(["mergekit", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for needle in ("CONFIG.yml", "--print-plan", "--max-memory", "--threads", "--summarize", "--no-progress"):
        assert needle in proc.stdout


# --- against MergeKit itself (optional) -----------------------------------------------------------

MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")


def mergekit_cases(dirs):
    base, ft1, ft2 = (str(dirs[a]) for a in ("base", "ft1", "ft2"))
    return {
        "linear": {"merge_method": "linear", "models": [{"model": ft1, "parameters": {"weight": 0.3}}, {"model": ft2, "parameters": {"weight": 0.7}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "models": [{"model": ft1, "parameters": {"weight": 0.6}}, {"model": ft2, "parameters": {"weight": [0.2, 0.5]}}]},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [{"model": ft1, "parameters": {"weight": 0.6, "density": 0.5}}, {"model": ft2, "parameters": {"weight": 0.5, "density": 0.3}}]},
        "slerp": dict(slerp_config(dirs), dtype=None),
        # Ends on another model than it starts with: the final norm and lm_head come from the last
        # slice's model, the embeddings from the first's, in both tools.
        "passthrough": {"merge_method": "passthrough", "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}]},
                                                                  {"sources": [{"model": base, "layer_range": [1, 2]}]},
                                                                  {"sources": [{"model": ft1, "layer_range": [2, 3]}]}]},
    }


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not installed (set MERGEKIT_YAML or put it on PATH)")
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp", "passthrough"])
def test_same_config_as_mergekit(tmp_path, models, method):
    """The same config file run by MergeKit 0.1.5 and by `brainsurgery mergekit` (both computing
    in f32, written as bfloat16) agree within one bfloat16 step."""
    _, dirs = models
    config = dict(mergekit_cases(dirs)[method], dtype="float32", out_dtype="bfloat16")
    cfg = write_config(tmp_path, config)
    proc = subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk-out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mk: dict[str, np.ndarray] = {}
    for f in sorted((tmp_path / "mk-out").glob("*.safetensors")):
        mk.update(read(f))
    ours = cli(["mergekit", cfg, "-o", tmp_path / "ours"], tmp_path)
    assert ours.returncode == 0, ours.stderr
    got: dict[str, np.ndarray] = {}
    for f in sorted((tmp_path / "ours").glob("*.safetensors")):
        got.update(read(f))
    assert set(got) == set(mk)
    mk_config = json.loads((tmp_path / "mk-out" / "config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert our_config["num_hidden_layers"] == mk_config["num_hidden_layers"]
    for name in got:
        assert got[name].dtype == mk[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_allclose(got[name].astype(np.float64), mk[name].astype(np.float64), rtol=2**-7, atol=1e-6, err_msg=name)
