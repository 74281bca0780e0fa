"""merge (src/transforms/merge.rs) against NumPy implementations of each method, written here from
the papers and MergeKit's formulas (merge_methods/*.py, sparsify.py):

* linear: ``Σ wᵢ·mᵢ`` (over ``Σ wᵢ`` with ``normalize``);
* task arithmetic family: ``base + λ·Σ wᵢ·sparsify(mᵢ − base)``, with TIES' sign election
  (majority sign of ``Σ wᵢ·δᵢ``, ``≥ 0`` counting as +) and the normalization by the weights of
  the entries agreeing in sign;
* slerp between the base (t = 0) and the other model; model_stock.

The random masks (DARE, DELLA) are drawn here with the generator docs/semantics.md documents
(FNV-1a of ``"{seed}\\0{alias}\\0{name}"``, SplitMix64 per element index), so masked results are
compared exactly in where they keep entries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import read, tensor_names
from helpers import assert_one_error, cli, dump_plan, sha256, write_st
from safetensors.numpy import load_file, save_file

F32 = np.float32
LAYERS = 3
MASK64 = (1 << 64) - 1


# --- the documented mask generator -------------------------------------------------------------


def mask_seed(seed: int, alias: str, name: str) -> int:
    h = 0xCBF29CE484222325
    for b in f"{seed}\0{alias}\0{name}".encode():
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


def uniform(key: int, n: int) -> np.ndarray:
    """Element i's draw: SplitMix64 of ``key + (i + 1)·0x9E3779B97F4A7C15``, top 53 bits / 2⁵³."""
    i = np.arange(1, n + 1, dtype=np.uint64)
    z = np.full(n, key, dtype=np.uint64) + i * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# --- checkpoints --------------------------------------------------------------------------------


def names() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (8, 6)}
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (6, 6)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (10, 6)
    shapes["model.norm.weight"] = (6,)
    return shapes


def checkpoints(tmp_path, dtype=F32, seed=0):
    """base, ft1, ft2: the fine-tunes are the base plus noise; an int tensor rides along."""
    rng = np.random.default_rng(seed)
    models = {"base": {}, "ft1": {}, "ft2": {}}
    for name, shape in names().items():
        base = rng.standard_normal(shape)
        models["base"][name] = base.astype(dtype)
        for ft in ("ft1", "ft2"):
            models[ft][name] = (base + 0.1 * rng.standard_normal(shape)).astype(dtype)
    for m in models.values():
        m["position_ids"] = np.arange(8, dtype=np.int64)
    paths = {}
    for alias, tensors in models.items():
        path = (tmp_path / f"{alias}.safetensors").resolve()
        write_st(path, tensors)
        paths[alias] = path
    return models, paths


def inputs(paths):
    return [f"{alias}::{path}" for alias, path in paths.items()]


def run(paths, merge, tmp_path, threads=0, out_name="out.safetensors"):
    out = tmp_path / out_name
    bs.run({"inputs": inputs(paths), "transforms": [{"merge": merge}], "output": str(out)}, threads=threads)
    return read(out)


def layer_t(name: str) -> float:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "layer", "h", "blocks") and b.isdigit():
            return int(b) / (LAYERS - 1)
    return 0.0


def grad(values, t):
    values = [values] if np.isscalar(values) else values
    span = len(values) - 1
    if span == 0:
        return values[0]
    scaled = t * span
    i0 = min(int(np.floor(scaled)), span)
    i1 = min(i0 + 1, span)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


# --- NumPy references ---------------------------------------------------------------------------


def ref_linear(ms, ws, normalize=True):
    acc = sum(w * m.astype(np.float64) for m, w in zip(ms, ws))
    return acc / sum(ws) if normalize else acc


def sparsify(method, delta, density, *, gamma=0.01, epsilon=0.15, rescale=False, key=0):
    """MergeKit's sparsify.py on one f32 delta (ties broken by index, as a stable sort)."""
    d = delta.astype(np.float64).ravel().copy()
    n = d.size
    if density >= 1:
        return d.reshape(delta.shape)
    if method == "magnitude":
        k = int(np.floor(density * n))
        keep = np.zeros(n, bool)
        keep[np.argsort(-np.abs(delta.ravel()), kind="stable")[:k]] = True
        out = np.where(keep, d, 0.0)
        return rescale_l1(d, out, rescale).reshape(delta.shape)
    if method == "outliers":
        target = int(np.floor(density * n))
        top = int(np.floor(gamma * n))
        bottom = n - target - top
        if bottom < 0:
            top += bottom
            bottom = 0
        keep = np.zeros(n, bool)
        keep[np.argsort(np.abs(delta.ravel()), kind="stable")[bottom : n - top]] = True
        out = np.where(keep, d, 0.0)
        return rescale_l1(d, out, rescale).reshape(delta.shape)
    if method == "random":
        # MergeKit rescales the kept entries to the delta's L1 norm (not by 1/density).
        keep = uniform(key, n) < density
        return rescale_l1(d, np.where(keep, d, 0.0), rescale).reshape(delta.shape)
    if method == "ranked":
        if density <= 0:
            return np.zeros(delta.shape)
        rows = delta.shape[0] if delta.ndim >= 2 else 1
        cols = n // rows
        u = uniform(key, n).reshape(rows, cols)
        dd = d.reshape(rows, cols)
        out = np.zeros_like(dd)
        for r in range(rows):
            order = np.argsort(np.abs(delta.reshape(rows, cols)[r]), kind="stable")
            norm = np.empty(cols)
            norm[order] = np.arange(cols) / (cols - 1) if cols > 1 else 0.0
            prob = (density - epsilon) + norm * 2.0 * epsilon
            keep = u[r] < prob
            out[r] = np.where(keep, dd[r], 0.0)
        return rescale_l1(d, out.ravel(), rescale).reshape(delta.shape)
    raise AssertionError(method)


