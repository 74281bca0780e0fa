"""phlora / phlora_ (src/transforms/lowrank.rs, src/linalg.rs) against ``numpy.linalg.svd``.

Singular vectors are unique only up to sign (and within repeated singular values), so factors are
compared through what is unique: ``B @ A`` against NumPy's best rank-r approximation, the
singular values through ``A @ A.T`` (``= S_r`` when V is orthonormal), and the reported rank,
energy and relative error against NumPy's spectrum.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import read
from helpers import cli


def _run(path, transforms, out, **kwargs):
    return bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)}, **kwargs)


def _best(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _decaying(m: int, n: int, seed: int = 0, decay: float = 0.9) -> np.ndarray:
    """An m × n float32 matrix with singular values decay**i and random singular vectors."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * decay ** np.arange(k)) @ v.T).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_phlora_factors_reconstruct_the_best_rank_r_approximation(write, tmp_path, dtype):
    w = np.random.default_rng(0).standard_normal((40, 24)).astype(dtype)
    out = tmp_path / "out.safetensors"
    report = _run(write({"w": w, "other": np.ones(3, np.float32)}), [{"phlora": {"target": "w", "target_a": "w_a", "target_b": "w_b", "rank": 5}}], out)
    got = read(out)
    assert "w" not in got  # delete_original defaults to true, as in the 0.2 tool
    a, b = got["w_a"], got["w_b"]
    assert a.shape == (5, 24) and b.shape == (40, 5) and a.dtype == dtype and b.dtype == dtype
    tol = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(b.astype(np.float64) @ a, _best(w, 5), atol=tol * np.abs(w).max() * 10)
    # A = sqrt(S) Vᵀ and B = U sqrt(S): A Aᵀ = BᵀB = S_r.
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)[:5]
    np.testing.assert_allclose(np.diag(a.astype(np.float64) @ a.T), s, rtol=tol * 10)
    np.testing.assert_allclose(np.diag(b.T.astype(np.float64) @ b), s, rtol=tol * 10)
    (f,) = report["factorizations"]
    assert (f["op"], f["tensor"], f["shape"], f["rank"], f["method"]) == ("phlora", "model::w", (40, 24), 5, "exact")
    full = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert f["energy"] == pytest.approx((full[:5] ** 2).sum() / (full**2).sum(), rel=1e-5)
    assert f["relative_error"] == pytest.approx(np.linalg.norm(w - _best(w, 5)) / np.linalg.norm(w), rel=1e-4)


def test_phlora_templates_keep_original_and_half_precision(write, tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"l.{i}.w": rng.standard_normal((16, 12)).astype(ml_dtypes.bfloat16) for i in range(2)}
    out = tmp_path / "out.safetensors"
    _run(
        write(tensors),
        [{"phlora": {"target": r"l\.(\d+)\.w", "target_a": r"l.\1.a", "target_b": r"l.\1.b", "rank": 4, "delete_original": False}}],
        out,
    )
    got = bs.open(out)
    for i in range(2):
        w = np.asarray(tensors[f"l.{i}.w"]).astype(np.float32)
        assert np.asarray(got[f"l.{i}.w"]).astype(np.float32).tolist() == w.tolist()
        a = np.asarray(got[f"l.{i}.a"]).astype(np.float32)
        b = np.asarray(got[f"l.{i}.b"]).astype(np.float32)
        assert got[f"l.{i}.a"].dtype == ml_dtypes.bfloat16
        np.testing.assert_allclose(b @ a, _best(w, 4), atol=0.05 * np.abs(w).max())


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_phlora_in_place_replaces_by_the_truncation(write, tmp_path, dtype):
    w = _decaying(64, 48, seed=2).astype(dtype)
    out = tmp_path / "out.safetensors"
    _run(write({"w": w}), [{"phlora_": {"target": "w", "rank": 7}}], out)
    got = np.asarray(bs.open(out)["w"]).astype(np.float64)
    expected = _best(np.asarray(w).astype(np.float32), 7)
    # One rounding to the dtype from the f32 product.
    eps = 1e-5 if dtype == np.float32 else 8e-3
    np.testing.assert_allclose(got, expected, atol=eps * np.abs(expected).max() + 1e-7)


