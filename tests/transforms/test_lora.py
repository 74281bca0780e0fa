"""extract_lora and merge_lora (src/transforms/lora.rs) against NumPy written from PEFT's formulas,
and against PEFT itself when torch and peft are installed (those tests skip otherwise).

PEFT's LoRA, for a module M with weight W (out × in): ``W' = W + s·B@A`` with ``s = alpha/r``
(``alpha/√r`` with ``use_rslora``), r and alpha per module from ``rank_pattern`` / ``alpha_pattern``;
``fan_in_fan_out`` (GPT-2 Conv1D) stores W transposed and adds ``s·(B@A)ᵀ``; ``lora_bias`` adds
``s·lora_B.bias``; DoRA rescales each output row of ``W + s·B@A`` to the magnitude ``m``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import brainsurgery as bs
from conftest import read, save_safetensors

P = "base_model.model."


def _low_rank(m, n, r, rng, scale=0.1):
    return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * scale / np.sqrt(r)).astype(np.float32)


def _pair(write, rng, rank=4, noise=0.0, bias=False):
    """A base and a fine-tune whose projection weights differ by rank-`rank` deltas."""
    base, ft = {}, {}
    for i in range(2):
        for name, (o, n) in {"q_proj": (24, 16), "v_proj": (16, 16)}.items():
            key = f"model.layers.{i}.{name}"
            w = rng.standard_normal((o, n)).astype(np.float32)
            base[f"{key}.weight"] = w
            ft[f"{key}.weight"] = w + _low_rank(o, n, rank, rng) + noise * rng.standard_normal((o, n)).astype(np.float32)
            if bias:
                b = rng.standard_normal(o).astype(np.float32)
                base[f"{key}.bias"] = b
                ft[f"{key}.bias"] = b + 0.05 * rng.standard_normal(o).astype(np.float32)
        base[f"model.layers.{i}.norm.weight"] = np.ones(16, np.float32)
        ft[f"model.layers.{i}.norm.weight"] = np.ones(16, np.float32)
    return base, ft, write(base, name="base.safetensors"), write(ft, name="ft.safetensors")


def _extract(base_path, ft_path, out_dir, **payload):
    payload = {"base": "base", "finetuned": "ft", "target": r".*_proj\.weight", "path": str(out_dir), **payload}
    return bs.run({"inputs": [f"base::{base_path}", f"ft::{ft_path}"], "transforms": [{"extract_lora": payload}]})


def _merge(base_path, adapter, out, **payload):
    plan = {"inputs": [f"base::{base_path}"], "transforms": [{"merge_lora": {"target": "base", "adapter": str(adapter), **payload}}], "output": str(out)}
    return bs.run(plan)


def _numpy_merge(base: dict, adapter: Path) -> dict:
    """PEFT's merge written in NumPy (float64)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = read(adapter / "adapter_model.safetensors")
    out = {k: v.astype(np.float64) for k, v in base.items()}
    import re

    def pattern(kind, module, default):
        for key, value in config.get(kind, {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    modules = {k[len(P) : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    for m in modules:
        a, b = tensors[f"{P}{m}.lora_A.weight"].astype(np.float64), tensors[f"{P}{m}.lora_B.weight"].astype(np.float64)
        r, alpha = pattern("rank_pattern", m, config["r"]), pattern("alpha_pattern", m, config["lora_alpha"])
        s = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
        delta = s * (b @ a)
        if config.get("fan_in_fan_out"):
            delta = delta.T
        merged = out[f"{m}.weight"] + delta
        if config.get("use_dora"):
            mag = tensors[f"{P}{m}.lora_magnitude_vector"].astype(np.float64)
            merged = (mag / np.linalg.norm(merged, axis=1))[:, None] * merged
        out[f"{m}.weight"] = merged
        if f"{P}{m}.lora_B.bias" in tensors:
            out[f"{m}.bias"] = out[f"{m}.bias"] + s * tensors[f"{P}{m}.lora_B.bias"]
    return out


def _rel(a, b):
    """‖a − b‖ / ‖b‖, or ‖a − b‖ when b is zero."""
    diff = np.linalg.norm(a.astype(np.float64) - b)
    norm = np.linalg.norm(b)
    return diff / norm if norm else diff


def test_extract_then_merge_recovers_a_low_rank_fine_tune(write, tmp_path):
    base, ft, bp, fp = _pair(write, np.random.default_rng(0), rank=4)
    adapter = tmp_path / "adapter"
    report = _extract(bp, fp, adapter, rank=4, alpha=8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["rank_pattern"] == {}
    assert config["fan_in_fan_out"] is False and config["lora_bias"] is False
    tensors = read(adapter / "adapter_model.safetensors")
    assert tensors[f"{P}model.layers.0.q_proj.lora_A.weight"].shape == (4, 16)
    assert tensors[f"{P}model.layers.0.q_proj.lora_B.weight"].shape == (24, 4)
    assert len(tensors) == 8
    assert len(report["factorizations"]) == 4
    assert all(f["relative_error"] < 1e-5 for f in report["factorizations"])
    # PEFT's formula over our adapter gives the fine-tune.
    merged = _numpy_merge(base, adapter)
    for k in ft:
        assert _rel(ft[k], merged[k]) < 1e-5, k
    # And so does our merge.
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out)
    got = read(out)
    for k in ft:
        assert _rel(got[k], ft[k].astype(np.float64)) < 1e-5, k


def test_extraction_is_the_same_for_any_thread_count_and_fails_at_the_first_bad_module(write, tmp_path):
    # Modules are factored several at once, one per thread: the adapter, the report's order and
    # the error of a bad module must not depend on how many.
    rng = np.random.default_rng(21)
    base, ft = {}, {}
    for i in range(3):
        for name, (o, n) in {"q_proj": (200, 160), "v_proj": (120, 160)}.items():
            w = rng.standard_normal((o, n)).astype(np.float32)
            base[f"model.layers.{i}.{name}.weight"] = w
            ft[f"model.layers.{i}.{name}.weight"] = w + _low_rank(o, n, 6, rng) + 1e-3 * rng.standard_normal((o, n)).astype(np.float32)
    bp, fp = write(base, name="base.safetensors"), write(ft, name="ft.safetensors")
    plan = lambda out, fp=fp, method="randomized": {  # noqa: E731
        "inputs": [f"base::{bp}", f"ft::{fp}"],
        "transforms": [{"extract_lora": {"base": "base", "finetuned": "ft", "target": r".*_proj\.weight",
                                         "rank": 8, "method": method, "path": str(out)}}],
    }
    for method in ["randomized", "exact"]:
        runs = {t: bs.run(plan(tmp_path / f"{method}{t}", method=method), threads=t, quiet=True) for t in [1, 2, 3]}
        one = (tmp_path / f"{method}1" / "adapter_model.safetensors").read_bytes()
        for t in [2, 3]:
            assert (tmp_path / f"{method}{t}" / "adapter_model.safetensors").read_bytes() == one, (method, t)
            assert runs[t]["factorizations"] == runs[1]["factorizations"], (method, t)
        assert [f["tensor"] for f in runs[1]["factorizations"]] == [f"ft::{k}" for k in ft]
    # The check counts what the run reads: both weights of every module.
    checked = bs.check(plan(tmp_path / "checked"))
    weights = sum(v.nbytes for v in base.values()) + sum(v.nbytes for v in ft.values())
    assert checked["bytes_to_read"] == runs[1]["bytes_read"] == weights
    # Two bad modules: the error names the first in order, for any thread count.
    ft["model.layers.1.q_proj.weight"][3, 4] = np.nan
    ft["model.layers.2.v_proj.weight"][0, 0] = np.inf
    bad = write(ft, name="bad.safetensors")
    for t in [1, 2, 3]:
        with pytest.raises(bs.TransformError, match=r"model\.layers\.1\.q_proj") as e:
            bs.run(plan(tmp_path / f"bad{t}", fp=bad), threads=t, quiet=True)
        assert "layers.2" not in str(e.value)
        assert not (tmp_path / f"bad{t}").exists()


def test_extraction_threads_read_deeply_stacked_lazy_tensors(write, tmp_path):
    # The worker threads read the weights: a tensor under thousands of stacked in-place edits
    # recurses once per edit when read, which the engine's stack holds (issue 9) and a default
    # thread stack did not (the process aborted with threads=2).
    base, ft, bp, fp = _pair(write, np.random.default_rng(5), rank=2)
    edits = [{"scale_": {"target": "ft::model.layers.0.v_proj.weight", "by": 1.0}}] * 5000
    step = {"extract_lora": {"base": "base", "finetuned": "ft", "target": r".*_proj\.weight", "rank": 2}}
    outs = []
    for threads in [1, 2]:
        out = tmp_path / f"t{threads}"
        plan = {"inputs": [f"base::{bp}", f"ft::{fp}"], "transforms": [*edits, {"extract_lora": {**step["extract_lora"], "path": str(out)}}]}
        bs.run(plan, threads=threads, quiet=True)
        outs.append(read(out / "adapter_model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert np.array_equal(outs[0][k], outs[1][k]), k


def test_one_module_on_several_threads_matches_one_thread(write, tmp_path):
    # One module: a single worker with every thread (the SVD's passes split by halves of rows),
    # against one thread.
    rng = np.random.default_rng(8)
    w = rng.standard_normal((300, 280)).astype(np.float32)
    bp = write({"m.q_proj.weight": w}, name="b1.safetensors")
    fp = write({"m.q_proj.weight": w + _low_rank(300, 280, 5, rng)}, name="f1.safetensors")
    files = []
    for threads in [1, 2]:
        out = tmp_path / f"one{threads}"
        payload = {"base": "base", "finetuned": "ft", "target": r".*_proj\.weight", "rank": 5, "method": "randomized", "path": str(out)}
        bs.run({"inputs": [f"base::{bp}", f"ft::{fp}"], "transforms": [{"extract_lora": payload}]}, threads=threads, quiet=True)
        files.append(read(out / "adapter_model.safetensors"))
    for k in files[0]:
        assert np.array_equal(files[0][k], files[1][k]), k


def test_full_rank_extraction_round_trips(write, tmp_path):
    base, ft, bp, fp = _pair(write, np.random.default_rng(1), rank=4, noise=0.3)
    adapter = tmp_path / "adapter"
    _extract(bp, fp, adapter, target=r".*v_proj\.weight", rank=16)
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out)
    got = read(out)
    for i in range(2):
        k = f"model.layers.{i}.v_proj.weight"
        assert _rel(got[k], ft[k].astype(np.float64)) < 1e-5
        q = f"model.layers.{i}.q_proj.weight"
        assert np.array_equal(got[q], base[q])


def test_one_svd_serves_several_ranks(write, tmp_path):
    base, ft, bp, fp = _pair(write, np.random.default_rng(2), rank=6, noise=0.01)
    adapter = tmp_path / "adapters"
    report = _extract(bp, fp, adapter, rank=[2, 8, 4])
    for r in [2, 4, 8]:
        config = json.loads((adapter / f"r{r}" / "adapter_config.json").read_text())
        assert config["r"] == r and config["lora_alpha"] == r
        a = read(adapter / f"r{r}" / "adapter_model.safetensors")[f"{P}model.layers.1.q_proj.lora_A.weight"]
        assert a.shape == (r, 16)
    errors = {(f["tensor"], f["rank"]): f["relative_error"] for f in report["factorizations"]}
    assert len(errors) == 12
    t = "ft::model.layers.0.q_proj.weight"
    assert errors[(t, 2)] > errors[(t, 4)] > errors[(t, 8)]
    # The error the report gives is the one a merge makes.
    merged = _numpy_merge(base, adapter / "r4")
    k = "model.layers.0.q_proj.weight"
    delta = ft[k].astype(np.float64) - base[k]
    assert _rel(merged[k] - base[k], delta) == pytest.approx(errors[(t, 4)], rel=1e-3)


def test_energy_gives_per_module_ranks_in_rank_and_alpha_patterns(write, tmp_path):
    rng = np.random.default_rng(3)
    base, ft, bp, fp = _pair(write, rng, rank=2)
    # One module gets a delta of higher rank.
    k = "model.layers.1.v_proj.weight"
    ft[k] = base[k] + _low_rank(16, 16, 6, rng)
    fp = write(ft, name="ft.safetensors")
    adapter = tmp_path / "adapter"
    report = _extract(bp, fp, adapter, energy=0.9999)
    ranks = {f["tensor"]: f["rank"] for f in report["factorizations"]}
    assert ranks["ft::model.layers.0.q_proj.weight"] == 2 and ranks["ft::model.layers.1.v_proj.weight"] == 6
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["rank_pattern"] == {"model.layers.1.v_proj": 6}
    assert config["alpha_pattern"] == {"model.layers.1.v_proj": 6}
    merged = _numpy_merge(base, adapter)
    for name in ft:
        assert _rel(ft[name], merged[name]) < 1e-3, name


def test_rslora_and_bias(write, tmp_path):
    base, ft, bp, fp = _pair(write, np.random.default_rng(4), rank=3, bias=True)
    adapter = tmp_path / "adapter"
    _extract(bp, fp, adapter, rank=3, alpha=16, use_rslora=True, bias=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["lora_bias"] is True
    tensors = read(adapter / "adapter_model.safetensors")
    assert tensors[f"{P}model.layers.0.q_proj.lora_B.bias"].shape == (24,)
    merged = _numpy_merge(base, adapter)
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out)
    got = read(out)
    for k in ft:
        assert _rel(ft[k], merged[k]) < 1e-5, k
        assert _rel(got[k], ft[k].astype(np.float64)) < 1e-5, k


def test_gpt2_conv1d_layout_is_fan_in_fan_out(write, tmp_path):
    rng = np.random.default_rng(5)
    base = {"h.0.attn.c_attn.weight": rng.standard_normal((16, 48)).astype(np.float32)}  # in × out
    ft = {"h.0.attn.c_attn.weight": base["h.0.attn.c_attn.weight"] + _low_rank(16, 48, 2, rng)}
    bp, fp = write(base, name="base.safetensors"), write(ft, name="ft.safetensors")
    adapter = tmp_path / "adapter"
    _extract(bp, fp, adapter, target=r".*c_attn\.weight", rank=2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    tensors = read(adapter / "adapter_model.safetensors")
    assert tensors[f"{P}h.0.attn.c_attn.lora_A.weight"].shape == (2, 16)  # r × in
    assert tensors[f"{P}h.0.attn.c_attn.lora_B.weight"].shape == (48, 2)  # out × r
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out)
    assert _rel(read(out)["h.0.attn.c_attn.weight"], ft["h.0.attn.c_attn.weight"].astype(np.float64)) < 1e-5


def _adapter(tmp_path, base, config, modules, rng, name="handmade", dora=False, bias=False):
    """An adapter directory written by hand: random A and B (B non-zero) per module."""
    d = tmp_path / name
    d.mkdir()
    tensors = {}
    for m, r in modules.items():
        out_dim, in_dim = base[f"{m}.weight"].shape
        if config.get("fan_in_fan_out"):
            out_dim, in_dim = in_dim, out_dim
        tensors[f"{P}{m}.lora_A.weight"] = rng.standard_normal((r, in_dim)).astype(np.float32)
        tensors[f"{P}{m}.lora_B.weight"] = rng.standard_normal((out_dim, r)).astype(np.float32)
        if dora:
            tensors[f"{P}{m}.lora_magnitude_vector"] = (1 + rng.random(out_dim)).astype(np.float32)
        if bias:
            tensors[f"{P}{m}.lora_B.bias"] = rng.standard_normal(out_dim).astype(np.float32)
    save_safetensors(d / "adapter_model.safetensors", tensors)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return d


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "use_rslora": True},
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"layers.1.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
        {"r": 4, "lora_alpha": 8, "use_dora": True},
    ],
)
def test_merge_matches_peft_formulas(write, tmp_path, config):
    rng = np.random.default_rng(6)
    base, _, bp, _ = _pair(write, rng)
    modules = {f"model.layers.{i}.{n}": 4 for i in range(2) for n in ["q_proj", "v_proj"]}
    if "rank_pattern" in config:
        modules["model.layers.1.q_proj"] = 2
    adapter = _adapter(tmp_path, base, config, modules, rng, dora=config.get("use_dora", False))
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out)
    got, want = read(out), _numpy_merge(base, adapter)
    for k in base:
        assert _rel(got[k], want[k]) < 1e-6, k


def test_merge_scale_and_bias(write, tmp_path):
    rng = np.random.default_rng(7)
    base, _, bp, _ = _pair(write, rng, bias=True)
    adapter = _adapter(tmp_path, base, {"r": 2, "lora_alpha": 4, "lora_bias": True}, {"model.layers.0.q_proj": 2}, rng, bias=True)
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out, scale=0.5)
    got, want = read(out), _numpy_merge(base, adapter)
    half = {k: base[k] + 0.5 * (want[k] - base[k]) for k in base}
    for k in base:
        assert _rel(got[k], half[k]) < 1e-6 if np.linalg.norm(half[k]) else np.array_equal(got[k], base[k]), k


