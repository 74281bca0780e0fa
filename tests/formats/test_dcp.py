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