def test_energy_and_threshold_choose_the_rank_numpy_would(write, tmp_path):
    w = _decaying(50, 30, seed=3, decay=0.8)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    share = np.cumsum(s**2) / (s**2).sum()
    path = write({"w": w})
    for key, value, want in [
        ("energy", 0.95, int(np.searchsorted(share, 0.95) + 1)),
        ("energy", 0.5, int(np.searchsorted(share, 0.5) + 1)),
        ("threshold", 0.1, int((s >= 0.1).sum())),
    ]:
        out = tmp_path / f"{key}{value}.safetensors"
        report = _run(path, [{"phlora": {"target": "w", "target_a": "a", "target_b": "b", key: value}}], out)
        (f,) = report["factorizations"]
        assert f["rank"] == want, (key, value)
        assert read(out)["a"].shape == (want, 30)
        assert f["energy"] == pytest.approx(share[want - 1], rel=1e-5)
    # max_rank caps the energy rule.
    report = _run(path, [{"phlora": {"target": "w", "target_a": "a", "target_b": "b", "energy": 0.999, "max_rank": 3}}], tmp_path / "cap.safetensors")
    assert report["factorizations"][0]["rank"] == 3


def test_randomized_is_within_one_percent_of_exact(write, tmp_path):
    w = _decaying(1024, 4096, seed=4, decay=0.97)
    path = write({"w": w})
    errors = {}
    for method in ["exact", "randomized"]:
        report = _run(path, [{"phlora_": {"target": "w", "rank": 64, "method": method}}], tmp_path / f"{method}.safetensors")
        (f,) = report["factorizations"]
        assert f["method"] == method
        errors[method] = f["relative_error"]
        got = read(tmp_path / f"{method}.safetensors")["w"].astype(np.float64)
        measured = np.linalg.norm(w - got) / np.linalg.norm(w)
        assert measured == pytest.approx(f["relative_error"], rel=1e-3)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert errors["exact"] == pytest.approx(np.sqrt((s[64:] ** 2).sum() / (s**2).sum()), rel=1e-4)
    assert errors["randomized"] <= 1.01 * errors["exact"]
    # auto picks randomized here (rank 64 is small against 1024).
    report = _run(path, [{"phlora_": {"target": "w", "rank": 64}}], tmp_path / "auto.safetensors")
    assert report["factorizations"][0]["method"] == "randomized"


def test_output_is_identical_for_any_thread_count(write, tmp_path):
    w = _decaying(600, 520, seed=5)
    path = write({"w": w, "v": _decaying(300, 700, seed=6)})
    plan = [{"phlora": {"target": "(w|v)", "target_a": r"\1.a", "target_b": r"\1.b", "rank": 20, "method": "randomized"}}]
    outs = []
    for threads in [1, 2, 3]:
        out = tmp_path / f"t{threads}.safetensors"
        _run(path, plan, out, threads=threads)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_matches_factored_at_once_keep_order_and_report_the_first_failure(write, tmp_path):
    # Several matches are factored one per thread: the factors, the report's order and which bad
    # matrix the error names must be those of one thread.
    ws = {f"m{i}": _decaying(120 + 10 * i, 90, seed=i) for i in range(5)}
    path = write(ws)
    for method in ["exact", "randomized"]:
        plan = [{"phlora": {"target": r"m(\d)", "target_a": r"a\1", "target_b": r"b\1", "rank": 6, "method": method}}]
        reports, outs = [], []
        for threads in [1, 2, 3]:
            out = tmp_path / f"{method}{threads}.safetensors"
            reports.append(_run(path, plan, out, threads=threads, quiet=True)["factorizations"])
            outs.append(out.read_bytes())
        assert outs[0] == outs[1] == outs[2], method
        assert reports[0] == reports[1] == reports[2], method
        assert [f["tensor"].split("::")[-1] for f in reports[0]] == list(ws)
    ws["m2"][3, 3] = np.nan
    ws["m4"][0, 0] = np.inf
    bad = write(ws, name="bad.safetensors")
    plan = [{"phlora": {"target": r"m(\d)", "target_a": r"a\1", "target_b": r"b\1", "rank": 6}}]
    for threads in [1, 2, 3]:
        with pytest.raises(bs.TransformError, match="m2") as e:
            _run(bad, plan, tmp_path / f"bad{threads}.safetensors", threads=threads, quiet=True)
        assert "m4" not in str(e.value)