def rescale_l1(before, after, rescale):
    if not rescale:
        return after
    b, a = np.abs(before).sum(), np.abs(after).sum()
    if b < 1e-7 or a < 1e-7:
        return after
    return after * (b / a)


def ref_gta(base, ms, ws, *, sparse=None, consensus=False, normalize=False, lam=1.0, densities=None, keys=None, **kw):
    deltas = []
    for i, m in enumerate(ms):
        delta = (m.astype(F32) - base.astype(F32)).astype(F32)
        if sparse:
            delta = sparsify(sparse, delta, densities[i], key=keys[i], **kw)
        deltas.append(delta.astype(np.float64))
    weighted = np.stack([w * d for w, d in zip(ws, deltas)])
    wcol = np.array(ws, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    if consensus:
        majority = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
        mask = np.sign(weighted) == majority
        mixed = (weighted * mask).sum(axis=0)
        divisor = (wcol * mask).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(axis=0)
        divisor = sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return base.astype(np.float64) + lam * mixed


def ref_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    a, b = v0.astype(np.float64), v1.astype(np.float64)

    def unit(v):
        n = np.linalg.norm(v)
        return v / n if n > eps else v

    dot = np.sum(unit(a) * unit(b))
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b


def ref_model_stock(base, ms):
    w0 = base.astype(np.float64).ravel()
    ws = [m.astype(np.float64).ravel() for m in ms]
    offsets = [w - w0 for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j])
            cos.append(np.clip(np.dot(offsets[i], offsets[j]) / max(norm, 1e-6), -1, 1))
    c = np.mean(cos)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


def assert_close(got, expected, name, dtype=F32):
    assert got.dtype == np.dtype(dtype), name
    assert got.shape == expected.shape, name
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        # The same rounding: f64 reference to bf16; the engine rounds from f32, so at most one
        # bf16 step apart.
        want = expected.astype(ml_dtypes.bfloat16).astype(np.float64)
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=2**-7, atol=1e-6, err_msg=name)
    else:
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=2e-6, atol=2e-6, err_msg=name)


def check_all(got, models, reference, dtype=F32):
    assert set(got) == set(models["base"])
    np.testing.assert_array_equal(got["position_ids"], models["base"]["position_ids"])
    for name in names():
        assert_close(got[name], reference(name), name, dtype)


# --- methods ------------------------------------------------------------------------------------


def test_linear_normalized_with_gradient_weights(tmp_path):
    models, paths = checkpoints(tmp_path)
    got = run(
        paths,
        {"method": "linear", "models": {"ft1": {"weight": [0.2, 0.8]}, "ft2": {"weight": 0.5}, "base": {"weight": 1}}, "to": "merged"},
        tmp_path,
    )

    def ref(name):
        t = layer_t(name)
        ws = [grad([0.2, 0.8], t), 0.5, 1.0]
        return ref_linear([models[a][name] for a in ("ft1", "ft2", "base")], ws)

    check_all(got, models, ref)


def test_linear_unnormalized_weights_summing_to_one_bfloat16(tmp_path):
    models, paths = checkpoints(tmp_path)
    got = run(
        paths,
        {"method": "linear", "models": ["ft1", "ft2"], "weight": 0.5, "normalize": False, "to": "merged", "dtype": "bfloat16"},
        tmp_path,
    )
    check_all(
        got,
        models,
        lambda n: ref_linear([models["ft1"][n], models["ft2"][n]], [0.5, 0.5], normalize=False),
        dtype=ml_dtypes.bfloat16,
    )


def test_task_arithmetic_with_lambda(tmp_path):
    models, paths = checkpoints(tmp_path)
    got = run(
        paths,
        {"method": "task_arithmetic", "base": "base", "models": {"ft1": {"weight": 0.7}, "ft2": {"weight": -0.3}}, "lambda": 1.5, "to": "merged"},
        tmp_path,
    )
    check_all(got, models, lambda n: ref_gta(models["base"][n], [models["ft1"][n], models["ft2"][n]], [0.7, -0.3], lam=1.5))


def test_ties_trims_elects_and_averages_disjointly(tmp_path):
    models, paths = checkpoints(tmp_path)
    merge = {
        "method": "ties",
        "base": "base",
        # The base listed among the models is the base (MergeKit configs list it so).
        "models": {"base": None, "ft1": {"weight": 0.5, "density": 0.5}, "ft2": {"weight": 0.8, "density": [0.3, 0.9]}},
        "to": "merged",
        "dtype": "bfloat16",
    }
    got = run(paths, merge, tmp_path)

    def ref(n):
        d = [0.5, grad([0.3, 0.9], layer_t(n))]
        return ref_gta(
            models["base"][n], [models["ft1"][n], models["ft2"][n]], [0.5, 0.8],
            sparse="magnitude", consensus=True, normalize=True, densities=d, keys=[0, 0],
        )

    check_all(got, models, ref, dtype=ml_dtypes.bfloat16)