def test_merge_into_bf16_with_an_f32_adapter(write, tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(12)
    base32, _, _, _ = _pair(write, rng, bias=True)
    base = {k: v.astype(ml_dtypes.bfloat16) for k, v in base32.items()}
    bp = write(base, name="base-bf16.safetensors")
    as32 = {k: v.astype(np.float32) for k, v in base.items()}
    adapter = _adapter(tmp_path, as32, {"r": 2, "lora_alpha": 4, "lora_bias": True}, {"model.layers.1.v_proj": 2}, rng, bias=True)
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out)
    merged = bs.open(out)
    want = _numpy_merge(as32, adapter)
    for k in base:
        got = np.asarray(merged[k])
        assert got.dtype == ml_dtypes.bfloat16
        # Computed in f32, rounded once to bfloat16.
        np.testing.assert_array_equal(got, want[k].astype(np.float32).astype(ml_dtypes.bfloat16), err_msg=k)


def test_bad_adapters_are_clear_errors(write, tmp_path):
    rng = np.random.default_rng(8)
    base, _, bp, _ = _pair(write, rng)
    out = tmp_path / "merged.safetensors"
    ia3 = _adapter(tmp_path, base, {"r": 2, "lora_alpha": 2}, {"model.layers.0.q_proj": 2}, rng, name="ia3")
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(bs.FormatError, match="peft_type is `IA3`"):
        _merge(bp, ia3, out)
    stray = _adapter(tmp_path, base, {"r": 2, "lora_alpha": 2}, {"model.layers.0.q_proj": 2}, rng, name="stray")
    tensors = read(stray / "adapter_model.safetensors")
    tensors[f"{P}model.layers.0.k_proj.lora_A.weight"] = np.zeros((2, 16), np.float32)
    tensors[f"{P}model.layers.0.k_proj.lora_B.weight"] = np.zeros((16, 2), np.float32)
    save_safetensors(stray / "adapter_model.safetensors", tensors)
    with pytest.raises(bs.TransformError, match=r"model\.layers\.0\.k_proj.*does not exist; closest"):
        _merge(bp, stray, out)
    wrong = _adapter(tmp_path, base, {"r": 4, "lora_alpha": 2}, {"model.layers.0.q_proj": 2}, rng, name="wrong")
    with pytest.raises(bs.FormatError, match="rank 2 but the config says 4"):
        _merge(bp, wrong, out)
    typed = _adapter(tmp_path, base, {"r": 2, "lora_alpha": 2, "fan_in_fan_out": "true"}, {"model.layers.0.q_proj": 2}, rng, name="typed")
    with pytest.raises(bs.FormatError, match="fan_in_fan_out is `\"true\"`, not true or false"):
        _merge(bp, typed, out)
    half = _adapter(tmp_path, base, {"r": 2, "lora_alpha": 2}, {"model.layers.0.q_proj": 2}, rng, name="half")
    tensors = read(half / "adapter_model.safetensors")
    del tensors[f"{P}model.layers.0.q_proj.lora_B.weight"]
    save_safetensors(half / "adapter_model.safetensors", tensors)
    with pytest.raises(bs.FormatError, match="has lora_A but no lora_B"):
        _merge(bp, half, out)
    nan = _adapter(tmp_path, base, {"r": 2, "lora_alpha": 2}, {"model.layers.0.q_proj": 2}, rng, name="nan")
    tensors = read(nan / "adapter_model.safetensors")
    tensors[f"{P}model.layers.0.q_proj.lora_A.weight"][1, 3] = np.nan
    save_safetensors(nan / "adapter_model.safetensors", tensors)
    with pytest.raises(bs.TransformError, match="module `model.layers.0.q_proj` holds NaN"):
        _merge(bp, nan, out)
    assert not out.exists()


