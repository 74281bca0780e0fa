"""Every plan in examples/ runs on the tiny GPT-2 it was written for, and does what it says —
checked against NumPy computed here from the same seeded weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_tiny_gpt2 import save_safetensors, tiny_gpt2  # noqa: E402


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory laid out like the repository: examples/tiny-gpt2 and the plans."""
    save_safetensors(tmp_path / "examples" / "tiny-gpt2" / "model.safetensors", tiny_gpt2(), {"format": "pt"})
    (tmp_path / "examples" / "tiny-gpt2" / "config.json").write_text("{}\n")
    for plan in (ROOT / "examples").glob("*.yaml"):
        shutil.copy(plan, tmp_path / "examples" / plan.name)
    return tmp_path


def run_example(workdir: Path, name: str) -> str:
    result = subprocess.run(
        ["brainsurgery", f"examples/{name}.yaml", "--no-progress"], cwd=workdir, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def load(path: Path) -> dict[str, np.ndarray]:
    ck = bs.open(path)
    return {name: np.array(ck[name]) for name in ck}


def test_every_example_is_tested() -> None:
    tested = {"demo", "upcycle_moe", "prefix_rewrite", "bulk_scale", "tour", "ties_merge"}
    assert {p.stem for p in (ROOT / "examples").glob("*.yaml")} <= tested


def test_upcycle_moe(workdir: Path) -> None:
    run_example(workdir, "upcycle_moe")
    out = load(workdir / "out" / "tiny-gpt2-moe")
    dense = tiny_gpt2()
    for layer in range(2):
        for expert in range(4):
            for part in ("c_fc", "c_proj"):
                for kind in ("weight", "bias"):
                    np.testing.assert_array_equal(
                        out[f"h.{layer}.mlp.experts.{expert}.{part}.{kind}"], dense[f"h.{layer}.mlp.{part}.{kind}"]
                    )
        assert f"h.{layer}.mlp.c_fc.weight" not in out
        np.testing.assert_array_equal(out[f"h.{layer}.mlp.router.weight"], np.zeros((4, 64), np.float32))
    assert (workdir / "out" / "tiny-gpt2-moe" / "config.json").exists()


def test_prefix_rewrite(workdir: Path) -> None:
    run_example(workdir, "prefix_rewrite")
    out = load(workdir / "out" / "tiny-gpt2-renamed.safetensors")
    expected = {}
    for name, value in tiny_gpt2().items():
        parts = name.split(".")
        new = "model.layers." + ".".join(parts[1:]) if parts[0] == "h" else "transformer." + name
        expected[new] = value
    assert set(out) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(out[name], value)


def test_bulk_scale(workdir: Path) -> None:
    stdout = run_example(workdir, "bulk_scale")
    out = load(workdir / "out" / "tiny-gpt2-scaled")
    expected = {}
    for name, value in tiny_gpt2().items():
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            value = value * np.float32(0.5)
        if name.endswith("mlp.c_fc.weight"):
            value = np.clip(value, np.float32(-0.05), np.float32(0.05))
        if name == "h.0.attn.c_proj.weight":
            value = value.copy()
            value[:8] = value[:8] * np.float32(2.0)
        if value.dtype == np.float32:
            value = value.astype(ml_dtypes.bfloat16)
        expected[name] = value
    assert list(out) == list(expected)  # input order kept
    for name, value in expected.items():
        assert out[name].dtype == value.dtype, name
        np.testing.assert_array_equal(out[name].view(np.uint8), value.view(np.uint8), err_msg=name)
    assert "h.0.attn.c_attn.weight" in stdout  # the dump printed


def test_tour(workdir: Path) -> None:
    stdout = run_example(workdir, "tour")
    original = tiny_gpt2()
    out = load(workdir / "out" / "tiny-gpt2-tour")
    assert set(out) == set(original)
    for name, value in original.items():
        assert out[name].dtype == value.dtype, name
        np.testing.assert_array_equal(out[name], value, err_msg=name)
    np.testing.assert_array_equal(load(workdir / "out" / "tour-wte.safetensors")["wte.weight"], original["wte.weight"])
    assert "split:" in stdout and "sizes" in stdout  # help
    assert "h.0.attn.c_attn.weight" in stdout  # dump
    assert "no differences" in stdout  # diff


def test_ties_merge(workdir: Path) -> None:
    """TIES from MergeKit's formula, in NumPy: where only one fine-tune changed a tensor, the
    result is the base plus that delta's largest half (|δ| ranked with ties by index); the
    others are the base's."""
    run_example(workdir, "ties_merge")
    out = load(workdir / "out" / "tiny-gpt2-ties")
    base = tiny_gpt2()
    changed = {}
    for name, b in base.items():
        if ".attn.c_attn.weight" in name:
            changed[name] = (b.astype(np.float32) * np.float32(1.1)).astype(np.float32)
        elif ".mlp.c_fc.weight" in name:
            changed[name] = (b.astype(np.float32) * np.float32(0.9)).astype(np.float32)
    assert changed
    for name, b in base.items():
        if name not in changed:
            np.testing.assert_array_equal(out[name], b, err_msg=name)
            continue
        delta = (changed[name] - b).astype(np.float32).ravel()
        keep = np.zeros(delta.size, bool)
        # A stable sort of -|δ|: the largest first, equal ones in index order.
        keep[np.argsort(-np.abs(delta.astype(np.float64)), kind="stable")[: delta.size // 2]] = True
        expected = (b.ravel().astype(np.float64) + np.where(keep, delta, 0)).astype(np.float32).reshape(b.shape)
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)
        assert not np.array_equal(out[name], b)
