"""Reading PyTorch checkpoints (zip and legacy formats, strided tensors): values match the
expectations written beside each fixture (NumPy only), and match torch itself when it is
installed; hostile and malformed files are refused."""

from __future__ import annotations

import io
import pickle
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import raw_bytes

import brainsurgery as bs

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "torch"
LEGACY = ["legacy_plain", "legacy_wrapped", "legacy_shared", "legacy_cuda", "legacy_strided"]
NAMES = ["plain", "wrapped", "shared", "parameter", "cuda", "strided", *LEGACY]


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
    for wrapper in ("state_dict", "model"):
        if wrapper in obj:
            obj = obj[wrapper]

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


def test_entries_that_are_not_tensors_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # wrapped.pt is {"state_dict": {...}, "epoch": 3, "lr": 0.1}: the wrapper's siblings are
    # named in a notice, on the opened checkpoint and in a run's report (and on stderr).
    path = FIXTURES / "wrapped.pt"
    assert any("2 entries that are not tensors skipped (epoch, lr)" in n for n in bs.open(path).notices)
    report = bs.run({"inputs": [str(path)], "output": str(tmp_path / "o.safetensors")})
    assert any("(epoch, lr)" in n for n in report["notices"])
    assert "(epoch, lr)" in capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_every_fixture_converts_to_safetensors(tmp_path: Path, name: str) -> None:
    out = tmp_path / "model.safetensors"
    bs.run({"inputs": [str(FIXTURES / f"{name}.pt")], "transforms": [], "output": str(out)})
    want = expected(name)
    for key, value in want.items():
        dtype, shape, data = raw_bytes(out, key.removesuffix("::bf16"))
        assert shape == list(value.shape), key
        assert data == np.ascontiguousarray(value).tobytes(), key
        assert (dtype == "BF16") == key.endswith("::bf16"), key
    if not any(k.endswith("::bf16") for k in want):
        from safetensors.numpy import load_file

        check(load_file(str(out)), want)


def test_strided_views_are_zero_copy_and_read_only() -> None:
    for name in ("strided", "legacy_strided"):
        ck = bs.open(FIXTURES / f"{name}.pt")
        transposed = ck["transposed"]
        assert not transposed.flags.c_contiguous
        assert transposed.strides == (4, 16)
        assert np.shares_memory(transposed, ck["transposed"])
        assert ck["expanded_i8"].strides == (1, 0)
        assert not transposed.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            transposed[0, 0] = 1.0
        assert ck["row_of_base"].flags.c_contiguous
        del ck  # the arrays keep the mapping alive
        np.testing.assert_array_equal(transposed, expected(name)["transposed"])
    shared = bs.open(FIXTURES / "legacy_shared.pt")
    assert np.shares_memory(shared["whole"], shared["tail"])


def test_inspect_lists_legacy_and_strided_tensors() -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "brainsurgery", "inspect", str(FIXTURES / "legacy_strided.pt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:-1]}
    assert rows["transposed"] == ["float32", "(4,", "3)", "48", "B"]
    assert rows["expanded_i8"] == ["int8", "(5,", "3)", "15", "B"]
    assert proc.stdout.splitlines()[-1].startswith("total: 6 tensors")


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


def test_big_endian_archive_is_refused(tmp_path: Path) -> None:
    # torch byteswaps storages saved on a big-endian machine; reading them in place would be wrong.
    path = tmp_path / "m.pt"
    with zipfile.ZipFile(FIXTURES / "plain.pt") as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = b"big" if info.filename.endswith("/byteorder") else src.read(info)
            dst.writestr(info.filename, data)
    with pytest.raises(bs.FormatError, match=r"byte order \"big\""):
        bs.open(path)


def test_reshaping_a_strided_tensor_keeps_its_element_order(tmp_path: Path) -> None:
    want = expected("strided")["transposed"]
    out = tmp_path / "o.safetensors"
    bs.run(
        {
            "inputs": [str(FIXTURES / "strided.pt")],
            "transforms": [
                {"reshape": {"from": "transposed", "to": "flat", "shape": [-1]}},
                {"reshape": {"from": "transposed", "to": "deep", "shape": [1, 2, 1, -1]}},
            ],
            "output": str(out),
        }
    )
    got = ours(out)
    np.testing.assert_array_equal(got["flat"], want.reshape(-1))
    np.testing.assert_array_equal(got["deep"], want.reshape(1, 2, 1, -1))


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


def test_truncated_legacy_file_is_refused(tmp_path: Path) -> None:
    data = (FIXTURES / "legacy_plain.pt").read_bytes()
    path = tmp_path / "m.pt"
    for n in (1, 15, 21, 137, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:n])
        with pytest.raises(bs.FormatError):
            bs.open(path)


def test_storage_smaller_than_strided_extent_is_refused(tmp_path: Path) -> None:
    data = (FIXTURES / "legacy_strided.pt").read_bytes()
    # The transposed tensor's strides (1, 4) over 12 elements, pickled as BININT1s: stride 5
    # puts its last element at 3 + 2 * 5 = 13.
    old = b"K\x01K\x04\x86"
    assert data.count(old) == 1
    path = tmp_path / "m.pt"
    path.write_bytes(data.replace(old, b"K\x01K\x05\x86"))
    with pytest.raises(bs.FormatError, match=r'"transposed".*extends past the end of its storage'):
        bs.open(path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(bs.FormatError, match=r'"transposed"'):
        bs.run({"inputs": [str(path)], "transforms": [], "output": str(out)})
    assert not out.exists()


def test_wrong_magic_number_is_refused(tmp_path: Path) -> None:
    data = bytearray((FIXTURES / "legacy_plain.pt").read_bytes())
    data[6] ^= 0xFF  # inside the pickled magic number
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(bs.FormatError, match="wrong magic number"):
        bs.open(path)


def test_tar_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(bs.FormatError, match="tar archive"):
        bs.open(path)


def test_transforms_read_strided_tensors(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    transforms = [
        {"scale_": {"target": "transposed", "by": 2.0}},
        {"permute": {"from": "permuted_bool", "to": "back", "order": [1, 2, 0]}},
        {"cast": {"from": "narrow_f16", "to": "narrow32", "dtype": "float32"}},
    ]
    bs.run({"inputs": [str(FIXTURES / "legacy_strided.pt")], "transforms": transforms, "output": str(out)})
    want = expected("legacy_strided")
    dtype, shape, data = raw_bytes(out, "transposed")
    np.testing.assert_array_equal(np.frombuffer(data, "<f4").reshape(shape), want["transposed"] * np.float32(2))
    dtype, shape, data = raw_bytes(out, "back")
    np.testing.assert_array_equal(np.frombuffer(data, "?").reshape(shape), want["permuted_bool"].transpose(1, 2, 0))
    dtype, shape, data = raw_bytes(out, "narrow32")
    np.testing.assert_array_equal(np.frombuffer(data, "<f4").reshape(shape), want["narrow_f16"].astype(np.float32))