def test_extract_bad_input(write, tmp_path):
    rng = np.random.default_rng(9)
    base, ft, bp, fp = _pair(write, rng)
    adapter = tmp_path / "adapter"
    with pytest.raises(bs.TransformError, match="rank 17 does not fit"):
        _extract(bp, fp, adapter, rank=17)
    with pytest.raises(bs.TransformError, match="2-D"):
        _extract(bp, fp, adapter, target=r".*norm\.weight", rank=1)
    with pytest.raises(bs.PlanError, match="floating dtype"):
        _extract(bp, fp, adapter, rank=2, dtype="int8")
    ft["model.layers.0.q_proj.weight"] = np.zeros((24, 15), np.float32)
    fp = write(ft, name="ft2.safetensors")
    with pytest.raises(bs.TransformError, match="shape mismatch"):
        _extract(bp, fp, adapter, rank=2)
    assert not adapter.exists()
    # lora_bias is one flag per adapter: biased and unbiased layers cannot share one.
    base, ft, bp, fp = _pair(write, rng, bias=True)
    for name in [base, ft]:
        del name["model.layers.1.v_proj.bias"]
    bp, fp = write(base, name="b3.safetensors"), write(ft, name="f3.safetensors")
    with pytest.raises(bs.TransformError, match="`model.layers.1.v_proj` has no bias"):
        _extract(bp, fp, adapter, rank=2, bias=True)
    # A foreign adapter in the way is refused unless overwrite.
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(bs.TransformError, match="did not write"):
        _extract(bp, fp, adapter, rank=2)
    _extract(bp, fp, adapter, rank=2, overwrite=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    _extract(bp, fp, adapter, rank=3)  # ours now: replaced without asking
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 3


def test_minilm_extract_and_merge_preserves_embeddings(tmp_path):
    """A synthetic fine-tune of the real MiniLM (base + rank-8 deltas + small noise), extracted at
    rank 8 and merged back, embeds like the fine-tune (cosine ≥ 0.9999)."""
    from test_minilm import _cosines, _embed_all, _model_file

    model = _model_file()
    base = {k: np.asarray(v) for k, v in bs.open(model).items()}
    rng = np.random.default_rng(10)
    ft = dict(base)
    targets = [k for k in base if k.endswith(("query.weight", "value.weight", "intermediate.dense.weight"))]
    for k in targets:
        o, n = base[k].shape
        scale = float(np.abs(base[k]).mean())
        ft[k] = (base[k] + _low_rank(o, n, 8, rng, scale=scale) + 1e-4 * scale * rng.standard_normal((o, n))).astype(np.float32)
    fp = tmp_path / "ft.safetensors"
    save_safetensors(fp, ft)
    adapter = tmp_path / "adapter"
    _extract(model, fp, adapter, target=r".*(query|value|intermediate\.dense)\.weight", rank=8)
    out = tmp_path / "merged.safetensors"
    _merge(model, adapter, out)
    merged = bs.open(out)
    for want, got in zip(_embed_all(ft), _embed_all(merged), strict=True):
        assert _cosines(want, got).min() >= 0.9999


# ---- against PEFT itself ----


def _torch():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    return torch, peft


def _tiny_model(torch, bias=True):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 24, bias=bias)
            self.v_proj = torch.nn.Linear(16, 16, bias=bias)
            self.norm = torch.nn.LayerNorm(16)

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(40, 16)
            self.layers = torch.nn.ModuleList([Block(), Block()])

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Layers()

    torch.manual_seed(0)
    return Tiny()


