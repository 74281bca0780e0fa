"""Tensor references (src/references/): regex full match, Python `re` features, aliases, slices."""

from __future__ import annotations

import numpy as np
import pytest

import brainsurgery as bs
from conftest import read, tensor_names

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.lm_head.weight",
    "model.norm.weight",
    "lm_head.weight",
    "i",
    "a.w",
]


@pytest.fixture
def tensors():
    return {name: np.full((2,), k, np.float32) for k, name in enumerate(NAMES)}


@pytest.fixture
def src(write, tensors):
    return write(tensors)


def _selected(src, tmp_path, pattern, inputs=None):
    """Names matched by ``pattern``: delete them and see which are gone (order = input order)."""
    out = tmp_path / "sel.safetensors"
    bs.run({"inputs": inputs or [str(src)], "transforms": [{"copy": {"from": pattern, "to": r"sel.\g<0>"}}], "output": str(out)})
    return [n[len("sel."):] for n in tensor_names(out) if n.startswith("sel.")]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"model\.(?!lm_head).*", [n for n in NAMES if n.startswith("model.") and not n.startswith("model.lm_head")]),
        (r"(?!.*weight).*", ["i", "a.w"]),
        (r".*(?<!proj\.weight)", [n for n in NAMES if not n.endswith("proj.weight")]),
        (r".*(?<=layers\.1\.)mlp.*", ["model.layers.1.mlp.up_proj.weight"]),
        (r"model\.layers\.(?P<n>\d+)\.mlp\..*", ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]),
        (r"(?i)MODEL\.NORM\.WEIGHT", ["model.norm.weight"]),
        (r"model\.layers\.\d\.(self_attn|mlp)\.(q|up)_proj\.weight", [n for n in NAMES if "proj" in n]),
        (r"[a-z]\.w", ["a.w"]),
        (r"\w", ["i"]),
    ],
)
def test_python_re_features(src, tmp_path, pattern, expected):
    assert _selected(src, tmp_path, pattern) == expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("lm_head.weight", ["lm_head.weight"]),  # not model.lm_head.weight (no search semantics)
        ("i|a", ["i"]),  # alternation is anchored as a whole: `a` alone does not match `a.w`
        ("a|i", ["i"]),
        (r"a\.w|i", ["i", "a.w"]),
        ("weight", None),
        ("model", None),
        (r"model\.layers\.0", None),
        (r"\.w", None),
    ],
)
def test_regex_must_match_the_whole_name(src, tmp_path, pattern, expected):
    if expected is None:
        with pytest.raises(bs.TransformError, match="matches no tensor"):
            _selected(src, tmp_path, pattern)
    else:
        assert _selected(src, tmp_path, pattern) == expected


def test_literal_dot_in_pattern_is_a_regex_dot(write, tmp_path):
    # `.` in a pattern is regex any-char (Python re), so `a.w` also matches `axw`.
    path = write({"a.w": np.zeros(1, np.float32), "axw": np.ones(1, np.float32)})
    assert _selected(path, tmp_path, "a.w") == ["a.w", "axw"]


def test_matches_processed_in_input_order(write, tmp_path):
    names = ["z.3", "a.1", "m.2", "b.10", "b.9"]
    path = write({n: np.zeros(1, np.float32) for n in names})
    assert _selected(path, tmp_path, ".*") == names


def test_rewrite_groups_and_whole_match(src, tmp_path, tensors):
    out = tmp_path / "out.safetensors"
    bs.run(
        {
            "inputs": [str(src)],
            "transforms": [{"copy": {"from": r"model\.layers\.(?P<layer>\d+)\.(\w+)\.(.*)", "to": r"L\g<layer>.\g<2>.\3|\1|\g<0>"}}],
            "output": str(out),
        }
    )
    got = read(out)
    new = sorted(set(got) - set(tensors))
    assert new == sorted(
        [
            "L0.self_attn.q_proj.weight|0|model.layers.0.self_attn.q_proj.weight",
            "L0.mlp.up_proj.weight|0|model.layers.0.mlp.up_proj.weight",
            "L1.self_attn.q_proj.weight|1|model.layers.1.self_attn.q_proj.weight",
            "L1.mlp.up_proj.weight|1|model.layers.1.mlp.up_proj.weight",
        ]
    )
    for name in new:
        np.testing.assert_array_equal(got[name], tensors[name.split("|")[2]])


# ---------------------------------------------------------------- aliases


