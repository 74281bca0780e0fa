"""copy / move / delete (src/transforms/copy.rs): names, values, order and errors."""

from __future__ import annotations

import numpy as np
import pytest

import brainsurgery as bs
from conftest import raw_bytes, read, tensor_names


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "model.layers.0.mlp.w": rng.standard_normal((3, 4)).astype(np.float32),
        "model.layers.1.mlp.w": rng.standard_normal((3, 4)).astype(np.float32),
        "model.layers.1.attn.w": rng.standard_normal(5).astype(np.float16),
        "model.embed": np.arange(6, dtype=np.int64).reshape(2, 3),
        "lm_head.weight": np.array([np.nan, -0.0, np.inf, 1e-40], dtype=np.float32),
    }


def _run(src, transforms, tmp_path, name="out.safetensors"):
    out = tmp_path / name
    bs.run({"inputs": [str(src)], "transforms": transforms, "output": str(out)})
    return out


# ---------------------------------------------------------------- copy


def test_copy_keeps_values_bit_exact_including_nan_negzero_subnormal(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"copy": {"from": "lm_head.weight", "to": "backup"}}], tmp_path)
    got = read(out)
    assert got["backup"].dtype == np.float32
    assert got["backup"].tobytes() == tensors["lm_head.weight"].tobytes()
    # The source is still there and unchanged.
    assert got["lm_head.weight"].tobytes() == tensors["lm_head.weight"].tobytes()
    assert set(got) == set(tensors) | {"backup"}


def test_copy_every_dtype_bit_exact(write, tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(2)
    tensors = {
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal(5).astype(np.float16),
        "bf16": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        "e4m3": rng.standard_normal(5).astype(ml_dtypes.float8_e4m3fn),
        "e5m2": rng.standard_normal(5).astype(ml_dtypes.float8_e5m2),
        "i8": np.array([-128, 127, 0, 1, -1], np.int8),
        "i16": np.array([-32768, 32767, 0], np.int16),
        "i32": np.array([-(2**31), 2**31 - 1], np.int32),
        "u8": np.array([0, 255, 7], np.uint8),
        "b": np.array([True, False, True]),
    }
    src = write(tensors)
    out = _run(src, [{"copy": {"from": "(.*)", "to": r"copy.\1"}}], tmp_path)
    for name, array in tensors.items():
        dtype, shape, data = raw_bytes(out, f"copy.{name}")
        assert data == array.tobytes(), name
        assert shape == list(array.shape)
        assert raw_bytes(out, name)[0] == dtype


def test_copy_new_tensors_follow_input_order_in_creation_order(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"copy": {"from": r"model\.layers\.(\d+)\.mlp\.w", "to": r"z.\1"}}, {"copy": {"from": "model.embed", "to": "a.embed"}}], tmp_path)
    assert tensor_names(out) == list(tensors) + ["z.0", "z.1", "a.embed"]


def test_copy_with_slice_copies_the_region(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"copy": {"from": "model.layers.0.mlp.w::[1:, ::-2]", "to": "part"}}], tmp_path)
    got = read(out)
    expected = tensors["model.layers.0.mlp.w"][1:, ::-2]
    assert got["part"].shape == expected.shape
    np.testing.assert_array_equal(got["part"], expected)


# ---------------------------------------------------------------- rewrites


@pytest.mark.parametrize(
    ("pattern", "template", "expected"),
    [
        (r"model\.layers\.(\d+)\.(.*)", r"blocks.\1.\2", {"blocks.0.mlp.w", "blocks.1.mlp.w", "blocks.1.attn.w"}),
        (r"model\.layers\.(?P<n>\d+)\.(?P<rest>.*)", r"L\g<n>.\g<rest>", {"L0.mlp.w", "L1.mlp.w", "L1.attn.w"}),
        (r"model\.layers\.(\d+)\.(.*)", r"backup.\g<0>", {"backup.model.layers.0.mlp.w", "backup.model.layers.1.mlp.w", "backup.model.layers.1.attn.w"}),
        (r"model\.layers\.(\d)\.mlp\.w", r"x\g<1>y", {"x0y", "x1y"}),
        # SPEC §9: the rewrite expands the full match, so `(.*)` -> `backup.\1` gives the whole name.
        (r"(lm_head.*)", r"backup.\1", {"backup.lm_head.weight"}),
    ],
)
def test_copy_rewrite_templates(write, tmp_path, pattern, template, expected):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"copy": {"from": pattern, "to": template}}], tmp_path)
    got = read(out)
    assert set(got) - set(tensors) == expected