def test_ties_rescaled_unnormalized_float32(tmp_path):
    models, paths = checkpoints(tmp_path)
    merge = {"method": "ties", "base": "base", "models": ["ft1", "ft2"], "weight": 0.6, "density": 0.4,
             "normalize": False, "rescale": True, "to": "merged"}
    got = run(paths, merge, tmp_path)
    check_all(got, models, lambda n: ref_gta(
        models["base"][n], [models["ft1"][n], models["ft2"][n]], [0.6, 0.6], sparse="magnitude",
        consensus=True, normalize=False, densities=[0.4, 0.4], keys=[0, 0], rescale=True))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_masks_match_the_documented_generator(tmp_path, method):
    models, paths = checkpoints(tmp_path)
    merge = {"method": method, "base": "base", "models": {"ft1": {"weight": 0.6, "density": 0.3}, "ft2": {"weight": 0.4, "density": 0.7}},
             "seed": 7, "to": "merged"}
    got = run(paths, merge, tmp_path)
    consensus = method == "dare_ties"

    def ref(n):
        keys = [mask_seed(7, a, n) for a in ("ft1", "ft2")]
        return ref_gta(models["base"][n], [models["ft1"][n], models["ft2"][n]], [0.6, 0.4], sparse="random",
                       consensus=consensus, densities=[0.3, 0.7], keys=keys, rescale=True)

    check_all(got, models, ref)


def test_dare_mask_positions_exactly(tmp_path):
    """One model: the entries that moved off the base are exactly the documented mask's."""
    models, paths = checkpoints(tmp_path)
    del paths["ft2"]
    merge = {"method": "dare_linear", "base": "base", "models": {"ft1": {"weight": 1.0, "density": 0.5}}, "to": "merged"}
    got = run(paths, merge, tmp_path)
    for name in names():
        keep = uniform(mask_seed(0, "ft1", name), models["base"][name].size).reshape(models["base"][name].shape) < 0.5
        moved = got[name] != models["base"][name]
        delta_nonzero = models["ft1"][name] != models["base"][name]
        np.testing.assert_array_equal(moved, keep & delta_nonzero, err_msg=name)
        assert 0.3 < keep.mean() < 0.7


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_drop_outliers_and_small_entries(tmp_path, method):
    models, paths = checkpoints(tmp_path)
    merge = {"method": method, "base": "base", "models": {"ft1": {"weight": 0.5}, "ft2": {"weight": 0.5, "gamma": 0.1}},
             "density": 0.6, "to": "merged"}
    got = run(paths, merge, tmp_path)

    def ref(n):
        ms = [models["ft1"][n], models["ft2"][n]]
        base = models["base"][n]
        deltas = [sparsify("outliers", (m.astype(F32) - base).astype(F32), 0.6, gamma=g) for m, g in zip(ms, [0.01, 0.1])]
        # Different gamma per model: build the reference from the sparsified deltas directly.
        weighted = np.stack([0.5 * d for d in deltas])
        if method == "breadcrumbs_ties":
            majority = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
            weighted = weighted * (np.sign(weighted) == majority)
        return base.astype(np.float64) + weighted.sum(axis=0)

    check_all(got, models, ref)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_ranked_keep_probabilities(tmp_path, method):
    models, paths = checkpoints(tmp_path)
    merge = {"method": method, "base": "base", "models": {"ft1": {"weight": 0.5, "epsilon": 0.1}, "ft2": {"weight": 0.5}},
             "density": 0.5, "lambda": 0.9, "seed": 3, "to": "merged"}
    got = run(paths, merge, tmp_path)

    def ref(n):
        base = models["base"][n]
        keys = {a: mask_seed(3, a, n) for a in ("ft1", "ft2")}
        deltas = [sparsify("ranked", (models[a][n].astype(F32) - base).astype(F32), 0.5, epsilon=e, rescale=True, key=keys[a])
                  for a, e in (("ft1", 0.1), ("ft2", 0.15))]
        weighted = np.stack([0.5 * d for d in deltas])
        wcol = np.full(weighted.shape, 0.5)
        if method == "della":
            majority = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
            mask = np.sign(weighted) == majority
            mixed = (weighted * mask).sum(axis=0)
            divisor = (wcol * mask).sum(axis=0)
            divisor[divisor == 0] = 1
            mixed = mixed / divisor
        else:
            mixed = weighted.sum(axis=0)
        return base.astype(np.float64) + 0.9 * mixed

    check_all(got, models, ref)


def test_slerp_with_filtered_gradient_t(tmp_path):
    models, paths = checkpoints(tmp_path)
    del paths["ft2"]
    t = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.5}]
    got = run(paths, {"method": "slerp", "base": "base", "models": ["ft1"], "t": t, "to": "merged"}, tmp_path)

    def ref(n):
        lt = layer_t(n)
        tv = grad([0.0, 0.5, 1.0], lt) if "self_attn" in n else grad([1.0, 0.0], lt) if "mlp" in n else 0.5
        return ref_slerp(tv, models["base"][n], models["ft1"][n])

    check_all(got, models, ref)


def test_slerp_falls_back_to_lerp_when_collinear(tmp_path, write):
    a = np.linspace(1, 2, 12, dtype=F32).reshape(3, 4)
    paths = {"base": write({"w": a}, "a.safetensors"), "ft1": write({"w": (a * 3).astype(F32)}, "b.safetensors")}
    got = run(paths, {"method": "slerp", "base": "base", "models": ["ft1"], "t": 0.25, "to": "merged"}, tmp_path)
    np.testing.assert_allclose(got["w"], 0.75 * a + 0.25 * 3 * a, rtol=1e-6)


def test_model_stock(tmp_path):
    models, paths = checkpoints(tmp_path)
    got = run(paths, {"method": "model_stock", "base": "base", "models": ["ft1", "ft2"], "to": "merged"}, tmp_path)
    check_all(got, models, lambda n: ref_model_stock(models["base"][n], [models["ft1"][n], models["ft2"][n]]))


