"""Config files follow the weights (issue 13 item 4): the `config` transform edits an alias's JSON
sidecars by dotted path; an alias `merge` creates carries its base's (or a named alias's)
sidecars, its config saying the result's dtype and, for passthrough, its layer count; every
written config.json is checked against the tensors written beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import brainsurgery as bs
from helpers import assert_one_error, cli, dump_plan, write_st
from safetensors.numpy import load_file

LAYERS = 3
HIDDEN = 8


def llama_dir(path: Path, seed: int, layers: int = LAYERS, extra: dict | None = None) -> Path:
    """A tiny Llama-style checkpoint directory with config, tokenizer and generation config."""
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((16, HIDDEN), dtype=np.float32)}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = rng.standard_normal((12, HIDDEN), dtype=np.float32)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    tensors["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    path.mkdir(parents=True)
    write_st(path / "model.safetensors", tensors, {"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "torch_dtype": "float32",
        "rope_scaling": {"factor": 1.0, "type": "linear"},
        **(extra or {}),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "generation_config.json").write_text('{"do_sample": false}')
    return path


def test_config_sets_and_deletes_by_dotted_path_and_leaves_the_input(tmp_path: Path) -> None:
    src = llama_dir(tmp_path / "m", 0)
    before = (src / "config.json").read_bytes()
    plan = dump_plan(
        tmp_path / "plan.yaml",
        {
            "inputs": [f"m::{src}"],
            "transforms": [
                {"config": {"set": ["rope_scaling.factor=4.0", "max_position_embeddings=8192"], "delete": ["rope_scaling.type"]}},
                {"config": {"file": "generation_config.json", "set": {"temperature": 0.7}}},
            ],
            "output": {"path": str(tmp_path / "out")},
        },
    )
    proc = cli([plan], tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_scaling"] == {"factor": 4.0}
    assert config["max_position_embeddings"] == 8192
    # The other keys stay, in their order.
    assert list(config)[:4] == ["architectures", "model_type", "hidden_size", "num_hidden_layers"]
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"do_sample": False, "temperature": 0.7}
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (src / "config.json").read_bytes() == before


def test_config_without_edits_prints_the_document(tmp_path: Path) -> None:
    src = llama_dir(tmp_path / "m", 0)
    proc = cli(["-e", "config", "--input", f"m::{src}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])["num_hidden_layers"] == LAYERS


def test_config_errors_name_the_path(tmp_path: Path) -> None:
    src = llama_dir(tmp_path / "m", 0)
    plan = dump_plan(tmp_path / "plan.yaml", {"inputs": [f"m::{src}"], "transforms": [{"config": {"delete": ["rope_scaling.nope"]}}]})
    assert_one_error(cli(["check", plan], tmp_path), 2, "transforms[0].config.delete", "rope_scaling.nope")


def test_merge_carries_the_base_sidecars_with_its_dtype(tmp_path: Path) -> None:
    base, ft = llama_dir(tmp_path / "base", 0), llama_dir(tmp_path / "ft", 1, extra={"torch_dtype": "float16"})
    out = tmp_path / "merged"
    plan = {
        "inputs": [f"base::{base}", f"ft::{ft}"],
        "transforms": [{"merge": {"method": "linear", "models": {"base": {"weight": 0.5}, "ft": {"weight": 0.5}}, "to": "merged", "dtype": "bfloat16"}}],
        "output": {"path": str(out), "alias": "merged"},
    }
    bs.run(plan)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["num_hidden_layers"] == LAYERS
    # linear takes no base: the sidecars are the first model's.
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    # `sidecars:` names another alias.
    plan["transforms"][0]["merge"]["sidecars"] = "ft"
    plan["output"]["path"] = str(tmp_path / "merged2")
    bs.run(plan)
    assert json.loads((tmp_path / "merged2" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    plan["transforms"][0]["merge"]["sidecars"] = "nope"
    with pytest.raises(bs.PlanError, match="nope"):
        bs.check(plan)


def test_passthrough_rewrites_the_layer_count(tmp_path: Path) -> None:
    a, b = llama_dir(tmp_path / "a", 0), llama_dir(tmp_path / "b", 1)
    out = tmp_path / "franken"
    plan = {
        "inputs": [f"a::{a}", f"b::{b}"],
        "transforms": [{"merge": {"method": "passthrough", "slices": [{"alias": "a", "layers": [0, 2]}, {"alias": "b", "layers": [1, 3]}], "to": "f"}}],
        "output": {"path": str(out), "alias": "f"},
    }
    bs.run(plan)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    names = load_file(str(out / "model.safetensors"))
    assert max(int(n.split(".")[2]) for n in names if ".layers." in n) == 3


def test_a_config_disagreeing_with_the_tensors_is_refused_before_any_work(tmp_path: Path) -> None:
    src = llama_dir(tmp_path / "m", 0)
    out = tmp_path / "out"
    plan = dump_plan(
        tmp_path / "plan.yaml",
        {"inputs": [f"m::{src}"], "transforms": [{"delete": {"target": r"model\.layers\.2\..*"}}], "output": {"path": str(out)}},
    )
    assert_one_error(cli([plan], tmp_path), 2, "num_hidden_layers: 3", "2 layers", "config: {set: {num_hidden_layers: 2}}")
    assert not out.exists()
    # Saying so in the plan fixes it.
    fixed = dump_plan(
        tmp_path / "fixed.yaml",
        {
            "inputs": [f"m::{src}"],
            "transforms": [{"delete": {"target": r"model\.layers\.2\..*"}}, {"config": {"set": {"num_hidden_layers": 2}}}],
            "output": {"path": str(out)},
        },
    )
    proc = cli([fixed], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    # The hidden size is checked against the embedding too.
    bad = dump_plan(
        tmp_path / "bad.yaml",
        {"inputs": [f"m::{src}"], "transforms": [{"config": {"set": {"hidden_size": 16}}}], "output": {"path": str(tmp_path / "o2")}},
    )
    assert_one_error(cli(["check", bad], tmp_path), 2, "hidden_size: 16", "model.embed_tokens.weight")


def test_config_from_gives_a_built_alias_its_sidecars(tmp_path: Path) -> None:
    src = llama_dir(tmp_path / "m", 0)
    out = tmp_path / "out"
    plan = {
        "inputs": [f"m::{src}"],
        "transforms": [
            {"copy": {"from": r"m::(.*)", "to": r"n::\1"}},
            {"config": {"alias": "n", "from": "m", "set": {"torch_dtype": "float32"}}},
        ],
        "output": {"path": str(out), "alias": "n"},
    }
    bs.run(plan)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == HIDDEN
    assert (out / "tokenizer.json").exists()


def test_passthrough_frankenmerge_loads_with_transformers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "dense", safe_serialization=True)
    out = tmp_path / "franken"
    bs.run(
        {
            "inputs": [f"m::{tmp_path / 'dense'}"],
            "transforms": [{"merge": {"method": "passthrough", "slices": [{"alias": "m", "layers": [0, 3]}, {"alias": "m", "layers": [1, 4]}], "to": "f"}}],
            "output": {"path": str(out), "alias": "f"},
        }
    )
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert loaded.config.num_hidden_layers == 6
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # Layer 3 of the result is layer 1 of the dense model.
    dense = model.state_dict()
    got = loaded.state_dict()
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], dense["model.layers.1.mlp.up_proj.weight"])


def test_towers_and_prediction_layers_do_not_count_as_decoder_layers(tmp_path: Path) -> None:
    """A plain copy of a checkpoint whose config is right is never refused: a vision tower's
    `blocks`, T5's `block.N.layer.M` and DeepSeek's multi-token-prediction layer after the decoder
    are not decoder layers, and an embedding of its own width is not `hidden_size`."""
    cases = {
        "vl": ({"model.layers.0.mlp.w": (2, 2), "model.layers.1.mlp.w": (2, 2), "visual.blocks.5.attn.w": (2, 2)},
               {"num_hidden_layers": 2}),
        "t5": ({"encoder.block.0.layer.2.w": (2, 2), "decoder.block.0.layer.2.w": (2, 2)}, {"num_layers": 1}),
        "mtp": ({"model.layers.0.w": (2, 2), "model.layers.1.w": (2, 2), "model.layers.2.w": (2, 2)},
                {"num_hidden_layers": 2, "num_nextn_predict_layers": 1}),
        "albert": ({"model.embed_tokens.weight": (16, 4), "model.layers.0.w": (2, 2)},
                   {"hidden_size": 8, "embedding_size": 4, "num_hidden_layers": 1}),
    }
    for name, (shapes, config) in cases.items():
        src = tmp_path / name
        src.mkdir()
        write_st(src / "model.safetensors", {n: np.zeros(s, np.float32) for n, s in shapes.items()}, {"format": "pt"})
        (src / "config.json").write_text(json.dumps(config))
        proc = cli([str(src), "-o", str(tmp_path / f"{name}-out")], tmp_path)
        assert proc.returncode == 0, (name, proc.stderr)


def test_passthrough_rebuilds_layer_types_and_takes_embed_out_from_the_last_slice(tmp_path: Path) -> None:
    a, b = llama_dir(tmp_path / "a", 0, extra={"layer_types": ["full", "sliding", "full"]}), llama_dir(tmp_path / "b", 1)
    for d, v in ((a, 1.0), (b, 2.0)):
        tensors = {n: np.full(2, v, np.float32) for n in ("embed_out.weight", "final_layer_norm.weight")}
        write_st(d / "extra.safetensors", tensors)
    out = tmp_path / "f"
    bs.run({
        "inputs": [f"a::{a}", f"b::{b}"],
        "transforms": [{"merge": {"method": "passthrough", "slices": [{"alias": "a", "layers": [1, 3]}, {"alias": "b", "layers": [0, 2]}], "to": "f"}}],
        "output": {"path": str(out), "alias": "f"},
    })
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["layer_types"] == ["sliding", "full", "full", "sliding"]
    got = load_file(str(out / "model.safetensors"))
    # GPT-NeoX's output head is a post weight (MergeKit's gpt-neox table): from the last slice.
    assert got["embed_out.weight"].tolist() == [2.0, 2.0] and got["final_layer_norm.weight"].tolist() == [2.0, 2.0]
    assert np.array_equal(got["model.embed_tokens.weight"], load_file(str(a / "model.safetensors"))["model.embed_tokens.weight"])


def test_a_merge_carries_a_config_that_is_not_strict_json(tmp_path: Path) -> None:
    a, b = llama_dir(tmp_path / "a", 0), llama_dir(tmp_path / "b", 1)
    (a / "config.json").write_text('{"num_hidden_layers": 3, "initializer_range": NaN}')
    out = tmp_path / "m"
    bs.run({
        "inputs": [f"a::{a}", f"b::{b}"],
        "transforms": [{"merge": {"method": "linear", "models": ["a", "b"], "weight": 0.5, "to": "m", "dtype": "bfloat16"}}],
        "output": {"path": str(out), "alias": "m"},
    })
    assert "NaN" in (out / "config.json").read_text()
