"""The memory contract (issue 12): a budget for tensors computed whole, the scratch arena beyond
it, and what `check` says before a byte is read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import brainsurgery as bs

MiB = 1 << 20


@pytest.fixture
def operands(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 1024), dtype=np.float32)  # 2 MiB
    b = rng.standard_normal((1024, 2048), dtype=np.float32)  # 8 MiB; the product 4 MiB
    cube = rng.standard_normal((32, 64, 512), dtype=np.float32)  # 4 MiB
    path = tmp_path / "m.safetensors"
    save_file({"a": a, "b": b, "cube": cube}, str(path))
    return path, a, b, cube


def plan(model: Path, out: Path) -> dict:
    return {
        "inputs": [str(model)],
        "transforms": [
            {"matmul": {"from_a": "a", "from_b": "b", "to": "ab"}},
            # Reversing three dimensions cannot stream: the whole source is copied first.
            {"permute": {"from": "cube", "to": "cube_t", "order": [2, 1, 0]}},
        ],
        "output": str(out),
    }


def test_work_above_the_budget_goes_to_the_arena_and_equals_numpy(operands, tmp_path: Path) -> None:
    model, a, b, cube = operands
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out.safetensors"
    # One writing thread holds 3 MiB; a 4 MiB budget leaves no room for the 8 MiB operand, the
    # 4 MiB product or the 4 MiB copy of the cube.
    checked = bs.check(plan(model, out), threads=1, max_memory="4MiB", scratch_dir=scratch)
    assert checked["memory_budget"] == 4 * MiB
    assert checked["arena_bytes"] > 0
    # The budget, plus what the spilled product maps in at a time: a panel of `a` and of the
    # product (8 MiB) and `b` (8 MiB, not packed).
    assert 4 * MiB < checked["peak_memory_estimate"] <= 4 * MiB + 16 * MiB
    result = bs.run(plan(model, out), threads=1, max_memory=4 * MiB, scratch_dir=scratch, quiet=True)
    assert result.arena_bytes >= 4 * MiB and result.memory_budget == 4 * MiB
    assert "in the scratch arena" in repr(result)
    got = load_file(str(out))
    np.testing.assert_allclose(got["ab"], a @ b, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(got["cube_t"], cube.transpose(2, 1, 0))
    # The arena's file never had a name in the scratch directory.
    assert list(scratch.iterdir()) == []
    # The same with an ample budget: nothing in the arena, the same bytes.
    ample = tmp_path / "ample.safetensors"
    roomy = bs.run(plan(model, ample), threads=1, max_memory="1GiB", scratch_dir=scratch, quiet=True)
    assert roomy["arena_bytes"] == 0
    assert ample.read_bytes() == out.read_bytes()


def test_a_budget_below_the_writing_buffers_is_refused_before_any_work(operands, tmp_path: Path) -> None:
    model, *_ = operands
    out = tmp_path / "out.safetensors"
    with pytest.raises(bs.PlanError, match=r"writing with 2 threads needs \d+ bytes of memory at once, more than the budget of 1048576 bytes"):
        bs.run(plan(model, out), threads=2, max_memory="1MiB", quiet=True)
    assert not out.exists()
    cli = subprocess.run(
        [sys.executable, "-m", "brainsurgery", "check", "--max-memory", "1MiB", "--threads", "2", str(model)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2, cli.stderr
    assert "more than the budget" in cli.stderr


def test_a_factorization_whose_workspace_exceeds_the_budget_names_the_tensor(tmp_path: Path) -> None:
    w = np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32)
    model = tmp_path / "w.safetensors"
    save_file({"w": w}, str(model))
    p = {"inputs": [str(model)], "transforms": [{"phlora_": {"target": "w", "rank": 8}}], "output": str(tmp_path / "o.safetensors")}
    with pytest.raises(bs.PlanError, match=r"factorizing `.*w` needs \d+ bytes"):
        bs.check(p, threads=1, max_memory="3MiB")


@pytest.mark.parametrize("bad", ["lots", -1, 1.5])
def test_max_memory_must_be_a_size(operands, tmp_path: Path, bad: object) -> None:
    model, *_ = operands
    with pytest.raises((bs.PlanError, TypeError)):
        bs.check({"inputs": [str(model)]}, max_memory=bad)  # type: ignore[arg-type]


def test_a_missing_scratch_directory_is_a_clear_error_and_nothing_is_written(operands, tmp_path: Path) -> None:
    model, *_ = operands
    out = tmp_path / "out.safetensors"
    with pytest.raises(bs.TransformError, match="scratch arena in .*nowhere"):
        bs.run(plan(model, out), threads=1, max_memory="4MiB", scratch_dir=tmp_path / "nowhere", quiet=True)
    assert not out.exists()


def test_sessions_and_lazy_results_compute_within_their_budget(operands, tmp_path: Path) -> None:
    model, a, b, _ = operands
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    s = bs.Session({"m": model}, max_memory="4MiB", scratch_dir=scratch, threads=1)
    s.apply({"matmul": {"from_a": "m::a", "from_b": "m::b", "to": "m::ab"}})
    np.testing.assert_allclose(np.asarray(s["m::ab"]), a @ b, rtol=1e-4, atol=1e-3)
    assert list(scratch.iterdir()) == []
    # The session's scratch directory is the one used: the 8 MiB operand spills there, and a
    # directory that does not exist is the error.
    missing = bs.Session({"m": model}, max_memory="4MiB", scratch_dir=tmp_path / "nowhere", threads=1)
    missing.apply({"matmul": {"from_a": "m::a", "from_b": "m::b", "to": "m::ab"}})
    with pytest.raises(bs.TransformError, match="scratch arena in .*nowhere"):
        missing["m::ab"]
    # Likewise the lazy result of a run without output.
    lazy = bs.run(
        {"inputs": [str(model)], "transforms": [{"matmul": {"from_a": "a", "from_b": "b", "to": "ab"}}]},
        threads=1,
        max_memory="4MiB",
        scratch_dir=tmp_path / "nowhere",
        quiet=True,
    )
    assert lazy.tensors is not None
    with pytest.raises(bs.TransformError, match="scratch arena in .*nowhere"):
        lazy.tensors["ab"]


def arena_mappings(scratch: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from (unnamed) files in `scratch`."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(scratch)):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="mappings read from /proc")
def test_tensors_read_from_a_session_count_against_its_budget(operands, tmp_path: Path) -> None:
    # An 8 MiB tensor read back under a 4 MiB budget: the array Python gets is a copy in the
    # session's arena (a view of its mapping), not memory outside the budget; one within the
    # budget is in memory.
    model, _, b, _ = operands
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    s = bs.Session({"m": model}, max_memory="4MiB", scratch_dir=scratch, threads=1)
    s.apply({"scale": {"from": "m::b", "to": "m::b2", "by": 2.0}})
    doubled = np.asarray(s["m::b2"])
    np.testing.assert_array_equal(doubled, b * 2)
    address = doubled.__array_interface__["data"][0]
    assert any(start <= address < end for start, end in arena_mappings(scratch))
    assert not doubled.flags.writeable
    roomy = bs.Session({"m": model}, max_memory="1GiB", scratch_dir=scratch, threads=1)
    roomy.apply({"scale": {"from": "m::b", "to": "m::b2", "by": 2.0}})
    in_memory = np.asarray(roomy["m::b2"])
    np.testing.assert_array_equal(in_memory, b * 2)
    address = in_memory.__array_interface__["data"][0]
    assert not any(start <= address < end for start, end in arena_mappings(scratch))
    # Nothing is left in the directory once the arrays are gone.
    del doubled, in_memory, s, roomy
    assert list(scratch.iterdir()) == []


def test_results_outside_the_output_are_released_before_the_write(operands, tmp_path: Path) -> None:
    # A product in another alias, read by an assertion, is not kept through the write: the
    # product the output needs (its 14 MiB of operands and result) then fits the 15 MiB the
    # budget leaves beside the writing buffers (with the first kept, 4 MiB of it spilled).
    model, a, b, _ = operands
    p = {
        "inputs": [f"m::{model}"],
        "transforms": [
            {"matmul": {"from_a": "m::a", "from_b": "m::b", "to": "tmp::ab"}},
            {"assert": {"finite": {"of": "tmp::ab"}}},
            {"matmul": {"from_a": "m::a", "from_b": "m::b", "to": "m::ab"}},
            {"delete": {"target": "m::a"}},
            {"delete": {"target": "m::b"}},
        ],
        "output": {"path": str(tmp_path / "out.safetensors"), "alias": "m"},
    }
    result = bs.run(p, threads=1, max_memory="18MiB", quiet=True)
    assert result.arena_bytes == 0
    np.testing.assert_allclose(load_file(str(tmp_path / "out.safetensors"))["ab"], a @ b, rtol=1e-4, atol=1e-3)


def test_check_judges_the_threads_a_run_would_use(operands, tmp_path: Path) -> None:
    model, *_ = operands
    p = {"inputs": [str(model)], "output": str(tmp_path / "o.safetensors")}
    assert bs.check(p, threads=1, max_memory="4MiB")["peak_memory_estimate"] <= 4 * MiB
    with pytest.raises(bs.PlanError, match="writing with 2 threads"):
        bs.check(p, threads=2, max_memory="4MiB")
    with pytest.raises(bs.PlanError, match="writing with 2 threads"):
        bs.Session({"m": model}, threads=2, max_memory="4MiB")


def test_sigint_during_a_spilled_run_leaves_no_output_and_no_scratch(tmp_path: Path) -> None:
    # Large enough that the run is still computing when the signal arrives.
    model = tmp_path / "big.safetensors"
    save_file({"x": np.ones((64, 256, 1024), dtype=np.float32)}, str(model))  # 64 MiB
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out.safetensors"
    script = textwrap.dedent(
        f"""
        import brainsurgery as bs
        print("ready", flush=True)
        bs.run({{"inputs": [{str(model)!r}],
                 "transforms": [{{"permute": {{"from": "x", "to": "y", "order": [2, 1, 0]}}}}]
                 + [{{"assert": {{"finite": "y"}}}}] * 50,
                 "output": {str(out)!r}}},
               threads=1, max_memory="8MiB", scratch_dir={str(scratch)!r}, quiet=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0, err
    assert "KeyboardInterrupt" in err or "interrupted" in err
    assert not out.exists()
    assert list(scratch.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def peak_rss_of_run(model: Path, transforms: list, budget: str, out: Path) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of `bs.run` of `transforms` over `model` with one thread and
    `budget`, in a fresh interpreter."""
    script = textwrap.dedent(
        f"""
        import time
        import brainsurgery as bs
        start = time.perf_counter()
        bs.run({{"inputs": [{str(model)!r}], "transforms": {transforms!r},
                 "output": {{"path": {str(out)!r}, "overwrite": True}}}},
               threads=1, max_memory={budget!r}, quiet=True)
        seconds = time.perf_counter() - start
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                print(int(line.split()[1]) * 1024, seconds)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak, seconds = done.stdout.split()
    return int(peak), float(seconds)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc")
def test_a_product_of_operands_larger_than_the_budget_keeps_the_resident_set_near_it(tmp_path: Path) -> None:
    # 16 and 32 MiB operands and a 8 MiB product under a 16 MiB budget: all three in the arena,
    # computed panel by panel with each panel's pages handed back, so the resident set grows by
    # about the budget, not by the 56 MiB of operands and product.
    rng = np.random.default_rng(2)
    a = rng.standard_normal((1024, 4096), dtype=np.float32)
    b = rng.standard_normal((4096, 2048), dtype=np.float32)
    model = tmp_path / "ab.safetensors"
    save_file({"a": a, "b": b, "small": np.ones(4, np.float32)}, str(model))
    out = tmp_path / "o.safetensors"
    baseline, _ = peak_rss_of_run(model, [{"delete": {"target": "[ab]"}}], "16MiB", out)
    product = [{"matmul": {"from_a": "a", "from_b": "b", "to": "c"}}, {"delete": {"target": "[ab]"}}]
    bounded, _ = peak_rss_of_run(model, product, "16MiB", out)
    # The budget plus the fixed share of the panels (a packed panel of b, a panel of a, and
    # faer's packing buffers).
    assert bounded - baseline <= 16 * MiB + 16 * MiB, (baseline >> 20, bounded >> 20)
    got = load_file(str(out))["c"]
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-3)
    # The same bytes as with an ample budget (panels are a function of the shape alone).
    peak_rss_of_run(model, product, "1GiB", tmp_path / "ample.safetensors")
    assert (tmp_path / "ample.safetensors").read_bytes() == out.read_bytes()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc")
def test_a_factorization_of_a_matrix_larger_than_the_budget_keeps_the_resident_set_near_it(tmp_path: Path) -> None:
    # A 64 MiB matrix of rank 8 plus noise, factored at rank 8 under a 32 MiB budget: the matrix
    # waits in the arena and each pass of the randomized SVD goes through it a 16 MiB panel at a
    # time.
    rng = np.random.default_rng(3)
    m = n = 4096
    u = np.linalg.qr(rng.standard_normal((m, 8)))[0]
    v = np.linalg.qr(rng.standard_normal((n, 8)))[0]
    sigma = np.array([400, 300, 200, 150, 100, 80, 60, 50], dtype=np.float64)
    low = (u * sigma) @ v.T
    w = (low + 1e-3 * rng.standard_normal((m, n))).astype(np.float32)
    model = tmp_path / "w.safetensors"
    save_file({"w": w, "small": np.ones(4, np.float32)}, str(model))
    out = tmp_path / "o.safetensors"
    baseline, _ = peak_rss_of_run(model, [{"delete": {"target": "w"}}], "32MiB", out)
    factor = [{"phlora": {"target": "w", "target_a": "a", "target_b": "b", "rank": 8, "method": "randomized"}}]
    bounded, _ = peak_rss_of_run(model, factor, "32MiB", out)
    assert bounded - baseline <= 40 * MiB, (baseline >> 20, bounded >> 20)
    got = load_file(str(out))
    b, a = got["b"].astype(np.float64), got["a"].astype(np.float64)
    assert np.abs(b @ a - low).max() < 1e-2
    # The singular values of B·A, from the small triangular factors of B and Aᵀ.
    kept = np.linalg.svd(np.linalg.qr(b)[1] @ np.linalg.qr(a.T)[1].T, compute_uv=False)
    np.testing.assert_allclose(kept, sigma, rtol=1e-4)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc")
def test_a_transpose_larger_than_the_budget_keeps_the_resident_set_near_it(tmp_path: Path) -> None:
    # A 128 MiB matrix transposed under a 32 MiB budget: read in bands of source rows by `pread`
    # rather than through a mapping (which makes the whole source resident), so the resident set
    # grows by less than the budget over a run that only copies a small tensor.
    model = tmp_path / "big.safetensors"
    save_file(
        {"w": np.arange(4096 * 8192, dtype=np.int32).reshape(4096, 8192), "small": np.ones(4, np.float32)},
        str(model),
    )

    def run(transforms: list, budget: str) -> tuple[int, float]:
        return peak_rss_of_run(model, transforms, budget, tmp_path / "o.safetensors")

    transpose = [{"permute": {"from": "w", "to": "t", "order": [1, 0]}}, {"delete": {"target": "w"}}]
    baseline, _ = run([{"delete": {"target": "w"}}], "32MiB")
    bounded, _ = run(transpose, "32MiB")
    assert bounded - baseline <= 32 * MiB, (baseline >> 20, bounded >> 20)
    t = bs.open(tmp_path / "o.safetensors")["t"]
    assert t.shape == (8192, 4096)
    np.testing.assert_array_equal(t[17], np.arange(4096) * 8192 + 17)
    np.testing.assert_array_equal(t[:, 5], np.arange(8192) + 5 * 8192)
    np.testing.assert_array_equal(t[8191], np.arange(4096) * 8192 + 8191)


@pytest.mark.parametrize("order", [[0, 2, 1], [1, 0], [2, 0, 1]])
def test_banded_transposes_equal_numpy_across_planes_and_partial_bands(tmp_path: Path, order: list[int]) -> None:
    # Sources above a quarter of the budget are read in bands of rows; planes and a last band
    # narrower than the others included.
    shape = (3, 500, 1000) if len(order) == 3 else (1500, 1000)
    x = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    model = tmp_path / "x.safetensors"
    save_file({"x": x}, str(model))
    out = tmp_path / "o.safetensors"
    bs.run(
        {"inputs": [str(model)], "transforms": [{"permute": {"from": "x", "to": "y", "order": order}}], "output": str(out)},
        threads=2,
        max_memory="8MiB",
        quiet=True,
    )
    np.testing.assert_array_equal(load_file(str(out))["y"], x.transpose(order))


@pytest.mark.parametrize("threads", [1, 4])
def test_banded_transposes_read_each_source_byte_once_whatever_the_threads(tmp_path: Path, threads: int) -> None:
    # One band per reading thread: threads on distant chunks do not evict each other's bands.
    x = np.arange(1024 * 1536, dtype=np.int32).reshape(1024, 1536)
    model = tmp_path / "x.safetensors"
    save_file({"x": x}, str(model))
    out = tmp_path / "o.safetensors"
    result = bs.run(
        {"inputs": [str(model)], "transforms": [{"permute": {"from": "x", "to": "y", "order": [1, 0]}}, {"delete": {"target": "x"}}], "output": str(out)},
        threads=threads,
        max_memory="16MiB",
        quiet=True,
    )
    assert result.bytes_read == x.nbytes
    np.testing.assert_array_equal(load_file(str(out))["y"], x.T)


@pytest.mark.parametrize("through_permute", [False, True])
def test_a_written_product_is_released_so_the_next_fits_the_budget(tmp_path: Path, through_permute: bool) -> None:
    # Two 4 MiB products from 1 MiB operands: with one thread, the first is written before the
    # second is computed; released after its write (also when it is read only through a written
    # permutation), its memory holds the second, so nothing goes to the arena.
    rng = np.random.default_rng(3)
    a, b, a2 = (rng.standard_normal(s, dtype=np.float32) for s in [(1024, 256), (256, 1024), (1024, 256)])
    model = tmp_path / "ops.safetensors"
    save_file({"a": a, "b": b, "a2": a2}, str(model))
    out = tmp_path / "o.safetensors"
    transforms: list[dict] = [
        {"matmul": {"from_a": "a", "from_b": "b", "to": "c1"}},
        {"matmul": {"from_a": "a2", "from_b": "b", "to": "c2"}},
    ]
    if through_permute:
        transforms += [{"permute": {"from": f"c{i}", "to": f"t{i}", "order": [1, 0]}} for i in (1, 2)]
    transforms.append({"delete": {"target": "a|b|a2|c1|c2" if through_permute else "a|b|a2"}})
    result = bs.run(
        {"inputs": [str(model)], "transforms": transforms, "output": str(out)}, threads=1, max_memory="10MiB", quiet=True
    )
    assert result.arena_bytes == 0
    got = load_file(str(out))
    for name, product in [("1", a @ b), ("2", a2 @ b)]:
        if through_permute:
            np.testing.assert_allclose(got["t" + name], product.T, rtol=1e-4, atol=1e-3)
        else:
            np.testing.assert_allclose(got["c" + name], product, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("read_again", [False, True])
def test_a_product_is_released_after_its_last_reader_not_at_the_write(tmp_path: Path, read_again: bool) -> None:
    # A 4 MiB product of the second input, read by an assertion and never written: released
    # after that step, its memory holds the output's product (4 + 4 MiB and the writer's 3 MiB
    # would not fit 10 MiB). Read again by a later step, it is kept until then.
    rng = np.random.default_rng(5)
    a, b, x, y = (rng.standard_normal(s, dtype=np.float32) for s in [(1024, 256), (256, 1024)] * 2)
    model, aux = tmp_path / "m.safetensors", tmp_path / "aux.safetensors"
    save_file({"a": a, "b": b}, str(model))
    save_file({"x": x, "y": y}, str(aux))
    out = tmp_path / "o.safetensors"
    transforms: list[dict] = [
        {"matmul": {"from_a": "aux::x", "from_b": "aux::y", "to": "aux::p"}},
        {"assert": {"finite": {"of": "aux::p"}}},
        {"matmul": {"from_a": "a", "from_b": "b", "to": "c"}},
        {"assert": {"finite": {"of": "c"}}},
    ]
    if read_again:
        transforms.append({"assert": {"finite": {"of": "aux::p"}}})
    transforms.append({"delete": {"target": "a|b"}})
    plan = {"inputs": [f"m::{model}", f"aux::{aux}"], "transforms": transforms, "output": {"path": str(out), "alias": "m"}}
    result = bs.run(plan, threads=1, max_memory="10MiB", quiet=True)
    assert (result.arena_bytes > 0) == read_again
    np.testing.assert_allclose(load_file(str(out))["c"], a @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("later", ["phlora_", "dump_full", "merge_lora"])
def test_a_product_read_again_by_a_later_step_is_computed_once(tmp_path: Path, later: str) -> None:
    # The assertion's read is not the product's last: a factorization, a `dump` of its values or
    # a merge into it reads it later, so it is kept, and the operands are read once.
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((256, 64), dtype=np.float32), rng.standard_normal((64, 256), dtype=np.float32)
    model = tmp_path / "m.safetensors"
    save_file({"a": a, "b": b}, str(model))
    transforms: list[dict] = [
        {"matmul": {"from_a": "a", "from_b": "b", "to": "p.weight"}},
        {"assert": {"finite": {"of": "p\\.weight"}}},
    ]
    if later == "phlora_":
        transforms.append({"phlora_": {"target": "p\\.weight", "rank": 8}})
    elif later == "dump_full":
        transforms.append({"dump": {"target": "p\\.weight", "verbosity": "full"}})
    else:
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        save_file(
            {
                "base_model.model.p.lora_A.weight": rng.standard_normal((4, 256), dtype=np.float32),
                "base_model.model.p.lora_B.weight": rng.standard_normal((256, 4), dtype=np.float32),
            },
            str(adapter / "adapter_model.safetensors"),
        )
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["p"]}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        transforms.append({"merge_lora": {"target": "m", "adapter": str(adapter)}})
    transforms.append({"delete": {"target": "a|b"}})
    out = tmp_path / "o.safetensors"
    plan = {"inputs": [f"m::{model}"], "transforms": transforms, "output": str(out)}
    result = bs.run(plan, threads=1, quiet=True)
    adapter_bytes = 2 * 4 * 256 * 4 if later == "merge_lora" else 0
    assert result.bytes_read == a.nbytes + b.nbytes + adapter_bytes


@pytest.mark.parametrize("op", ["phlora_", "phlora"])
def test_factors_kept_for_the_write_come_from_the_budget(tmp_path: Path, op: str) -> None:
    """`phlora_`'s f32 factors (kept to compute the product when written) and `phlora`'s factors
    are allocated from the budget, spilling to the arena past it, as the check estimates."""
    w = np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32)
    model = tmp_path / "w.safetensors"
    save_file({"w": w}, str(model))
    spec: dict[str, object] = {"target": "w", "rank": 512, "method": "exact"}
    if op == "phlora":
        spec.update(target_a="a", target_b="b")
    p = {"inputs": [str(model)], "transforms": [{op: spec}], "output": str(tmp_path / "o.safetensors")}
    checked = bs.check(p, threads=1, max_memory="16MiB")
    result = bs.run(p, threads=1, max_memory="16MiB", quiet=True)
    assert checked["arena_bytes"] == result["arena_bytes"] == 4 * MiB
    got = load_file(str(tmp_path / "o.safetensors"))
    product = got["w"] if op == "phlora_" else got["b"].astype(np.float64) @ got["a"].astype(np.float64)
    u, s, vt = np.linalg.svd(w.astype(np.float64))
    np.testing.assert_allclose(product, (u[:, :512] * s[:512]) @ vt[:512], atol=1e-3)
