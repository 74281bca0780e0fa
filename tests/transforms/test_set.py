"""set (src/transforms/set.rs): the run's flags of the 0.2 tool (issue 15 item 7) — `dry-run`
forgets what ran while it was on and writes nothing, `preview` prints what each step is about to
do, `verbose` what it did, `set: {}` prints the flags. Expected values are computed with NumPy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import brainsurgery as bs
from conftest import read
from helpers import assert_one_error, cli

RNG = np.random.default_rng(15)
TENSORS = {
    "ln_f.weight": RNG.standard_normal(16).astype(np.float32),
    "h.0.attn.c_proj.weight": RNG.standard_normal((4, 4)).astype(np.float32),
}


@pytest.fixture
def model(write) -> Path:
    return write(TENSORS, "model.safetensors")


def test_flags_as_the_validation_example_sets_them(model, tmp_path):
    plan = tmp_path / "validation.yaml"
    plan.write_text(
        f"inputs:\n  - {model}\n"
        "output: { path: out.safetensors }\n"
        "transforms:\n"
        "  - set: {}  # print the current flags\n"
        "  - set: { dry-run: false, preview: false, verbose: false }  # repeatable flags\n"
        "  - set: { dry-run: true }\n"
        "  - copy: { from: ln_f.weight, to: scratch.w }\n"
        "  - scale_: { target: ln_f.weight, by: 3.0 }\n"
        "  - save: { path: dry.safetensors, target: scratch.w }  # nothing is written\n"
        "  - assert: { exists: scratch.w }\n"
        "  - set: { dry-run: False }  # forget the steps since dry-run was turned on\n"
        "  - assert: { not: { exists: scratch.w } }\n"
        "  - set: { verbose: T, preview: true }\n"
        "  - scale_: { target: ln_f.weight, by: 2.0 }\n"
        "  - set\n",
    )
    proc = cli([plan], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "set flags: dry-run=false, preview=false, verbose=false" in lines
    assert "set flags: dry-run=false, preview=true, verbose=true" in lines
    assert "preview: scale_: 1 tensor × 2" in lines and "scale_: 1 tensor × 2" in lines
    assert lines.index("preview: scale_: 1 tensor × 2") < lines.index("scale_: 1 tensor × 2")
    assert not (tmp_path / "dry.safetensors").exists()
    out = read(tmp_path / "out.safetensors")
    assert set(out) == set(TENSORS)
    np.testing.assert_array_equal(out["ln_f.weight"], TENSORS["ln_f.weight"] * np.float32(2.0))


def test_dry_run_on_at_the_end_writes_no_output(model, tmp_path):
    out = tmp_path / "out.safetensors"
    report = bs.run(
        {
            "inputs": [str(model)],
            "transforms": [{"set": {"dry-run": True, "verbose": True}}, {"scale_": {"target": ".*", "by": 0.5}}],
            "output": str(out),
        }
    )
    assert not out.exists()
    assert any("dry-run" in n and "not written" in n for n in report["notices"])
    assert "dry-run scale_: 2 tensors × 0.5" in report["output"]


def test_python_builder_and_bad_values(model, tmp_path):
    plan = bs.Plan(inputs=[str(model)]).set(dry_run=True, verbose=False)
    assert plan.to_dict()["transforms"] == [{"set": {"dry-run": True, "verbose": False}}]
    report = bs.Plan(inputs=[str(model)]).set(preview=True).set().run()
    assert report["output"] == ["preview: set: flags printed", "set flags: dry-run=false, preview=true, verbose=false"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"inputs: [{model}]\ntransforms:\n  - set: {{ verbose: maybe }}\n")
    assert_one_error(cli([bad], cwd=tmp_path), 2, "transforms[0].set.verbose", "maybe")
    with pytest.raises(bs.PlanError, match=r"transforms\[0\]\.set.*unknown key `dry_run`.*dry-run"):
        bs.check({"inputs": [str(model)], "transforms": [{"set": {"dry_run": True}}]})


def test_verbose_reports_a_nested_plan_once(model):
    report = bs.run(
        {
            "inputs": [str(model)],
            "transforms": [
                {"set": {"verbose": True}},
                {"execute": {"transforms": [{"copy": {"from": "ln_f.weight", "to": "a"}}, {"copy": {"from": "a", "to": "b"}}]}},
            ],
        }
    )
    copies = [line for line in report["output"] if line.startswith("copy:")]
    assert copies == ["copy: 1 tensor", "copy: 1 tensor"], report["output"]