def test_rewrite_template_dot_is_literal(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"copy": {"from": "model.embed", "to": "a.b"}}], tmp_path)
    got = read(out)
    assert "a.b" in got
    np.testing.assert_array_equal(got["a.b"], tensors["model.embed"])


def test_rewrite_values_follow_their_source(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"copy": {"from": r"model\.layers\.(\d+)\.mlp\.w", "to": r"c\1"}}], tmp_path)
    got = read(out)
    np.testing.assert_array_equal(got["c0"], tensors["model.layers.0.mlp.w"])
    np.testing.assert_array_equal(got["c1"], tensors["model.layers.1.mlp.w"])


# ---------------------------------------------------------------- structured patterns


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        (["model", "layers", "$i", "*rest"], ["blk", "$i", "*rest"], {"blk.0.mlp.w": "model.layers.0.mlp.w", "blk.1.mlp.w": "model.layers.1.mlp.w", "blk.1.attn.w": "model.layers.1.attn.w"}),
        (["model", "layers", "~i::\\d+", "mlp", "w"], ["mlp${i}", "weight"], {"mlp0.weight": "model.layers.0.mlp.w", "mlp1.weight": "model.layers.1.mlp.w"}),
        (["model", "layers", "~1", "*rest"], ["one", "*rest"], {"one.mlp.w": "model.layers.1.mlp.w", "one.attn.w": "model.layers.1.attn.w"}),
        (["model", "~a,b::(l)(ayers)", "$i", "mlp", "w"], ["${b}${a}", "$i"], {"ayersl.0": "model.layers.0.mlp.w", "ayersl.1": "model.layers.1.mlp.w"}),
        (["*all", "embed"], ["e", "*all"], {"e.model": "model.embed"}),
    ],
)
def test_copy_structured_patterns(write, tmp_path, source, target, expected):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"copy": {"from": source, "to": target}}], tmp_path)
    got = read(out)
    assert set(got) - set(tensors) == set(expected)
    for new, old in expected.items():
        assert got[new].tobytes() == tensors[old].tobytes()


def test_structured_reference_with_alias_and_slice(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = tmp_path / "out.safetensors"
    bs.run(
        {
            "inputs": [f"m::{src}"],
            "transforms": [{"copy": {"from": {"alias": "m", "path": ["model", "layers", "$i", "mlp", "w"], "slice": "[:, :2]"}, "to": ["s", "$i"]}}],
            "output": str(out),
        }
    )
    got = read(out)
    np.testing.assert_array_equal(got["s.0"], tensors["model.layers.0.mlp.w"][:, :2])
    np.testing.assert_array_equal(got["s.1"], tensors["model.layers.1.mlp.w"][:, :2])


def test_structured_literal_interpolation_in_file_plan_is_literal_outside_tokens(write, tmp_path):
    # SPEC §2/§9: `${...}` means nothing in a plain (regex) rewrite template.
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"copy": {"from": "model.embed", "to": "x${i}"}}], tmp_path)
    assert "x${i}" in read(out)


# ---------------------------------------------------------------- move


def test_move_renames_bit_exact_and_keeps_input_position(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"move": {"from": r"model\.layers\.1\.(.*)", "to": r"moved.\1"}}], tmp_path)
    expected_order = [n.replace("model.layers.1.", "moved.") for n in tensors]
    assert tensor_names(out) == expected_order
    got = read(out)
    assert got["moved.mlp.w"].tobytes() == tensors["model.layers.1.mlp.w"].tobytes()
    assert got["moved.attn.w"].tobytes() == tensors["model.layers.1.attn.w"].tobytes()
    assert got["moved.attn.w"].dtype == np.float16
    assert "model.layers.1.mlp.w" not in got


def test_move_chain_then_move_back_is_identity(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"move": {"from": "(.*)", "to": r"tmp.\1"}}, {"move": {"from": r"tmp\.(.*)", "to": r"\1"}}], tmp_path)
    assert tensor_names(out) == list(tensors)
    got = read(out)
    for name, array in tensors.items():
        assert got[name].tobytes() == array.tobytes()