def test_default_alias_with_one_input(src, tmp_path, tensors):
    out = tmp_path / "out.safetensors"
    # bare path input -> alias "model"; bare pattern and `model::` name the same tensors.
    bs.run({"inputs": [str(src)], "transforms": [{"copy": {"from": "i", "to": "j"}}, {"copy": {"from": "model::j", "to": "model::k"}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["k"], tensors["i"])


def test_named_single_input_is_the_default(src, tmp_path, tensors):
    out = tmp_path / "out.safetensors"
    bs.run({"inputs": [f"base::{src}"], "transforms": [{"copy": {"from": "i", "to": "j"}}, {"assert": {"exists": "base::j"}}], "output": str(out)})
    np.testing.assert_array_equal(read(out)["j"], tensors["i"])


def test_no_default_alias_with_two_inputs(write, tmp_path):
    pa = write({"w": np.zeros(2, np.float32)}, "a.safetensors")
    pb = write({"w": np.ones(2, np.float32)}, "b.safetensors")
    with pytest.raises(bs.PlanError) as info:
        bs.run({"inputs": [f"a::{pa}", f"b::{pb}"], "transforms": [{"copy": {"from": "w", "to": "v"}}], "output": str(tmp_path / "o.safetensors")})
    message = str(info.value)
    assert "a" in message and "b" in message and "alias" in message
    # check() refuses it too, before reading anything.
    with pytest.raises(bs.PlanError):
        bs.check({"inputs": [f"a::{pa}", f"b::{pb}"], "transforms": [{"copy": {"from": "w", "to": "v"}}], "output": str(tmp_path / "o.safetensors")})


def test_output_alias_is_the_default_with_two_inputs(write, tmp_path):
    pa = write({"w": np.zeros(2, np.float32)}, "a.safetensors")
    pb = write({"w": np.arange(2, dtype=np.float32)}, "b.safetensors")
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [f"a::{pa}", f"b::{pb}"], "transforms": [{"copy": {"from": "w", "to": "v"}}], "output": {"path": str(out), "alias": "b"}})
    got = read(out)
    assert set(got) == {"w", "v"}
    np.testing.assert_array_equal(got["v"], np.arange(2, dtype=np.float32))


def test_cross_alias_copy_and_unknown_alias(write, tmp_path):
    pa = write({"w": np.zeros(2, np.float32)}, "a.safetensors")
    pb = write({"w": np.arange(2, dtype=np.float32)}, "b.safetensors")
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [f"a::{pa}", f"b::{pb}"], "transforms": [{"copy": {"from": "b::w", "to": "a::from_b"}}], "output": {"path": str(out), "alias": "a"}})
    got = read(out)
    np.testing.assert_array_equal(got["from_b"], np.arange(2, dtype=np.float32))
    np.testing.assert_array_equal(got["w"], np.zeros(2, np.float32))
    with pytest.raises(bs.PlanError, match="zz"):
        bs.run({"inputs": [f"a::{pa}", f"b::{pb}"], "transforms": [{"copy": {"from": "zz::w", "to": "a::q"}}], "output": {"path": str(out), "alias": "a"}})


# ---------------------------------------------------------------- slices


X = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("[:2]", np.s_[:2]),
        ("[1]", np.s_[1]),
        ("[-1]", np.s_[-1]),
        ("[:, 1:3]", np.s_[:, 1:3]),
        ("[:, :, ::2]", np.s_[:, :, ::2]),
        ("[::-1]", np.s_[::-1]),
        ("[::-1, ::-2, ::-3]", np.s_[::-1, ::-2, ::-3]),
        ("[-2:, -3:-1, -1]", np.s_[-2:, -3:-1, -1]),
        ("[2:0:-1, 3::-2]", np.s_[2:0:-1, 3::-2]),
        ("[:100]", np.s_[:100]),
        ("[-100:1]", np.s_[-100:1]),
        ("[2:1]", np.s_[2:1]),
        ("[1, 2, 3]", np.s_[1, 2, 3]),
        ("[..., 1]", np.s_[..., 1]),
        ("[1, ...]", np.s_[1, ...]),
        ("[ 0 : 2 , : , 4 ]", np.s_[0:2, :, 4]),
    ],
)
def test_slices_follow_numpy(write, tmp_path, text, index):
    path = write({"x": X})
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"copy": {"from": f"x::{text}", "to": "y"}}], "output": str(out)})
    got = read(out)
    expected = X[index]
    assert got["y"].shape == expected.shape
    np.testing.assert_array_equal(got["y"], expected)


def test_slice_with_alias(write, tmp_path):
    path = write({"x": X})
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [f"m::{path}"], "transforms": [{"copy": {"from": "m::x::[1, ::-1]", "to": "m::y"}}], "output": str(out)})
    np.testing.assert_array_equal(read(out)["y"], X[1, ::-1])


def test_slice_applies_to_every_match(write, tmp_path):
    tensors = {"p.0": X, "p.1": X + 100}
    path = write(tensors)
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [str(path)], "transforms": [{"copy": {"from": r"p\.(\d)::[:, -1]", "to": r"q.\1"}}], "output": str(out)})
    got = read(out)
    np.testing.assert_array_equal(got["q.0"], X[:, -1])
    np.testing.assert_array_equal(got["q.1"], (X + 100)[:, -1])


@pytest.mark.parametrize("text", ["[3]", "[-4]", "[:, 4]", "[::0]", "[:, :, :, :]", "[0, 0, 5]"])
def test_invalid_slice_for_the_tensor_raises(write, tmp_path, text):
    path = write({"x": X})
    with pytest.raises(bs.TransformError) as info:
        bs.run({"inputs": [str(path)], "transforms": [{"copy": {"from": f"x::{text}", "to": "y"}}], "output": str(tmp_path / "o.safetensors")})
    assert "x" in str(info.value)


@pytest.mark.parametrize("text", ["[a]", "[1:2:3:4]", "[", "1:2"])
def test_malformed_slice_is_plan_error(write, tmp_path, text):
    path = write({"x": X})
    with pytest.raises(bs.PlanError):
        bs.run({"inputs": [str(path)], "transforms": [{"copy": {"from": f"x::{text}", "to": "y"}}], "output": str(tmp_path / "o.safetensors")})


def test_invalid_regex_is_plan_error(src, tmp_path):
    with pytest.raises(bs.PlanError, match="regex"):
        _selected(src, tmp_path, "model.(")
