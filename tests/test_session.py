"""``brainsurgery.Session`` and the lazy result of ``run`` (issue 11, items 4, 7 and 8).

Values are checked against NumPy computed here; replays are compared byte for byte.
"""

from __future__ import annotations

import gc
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import brainsurgery as bs


@pytest.fixture
def model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "m.safetensors"
    save_file(
        {
            "h.0.attn.weight": rng.standard_normal((8, 4)).astype(np.float32),
            "h.0.norm.weight": np.ones(4, np.float32),
            "h.1.norm.weight": np.full(4, 2.0, np.float32),
            "lm_head.weight": rng.standard_normal((3, 4)).astype(np.float32),
        },
        str(path),
    )
    return path


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_spec_example_runs_and_values_match_numpy(model: Path, tmp_path: Path) -> None:
    original = load_file(str(model))
    s = bs.Session(inputs={"m": str(model)})
    assert sorted(s) == sorted(f"m::{n}" for n in original)
    s.apply({"scale_": {"target": "m::.*norm.*", "by": 0.5}})
    s.apply("delete: target: m::lm_head.weight")
    assert "m::lm_head.weight" not in s
    np.testing.assert_array_equal(s["m::h.1.norm.weight"], original["h.1.norm.weight"] * 0.5)
    # A bare name means the only input's alias.
    np.testing.assert_array_equal(s["h.0.attn.weight"], original["h.0.attn.weight"])
    out = tmp_path / "out"
    files = s.save(out)
    assert files and all(Path(f).parent == out for f in files)
    written = bs.open(out)
    assert sorted(written) == ["h.0.attn.weight", "h.0.norm.weight", "h.1.norm.weight"]
    np.testing.assert_array_equal(written["h.0.norm.weight"], original["h.0.norm.weight"] * 0.5)


def test_untouched_tensors_are_views_of_the_file_and_computed_ones_are_not(model: Path) -> None:
    s = bs.Session(inputs=str(model))
    view = s["h.0.attn.weight"]
    assert not view.flags.writeable
    s.apply({"scale_": {"target": "h.0.attn.weight", "by": 2}})
    computed = s["h.0.attn.weight"]
    assert not computed.flags.writeable
    np.testing.assert_array_equal(computed, view * 2)
    # The earlier view still shows the file's values.
    np.testing.assert_array_equal(view, load_file(str(model))["h.0.attn.weight"])


def test_view_points_into_the_mapped_file(model: Path) -> None:
    s = bs.Session(inputs=str(model))
    a = s["h.0.attn.weight"]
    b = s["h.0.attn.weight"]
    # Two reads of an untouched tensor share the one mapping: same address.
    assert a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    assert np.shares_memory(a, b)


def test_a_failing_apply_leaves_the_session_as_it_was(model: Path) -> None:
    s = bs.Session(inputs=str(model))
    before = s["h.0.norm.weight"].copy()
    with pytest.raises(bs.AssertionFailed):
        s.apply([{"scale_": {"target": "h.0.norm.weight", "by": 3}}, {"assert": {"iszero": "h.0.norm.weight"}}])
    np.testing.assert_array_equal(s["h.0.norm.weight"], before)
    with pytest.raises(bs.PlanError, match="did you mean"):
        s.apply({"scael_": {"target": "x", "by": 2}})
    # Failed blocks are not part of the plan.
    assert s.plan["transforms"] == []


def test_apply_accepts_yaml_text_and_one_line_forms(model: Path) -> None:
    s = bs.Session(inputs={"m": str(model)}, quiet=True)
    s.apply("scale_:\n  target: m::h.0.norm.weight\n  by: 4\n")
    s.apply("copy: from: m::h.0.norm.weight, to: m::y")
    np.testing.assert_array_equal(s["m::y"], np.full(4, 4.0, np.float32))
    result = s.apply("dump: format: compact")
    assert any("h.0" in line for line in result["output"])


def test_plan_replays_byte_identically(model: Path, tmp_path: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    s.apply({"cast_": {"target": "m::.*", "dtype": "bfloat16"}})
    s.apply({"scale_": {"target": "m::h\\.1\\..*", "by": -1}})
    first = tmp_path / "first.safetensors"
    s.save(first)
    plan = s.plan
    assert plan["inputs"] == [f"m::{model.resolve()}"]
    assert [next(iter(t)) for t in plan["transforms"]] == ["cast_", "scale_", "save"]
    kept = tmp_path / "kept.safetensors"
    first.rename(kept)
    # Replayed from another folder: the inputs are absolute.
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path.parent)
        bs.run(plan, quiet=True)
    finally:
        os.chdir(cwd)
    assert sha(first) == sha(kept)


