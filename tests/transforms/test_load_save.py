"""load / save (src/transforms/load.rs): checkpoints in and out in the middle of a plan."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import brainsurgery as bs
from conftest import read, tensor_names


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "h.0.w": rng.standard_normal((3, 4)).astype(np.float32),
        "h.0.b": rng.standard_normal(4).astype(np.float32),
        "ids": np.arange(5, dtype=np.int64),
    }


def test_load_second_checkpoint_then_assert_equal_across_aliases(write, tmp_path):
    tensors = _tensors()
    a = write(tensors, "a.safetensors")
    b = write(tensors, "b.safetensors")
    out = tmp_path / "out.safetensors"
    report = bs.run(
        {
            "inputs": [f"model::{a}"],
            "transforms": [
                {"load": {"path": str(b), "alias": "other"}},
                {"assert": {"equal": {"left": ".*", "right": "other::\\g<0>"}}},
                {"copy": {"from": "other::h.0.w", "to": "model::from_other"}},
            ],
            "output": str(out),
        }
    )
    assert report["alias"] == "model"
    got = load_file(str(out))
    np.testing.assert_array_equal(got["from_other"], tensors["h.0.w"])
    assert tensor_names(out) == ["h.0.w", "h.0.b", "ids", "from_other"]


def test_assert_equal_across_loaded_aliases_fails_on_different_values(write, tmp_path):
    a = write(_tensors(0), "a.safetensors")
    b = write(_tensors(1), "b.safetensors")
    with pytest.raises(bs.AssertionFailed, match=r"transforms\[1\].*h\.0\.w"):
        bs.run(
            {
                "inputs": [f"model::{a}"],
                "transforms": [
                    {"load": {"path": str(b), "alias": "other"}},
                    {"assert": {"equal": {"left": "h.0.w", "right": "other::h.0.w"}}},
                ],
            }
        )


def test_load_whole_checkpoint_into_existing_alias_is_a_plan_error(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.load\.alias.*`model` already exists"):
        bs.check({"inputs": [f"model::{a}"], "transforms": [{"load": {"path": str(a), "alias": "model"}}]})


def test_load_one_tensor_from_one_tensor_file(write, tmp_path):
    tensors = _tensors()
    a = write(tensors, "a.safetensors")
    extra = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    one = write({"anything": extra}, "one.safetensors")
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [str(a)], "transforms": [{"load": {"path": str(one), "to": "extra.w"}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["extra.w"], extra)
    assert tensor_names(out)[-1] == "extra.w"


def test_load_one_named_tensor_into_another_alias(write, tmp_path):
    tensors = _tensors()
    a = write(tensors, "a.safetensors")
    other = write(_tensors(3), "other.safetensors")
    out = tmp_path / "out.safetensors"
    report = bs.run(
        {
            "inputs": [f"a::{a}", f"b::{a}"],
            "transforms": [{"load": {"path": str(other), "to": "fresh::h.0.b"}}],
            "output": str(out),
        }
    )
    assert report["alias"] == "fresh"
    np.testing.assert_array_equal(read(out)["h.0.b"], _tensors(3)["h.0.b"])


def test_load_one_tensor_needs_a_matching_name_in_a_multi_tensor_file(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.TransformError, match=r"transforms\[0\] \(load\).*holds 3 tensors.*`nope`"):
        bs.check({"inputs": [str(a)], "transforms": [{"load": {"path": str(a), "to": "nope"}}]})


def test_load_one_tensor_onto_existing_name_fails(write):
    a = write(_tensors(), "a.safetensors")
    one = write({"x": np.zeros(2, np.float32)}, "one.safetensors")
    with pytest.raises(bs.TransformError, match=r"transforms\[0\] \(load\).*`model::ids` already exists"):
        bs.check({"inputs": [str(a)], "transforms": [{"load": {"path": str(one), "to": "ids"}}]})


def test_load_pytorch_and_numpy_with_and_without_format(write, tmp_path):
    from pathlib import Path

    a = write(_tensors(), "a.safetensors")
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "torch" / "plain.pt"
    expected = dict(np.load(fixture.with_suffix(".npz")))
    npy = tmp_path / "w.npy"
    np.save(npy, np.arange(6, dtype=np.int16).reshape(2, 3))
    out = tmp_path / "out.safetensors"
    bs.run(
        {
            "inputs": [f"model::{a}"],
            "transforms": [
                {"load": {"path": str(fixture), "alias": "t", "format": "pytorch"}},
                {"load": {"path": str(npy), "to": "model::w"}},
                {"copy": {"from": "t::(f32|f16|i64|flag|scalar)", "to": "model::torch.\\1"}},
            ],
            "output": str(out),
        },
        quiet=True,
    )
    got = load_file(str(out))
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.int16).reshape(2, 3))
    for name in ["f32", "f16", "i64", "flag", "scalar"]:
        np.testing.assert_array_equal(got[f"torch.{name}"], expected[name])


def test_load_format_must_match_the_file(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.load\.format.*holds safetensors weights, not PyTorch"):
        bs.check({"inputs": [str(a)], "transforms": [{"load": {"path": str(a), "alias": "t", "format": "torch"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.load\.format.*unknown format `onnx`"):
        bs.check({"inputs": [str(a)], "transforms": [{"load": {"path": str(a), "alias": "t", "format": "onnx"}}]})


def test_load_alias_contradicting_to_is_a_plan_error(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.load\.alias.*contradicts"):
        bs.check({"inputs": [str(a)], "transforms": [{"load": {"path": str(a), "to": "x::w", "alias": "y"}}]})


def test_load_needs_alias_or_to(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.load.*`alias`.*`to`"):
        bs.check({"inputs": [str(a)], "transforms": [{"load": {"path": str(a)}}]})


def test_load_unknown_key_suggests(write):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.load.*`pth`.*did you mean `path`"):
        bs.check({"inputs": [str(a)], "transforms": [{"load": {"pth": str(a), "alias": "x"}}]})


def test_save_alias_and_one_tensor_read_back_with_official_package(write, tmp_path):
    tensors = _tensors()
    a = write(tensors, "a.safetensors", metadata={"format": "pt"})
    whole = tmp_path / "whole.safetensors"
    one = tmp_path / "one.safetensors"
    sliced = tmp_path / "sliced.safetensors"
    bs.run(
        {
            "inputs": [str(a)],
            "transforms": [
                {"scale_": {"target": "h.0.w", "by": 2}},
                {"save": {"path": str(whole), "alias": "model"}},
                {"save": {"path": str(one), "target": "h.0.b"}},
                {"save": {"path": str(sliced), "target": "h.0.w::[1:, :2]"}},
                {"delete": {"target": "h.0.w"}},
            ],
            "output": str(tmp_path / "final.safetensors"),
        }
    )
    got = load_file(str(whole))
    assert tensor_names(whole) == ["h.0.w", "h.0.b", "ids"]
    np.testing.assert_array_equal(got["h.0.w"], tensors["h.0.w"] * np.float32(2))
    np.testing.assert_array_equal(got["ids"], tensors["ids"])
    assert load_file(str(one)).keys() == {"h.0.b"}
    np.testing.assert_array_equal(load_file(str(one))["h.0.b"], tensors["h.0.b"])
    np.testing.assert_array_equal(load_file(str(sliced))["h.0.w"], (tensors["h.0.w"] * np.float32(2))[1:, :2])
    from safetensors import safe_open

    with safe_open(str(whole), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and "brainsurgery.version" in meta
    # The later delete does not affect what was saved before it.
    assert "h.0.w" not in read(tmp_path / "final.safetensors")


def test_output_refuses_overwriting_a_file_a_single_tensor_load_read(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    other = write({"v": np.ones(3, np.float32)}, "other.safetensors")
    before = other.read_bytes()
    with pytest.raises(bs.PlanError, match=r"output\.path.*would overwrite input"):
        bs.run({"inputs": [str(a)], "transforms": [{"load": {"path": str(other), "to": "v"}}], "output": str(other)})
    assert other.read_bytes() == before


def test_output_refuses_overwriting_a_checkpoint_whose_alias_was_removed(write, tmp_path):
    """The alias that held the file is gone, but its tensors live on in another alias."""
    a = write(_tensors(), "a.safetensors")
    other = write({"v": np.ones(3, np.float32)}, "other.safetensors")
    before = other.read_bytes()
    plan = {
        "inputs": [f"m::{a}"],
        "transforms": [
            {"load": {"path": str(other), "alias": "o"}},
            {"copy": {"from": "o::v", "to": "m::v"}},
            {"prefixes": {"mode": "remove", "alias": "o"}},
        ],
        "output": {"path": str(other), "alias": "m"},
    }
    with pytest.raises(bs.PlanError, match=r"output\.path.*would overwrite input"):
        bs.check(plan)
    with pytest.raises(bs.PlanError, match=r"would overwrite input"):
        bs.run(plan)
    assert other.read_bytes() == before


def test_save_directory_is_sharded_like_the_output(write, tmp_path):
    tensors = _tensors()
    a = write(tensors, "a.safetensors")
    out = tmp_path / "saved"
    bs.run({"inputs": [str(a)], "transforms": [{"save": {"path": str(out), "alias": "model", "shard": "64B"}}]})
    assert (out / "model.safetensors.index.json").exists()
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(str(f)))
    for k, v in tensors.items():
        np.testing.assert_array_equal(merged[k], v)


def test_save_refuses_overwriting_an_input(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    before = a.read_bytes()
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.save\.path.*would overwrite input"):
        bs.run({"inputs": [str(a)], "transforms": [{"save": {"path": str(a), "alias": "model"}}]})
    assert a.read_bytes() == before


def test_save_refuses_overwriting_a_loaded_checkpoint(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    b = write(_tensors(1), "b.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[1\]\.save\.path.*would overwrite input"):
        bs.check(
            {
                "inputs": [str(a)],
                "transforms": [{"load": {"path": str(b), "alias": "b"}}, {"save": {"path": str(b), "target": "ids"}}],
            }
        )


def test_check_does_not_save(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    out = tmp_path / "saved.safetensors"
    report = bs.check({"inputs": [str(a)], "transforms": [{"save": {"path": str(out), "alias": "model"}}]})
    assert not out.exists()
    assert any("written when the plan runs" in n for n in report["notes"])


def test_failure_after_save_in_check_writes_nothing(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    out = tmp_path / "saved.safetensors"
    with pytest.raises(bs.TransformError):
        bs.run(
            {
                "inputs": [str(a)],
                "transforms": [{"save": {"path": str(out), "alias": "model"}}, {"delete": {"target": "nothing"}}],
            }
        )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_save_target_must_match_one_tensor(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.TransformError, match=r"transforms\[0\] \(save\).*`h\.0\..*` matches 2 tensors"):
        bs.check({"inputs": [str(a)], "transforms": [{"save": {"path": str(tmp_path / "x.safetensors"), "target": "h.0.*"}}]})


def test_save_unknown_alias_and_formats(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.save\.alias.*unknown alias `nope`"):
        bs.check({"inputs": [str(a)], "transforms": [{"save": {"path": str(tmp_path / "x"), "alias": "nope"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.save\.format.*one \.npz \(or \.npy\) file"):
        bs.check({"inputs": [str(a)], "transforms": [{"save": {"path": str(tmp_path / "x"), "alias": "model", "format": "npz"}}]})
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.save.*not both"):
        bs.check(
            {"inputs": [str(a)], "transforms": [{"save": {"path": str(tmp_path / "x"), "alias": "model", "target": "ids"}}]}
        )


def test_files_save_writes_are_in_the_report_before_the_output(write, tmp_path):
    a = write(_tensors(), "a.safetensors")
    saved, out = tmp_path / "snapshot.safetensors", tmp_path / "out.safetensors"
    report = bs.run(
        {
            "inputs": [f"model::{a}"],
            "transforms": [
                {"save": {"path": str(saved), "alias": "model"}},
                {"scale_": {"target": "h.0.w", "by": 2.0}},
            ],
            "output": str(out),
        }
    )
    assert [str(p) for p in report["written"]] == [str(saved), str(out)]
    np.testing.assert_array_equal(load_file(str(saved))["h.0.w"], _tensors()["h.0.w"])


def _plan(path, text):
    path.write_text(text)
    return path


def test_issue15_load_of_a_file_an_earlier_save_writes(write, tmp_path):
    """Issue 15 item 2 (the 0.2 tool's examples/gpt2.yaml): save a tensor, load it back, assert
    equality. The check gives the load what the save will write; a stale file of another shape
    at that path from an earlier run is not read by the check."""
    from helpers import cli

    t = _tensors()
    a = write(t, "a.safetensors")
    np.save(tmp_path / "unrelated.npy", np.zeros(2, np.float32))
    write({"stale": np.zeros((7, 7), np.float16)}, "demo_x.safetensors")  # an earlier run's file
    plan = _plan(
        tmp_path / "roundtrip.yaml",
        f"inputs:\n  - {a}\n"
        "output: { path: out.safetensors }\n"
        "transforms:\n"
        "  - copy: { from: \"h.0.w::[:2]\", to: demo.x }\n"
        "  - save: { path: demo_x.safetensors, target: demo.x }\n"
        "  - load: { path: demo_x.safetensors, to: demo.x_loaded, format: safetensors }\n"
        "  - assert: { equal: { left: demo.x_loaded, right: demo.x } }\n"
        "  - save: { path: backup.safetensors }  # the default alias, whole\n"
        "  - load: { path: backup.safetensors, alias: orig }\n"
        "  - assert: { equal: { left: 'orig::(.+)', right: '\\1' } }\n"
        "  - delete: { target: demo.x }\n"
        "  - delete: { target: demo.x_loaded }\n",
    )
    assert bs.check(plan)["output"] == []
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(read(tmp_path / "demo_x.safetensors")["demo.x"], t["h.0.w"][:2])
    back = read(tmp_path / "backup.safetensors")
    assert set(back) == {*t, "demo.x", "demo.x_loaded"}
    np.testing.assert_array_equal(back["demo.x_loaded"], t["h.0.w"][:2])
    out = read(tmp_path / "out.safetensors")
    assert set(out) == set(t) and all(np.array_equal(out[k], t[k]) for k in t)
    # A load of a file nothing in the plan writes is still opened in the check.
    with pytest.raises(bs.FormatError):
        bs.check({"inputs": [str(a)], "transforms": [{"load": {"path": str(tmp_path / "none.safetensors"), "alias": "n"}}]})


def test_a_load_the_run_could_not_read_as_its_save_wrote_is_refused_by_the_check(write, tmp_path):
    """A NumPy save to a path without an extension, loaded without `format`: the run would read
    it as safetensors (as its name says), so the check refuses it and names the way out; a
    single-file save to an existing directory is refused by the check, not after the steps."""
    a = write(_tensors(), "a.safetensors")
    steps = [
        {"save": {"path": str(tmp_path / "one"), "target": "h.0.w", "format": "numpy"}},
        {"load": {"path": str(tmp_path / "one"), "alias": "back"}},
    ]
    with pytest.raises(bs.PlanError, match=r"transforms\[1\]\.load\.format.*NumPy weights.*not safetensors.*give `format`"):
        bs.check({"inputs": [str(a)], "transforms": steps})
    steps[1]["load"]["format"] = "numpy"
    bs.run({"inputs": [str(a)], "transforms": steps}, quiet=True)
    (tmp_path / "adir").mkdir()
    save_dir = [{"save": {"path": str(tmp_path / "adir"), "target": "h.0.w", "format": "numpy"}}]
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.save\.path.*is a directory"):
        bs.check({"inputs": [str(a)], "transforms": save_dir})


def test_issue15_save_without_alias_or_target_saves_the_default_alias(write, tmp_path):
    """Issue 15 item 3: the only input, or `output.alias`; ambiguous is a plan error."""
    from helpers import assert_one_error, cli

    t = _tensors()
    a = write(t, "a.safetensors")
    b = write(_tensors(1), "b.safetensors")
    plan = _plan(tmp_path / "one.yaml", f"inputs:\n  - {a}\ntransforms:\n  - save: {{ path: only.safetensors }}\n")
    assert cli([plan], cwd=tmp_path).returncode == 0
    assert tensor_names(tmp_path / "only.safetensors") == list(t)
    plan = _plan(
        tmp_path / "two.yaml",
        f"inputs:\n  - base::{a}\n  - other::{b}\noutput: {{ path: out.safetensors, alias: other }}\n"
        "transforms:\n  - save: { path: copy_of_other.safetensors }\n",
    )
    assert cli([plan], cwd=tmp_path).returncode == 0
    got = read(tmp_path / "copy_of_other.safetensors")
    assert all(np.array_equal(got[k], v) for k, v in _tensors(1).items())
    plan = _plan(
        tmp_path / "ambiguous.yaml",
        f"inputs:\n  - base::{a}\n  - other::{b}\ntransforms:\n  - save: {{ path: which.safetensors }}\n",
    )
    assert_one_error(cli([plan], cwd=tmp_path), 2, "transforms[0].save", "default alias", "base, other", "give `alias`")
    assert not (tmp_path / "which.safetensors").exists()


def test_issue15_numpy_writes_npy_for_one_tensor_or_an_npy_path(write, tmp_path):
    """Issue 15 item 5: `format: numpy` is `.npy` for one tensor or a `.npy` path (never a zip
    under a `.npy` name), `.npz` otherwise."""
    from helpers import cli

    t = _tensors()
    a = write(t, "a.safetensors")
    plan = _plan(
        tmp_path / "numpy.yaml",
        f"inputs:\n  - {a}\n"
        "transforms:\n"
        "  - save: { path: emb.npy, target: model::h.0.w, format: numpy }\n"
        "  - save: { path: bias.arr, target: h.0.b, format: numpy }\n"
        "  - save: { path: all.npz, format: numpy }\n"
        "  - copy: { from: h.0.b, to: extra.b }\n"
        "  - load: { path: emb.npy, to: emb_back }\n"
        "  - assert: { equal: { left: emb_back, right: h.0.w } }\n",
    )
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name, want in [("emb.npy", t["h.0.w"]), ("bias.arr", t["h.0.b"])]:
        assert (tmp_path / name).read_bytes()[:6] == b"\x93NUMPY", name
        np.testing.assert_array_equal(np.load(tmp_path / name), want)
    with np.load(tmp_path / "all.npz") as z:
        assert sorted(z.files) == sorted(t)
    # The output: a `.npy` path with `format: numpy` holds its one tensor as a `.npy`.
    one = write({"w": t["h.0.w"]}, "one.safetensors")
    bs.run({"inputs": [str(one)], "output": {"path": str(tmp_path / "out.npy"), "format": "numpy"}})
    assert (tmp_path / "out.npy").read_bytes()[:6] == b"\x93NUMPY"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), t["h.0.w"])