def test_float64_inputs_stay_float64(tmp_path):
    models, paths = checkpoints(tmp_path, dtype=np.float64)
    got = run(paths, {"method": "task_arithmetic", "base": "base", "models": ["ft1", "ft2"], "weight": 0.5, "to": "merged"}, tmp_path)
    for name in names():
        want = models["base"][name] + 0.5 * ((models["ft1"][name] - models["base"][name]) + (models["ft2"][name] - models["base"][name]))
        assert got[name].dtype == np.float64
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "merge",
    [
        {"method": m, "base": "base", "models": ["ft1", "ft2"], "weight": 0.5, "density": 0.5}
        for m in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "nuslerp", "multislerp")
    ]
    + [
        {"method": "linear", "models": ["ft1", "ft2"], "weight": 0.5},
        {"method": "karcher", "models": ["ft1", "ft2"]},
        {"method": "slerp", "base": "base", "models": ["ft1"], "t": 0.5},
        {"method": "arcee_fusion", "base": "base", "models": ["ft1"]},
    ],
    ids=lambda m: m["method"],
)
def test_empty_and_scalar_tensors(tmp_path, write, merge):
    """Degenerate shapes merge without failing: an empty tensor stays empty, a scalar merges
    (model_stock's two scalar deltas point in opposite directions or the same one, cos = ±1;
    opposite ones are refused, since MergeKit's formula divides by zero there)."""
    rng = np.random.default_rng(1)
    paths = {}
    for alias in ("base", "ft1", "ft2"):
        paths[alias] = write({"empty": np.zeros((0, 3), F32), "scalar": np.array(rng.standard_normal(), F32)}, f"{alias}.safetensors")
    merge = {k: v for k, v in merge.items() if k not in ("density",) or "ties" in merge["method"] or "dare" in merge["method"] or "della" in merge["method"] or "breadcrumbs" in merge["method"]}
    try:
        got = run(paths, {**merge, "to": "merged"}, tmp_path)
    except bs.TransformError as e:
        # Opposite scalar deltas: 1 + (N−1)·cos is 0, refused rather than written as NaN.
        assert merge["method"] == "model_stock" and "opposite" in str(e), e
        return
    assert got["empty"].shape == (0, 3)
    assert got["scalar"].shape == ()
    assert np.isfinite(got["scalar"])


def test_plan_builder(tmp_path):
    models, paths = checkpoints(tmp_path)
    out = tmp_path / "builder.safetensors"
    plan = bs.Plan(inputs=inputs(paths), output=str(out))
    plan.merge(method="task_arithmetic", models=["ft1", "ft2"], to="merged", base="base", weight=0.5, lambda_=2.0)
    bs.run(plan.to_dict())
    got = read(out)
    for name in names():
        b = models["base"][name]
        assert_close(got[name], ref_gta(b, [models["ft1"][name], models["ft2"][name]], [0.5, 0.5], lam=2.0), name)


def test_target_limits_what_is_merged(tmp_path):
    models, paths = checkpoints(tmp_path)
    got = run(paths, {"method": "linear", "models": ["ft1", "ft2"], "weight": 1, "target": ".*mlp.*", "to": "merged"}, tmp_path)
    for name in names():
        if "mlp" in name:
            assert_close(got[name], ref_linear([models["ft1"][name], models["ft2"][name]], [1, 1]), name)
        else:
            np.testing.assert_array_equal(got[name], models["ft1"][name])