def _state(model) -> dict:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


# PEFT 0.21 warns about any 1-D lora_B.bias, its own included, taking it for a ZeRO-3 shard.
@pytest.mark.filterwarnings("ignore:.*LoRA tensor.*invalid shape")
def test_peft_loads_our_adapter_and_merges_to_the_fine_tune(tmp_path):
    torch, peft = _torch()
    model = _tiny_model(torch)
    base = _state(model)
    rng = np.random.default_rng(11)
    ft = {k: (v + _low_rank(*v.shape, 3, rng) if v.ndim == 2 else v + 0.01) for k, v in base.items()}
    bp, fp = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    save_safetensors(bp, base)
    save_safetensors(fp, ft)
    adapter = tmp_path / "adapter"
    _extract(bp, fp, adapter, rank=3, alpha=6, bias=True, use_rslora=True, modules_to_save=r".*(norm|embed_tokens)\.(weight|bias)")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_tokens", "model.layers.0.norm", "model.layers.1.norm"]
    if "lora_bias" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this PEFT has no lora_bias")
    loaded = peft.PeftModel.from_pretrained(model, str(adapter))
    merged = _state(loaded.merge_and_unload())
    for k in ft:
        assert _rel(merged[k], ft[k].astype(np.float64)) < 1e-5, k


