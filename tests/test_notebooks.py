"""The notebooks in notebooks/ run headless and do what they say.

Each notebook is executed by nbclient in a temporary working directory, on a kernel that is this
interpreter's ipykernel (a kernelspec written for the test, so a ``python3`` kernel installed
elsewhere or a ``python`` on PATH from another environment is never picked up). A failing cell,
including the notebook's own ``assert`` cells, fails the test with its traceback. Then the key
printed numbers are checked, and the files the notebook wrote are read back here with readers
that are not brainsurgery's (safetensors' NumPy loader, or a raw header + bytes parse for
bfloat16) and compared with NumPy.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import nbformat
import numpy as np
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient
from safetensors.numpy import load_file

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "brainsurgery-tests"
# Every notebook runs in well under 30 s on 2 cores; the margin is for a loaded CI machine.
CELL_TIMEOUT = 120


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Jupyter data directory whose one kernel is ``sys.executable -m ipykernel_launcher``."""
    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(path=root / "kernels" / KERNEL)
    return root


def execute(name: str, workdir: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run notebooks/``name`` with ``workdir`` as its working directory; returns the executed notebook."""
    # The inline backend renders figures to PNG outputs with Agg and needs no display; set
    # explicitly so an MPLBACKEND or matplotlibrc of the machine cannot pick a GUI backend.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # JUPYTER_PATH is searched before the user's and the environment's kernel directories. The
    # connection files and IPython's profile (startup scripts, history) stay out of $HOME too.
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(kernel_dir / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(kernel_dir / "ipython"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def stdout(nb: Any) -> str:
    """Everything the code cells printed."""
    cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    return "".join(out.get("text", "") for cell in cells for out in cell.outputs if out.output_type == "stream")


def outputs(nb: Any, cell_id: str) -> list[Any]:
    (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
    return cell.outputs


def number(text: str, label: str) -> float:
    """The number printed after ``label`` (a literal prefix) on its line."""
    match = re.search(re.escape(label) + r"\s*([-+0-9.eE]+|nan|inf)", text)
    assert match, f"{label!r} not printed; output was:\n{text}"
    return float(match.group(1))


def raw_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, parsed by hand (safetensors' NumPy loader has no bfloat16)."""
    kinds = {"BF16": ml_dtypes.bfloat16, "F32": np.float32}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return {
        name: np.frombuffer(data[e["data_offsets"][0] : e["data_offsets"][1]], dtype=kinds[e["dtype"]]).reshape(e["shape"])
        for name, e in header.items()
    }


def safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def test_every_notebook_is_tested() -> None:
    tested = {"01_inspect_and_edit", "02_upcycle_moe", "03_lora_extract_and_merge"}
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == tested


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {cell.id} has outputs"


def test_inspect_and_edit(tmp_path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("01_inspect_and_edit.ipynb", tmp_path, kernel_dir, monkeypatch)
    text = stdout(nb)

    # The rich repr of the opened checkpoint: four identical layers folded into one run.
    (shown,) = [o for o in outputs(nb, "inspect-repr") if o.output_type == "execute_result"]
    assert "model.layers.[0-3].self_attn.q_proj.weight" in shown.data["text/html"]
    assert "KeyError:" in text and '"model.layers.0.self_attn.q_proj.weight"' in text
    # The session: the failed block named the head, the plan replayed to the same bytes, and the
    # plan was refused once an array had been handed in.
    assert "AssertionFailed:" in text and "`m::lm_head.weight`" in text
    assert "replay is byte-identical: True" in text
    assert "PlanError:" in text and "handed in" in text
    assert "borrowed, not copied: True" in text
    saved, replayed = tmp_path / "out" / "session.safetensors", tmp_path / "out" / "tiny-llama-bf16.safetensors"
    assert saved.read_bytes() == replayed.read_bytes()

    # The input, written by bs.save: float32 as given, safetensors' `format: pt` metadata.
    source = load_file(str(tmp_path / "tiny-llama.safetensors"))
    assert len(source) == 39 and all(v.dtype == np.float32 for v in source.values())
    np.testing.assert_array_equal(source["model.layers.3.input_layernorm.weight"], np.ones(32, np.float32))
    assert safetensors_metadata(tmp_path / "tiny-llama.safetensors")["format"] == "pt"
    written = raw_safetensors(tmp_path / "out" / "tiny-llama-bf16.safetensors")
    expected = {re.sub(r"^model\.layers\.", "layers.", k): v for k, v in source.items() if k != "lm_head.weight"}
    assert sorted(written) == sorted(expected)
    for name, value in expected.items():
        if "layernorm" in name:
            value = value * np.float32(0.5)
        np.testing.assert_array_equal(written[name], value.astype(ml_dtypes.bfloat16), err_msg=name)


def test_upcycle_moe(tmp_path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("02_upcycle_moe.ipynb", tmp_path, kernel_dir, monkeypatch)
    text = stdout(nb)
    assert number(text, "max |logits difference| dense vs MoE:") < 1e-5
    assert number(text, "max |logits difference| with a random router:") < 1e-5
    # upcycle_moe to 8 experts keeps the logits; 1% noise moves them, by a little.
    assert number(text, "max |logits difference| with 8 experts:") < 1e-5
    assert "noisy experts differ: True" in text
    assert 1e-5 < number(text, "max |logits difference| with 1% noise:") < 1.0
    assert "same next-token predictions: True" in text
    # The experts of result.tensors are views of the dense file's bytes, not copies.
    assert "the 4 experts' w1 share one memory: True" in text
    plots = [o for o in outputs(nb, "upcycle-norms-plot") if "image/png" in o.get("data", {})]
    assert plots, "the norm plot was not drawn"

    dense = load_file(str(tmp_path / "dense.safetensors"))
    moe = load_file(str(tmp_path / "moe.safetensors"))
    parts = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    expected = {k: v for k, v in dense.items() if ".mlp." not in k}
    for i in range(2):
        expected[f"model.layers.{i}.block_sparse_moe.gate.weight"] = np.zeros((4, 64), np.float32)
        for e in range(4):
            for dense_name, moe_name in parts.items():
                expected[f"model.layers.{i}.block_sparse_moe.experts.{e}.{moe_name}.weight"] = dense[
                    f"model.layers.{i}.mlp.{dense_name}.weight"
                ]
    assert sorted(moe) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(moe[name], value, err_msg=name)


def test_lora_extract_and_merge(tmp_path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("03_lora_extract_and_merge.ipynb", tmp_path, kernel_dir, monkeypatch)
    text = stdout(nb)
    # The synthetic delta has rank 8 plus 1% noise: the error collapses to the noise at rank 8.
    assert number(text, "rank  4: relative error max") > 0.3
    assert number(text, "rank  8: relative error max") < 0.02
    assert number(text, "largest |measured - reported| error:") < 1e-4
    # The RunResult repr lists the factorizations the run reported.
    (shown,) = [o for o in outputs(nb, "lora-05") if o.output_type == "execute_result"]
    assert "extract_lora ft::model.layers.0.self_attn.q_proj.weight: rank 8" in shown.data["text/plain"]
    plots = [o for o in outputs(nb, "lora-spectrum-plot") if "image/png" in o.get("data", {})]
    assert plots, "the spectrum plot was not drawn"

    base = load_file(str(tmp_path / "base.safetensors"))
    finetuned = load_file(str(tmp_path / "finetuned.safetensors"))
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for rank in (1, 2, 4, 8, 16, 32):
        adapter = load_file(str(tmp_path / "adapters" / f"r{rank}" / "adapter_model.safetensors"))
        config = json.loads((tmp_path / "adapters" / f"r{rank}" / "adapter_config.json").read_text())
        assert config["r"] == rank and config["peft_type"] == "LORA"
        scaling = config["lora_alpha"] / config["r"]
        for name in base:
            module = f"base_model.model.{name.removesuffix('.weight')}"
            a, b = adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"]
            assert a.shape[0] == rank and b.shape[1] == rank
            delta = finetuned[name].astype(np.float64) - base[name]
            sigma = np.linalg.svd(delta, compute_uv=False)
            best = np.sqrt((sigma[rank:] ** 2).sum() / (sigma**2).sum())  # Eckart–Young
            got = np.linalg.norm(delta - scaling * (b.astype(np.float64) @ a)) / np.linalg.norm(delta)
            assert got == pytest.approx(best, abs=1e-4), (rank, name)
            if rank == 8:
                np.testing.assert_allclose(merged[name], base[name] + scaling * (b @ a), rtol=0, atol=1e-6, err_msg=name)