def test_move_swap_via_pattern_into_existing_name_raises(write, tmp_path):
    src = write(_inputs())
    with pytest.raises(bs.TransformError, match="exists"):
        _run(src, [{"move": {"from": "model.layers.0.mlp.w", "to": "model.layers.1.mlp.w"}}], tmp_path)


# ---------------------------------------------------------------- errors


def test_copy_collision_raises(write, tmp_path):
    src = write(_inputs())
    with pytest.raises(bs.TransformError) as info:
        _run(src, [{"copy": {"from": r"model\.layers\.(\d+)\.mlp\.w", "to": "same"}}], tmp_path)
    message = str(info.value)
    assert "same" in message
    assert "model.layers.0.mlp.w" in message and "model.layers.1.mlp.w" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_move_collision_raises(write, tmp_path):
    src = write(_inputs())
    with pytest.raises(bs.TransformError, match="both rewrite"):
        _run(src, [{"move": {"from": r"model\.layers\.\d+\.mlp\.(w)", "to": r"\1"}}], tmp_path)


def test_copy_destination_exists_raises(write, tmp_path):
    src = write(_inputs())
    with pytest.raises(bs.TransformError, match="already exists"):
        _run(src, [{"copy": {"from": "model.embed", "to": "lm_head.weight"}}], tmp_path)
    assert not (tmp_path / "out.safetensors").exists()


def test_transform_is_checked_against_all_matches_before_applying(write, tmp_path):
    # Second match's destination exists; nothing may be written.
    tensors = {"a.0": np.ones(2, np.float32), "a.1": np.zeros(2, np.float32), "b.1": np.ones(2, np.float32)}
    src = write(tensors)
    with pytest.raises(bs.TransformError, match=r"b\.1"):
        _run(src, [{"copy": {"from": r"a\.(\d)", "to": r"b.\1"}}], tmp_path)
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("transform", ["copy", "move"])
def test_zero_matches_raise_with_closest_names(write, tmp_path, transform):
    tensors = {f"name.{i}": np.zeros(1, np.float32) for i in range(40)}
    tensors["model.layers.0.mlp.weight"] = np.zeros(1, np.float32)
    src = write(tensors)
    with pytest.raises(bs.TransformError) as info:
        _run(src, [{transform: {"from": r"model\.layers\.0\.mlp\.wieght", "to": "x"}}], tmp_path)
    message = str(info.value)
    assert "wieght" in message  # the pattern
    assert "model.layers.0.mlp.weight" in message  # the closest name
    # not the whole list
    assert sum(f"name.{i}`" in message for i in range(40)) < 10


def test_regex_must_match_whole_name(write, tmp_path):
    src = write(_inputs())
    with pytest.raises(bs.TransformError, match="matches no tensor"):
        _run(src, [{"copy": {"from": "layers", "to": "x"}}], tmp_path)


# ---------------------------------------------------------------- delete


def test_delete_removes_only_matches_and_keeps_order(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"delete": {"target": r"model\.layers\..*"}}], tmp_path)
    assert tensor_names(out) == ["model.embed", "lm_head.weight"]
    got = read(out)
    np.testing.assert_array_equal(got["model.embed"], tensors["model.embed"])


def test_delete_missing_raises_and_missing_ok_passes(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    with pytest.raises(bs.TransformError, match="nothing"):
        _run(src, [{"delete": {"target": "nothing"}}], tmp_path)
    out = _run(src, [{"delete": {"target": "nothing", "missing_ok": True}}], tmp_path)
    assert tensor_names(out) == list(tensors)


def test_delete_then_copy_into_freed_name(write, tmp_path):
    tensors = _inputs()
    src = write(tensors)
    out = _run(src, [{"delete": {"target": "model.layers.0.mlp.w"}}, {"copy": {"from": "model.layers.1.mlp.w", "to": "model.layers.0.mlp.w"}}], tmp_path)
    got = read(out)
    np.testing.assert_array_equal(got["model.layers.0.mlp.w"], tensors["model.layers.1.mlp.w"])


def test_inputs_are_never_modified(write, tmp_path):
    src = write(_inputs())
    before = src.read_bytes()
    _run(src, [{"move": {"from": "(.*)", "to": r"x.\1"}}, {"delete": {"target": r"x\.model\..*"}}], tmp_path)
    assert src.read_bytes() == before