@pytest.mark.filterwarnings("ignore:.*LoRA tensor.*invalid shape")
@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns", "dora", "lora_bias"])
def test_our_merge_matches_peft_merge_and_unload(tmp_path, variant):
    torch, peft = _torch()
    model = _tiny_model(torch)
    base = _state(model)
    bp = tmp_path / "base.safetensors"
    save_safetensors(bp, base)
    options = {
        "plain": {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["layers.0.norm"]},
        "rslora": {"use_rslora": True},
        "patterns": {"rank_pattern": {"layers.1.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
        "dora": {"use_dora": True},
        "lora_bias": {"lora_bias": True},
    }[variant]
    options.setdefault("target_modules", ["q_proj", "v_proj"])
    try:
        config = peft.LoraConfig(r=4, lora_alpha=8, **options)
    except TypeError as e:  # an older PEFT without the option
        pytest.skip(str(e))
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "magnitude" in name else 0.0))
    adapter = tmp_path / "adapter"
    wrapped.save_pretrained(str(adapter), save_embedding_layers=False)
    want = _state(wrapped.merge_and_unload())
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out)
    got = read(out)
    for k in base:
        assert _rel(got[k], want[k].astype(np.float64)) < 1e-5, k


def test_our_merge_matches_peft_on_gpt2_conv1d(tmp_path):
    torch, peft = _torch()
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = conv1d(48, 16)  # weight stored in × out: (16, 48)

    class Gpt(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.h = torch.nn.ModuleList([torch.nn.ModuleDict({"attn": Attn()}) for _ in range(2)])

    torch.manual_seed(1)
    model = Gpt()
    base = _state(model)
    bp = tmp_path / "base.safetensors"
    save_safetensors(bp, base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    adapter = tmp_path / "adapter"
    wrapped.save_pretrained(str(adapter))
    want = _state(wrapped.merge_and_unload())
    out = tmp_path / "merged.safetensors"
    _merge(bp, adapter, out)
    got = read(out)
    for k in base:
        assert _rel(got[k], want[k].astype(np.float64)) < 1e-5, k
    # And PEFT loads what extract_lora writes for the same layout.
    ft = {k: want[k].astype(np.float32) for k in base}
    fp = tmp_path / "ft.safetensors"
    save_safetensors(fp, ft)
    ours = tmp_path / "ours"
    _extract(bp, fp, ours, target=r".*c_attn\.weight", rank=3)
    model = Gpt()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    merged = _state(peft.PeftModel.from_pretrained(model, str(ours)).merge_and_unload())
    for k in ft:
        assert _rel(merged[k], ft[k].astype(np.float64)) < 1e-5, k


def test_peft_loads_our_embedding_adapter(tmp_path):
    torch, peft = _torch()
    model = _tiny_model(torch)
    base = _state(model)
    rng = np.random.default_rng(13)
    ft = dict(base)
    for k in ["model.embed_tokens.weight", "model.layers.0.q_proj.weight"]:
        ft[k] = base[k] + _low_rank(*base[k].shape, 2, rng)
    bp, fp = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    save_safetensors(bp, base)
    save_safetensors(fp, ft)
    adapter = tmp_path / "adapter"
    _extract(bp, fp, adapter, target=r".*(embed_tokens|layers\.0\.q_proj)\.weight", rank=2)
    tensors = read(adapter / "adapter_model.safetensors")
    assert tensors[f"{P}model.embed_tokens.lora_embedding_A"].shape == (2, 40)  # r × vocab
    assert tensors[f"{P}model.embed_tokens.lora_embedding_B"].shape == (16, 2)  # dim × r
    merged = _state(peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload())
    for k in ft:
        assert _rel(merged[k], ft[k].astype(np.float64)) < 1e-5, k