def test_check_reports_factor_shapes_without_reading(write, tmp_path):
    path = write({"w": np.zeros((10, 6), np.float32)})
    plan = {"inputs": [str(path)], "transforms": [{"phlora": {"target": "w", "target_a": "a", "target_b": "b", "rank": 4}}]}
    report = bs.check({**plan, "output": str(tmp_path / "out.safetensors")})
    shapes = {t["name"]: t["shape"] for t in report["tensors"]}
    assert shapes == {"a": (4, 6), "b": (10, 4)}
    assert report["factorizations"] == []


def test_rank_above_the_matrix_is_clamped_with_a_notice(write, tmp_path):
    # The 0.2 tool clamps to min(m, n); its plans rely on that.
    w = np.random.default_rng(7).standard_normal((5, 8)).astype(np.float32)
    out = tmp_path / "out.safetensors"
    report = _run(write({"w": w}), [{"phlora_": {"target": "w", "rank": 64}}], out)
    assert any("rank 64" in n and "using 5" in n for n in report["notices"])
    np.testing.assert_allclose(read(out)["w"], w, atol=1e-5)


@pytest.mark.parametrize(
    ("payload", "error", "text"),
    [
        ({"target": "w", "rank": 0}, bs.PlanError, "at least 1"),
        ({"target": "w"}, bs.PlanError, "one of rank, energy and threshold"),
        ({"target": "w", "rank": 2, "energy": 0.9}, bs.PlanError, "not rank and energy"),
        ({"target": "w", "energy": 1.5}, bs.PlanError, "at most 1"),
        ({"target": "w", "energy": 0.9, "method": "randomized"}, bs.PlanError, "max_rank"),
        ({"target": "w", "rank": 2, "method": "fast"}, bs.PlanError, "unknown method"),
        ({"target": "v", "rank": 2}, bs.TransformError, "2-D"),
        ({"target": "i", "rank": 1}, bs.TransformError, "floating-point"),
        ({"target": "bad", "rank": 1}, bs.TransformError, "non-finite"),
    ],
)
def test_bad_input_is_a_clear_error(write, tmp_path, payload, error, text):
    bad = np.ones((3, 3), np.float32)
    bad[1, 2] = np.nan
    path = write({"w": np.ones((4, 4), np.float32), "v": np.ones((2, 2, 2), np.float32), "i": np.ones((2, 2), np.int32), "bad": bad})
    out = tmp_path / "out.safetensors"
    with pytest.raises(error) as e:
        _run(path, [{"phlora_": payload}], out)
    assert text in str(e.value)
    if error is bs.TransformError and payload["target"] == "bad":
        assert "model::bad" in str(e.value) and "row 1, column 2" in str(e.value)
    assert not out.exists()


def test_cli_prints_what_the_factorization_lost(write, tmp_path):
    path = write({"w": _decaying(30, 20, seed=8)})
    out = tmp_path / "out.safetensors"
    result = cli([path, "-e", "phlora_: {target: w, rank: 4}", "-o", out], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "factorized 1 tensor: rank 4, energy kept" in result.stdout and "relative error" in result.stdout


def test_check_estimates_the_factorization_workspace(write, tmp_path):
    # The exact SVD of a 1000 × 800 f32 matrix holds the matrix, a working copy and the vectors.
    path = write({"w": np.zeros((1000, 800), ml_dtypes.bfloat16)})
    plan = {"inputs": [str(path)], "transforms": [{"phlora_": {"target": "w", "rank": 700}}], "output": str(tmp_path / "o.safetensors")}
    report = bs.check(plan)
    assert report["peak_memory_estimate"] >= 2 * 1000 * 800 * 4 + (1000 + 800) * 800 * 4
    # The kept factors (f32, rank 700) count as computed in memory.
    assert report["materialized_bytes"] == (1000 + 800) * 700 * 4
