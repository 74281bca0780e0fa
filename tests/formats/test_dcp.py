"""Reading PyTorch Distributed Checkpoints (a directory of `.metadata` and `*.distcp`): values
match the expectations written beside each fixture by torch (NumPy only, see
tests/fixtures/make_dcp_fixtures.py), whichever way the directory is named as an input; a
tensor saved in one chunk is a zero-copy view, one saved by two ranks is assembled from its
chunks; hostile metadata is refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import raw_bytes

import brainsurgery as bs
from safetensors.numpy import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "dcp"
NAMES = ["plain", "sharded"]


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def check(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(k.removesuffix("::bf16") for k in want)
    for key, value in want.items():
        name = key.removesuffix("::bf16")
        array = got[name]
        if key.endswith("::bf16"):
            assert array.dtype.itemsize == 2 and array.shape == value.shape
            np.testing.assert_array_equal(array.view(np.uint16), value)
        else:
            assert array.dtype == value.dtype, name
            np.testing.assert_array_equal(array, value)


def check_safetensors(path: Path, want: dict[str, np.ndarray]) -> None:
    for key, value in want.items():
        dtype, shape, data = raw_bytes(path, key.removesuffix("::bf16"))
        assert shape == list(value.shape), key
        assert data == np.ascontiguousarray(value).tobytes(), key
        assert (dtype == "BF16") == key.endswith("::bf16"), key


@pytest.mark.parametrize("name", NAMES)
def test_open_matches_expectations(name: str) -> None:
    ck = bs.open(FIXTURES / name)
    assert ck.format == "DCP"
    check({n: np.array(ck[n]) for n in ck}, expected(name))


def test_one_chunk_is_a_view_and_two_are_assembled() -> None:
    plain = bs.open(FIXTURES / "plain")
    f32 = plain["f32"]
    assert np.shares_memory(f32, plain["f32"])  # both view the mapped .distcp
    assert plain["transposed"].strides == (4, 16)  # saved as a transposed view
    sharded = bs.open(FIXTURES / "sharded")
    rows = sharded["rows"]
    np.testing.assert_array_equal(rows, expected("sharded")["rows"])
    assert not rows.flags.writeable
    # The non-tensor entry of plain/ is named.
    assert any("nested.step" in n for n in plain.notices)


@pytest.mark.parametrize("name", NAMES)
def test_plan_input_and_alias_convert_to_safetensors(tmp_path: Path, name: str) -> None:
    out = tmp_path / "a.safetensors"
    bs.run({"inputs": [str(FIXTURES / name)], "transforms": [], "output": str(out)})
    check_safetensors(out, expected(name))
    out = tmp_path / "b.safetensors"
    plan = {"inputs": [f"m::{FIXTURES / name}"], "transforms": [], "output": {"path": str(out), "alias": "m"}}
    bs.run(plan)
    check_safetensors(out, expected(name))


def test_command_line_positional_input(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "sharded", tmp_path / "ckpt")
    proc = subprocess.run(
        [sys.executable, "-m", "brainsurgery", "inspect", str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rows" in proc.stdout and "cols" in proc.stdout
    # A run whose only input is the directory given on the command line.
    out = tmp_path / "o.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "brainsurgery", "run", str(tmp_path / "ckpt"), f"output.path={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    check_safetensors(out, expected("sharded"))


def test_session_reads_assembled_values() -> None:
    want = expected("sharded")
    s = bs.Session(inputs={"m": str(FIXTURES / "sharded")})
    np.testing.assert_array_equal(s["m::rows"], want["rows"])
    np.testing.assert_array_equal(np.asarray(s["m::cols"]).view(np.uint16), want["cols::bf16"])
    s.apply({"scale_": {"target": "m::rows", "by": 2.0}})
    np.testing.assert_array_equal(s["m::rows"], want["rows"] * 2)


def test_hostile_metadata_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "plain", ckpt)
    (ckpt / ".metadata").write_bytes(b"\x80\x02cos\nsystem\nX\n\x00\x00\x00echo pwned\x85R.")
    with pytest.raises(bs.FormatError, match=r"os\.system") as info:
        bs.open(ckpt)
    assert ".metadata" in str(info.value)
    proc = subprocess.run(
        [sys.executable, "-m", "brainsurgery", "inspect", str(ckpt)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert ".metadata" in proc.stderr and "os.system" in proc.stderr


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "sharded", ckpt)
    (ckpt / "__1_0.distcp").unlink()
    with pytest.raises(bs.FormatError, match=r"__1_0\.distcp"):
        bs.open(ckpt)


@pytest.mark.parametrize("name", NAMES)
def test_written_dcp_reads_back(tmp_path: Path, name: str) -> None:
    out = tmp_path / "ckpt"
    bs.run({"inputs": [str(FIXTURES / name)], "transforms": [], "output": {"path": str(out), "format": "dcp"}})
    assert (out / ".metadata").is_file()
    ck = bs.open(out)
    assert ck.format == "DCP"
    check({n: np.array(ck[n]) for n in ck}, expected(name))


def test_dcp_output_to_a_file_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(bs.FormatError, match="directory"):
        bs.run(
            {
                "inputs": [str(FIXTURES / "plain")],
                "transforms": [],
                "output": {"path": str(tmp_path / "o.safetensors"), "format": "dcp"},
            }
        )
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", NAMES)
def test_torch_loads_what_we_write(tmp_path: Path, name: str) -> None:
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "ckpt"
    bs.run({"inputs": [str(FIXTURES / name)], "transforms": [], "output": {"path": str(out), "format": "dcp"}})
    want = expected(name)
    state = {}
    for key, value in want.items():
        dtype = torch.bfloat16 if key.endswith("::bf16") else getattr(torch, str(value.dtype))
        state[key.removesuffix("::bf16")] = torch.zeros(value.shape, dtype=dtype)
    dcp.load(state, checkpoint_id=str(out), no_dist=True)
    for key, value in want.items():
        t = state[key.removesuffix("::bf16")]
        if key.endswith("::bf16"):
            np.testing.assert_array_equal(t.view(torch.int16).numpy().view(np.uint16), value)
        else:
            np.testing.assert_array_equal(t.numpy(), value)


def test_torch_converts_what_we_write_to_a_flat_state_dict(tmp_path: Path) -> None:
    # torch's dcp_to_torch_save rebuilds the state dict from planner_data: dotted names stay
    # flat keys (as torch's own save of a flat dict records them), `a` beside `a.b` included.
    torch = pytest.importorskip("torch")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src = tmp_path / "src.safetensors"
    tensors = {"a": np.ones(2, np.float32), "a.b": np.arange(3, dtype=np.float32), "layers.0.w": np.eye(2, dtype=np.float32)}
    save_file(tensors, str(src))
    out = tmp_path / "ckpt"
    bs.run({"inputs": [str(src)], "output": {"path": str(out), "format": "dcp"}})
    dcp_to_torch_save(str(out), str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k].numpy(), v)


def test_chunks_stored_at_the_same_place_are_refused(tmp_path: Path) -> None:
    # torch stores each chunk once; a crafted `.metadata` pointing many chunks at one archive
    # would make each cost a parse of it.
    pytest.importorskip("torch")
    import copy
    import pickle

    d = tmp_path / "s"
    shutil.copytree(FIXTURES / "sharded", d)
    with open(d / ".metadata", "rb") as f:
        md = pickle.load(f)
    by_tensor: dict[str, list] = {}
    for index in md.storage_data:
        by_tensor.setdefault(index.fqn, []).append(index)
    chunks = next(v for v in by_tensor.values() if len(v) > 1)
    for index in chunks[1:]:
        md.storage_data[index] = copy.copy(md.storage_data[chunks[0]])
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f, protocol=2)
    with pytest.raises(bs.FormatError, match="same place"):
        bs.open(d)


def test_save_and_load_transforms_take_dcp(tmp_path: Path) -> None:
    # `save` of the alias as a DCP directory mid-plan, then `load` of it back as another alias.
    out = tmp_path / "saved"
    bs.run(
        {
            "inputs": [f"m::{FIXTURES / 'sharded'}"],
            "transforms": [
                {"save": {"path": str(out), "format": "dcp", "alias": "m"}},
                {"load": {"path": str(out), "alias": "back", "format": "dcp"}},
            ],
            "output": {"path": str(tmp_path / "o.safetensors"), "alias": "back"},
        }
    )
    assert bs.open(out).format == "DCP"
    check_safetensors(tmp_path / "o.safetensors", expected("sharded"))