def ref_nuslerp(t, v0, v1, flatten, row_wise):
    a, b = v0.astype(np.float64), v1.astype(np.float64)
    shape = a.shape
    if flatten or a.ndim == 0:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1)
    lead = a.shape
    a, b = a.reshape(-1, lead[-1]), b.reshape(-1, lead[-1])
    na = np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-7)
    nb = np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-7)
    theta = np.arccos(np.clip(np.sum(a / na * (b / nb), axis=-1, keepdims=True), -1, 1))
    s = np.sin(theta)
    res = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.where(np.abs(s) < 1e-8, 1, s)
    lin = (1 - t) * a + t * b
    res = np.where(np.abs(s) < 1e-8, lin, res).reshape(lead)
    if row_wise and not flatten and v0.ndim > 0:
        res = np.moveaxis(res, -1, 0)
    return res.reshape(shape)


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(tmp_path, flatten, row_wise, with_base):
    models, paths = checkpoints(tmp_path)
    merge = {"method": "nuslerp", "models": {"ft1": {"weight": 0.3}, "ft2": {"weight": 0.5}},
             "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise, "to": "merged"}
    if with_base:
        merge["base"] = "base"
    got = run(paths, merge, tmp_path)
    t = 0.5 / 0.8

    def ref(n):
        b = models["base"][n].astype(F32)
        if with_base:
            d0, d1 = models["ft1"][n].astype(F32) - b, models["ft2"][n].astype(F32) - b
            return b.astype(np.float64) + ref_nuslerp(t, d0, d1, flatten, row_wise)
        return ref_nuslerp(t, models["ft1"][n], models["ft2"][n], flatten, row_wise)

    check_all(got, models, ref)


def ref_multislerp(xs, ws, base=None, normalize=True, eps=1e-8):
    xs = [x.astype(np.float64).ravel() for x in xs]
    if base is not None:
        xs = [x - base.astype(np.float64).ravel() for x in xs]
    w = np.array(ws, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.array([np.linalg.norm(x) for x in xs])
    units = [x / (nm + eps) for x, nm in zip(xs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangents = [u - np.dot(u, mean) * mean for u in units]
    tau = sum(wi * tg for wi, tg in zip(w, tangents))
    tn = np.linalg.norm(tau) + eps
    res = (mean * np.cos(tn) + tau * (np.sin(tn) / tn)) * np.dot(norms, w)
    if base is not None:
        res = res + base.astype(np.float64).ravel()
    return res


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(tmp_path, with_base):
    models, paths = checkpoints(tmp_path)
    merge = {"method": "multislerp", "models": {"ft1": {"weight": 0.2}, "ft2": {"weight": 0.5}}, "to": "merged"}
    if with_base:
        merge["base"] = "base"
    else:
        merge["models"]["base"] = {"weight": 0.3}
    got = run(paths, merge, tmp_path)

    def ref(n):
        if with_base:
            b = models["base"][n].astype(F32)
            ds = [models[a][n].astype(F32) - b for a in ("ft1", "ft2")]
            return ref_multislerp(ds, [0.2, 0.5]).reshape(b.shape) + b.astype(np.float64)
        ms = [models[a][n] for a in ("ft1", "ft2", "base")]
        return ref_multislerp(ms, [0.2, 0.5, 0.3]).reshape(ms[0].shape)

    check_all(got, models, ref)


def ref_karcher(xs, max_iter=10, tol=1e-5):
    xs = [x.astype(np.float64).ravel() for x in xs]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / nm if nm else np.zeros_like(x) for x, nm in zip(xs, norms)]
    valid = [i for i, nm in enumerate(norms) if nm > tol]
    a = np.array([alphas[i] for i in valid])
    a = a / a.sum()
    us = [units[i] for i in valid]
    mean = sum(ai * u for ai, u in zip(a, us))
    mean = us[0].copy() if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for ai, u in zip(a, us):
            dot = np.clip(np.dot(mean, u), -1, 1)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            tangent += ai * (theta / np.sin(theta)) * (u - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * (tangent / tn)
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    return sum(al * nm for al, nm in zip(alphas, norms)) * mean


def test_karcher(tmp_path):
    models, paths = checkpoints(tmp_path)
    got = run(paths, {"method": "karcher", "models": ["base", "ft1", "ft2"], "max_iter": 20, "to": "merged"}, tmp_path)
    check_all(got, models, lambda n: ref_karcher([models[a][n] for a in ("base", "ft1", "ft2")], max_iter=20).reshape(models["base"][n].shape))


@pytest.mark.parametrize("topk", [1.0, 0.5])
def test_sce(tmp_path, topk):
    models, paths = checkpoints(tmp_path)
    got = run(paths, {"method": "sce", "base": "base", "models": ["ft1", "ft2"], "select_topk": topk, "to": "merged"}, tmp_path)

    def ref(n):
        b = models["base"][n].astype(F32)
        deltas = np.stack([(models[a][n].astype(F32) - b).astype(np.float64) for a in ("ft1", "ft2")])
        if topk < 1:
            var = deltas.var(axis=0).ravel()
            k = int(np.floor(topk * np.count_nonzero(var)))
            mask = np.zeros(var.size, bool)
            mask[np.argsort(-var.astype(F32), kind="stable")[:k]] = True
            deltas = deltas * mask.reshape(b.shape)
        # MergeKit's sce_weight: equal weights below an energy sum of 1e-6.
        energy = np.array([np.sum(d**2) / d.size for d in deltas])
        w = np.full(len(deltas), 1 / len(deltas)) if abs(energy.sum()) < 1e-6 else energy / max(energy.sum(), 1e-6)
        majority = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
        keep = np.sign(deltas) == majority
        wcol = w.reshape((-1,) + (1,) * b.ndim)
        mixed = (deltas * wcol * keep).sum(axis=0)
        divisor = (wcol * keep).sum(axis=0)
        divisor = np.maximum(divisor, 1e-6)
        return b.astype(np.float64) + mixed / divisor

    check_all(got, models, ref)


def test_sce_of_small_deltas_weighs_them_equally(tmp_path):
    # Fine-tune deltas of ~1e-3: their energies sum below 1e-6, where MergeKit weighs equally.
    rng = np.random.default_rng(7)
    base = rng.standard_normal((64, 32)).astype(F32)
    d1, d2 = 3e-4 * rng.standard_normal(base.shape), 9e-4 * rng.standard_normal(base.shape)
    paths = {}
    for alias, w in {"base": base, "ft1": base + d1, "ft2": base + d2}.items():
        paths[alias] = tmp_path / f"{alias}.safetensors"
        save_file({"w": w.astype(F32)}, str(paths[alias]))
    got = run(paths, {"method": "sce", "base": "base", "models": ["ft1", "ft2"], "to": "merged"}, tmp_path)
    deltas = np.stack([(load_file(str(paths[a]))["w"] - base).astype(np.float64) for a in ("ft1", "ft2")])
    majority = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    keep = np.sign(deltas) == majority
    expected = base + (deltas * keep * 0.5).sum(axis=0) / np.maximum((keep * 0.5).sum(axis=0), 1e-6)
    np.testing.assert_allclose(got["w"], expected, rtol=0, atol=1e-6)


def test_arcee_fusion(tmp_path):
    models, paths = checkpoints(tmp_path)
    got = run(paths, {"method": "arcee_fusion", "base": "base", "models": ["ft1"], "to": "merged"}, tmp_path)

    def ref(n):
        b, m = models["base"][n].astype(F32), models["ft1"][n].astype(F32)

        def softmax(x):
            x = x.astype(np.float64)
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True) + 1e-8

        p, q = softmax(m), softmax(b)
        kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True).astype(F32)
        importance = (np.abs(m - b) * kl).astype(F32).ravel()
        s = np.sort(importance)
        q1, med, q3 = (s[int(np.floor(f * (s.size - 1)))] for f in (0.25, 0.5, 0.75))
        threshold = med + F32(1.5) * (q3 - q1)
        mask = (importance >= threshold).reshape(b.shape)
        assert 0 < mask.sum() < mask.size or mask.size < 10
        return np.where(mask, m, b).astype(np.float64)

    check_all(got, models, ref)


def test_passthrough_stacks_layer_ranges(tmp_path):
    models, paths = checkpoints(tmp_path)
    slices = [{"alias": "base", "layers": [0, 2]}, {"alias": "ft1", "layers": [1, 3]}]
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": inputs(paths), "transforms": [{"merge": {"method": "passthrough", "slices": slices, "to": "merged", "dtype": "bfloat16"}}],
            "output": str(out)})
    got = read(out)
    sources = [("base", 0), ("base", 1), ("ft1", 1), ("ft1", 2)]
    expected = {"model.embed_tokens.weight": models["base"]["model.embed_tokens.weight"]}
    for k, (alias, layer) in enumerate(sources):
        for kind in ("self_attn.q_proj", "mlp.up_proj"):
            expected[f"model.layers.{k}.{kind}.weight"] = models[alias][f"model.layers.{layer}.{kind}.weight"]
    # As MergeKit's post weights: the final norm (and every non-embedding outside the layers)
    # from the last slice's model; the embeddings from the first's.
    expected["model.norm.weight"] = models["ft1"]["model.norm.weight"]
    expected["position_ids"] = models["ft1"]["position_ids"]
    assert tensor_names(out) == list(expected)
    for name, want in expected.items():
        if want.dtype == np.int64:
            np.testing.assert_array_equal(got[name], want)
        else:
            np.testing.assert_array_equal(got[name], want.astype(ml_dtypes.bfloat16), err_msg=name)


