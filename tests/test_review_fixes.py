"""Regressions for the first review of the engine (each names the finding it covers)."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import brainsurgery as bs

from helpers import write_st as write_safetensors


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"w": np.arange(6, dtype=np.float32), "ids": np.arange(3, dtype=np.int64)})
    return path


def test_numpy_scalars_are_accepted_in_plans(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [str(model)], "transforms": [{"scale_": {"target": "w", "by": np.float32(0.5)}},
                                                    {"assert": {"count": {"of": "w", "is": np.int64(1)}}}],
            "output": str(out)})
    np.testing.assert_array_equal(load_file(out)["w"], np.arange(6, dtype=np.float32) * np.float32(0.5))


def test_a_required_key_left_empty_is_a_plan_error(model: Path) -> None:
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.cast.*missing required key `dtype`"):
        bs.check({"inputs": [str(model)], "transforms": [{"cast": {"from": "w", "to": "v", "dtype": None}}]})


def test_options_may_come_before_the_plan(model: Path, tmp_path: Path) -> None:
    plan = tmp_path / "p.yaml"
    plan.write_text(f"inputs: ['{model}']\noutput: '{tmp_path / 'o.safetensors'}'\n")
    result = subprocess.run(["brainsurgery", "--threads", "1", str(plan)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o.safetensors").exists()


def test_other_frameworks_weights_are_not_sidecars(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "model.safetensors", {"w": np.ones(2, np.float32)})
    for name in ["config.json", "tf_model.h5", "flax_model.msgpack", "model.onnx", "model.gguf"]:
        (src / name).write_text("x")
    bs.run({"inputs": [str(src)], "output": str(tmp_path / "out")})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_default_alias_with_a_new_output_alias(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    bs.run({"inputs": [str(model)], "transforms": [{"copy": {"from": "w", "to": "new::w"}}],
            "output": {"path": str(out), "alias": "new"}})
    assert list(load_file(out)) == ["w"]
