"""matmul (src/transforms/matmul.rs) against NumPy ``a @ b``: computed in float32 (float64 for F64)
and rounded back, so half-precision results are compared with a tolerance."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from conftest import read


def _run(path, transforms, out):
    return bs.run({"inputs": [str(path)], "transforms": transforms, "output": str(out)})


@pytest.mark.parametrize(("dtype", "rtol"), [(np.float64, 1e-12), (np.float32, 1e-5), (np.float16, 2e-3), (ml_dtypes.bfloat16, 1.6e-2)])
def test_matmul_matches_numpy(write, tmp_path, dtype, rtol):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 50)).astype(dtype)
    b = rng.standard_normal((50, 23)).astype(dtype)
    out = tmp_path / "out.safetensors"
    _run(write({"a": a, "b": b}), [{"matmul": {"from_a": "a", "from_b": "b", "to": "c"}}], out)
    got = read(out)["c"]
    assert got.dtype == np.dtype(dtype) and got.shape == (37, 23)
    wide = np.float64 if dtype == np.float64 else np.float32
    expected = a.astype(wide) @ b.astype(wide)
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    assert np.all(np.abs(got.astype(np.float64) - expected) <= rtol * scale + 1e-30)


def test_matmul_batched_and_templates(write, tmp_path):
    rng = np.random.default_rng(1)
    tensors = {}
    for i in range(2):
        tensors[f"l.{i}.x"] = rng.standard_normal((3, 4, 5)).astype(np.float32)
        tensors[f"l.{i}.y"] = rng.standard_normal((3, 5, 2)).astype(np.float32)
    out = tmp_path / "out.safetensors"
    _run(write(tensors), [{"matmul": {"from_a": r"l\.(\d+)\.x", "from_b": r"l.\1.y", "to": r"l.\1.xy"}}], out)
    got = read(out)
    for i in range(2):
        np.testing.assert_allclose(got[f"l.{i}.xy"], tensors[f"l.{i}.x"] @ tensors[f"l.{i}.y"], rtol=1e-5, atol=1e-5)


def test_matmul_sliced_operands_and_large(write, tmp_path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 260)).astype(np.float32)
    b = rng.standard_normal((200, 400)).astype(np.float32)
    out = tmp_path / "out.safetensors"
    _run(write({"a": a, "b": b}), [{"matmul": {"from_a": "a::[:, 10:210]", "from_b": "b::[:, ::-1]", "to": "c"}}], out)
    np.testing.assert_allclose(read(out)["c"], a[:, 10:210] @ b[:, ::-1], rtol=1e-4, atol=1e-4)


def test_matmul_inner_dimension_mismatch(write, tmp_path):
    path = write({"a": np.zeros((4, 6), np.float32), "b": np.zeros((5, 2), np.float32)})
    with pytest.raises(bs.TransformError) as e:
        _run(path, [{"matmul": {"from_a": "a", "from_b": "b", "to": "c"}}], tmp_path / "out.safetensors")
    text = str(e.value)
    assert "transforms[0]" in text and "matmul" in text and "`model::a` (4, 6)" in text and "`model::b` (5, 2)" in text
    assert "inner dimensions differ (6 and 5)" in text
    assert not (tmp_path / "out.safetensors").exists()


def test_matmul_refusals(write, tmp_path):
    path = write({"a": np.zeros((4, 6), np.float32), "h": np.zeros((6, 2), np.float16), "i": np.zeros((4, 6), np.int32), "v": np.zeros(6, np.float32), "bb": np.zeros((2, 4, 6), np.float32), "w": np.zeros((6, 2), np.float32)})
    out = tmp_path / "out.safetensors"
    with pytest.raises(bs.TransformError, match="dtype mismatch"):
        _run(path, [{"matmul": {"from_a": "a", "from_b": "h", "to": "c"}}], out)
    with pytest.raises(bs.TransformError, match="floating-point"):
        _run(path, [{"matmul": {"from_a": "i", "from_b": "h", "to": "c"}}], out)
    with pytest.raises(bs.TransformError, match="at least 2 dimensions"):
        _run(path, [{"matmul": {"from_a": "a", "from_b": "v", "to": "c"}}], out)
    with pytest.raises(bs.TransformError, match="broadcast"):
        _run(path, [{"matmul": {"from_a": "bb", "from_b": "a", "to": "c"}}], out)
    with pytest.raises(bs.TransformError, match=r"`model::nope` \(rewritten from `model::a`\) does not exist"):
        _run(path, [{"matmul": {"from_a": "a", "from_b": "nope", "to": "c"}}], out)
    with pytest.raises(bs.TransformError, match="already exists"):
        _run(path, [{"matmul": {"from_a": "a", "from_b": "w", "to": "i"}}], out)


def test_check_counts_the_product_held_in_memory(write, tmp_path):
    path = write({"a": np.ones((512, 256), np.float32), "b": np.ones((256, 1024), np.float32)})
    report = bs.check({"inputs": [str(path)], "transforms": [{"matmul": {"from_a": "a", "from_b": "b", "to": "c"}}], "output": str(tmp_path / "o.safetensors")})
    # Both operands and the product as f32, and the product's bytes kept for the writer.
    want = (512 * 256 + 256 * 1024 + 512 * 1024) * 4 + 512 * 1024 * 4
    assert report["materialized_bytes"] == want
    assert report["peak_memory_estimate"] > want


def _overcommit_refuses_the_impossible() -> bool:
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() in ("0", "2")
    except OSError:
        return False


@pytest.mark.skipif(not _overcommit_refuses_the_impossible(), reason="the kernel would grant 4 TiB and the test would exhaust memory")
def test_a_product_too_large_for_memory_is_an_error_and_leaves_nothing(write, tmp_path):
    # A 2^20 × 2^20 float32 product is 4 TiB: a clean error.
    path = write({"w": np.ones(2, np.float32)})
    out = tmp_path / "out"
    plan = {
        "inputs": [str(path)],
        "transforms": [
            {"zeroes": {"target": "p", "shape": [2**20, 1]}},
            {"zeroes": {"target": "q", "shape": [1, 2**20]}},
            {"matmul": {"from_a": "p", "from_b": "q", "to": "z"}},
        ],
        "output": str(out),
    }
    # Past the free-space check (a 4 TiB output fits few disks): beyond the memory budget the
    # product goes to the scratch arena, whose disk cannot hold it either.
    with pytest.raises(bs.TransformError, match="could not be allocated|scratch arena in .*No space left"):
        bs.run(plan, space_check=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_check_counts_a_product_added_into_another_tensor(write, tmp_path):
    # Issue 9: the product read as add_'s operand was left out of the estimate.
    path = write({"a": np.ones((512, 256), np.float32), "b": np.ones((256, 1024), np.float32), "w": np.ones((512, 1024), np.float32)})
    transforms = [{"matmul": {"from_a": "a", "from_b": "b", "to": "c"}}, {"add_": {"from": "c", "to": "w"}}, {"delete": {"target": "c"}}]
    report = bs.check({"inputs": [str(path)], "transforms": transforms, "output": str(tmp_path / "o.safetensors")})
    assert report["materialized_bytes"] == (512 * 256 + 256 * 1024 + 512 * 1024) * 4 + 512 * 1024 * 4