def test_passthrough_range_outside_the_model(tmp_path):
    _, paths = checkpoints(tmp_path)
    merge = {"method": "passthrough", "slices": [{"alias": "ft1", "layers": [2, 5]}], "to": "merged"}
    proc = cli(["check", plan_file(tmp_path, paths, merge)], tmp_path)
    assert_one_error(proc, 2, "layers [2, 5)", "`ft1`", "3 layers")


# --- CLI, determinism, header-only check -------------------------------------------------------


def plan_file(tmp_path, paths, merge, out="cli.safetensors"):
    return dump_plan(tmp_path / "plan.yaml", {"inputs": inputs(paths), "transforms": [{"merge": merge}], "output": str(tmp_path / out)})


DARE = {"method": "dare_ties", "base": "base", "models": {"ft1": {"weight": 0.5, "density": 0.4}, "ft2": {"weight": 0.5, "density": 0.6}},
        "to": "merged", "dtype": "bfloat16"}


def test_cli_equals_python_and_any_thread_count(tmp_path):
    models, paths = checkpoints(tmp_path)
    outs = []
    for threads in (1, 2):
        out = f"cli{threads}.safetensors"
        plan = plan_file(tmp_path, paths, DARE, out)
        proc = cli(["run", plan, "--threads", str(threads)], tmp_path)
        assert proc.returncode == 0, proc.stderr
        outs.append(tmp_path / out)
    assert sha256(outs[0]) == sha256(outs[1])
    got = run(paths, DARE, tmp_path, threads=2, out_name="py.safetensors")
    cli_got = read(outs[0])
    for name in got:
        np.testing.assert_array_equal(got[name].view(np.uint8), cli_got[name].view(np.uint8))