def test_setting_an_array_borrows_it(model: Path, tmp_path: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    s["m::extra"] = array
    assert s.info("m::extra") == ("float32", [2, 3])
    np.testing.assert_array_equal(s["m::extra"], array)
    # Zero copy both ways: the session reads the array's memory and hands the same memory back.
    assert np.shares_memory(s["m::extra"], array)
    # The session holds a reference: the array outlives the caller's name for it.
    del array
    gc.collect()
    s.apply({"scale_": {"target": "m::extra", "by": 2}})
    np.testing.assert_array_equal(s["m::extra"], np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
    out = tmp_path / "o.safetensors"
    s.save(out)
    np.testing.assert_array_equal(load_file(str(out))["extra"], np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
    # A new alias is created for a key naming one that does not exist.
    s["other::z"] = np.zeros(3, np.int64)
    assert "other" in s.aliases
    with pytest.raises(bs.PlanError, match="handed in"):
        s.plan


def test_delete_escapes_the_name(model: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    s["m::h.0.normXweight"] = np.zeros(1, np.float32)
    del s["m::h.0.norm.weight"]
    # The dot is literal: the look-alike name survives.
    assert "m::h.0.normXweight" in s
    assert "m::h.0.norm.weight" not in s
    with pytest.raises(KeyError, match="closest"):
        del s["m::h.0.norm.weigh"]


def test_missing_key_lists_close_matches(model: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    with pytest.raises(KeyError, match='closest: "m::lm_head.weight"'):
        s["m::lm_head.weigth"]


def test_check_reports_the_alias_without_reading(model: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    s.apply({"cast_": {"target": "m::.*", "dtype": "float16"}})
    report = s.check()
    assert report["alias"] == "m"
    assert {t["dtype"] for t in report["tensors"]} == {"float16"}
    assert report["total_bytes"] == sum(int(np.prod(t["shape"])) * 2 for t in report["tensors"])
    with pytest.raises(bs.PlanError, match="unknown alias"):
        s.check("nope")


def test_closed_session_and_arrays_that_outlive_it(model: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    view = s["m::h.0.attn.weight"]
    s.apply({"scale_": {"target": "m::h.1.norm.weight", "by": 3}})
    computed = s["m::h.1.norm.weight"]
    s.close()
    del s
    gc.collect()
    expected = load_file(str(model))
    np.testing.assert_array_equal(view, expected["h.0.attn.weight"])
    np.testing.assert_array_equal(computed, expected["h.1.norm.weight"] * 3)
    s2 = bs.Session(inputs={"m": str(model)})
    s2.close()
    assert s2.closed
    for use in (lambda: s2["m::h.0.norm.weight"], lambda: s2.apply("exit"), lambda: len(s2)):
        with pytest.raises(bs.BrainSurgeryError, match="closed"):
            use()
    with bs.Session(inputs={"m": str(model)}) as s3:
        assert len(s3) == 4
    assert s3.closed


def test_two_threads_on_one_session_never_corrupt_it(model: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    errors: list[BaseException] = []

    applied = [0, 0]

    def work(me: int) -> None:
        for _ in range(30):
            try:
                s.apply({"scale_": {"target": "m::h.0.norm.weight", "by": 2}})
                applied[me] += 1
            except bs.BrainSurgeryError as e:
                # The only error allowed: the session is busy in the other thread.
                if "another thread" not in str(e):
                    errors.append(e)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
            try:
                s["m::h.0.norm.weight"]
            except bs.BrainSurgeryError as e:
                if "another thread" not in str(e):
                    errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Every apply that returned took effect exactly once: nothing lost, nothing doubled.
    n = sum(applied)
    assert n > 0
    np.testing.assert_array_equal(s["m::h.0.norm.weight"], np.full(4, 2.0**n, np.float32))


def test_bad_inputs_and_arguments(model: Path, tmp_path: Path) -> None:
    with pytest.raises(bs.FormatError):
        bs.Session(inputs={"m": str(tmp_path / "missing.safetensors")})
    with pytest.raises(TypeError):
        bs.Session(inputs={"m": str(model)}, plan={"inputs": []})
    s = bs.Session(inputs={"a": str(model), "b": str(model)})
    with pytest.raises(bs.PlanError, match="names no alias"):
        s["x"] = np.zeros(1, np.float32)
    with pytest.raises(bs.PlanError, match="several aliases"):
        s.save(tmp_path / "o.safetensors")


def test_session_from_a_plan_applies_its_transforms(model: Path) -> None:
    s = bs.Session(plan={"inputs": [str(model)], "transforms": [{"copy": {"from": "h.0.norm.weight", "to": "n0"}}]})
    np.testing.assert_array_equal(s["n0"], np.ones(4, np.float32))


def test_run_without_output_returns_lazy_tensors(model: Path) -> None:
    original = load_file(str(model))
    result = bs.run(
        {"inputs": [str(model)], "transforms": [{"scale_": {"target": ".*norm.*", "by": 2}}]},
        quiet=True,
    )
    assert result.written == []
    tensors = result.tensors
    assert tensors is not None and tensors.alias == "model"
    assert set(tensors) == set(original)
    np.testing.assert_array_equal(tensors["h.1.norm.weight"], original["h.1.norm.weight"] * 2)
    # Untouched tensors are views of the file.
    untouched = tensors["lm_head.weight"]
    assert not untouched.flags.writeable
    np.testing.assert_array_equal(untouched, original["lm_head.weight"])
    assert tensors.info("h.0.attn.weight") == ("float32", [8, 4])
    with pytest.raises(KeyError, match="closest"):
        tensors["lm_head.weigh"]
    # The report is still the dict it was, with attributes and a readable repr.
    assert result.notes == result["notes"] and len(result.notes) == 1
    assert "result.tensors" in repr(result) and result.seconds >= 0


def test_run_with_output_has_no_tensors_and_reports_files(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    result = bs.run({"inputs": [str(model)], "output": str(out)}, quiet=True)
    assert result.tensors is None
    assert result.written == [str(out)]
    assert result.bytes_written == out.stat().st_size
    assert str(out) in repr(result)


def test_progress_callback_sees_every_byte_written(tmp_path: Path) -> None:
    # Several chunks on two writing threads.
    big = tmp_path / "big.safetensors"
    bs.save({f"w{i}": np.full((1024, 1024), i, np.float32) for i in range(6)}, big)
    calls: list[tuple[int, int]] = []
    out = tmp_path / "o.safetensors"
    result = bs.run(
        {"inputs": [str(big)], "output": str(out)},
        threads=2,
        quiet=True,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = sum(t["nbytes"] for t in result["tensors"])
    assert calls, "the callback was never called"
    assert all(t == total for _, t in calls)
    assert max(d for d, _ in calls) == total


def test_a_failing_progress_callback_does_not_fail_the_run(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(done: int, total: int) -> None:
        raise RuntimeError("display broke")

    reported: list[BaseException | None] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: reported.append(u.exc_value))
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [str(model)], "output": str(out)}, quiet=True, progress=broken)
    assert out.exists()
    assert reported and all(isinstance(e, RuntimeError) for e in reported)


def test_tqdm_bar_when_asked(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    bs.run({"inputs": [str(model)], "output": str(tmp_path / "o.safetensors")}, progress=True)
    assert "writing" in capsys.readouterr().err


def test_setting_bad_values_is_refused_and_leaves_the_session(model: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    before = list(s)
    with pytest.raises(TypeError):
        s["m::x"] = [1.0, 2.0]
    with pytest.raises(TypeError):
        s["m::x"] = np.array([object(), object()])

    class OnTheGpu:
        def __dlpack_device__(self) -> tuple[int, int]:
            return (2, 0)  # kDLCUDA

        def __dlpack__(self, **kwargs: object) -> object:  # pragma: no cover - never asked
            raise AssertionError("the data of a device tensor must not be asked for")

    with pytest.raises(ValueError, match=r"\.cpu\(\)"):
        s["m::x"] = OnTheGpu()
    assert list(s) == before
    # A non-contiguous array is copied once, in row-major order.
    s["m::t"] = np.arange(6, dtype=np.float32).reshape(2, 3).T
    np.testing.assert_array_equal(s["m::t"], np.arange(6, dtype=np.float32).reshape(2, 3).T)


def test_torch_tensors_go_in_copied_and_views_come_out_without_copies(model: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    s = bs.Session(inputs={"m": str(model)})
    t = torch.arange(8, dtype=torch.float32).to(torch.bfloat16)
    s["m::b"] = t
    view = s["m::b"]
    assert view.dtype.name == "bfloat16"
    # A session keeps its own copy of a torch tensor (torch may free the memory it exported).
    assert view.__array_interface__["data"][0] != t.data_ptr()
    t.mul_(0)
    np.testing.assert_array_equal(np.asarray(s["m::b"], dtype=np.float32), np.arange(8, dtype=np.float32))
    back = torch.from_dlpack(s["m::h.0.attn.weight"])
    assert back.data_ptr() == s["m::h.0.attn.weight"].__array_interface__["data"][0]
    out = tmp_path / "o.safetensors"
    s.save(out)
    assert bs.open(out).dtype("b") == "bfloat16"
    np.testing.assert_array_equal(np.asarray(bs.open(out)["b"], dtype=np.float32), np.arange(8, dtype=np.float32))


def test_run_reports_time_per_transform_and_for_the_write(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    plan = {
        "inputs": [str(model)],
        "transforms": [
            {"scale_": {"target": ".*norm.*", "by": 2}},
            {"execute": {"transforms": [{"copy": {"from": "h.0.norm.weight", "to": "c"}}]}},
            {"assert": {"finite": ".*"}},
        ],
        "output": str(out),
    }
    result = bs.run(plan, quiet=True)
    # One entry per top-level transform (the nested copy counts in its execute).
    assert [(t["index"], t["transform"]) for t in result.timings] == [(0, "scale_"), (1, "execute"), (2, "assert")]
    assert all(t["seconds"] >= 0 for t in result.timings)
    assert result.write_seconds is not None and 0 <= result.write_seconds <= result.seconds
    assert "output written in" in repr(result)
    no_output = bs.run({"inputs": [str(model)]}, quiet=True)
    assert no_output.write_seconds is None and no_output.timings == []


def test_run_reports_the_bytes_it_read_from_its_inputs(model: Path, tmp_path: Path) -> None:
    tensor_bytes = sum(a.nbytes for a in load_file(str(model)).values())
    out = tmp_path / "o.safetensors"
    # The write reads every tensor once.
    copied = bs.run({"inputs": [str(model)], "output": str(out)}, quiet=True)
    assert copied.bytes_read == tensor_bytes
    assert "read " in repr(copied)
    # An assertion over every tensor reads each once more.
    asserted = bs.run(
        {"inputs": [str(model)], "transforms": [{"assert": {"finite": ".*"}}], "output": {"path": str(out), "overwrite": True}},
        quiet=True,
    )
    assert asserted.bytes_read == 2 * tensor_bytes
    # Without output nothing is read; reading the lazy result later is not the run's.
    lazy = bs.run({"inputs": [str(model)]}, quiet=True)
    assert lazy.bytes_read == 0
    assert bs.check({"inputs": [str(model)], "output": str(tmp_path / "x.safetensors")})["bytes_read"] == 0
    s = bs.Session(inputs={"m": str(model)})
    applied = s.apply({"save": {"path": str(tmp_path / "s.safetensors"), "alias": "m"}})
    assert applied["bytes_read"] == tensor_bytes


def test_saves_along_the_way_replay_with_the_same_tensors_and_the_last_byte_identical(
    model: Path, tmp_path: Path
) -> None:
    s = bs.Session(inputs={"m": str(model)})
    s.apply({"scale_": {"target": "m::h.0.norm.weight", "by": 2}})
    first, last = tmp_path / "first.safetensors", tmp_path / "last.safetensors"
    s.save(first)
    s.apply({"scale_": {"target": "m::h.1.norm.weight", "by": 3}})
    s.save(last)
    kept_first, kept_last = load_file(str(first)), last.read_bytes()
    first_meta = bs.open(first).metadata
    first.unlink()
    last.unlink()
    bs.run(s.plan, quiet=True)
    # The last save: the same bytes. An earlier one: the same tensors; its recorded plan hash is
    # the hash of the plan up to it, which the whole plan's replay does not reproduce.
    assert last.read_bytes() == kept_last
    replayed_first = load_file(str(first))
    assert replayed_first.keys() == kept_first.keys()
    for name in kept_first:
        np.testing.assert_array_equal(replayed_first[name], kept_first[name])
    replayed_meta = bs.open(first).metadata
    assert {k: v for k, v in replayed_meta.items() if k != "brainsurgery.plan_sha256"} == {
        k: v for k, v in first_meta.items() if k != "brainsurgery.plan_sha256"
    }


def test_relative_paths_in_a_session_replay_from_another_folder(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "inner.yaml").write_text("transforms:\n  - copy: {from: h.0.norm.weight, to: c}\n")
    (plans / "main.yaml").write_text(f"inputs: ['{model}']\ntransforms:\n  - execute: {{path: inner.yaml}}\n")
    monkeypatch.chdir(tmp_path)
    s = bs.Session(plan=str(plans / "main.yaml"))
    s.apply({"load": {"path": "m.safetensors", "alias": "again"}})
    s.save("rel-out.safetensors")
    kept = (tmp_path / "rel-out.safetensors").read_bytes()
    (tmp_path / "rel-out.safetensors").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    bs.run(s.plan, quiet=True)
    assert (tmp_path / "rel-out.safetensors").read_bytes() == kept
    # A plan file read into the builder keeps its relative execute runnable from anywhere.
    assert "c" in bs.Plan.from_yaml(str(plans / "main.yaml")).run(quiet=True).tensors


def test_set_refuses_aliases_a_plan_cannot_name(model: Path) -> None:
    s = bs.Session(inputs={"m": str(model)})
    for key in ("bad alias::x", "a/b::x", ".*::x", "m::"):
        with pytest.raises(bs.PlanError, match="valid alias"):
            s[key] = np.zeros(1, np.float32)
    assert s.aliases == ["m"]


def test_ctrl_c_during_a_read_cancels_only_that_read(model: Path) -> None:
    import _thread
    import time

    s = bs.Session(inputs={"m": str(model)})
    s.apply({"zeroes": {"target": "m::big", "shape": [8192, 8192]}})
    s.apply({"scale_": {"target": "m::big", "by": 2}})
    timer = threading.Timer(0.02, _thread.interrupt_main)
    with pytest.raises(KeyboardInterrupt):
        timer.start()
        s["m::big"]
        time.sleep(5)  # the read finished first: the interrupt lands here
    timer.join()
    # The tensor reads whole afterwards (a cancelled read leaves nothing behind).
    big = s["m::big"]
    assert big.shape == (8192, 8192) and not big.any()
    # The next reads and applies are not cancelled by the earlier Ctrl-C.
    np.testing.assert_array_equal(s["m::h.1.norm.weight"], np.full(4, 2.0, np.float32))
    s.apply({"scale_": {"target": "m::h.1.norm.weight", "by": 3}})
    np.testing.assert_array_equal(s["m::h.1.norm.weight"], np.full(4, 6.0, np.float32))
    result = bs.run({"inputs": [str(model)], "transforms": [{"scale_": {"target": ".*norm.*", "by": 2}}]}, quiet=True)
    assert result.tensors is not None
    with pytest.raises(KeyboardInterrupt):
        timer = threading.Timer(0.02, _thread.interrupt_main)
        timer.start()
        result.tensors["h.1.norm.weight"]
        time.sleep(5)
    timer.join()
    np.testing.assert_array_equal(result.tensors["h.0.norm.weight"], np.full(4, 2.0, np.float32))


def test_writes_through_torch_do_not_reach_the_session(model: Path) -> None:
    torch = pytest.importorskip("torch")
    s = bs.Session(inputs={"m": str(model)})
    s.apply({"phlora": {"target": "m::h.0.attn.weight", "target_a": "m::a", "target_b": "m::b", "rank": 2}})
    before = np.array(s["m::a"])
    torch.from_dlpack(s["m::a"]).mul_(0)
    np.testing.assert_array_equal(s["m::a"], before)


def test_a_torch_tensor_freed_after_it_was_handed_in_does_not_crash(model: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    s = bs.Session(inputs={"m": str(model)})
    t = torch.arange(1 << 16, dtype=torch.float32)
    s["m::t"] = t
    t.resize_(1 << 24)  # torch reallocates; the memory the session saw is freed
    t.untyped_storage().resize_(0)
    np.testing.assert_array_equal(s["m::t"], np.arange(1 << 16, dtype=np.float32))


def test_lazy_torch_bits_are_resolved(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()
    n = torch._neg_view(torch.tensor([1.0, -2.0]))
    out = tmp_path / "o.safetensors"
    bs.save({"z": z, "zi": z.imag, "n": n}, out)
    ck = bs.open(out)
    np.testing.assert_array_equal(np.asarray(ck["z"]), np.array([1 - 2j, 3 + 4j], np.complex64))
    np.testing.assert_array_equal(np.asarray(ck["zi"]), np.array([-2.0, 4.0], np.float32))
    np.testing.assert_array_equal(np.asarray(ck["n"]), np.array([-1.0, 2.0], np.float32))


def test_an_empty_session_filled_from_python_saves_its_only_alias(tmp_path: Path) -> None:
    s = bs.Session()
    s["new::w"] = np.arange(4, dtype=np.float32)
    assert s.check()["alias"] == "new"
    out = tmp_path / "o.safetensors"
    s.save(out)
    np.testing.assert_array_equal(load_file(str(out))["w"], np.arange(4, dtype=np.float32))


def test_computed_tensors_larger_than_a_chunk_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    values = np.arange(3 * 2**18 + 5, dtype=np.float32)  # 3 MiB and a bit: four read chunks
    bs.save({"w": values}, path)
    s = bs.Session(inputs={"m": str(path)})
    s.apply({"scale_": {"target": "m::w", "by": 2}})
    np.testing.assert_array_equal(s["m::w"], values * 2)
    result = bs.run({"inputs": [str(path)], "transforms": [{"scale_": {"target": "w", "by": 3}}]}, quiet=True)
    assert result.tensors is not None
    np.testing.assert_array_equal(result.tensors["w"], values * 3)


def test_copies_the_engine_made_are_not_handed_back_as_the_callers(model: Path) -> None:
    torch = pytest.importorskip("torch")
    s = bs.Session(inputs={"m": str(model)})
    transposed = np.arange(6, dtype=np.float32).reshape(2, 3).T  # copied in (non-contiguous)
    big_endian = np.arange(3, dtype=">f4")  # copied in (byte order)
    s["m::t"] = transposed
    s["m::b"] = big_endian
    for key, expected in (("m::t", transposed), ("m::b", np.arange(3, dtype=np.float32))):
        torch.from_dlpack(s[key]).mul_(0)
        np.testing.assert_array_equal(s[key], expected)


def test_an_object_that_keeps_its_lazy_bit_cannot_loop(tmp_path: Path) -> None:
    class Stubborn:
        def __init__(self) -> None:
            self.array = np.arange(3, dtype=np.float32)

        def is_conj(self) -> bool:
            return True

        def resolve_conj(self) -> "Stubborn":
            return self

        def resolve_neg(self) -> "Stubborn":
            return self

        def __dlpack__(self, **kwargs: object) -> object:
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self) -> tuple[int, int]:
            return (1, 0)

    out = tmp_path / "o.safetensors"
    bs.save({"x": Stubborn()}, out)
    np.testing.assert_array_equal(bs.open(out)["x"], np.arange(3, dtype=np.float32))

    class NotCallable:
        is_conj = False

        def __init__(self) -> None:
            self.array = np.arange(2, dtype=np.float32)

        def __dlpack__(self, **kwargs: object) -> object:
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self) -> tuple[int, int]:
            return (1, 0)

    bs.save({"y": NotCallable()}, out)
    np.testing.assert_array_equal(bs.open(out)["y"], np.arange(2, dtype=np.float32))


def test_nested_plans_and_adapters_replay_from_another_folder(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = bs.Session(inputs={"m": "m.safetensors"})
    s.apply({"execute": {"plan": {"inputs": ["o::m.safetensors"], "transforms": [], "output": "nested.safetensors"}}})
    s.save("top.safetensors")
    plan = s.plan
    nested = plan["transforms"][0]["execute"]["plan"]
    assert nested["inputs"] == [f"o::{tmp_path / 'm.safetensors'}"]
    assert nested["output"] == str(tmp_path / "nested.safetensors")
    kept = (tmp_path / "top.safetensors").read_bytes()
    (tmp_path / "top.safetensors").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    bs.run(plan, quiet=True)
    assert (tmp_path / "top.safetensors").read_bytes() == kept
    assert not list(elsewhere.iterdir())
