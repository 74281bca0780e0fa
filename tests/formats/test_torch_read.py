"""Reading zip-format PyTorch checkpoints: values match the expectations written beside each
fixture (NumPy only), and match torch itself when it is installed; hostile pickles are refused."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

import brainsurgery as bs

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "torch"
NAMES = ["plain", "wrapped", "shared", "parameter", "cuda"]


def ours(path: Path) -> dict[str, np.ndarray]:
    ck = bs.open(path)
    return {name: np.array(ck[name]) for name in ck}


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


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_expectations(name: str) -> None:
    check(ours(FIXTURES / f"{name}.pt"), expected(name))


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_torch(name: str) -> None:
    torch = pytest.importorskip("torch")
    obj = torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)
    if "state_dict" in obj:
        obj = obj["state_dict"]

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                yield f"{prefix}{k}", v

    got = ours(FIXTURES / f"{name}.pt")
    want = dict(flat(obj))
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            np.testing.assert_array_equal(got[k].view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
        else:
            np.testing.assert_array_equal(got[k], t.numpy())


def test_convert_bin_to_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "pytorch_model.bin"
    src.write_bytes((FIXTURES / "plain.pt").read_bytes())
    out = tmp_path / "model.safetensors"
    bs.run({"inputs": [str(src)], "transforms": [], "output": str(out)})
    check(ours(out), expected("plain"))


def hostile_checkpoint(path: Path, marker: Path) -> None:
    """A zip checkpoint whose data.pkl would create `marker` if unpickled by pickle."""

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    path.write_bytes(buf.getvalue())


def test_hostile_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    hostile_checkpoint(path, marker)
    with pytest.raises(bs.FormatError, match=r"(posix|os)\.system"):
        bs.open(path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(bs.FormatError, match=r"(posix|os)\.system"):
        bs.run({"inputs": [str(path)], "transforms": [], "output": str(out)})
    assert not marker.exists()
    assert not out.exists()


def test_unknown_global_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02cbuiltins\neval\n.")
    with pytest.raises(bs.FormatError, match=r"builtins\.eval"):
        bs.open(path)


def test_compressed_entry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    with zipfile.ZipFile(FIXTURES / "plain.pt") as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(bs.FormatError, match="compressed"):
        bs.open(path)


def test_truncated_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes((FIXTURES / "plain.pt").read_bytes()[:-30])
    with pytest.raises(bs.FormatError):
        bs.open(path)


def test_storage_smaller_than_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    with zipfile.ZipFile(FIXTURES / "cuda.pt") as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:4] if info.filename.endswith("data/0") else data)
    with pytest.raises(bs.FormatError, match="smaller"):
        bs.open(path)


def test_non_contiguous_tensor_is_refused_by_name() -> None:
    with pytest.raises(bs.FormatError, match=r'"t".*not supported yet'):
        bs.open(FIXTURES / "transposed.pt")