def test_check_is_header_only(tmp_path):
    models, paths = checkpoints(tmp_path)
    plan = plan_file(tmp_path, paths, DARE)
    # Corrupt every data byte after the header: a check must not notice.
    for path in paths.values():
        raw = bytearray(path.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        raw[8 + n :] = b"\xff" * (len(raw) - 8 - n)
        path.write_bytes(bytes(raw))
    proc = cli(["check", plan], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "cli.safetensors").exists()


def test_memory_estimate_counts_one_workspace(tmp_path):
    """The check counts the largest merged result plus one tensor's inputs and work buffers, not
    every tensor's: a merge holds one tensor per input at a time, and results are released once
    written. Merges computed chunk by chunk (linear, the TIES/DARE/breadcrumbs family) hold no
    tensor whole: their figure does not grow with the model."""
    models, paths = checkpoints(tmp_path)
    out = tmp_path / "est.safetensors"
    della = {**DARE, "method": "della"}
    report = bs.check({"inputs": inputs(paths), "transforms": [{"merge": della}], "output": str(out)})
    sizes = {n: int(np.prod(s)) for n, s in names().items()}
    results = 2 * max(sizes.values())  # the largest bfloat16 result
    workspace = max(sizes.values()) * 4 * 5  # base + 2 models + 2 work buffers, f32
    assert report["materialized_bytes"] == results + workspace
    for method in ("dare_ties", "ties", "linear"):
        merge = {**DARE, "method": method}
        if method == "linear":
            del merge["base"]
        small = bs.check({"inputs": inputs(paths), "transforms": [{"merge": merge}], "output": str(out)})
        big_paths = {alias: tmp_path / f"big-{alias}.safetensors" for alias in paths}
        for alias, path in big_paths.items():
            save_file({"model.embed_tokens.weight": np.zeros((4096, 1024), F32)}, str(path))
        big = bs.check({"inputs": inputs(big_paths), "transforms": [{"merge": merge}], "output": str(out)})
        if method == "ties":
            # A sample of keys and the keys a bracket may gather grow with the tensor, to a cap.
            assert small["materialized_bytes"] < big["materialized_bytes"] < 64 * 2**20, method
        else:
            # A chunk of each input (f32 inputs to a bfloat16 result: two chunks' worth) and blocks.
            assert small["materialized_bytes"] == big["materialized_bytes"] < 8 * 2**20, method


@pytest.mark.parametrize(
    ("method", "passes"),
    [("linear", 1), ("task_arithmetic", 1), ("ties", 2), ("dare_ties", 2), ("breadcrumbs", 2), ("della", 1), ("slerp", 1),
     ("ties_keeping_nothing", 1)],
)
def test_check_counts_the_bytes_a_merge_reads(tmp_path, method, passes):
    """Streamed merges read their inputs once per pass (TIES: a pass for the magnitude bounds,
    then the chunks; DARE: one for the rescaling norms); the check's figure is the run's."""
    models, paths = checkpoints(tmp_path)
    merge = {**DARE, "method": method}
    if method == "linear":
        del merge["base"]
    if method == "slerp":
        merge = {"method": "slerp", "base": "base", "models": ["ft1"], "t": 0.3, "to": "merged"}
    if method == "breadcrumbs":
        merge["models"] = {"ft1": {"weight": 0.5, "density": 0.5}, "ft2": {"weight": 0.5, "density": 0.5}}
    if method == "ties_keeping_nothing":
        # No bound to find: only the chunks are read.
        merge = {**merge, "method": "ties", "models": {"ft1": {"weight": 0.5, "density": 0.0}, "ft2": {"weight": 0.5, "density": 0.0}}}
    plan = {"inputs": inputs(paths), "transforms": [{"merge": merge}], "output": str(tmp_path / "o.safetensors")}
    checked = bs.check(plan)
    result = bs.run(plan, quiet=True)
    floats = sum(a.nbytes for n, a in models["base"].items() if a.dtype != np.int64)
    ints = models["base"]["position_ids"].nbytes
    read_models = {"linear": 2, "slerp": 2}.get(method, 3)
    assert result["bytes_read"] == checked["bytes_to_read"], method
    assert result["bytes_read"] == passes * read_models * floats + ints, method


# --- bad input -----------------------------------------------------------------------------------


def test_shapes_differ(tmp_path, write):
    paths = {"base": write({"w": np.zeros((2, 3), F32)}, "a.safetensors"), "ft1": write({"w": np.zeros((3, 2), F32)}, "b.safetensors")}
    proc = cli(["check", plan_file(tmp_path, paths, {"method": "task_arithmetic", "base": "base", "models": ["ft1"], "weight": 1, "to": "m"})], tmp_path)
    assert_one_error(proc, 1, "ft1::w", "(3, 2)", "(2, 3)")


def test_missing_tensor_in_a_model(tmp_path, write):
    paths = {"base": write({"w": np.zeros(3, F32), "v": np.zeros(3, F32)}, "a.safetensors"), "ft1": write({"w": np.zeros(3, F32)}, "b.safetensors")}
    proc = cli(["check", plan_file(tmp_path, paths, {"method": "task_arithmetic", "base": "base", "models": ["ft1"], "weight": 1, "to": "m"})], tmp_path)
    assert_one_error(proc, 1, "ft1::v", "does not exist")


@pytest.mark.parametrize(
    ("merge", "needles"),
    [
        ({"method": "ties", "models": ["ft1", "ft2"], "weight": 1}, ["base"]),
        ({"method": "model_stock", "base": "base", "models": ["ft1"]}, ["at least 2 models"]),
        ({"method": "slerp", "base": "base", "models": ["ft1", "ft2"], "t": 0.5}, ["exactly 1 model"]),
        ({"method": "slerp", "base": "base", "models": ["ft1"]}, ["`t`"]),
        ({"method": "linear", "models": ["ft1", "ft2"], "weight": 0.7, "normalize": False}, ["sum to 1.4", "not 1"]),
        ({"method": "linear", "models": {"ft1": {"weight": 1}, "ft2": {"weight": -1}}}, ["sum to 0"]),
        ({"method": "linear", "models": ["ft1", "ft2"]}, ["needs a weight", "ft1"]),
        ({"method": "ties_dare", "base": "base", "models": ["ft1"]}, ["unknown merge method `ties_dare`", "dare_ties"]),
        ({"method": "karcher", "base": "base", "models": ["ft1", "ft2"]}, ["takes no base"]),
        ({"method": "nuslerp", "models": ["ft1", "ft2", "base"], "weight": 1}, ["exactly 2 models"]),
        ({"method": "arcee_fusion", "base": "base", "models": ["ft1", "ft2"]}, ["exactly 1 model"]),
        ({"method": "passthrough", "models": ["ft1"]}, ["passthrough takes `slices`", "not `models`"]),
        ({"method": "passthrough", "slices": [{"alias": "nope", "layers": [0, 1]}]}, ["nope"]),
        ({"method": "linear", "models": ["ft1", "nope"], "weight": 1}, ["nope"]),
        ({"method": "della", "base": "base", "models": ["ft1"], "weight": 1, "density": 0.9, "epsilon": 0.2}, ["density ± epsilon"]),
        ({"method": "ties", "base": "base", "models": ["ft1"], "weight": 1, "density": 1.5}, ["density must be in [0, 1]"]),
        ({"method": "ties", "base": "base", "models": {"ft1": {"wieght": 1}}}, ["wieght", "weight"]),
        ({"method": "linear", "models": ["ft1"], "weight": 1, "dtype": "int8"}, ["float dtype"]),
        ({"method": "linear", "models": ["ft1"], "weight": 1, "to": "base"}, ["`base` already exists"]),
    ],
)
def test_plan_errors(tmp_path, merge, needles):
    _, paths = checkpoints(tmp_path)
    merge = {"to": "merged", **merge}
    proc = cli(["check", plan_file(tmp_path, paths, merge)], tmp_path)
    assert_one_error(proc, 2, *needles)
    with pytest.raises(bs.PlanError):
        run(paths, merge, tmp_path)


def test_help_lists_the_keys(tmp_path):
    proc = cli(["help", "merge"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for key in ("method", "models", "base", "density", "epsilon", "seed"):
        assert key in proc.stdout


# --- against MergeKit itself (optional) -----------------------------------------------------------

MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 32,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def tiny_llama(rng, base=None):
    h, i, v = 16, 32, 32
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    if base is None:
        return {n: rng.standard_normal(s).astype(F32) for n, s in shapes.items()}
    return {n: (base[n] + 0.2 * rng.standard_normal(s)).astype(F32) for n, s in shapes.items()}


MERGEKIT_CASES = {
    "linear": (
        {"merge_method": "linear", "models": [{"model": "ft1", "parameters": {"weight": 0.3}}, {"model": "ft2", "parameters": {"weight": 0.7}}]},
        {"method": "linear", "models": {"ft1": {"weight": 0.3}, "ft2": {"weight": 0.7}}},
    ),
    "task_arithmetic": (
        {"merge_method": "task_arithmetic", "base_model": "base",
         "models": [{"model": "ft1", "parameters": {"weight": 0.6}}, {"model": "ft2", "parameters": {"weight": 0.5}}]},
        {"method": "task_arithmetic", "base": "base", "models": {"ft1": {"weight": 0.6}, "ft2": {"weight": 0.5}}},
    ),
    "ties": (
        {"merge_method": "ties", "base_model": "base",
         "models": [{"model": "ft1", "parameters": {"weight": 0.6, "density": 0.5}}, {"model": "ft2", "parameters": {"weight": 0.5, "density": 0.3}}]},
        {"method": "ties", "base": "base", "models": {"ft1": {"weight": 0.6, "density": 0.5}, "ft2": {"weight": 0.5, "density": 0.3}}},
    ),
    "slerp": (
        {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "ft1"}], "parameters": {"t": 0.3}},
        {"method": "slerp", "base": "base", "models": ["ft1"], "t": 0.3},
    ),
}


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not installed (set MERGEKIT_YAML or put it on PATH)")
@pytest.mark.parametrize("method", list(MERGEKIT_CASES))
def test_equals_mergekit(tmp_path, method):
    """Our merge of a tiny Llama equals MergeKit 0.1.5's (both computing in f32, written as
    bfloat16) within one bfloat16 step."""
    rng = np.random.default_rng(5)
    base = tiny_llama(rng)
    dirs = {}
    for alias, tensors in (("base", base), ("ft1", tiny_llama(rng, base)), ("ft2", tiny_llama(rng, base))):
        d = tmp_path / alias
        write_st(d / "model.safetensors", tensors)
        (d / "config.json").write_text(json.dumps(LLAMA_CONFIG))
        dirs[alias] = d
    theirs, ours = MERGEKIT_CASES[method]

    def path_of(value):
        return str(dirs[value]) if isinstance(value, str) and value in dirs else value

    config = dict(theirs, dtype="float32", out_dtype="bfloat16")
    if "base_model" in config:
        config["base_model"] = path_of(config["base_model"])
    config["models"] = [dict(m, model=path_of(m["model"])) for m in config["models"]]
    (tmp_path / "mk.yml").write_text(json.dumps(config))
    proc = subprocess.run([MERGEKIT, str(tmp_path / "mk.yml"), str(tmp_path / "mk-out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mk_files = sorted((tmp_path / "mk-out").glob("*.safetensors"))
    mk: dict[str, np.ndarray] = {}
    for f in mk_files:
        mk.update(read(f))
    got = run({a: d / "model.safetensors" for a, d in dirs.items()}, dict(ours, to="merged", dtype="bfloat16"), tmp_path)
    assert set(got) == set(mk)
    for name in got:
        a, b = got[name].astype(np.float64), mk[name].astype(np.float64)
        np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-6, err_msg=name)


def test_review_fixes_filter_star_zero_tensors_and_degenerate_cases(tmp_path):
    # MergeKit's `filter: "*"` matches every name; a tensor every model leaves at zero merges to
    # zero under multislerp; model_stock of opposite deltas and karcher with tol 0 are refused
    # rather than written as NaN; multislerp weights summing to zero cannot be normalized.
    base = np.ones((4, 3), F32)
    d = np.arange(12, dtype=F32).reshape(4, 3) / 10
    paths = {}
    for alias, w in {"base": base, "ft1": base + d, "ft2": base - d}.items():
        paths[alias] = tmp_path / f"{alias}.safetensors"
        save_file({"w": w, "zero": np.zeros(3, F32)}, str(paths[alias]))
    got = run(paths, {"method": "linear", "models": {"ft1": {"weight": [{"filter": "*", "value": 0.5}]}, "ft2": {"weight": 0.5}}, "to": "merged"}, tmp_path)
    np.testing.assert_allclose(got["w"], base, atol=1e-6)
    got = run(paths, {"method": "multislerp", "models": ["ft1", "ft2"], "weight": 0.5, "to": "merged"}, tmp_path)
    np.testing.assert_array_equal(got["zero"], np.zeros(3, F32))
    inputs = [f"{a}::{p}" for a, p in paths.items()]
    with pytest.raises(bs.TransformError, match=r"model_stock of `merged::w`.*opposite"):
        bs.run({"inputs": inputs, "transforms": [{"merge": {"method": "model_stock", "base": "base", "models": ["ft1", "ft2"], "to": "merged"}}],
                "output": {"path": str(tmp_path / "ms.safetensors"), "alias": "merged"}}, quiet=True)
    with pytest.raises(bs.PlanError, match=r"tol.*> 0"):
        bs.check({"inputs": inputs, "transforms": [{"merge": {"method": "karcher", "models": ["ft1", "ft2"], "tol": 0, "to": "merged"}}]})
    with pytest.raises(bs.PlanError, match=r"sum to 0"):
        bs.check({"inputs": inputs, "transforms": [{"merge": {"method": "multislerp", "models": {"ft1": {"weight": 1}, "ft2": {"weight": -1}}, "to": "merged"}}]})
