"""NumPy inputs (issue 4, item 4): ``.npy`` and ``.npz`` files written here by NumPy itself are
opened through ``brainsurgery.open`` and converted to safetensors; refused inputs raise
``FormatError`` naming what is wrong. Expected values are the arrays NumPy saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import brainsurgery as bs

ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "f16": np.linspace(-2, 2, 6, dtype=np.float16).reshape(2, 3),
    "f64": np.array([1.5, -0.25]),
    "i64": np.array([[-(2**40), 3]], dtype=np.int64),
    "i8": np.array([-128, 127], dtype=np.int8),
    "u16": np.array([65535, 1], dtype=np.uint16),
    "mask": np.array([True, False, True]),
    "u8": np.array([0, 255, 7], dtype=np.uint8),
    "scalar": np.array(3.25, dtype=np.float32),
    "empty": np.zeros((0, 5), dtype=np.float32),
}


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("name", list(ARRAYS))
def test_npy_opens_named_by_stem(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.npy"
    np.save(path, ARRAYS[name])
    ck = bs.open(path)
    assert list(ck) == [name]
    _same(ck[name], ARRAYS[name])


def test_npz_opens_every_array(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, **ARRAYS)
    ck = bs.open(path)
    assert sorted(ck) == sorted(ARRAYS)
    for name, want in ARRAYS.items():
        _same(ck[name], want)


def test_npz_compressed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, w=ARRAYS["f32"])
    with pytest.raises(bs.FormatError, match="np.savez_compressed.*np.savez"):
        bs.open(path)


def test_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(bs.FormatError, match=r'tensor "o".*allow_pickle is never used'):
        bs.open(path)
    npz = tmp_path / "o.npz"
    np.savez(npz, good=ARRAYS["f32"], bad=np.array([None], dtype=object))
    with pytest.raises(bs.FormatError, match=r'tensor "bad".*allow_pickle'):
        bs.open(npz)


def test_fortran_and_big_endian_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.npy"
    np.save(path, np.asfortranarray(ARRAYS["f32"]))
    with pytest.raises(bs.FormatError, match=r'tensor "f".*fortran_order'):
        bs.open(path)
    path = tmp_path / "b.npy"
    np.save(path, ARRAYS["f32"].astype(">f4"))
    with pytest.raises(bs.FormatError, match="big-endian not supported"):
        bs.open(path)


def test_bfloat16_void_is_refused(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    path = tmp_path / "bf.npy"
    np.save(path, np.ones(3, dtype=ml_dtypes.bfloat16))
    with pytest.raises(bs.FormatError, match="bfloat16"):
        bs.open(path)


def test_bad_magic_and_truncated_zip(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    path.write_bytes(b"not numpy at all, really")
    with pytest.raises(bs.FormatError, match="wrong magic"):
        bs.open(path)
    good = tmp_path / "g.npz"
    np.savez(good, w=ARRAYS["f32"])
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(bs.FormatError, match="truncated"):
        bs.open(cut)


def test_npz_to_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "m.npz", **ARRAYS)
    bs.run({"inputs": ["m.npz"], "output": "out.safetensors"})
    got = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(got) == sorted(ARRAYS)
    for name, want in ARRAYS.items():
        _same(got[name], want)


def test_safetensors_to_npz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "m.npz", **ARRAYS)
    bs.run({"inputs": ["m.npz"], "output": "mid.safetensors"})
    bs.run({"inputs": ["mid.safetensors"], "output": "out.npz"})
    with np.load(tmp_path / "out.npz", allow_pickle=False) as got:
        assert sorted(got.files) == sorted(ARRAYS)
        for name, want in ARRAYS.items():
            _same(got[name], want)
    bs.run({"inputs": ["mid.safetensors"], "output": {"path": "o2.npz", "format": "npz"}})
    assert (tmp_path / "o2.npz").exists()


def test_npz_output_refuses_bfloat16_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "w.npy", ARRAYS["f32"])
    plan = {"inputs": ["w.npy"], "transforms": [{"cast_": {"target": "w", "to": "bfloat16"}}], "output": "out.npz"}
    with pytest.raises(bs.FormatError, match=r'"w".*cannot be stored in \.npz.*cast'):
        bs.run(plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npy"]


def test_npy_output_holds_one_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "m.npz", **ARRAYS)
    # The plan output, and `save` of one tensor (through a slice) mid-plan.
    bs.run(
        {
            "inputs": ["m.npz"],
            "transforms": [
                {"save": {"path": "slice.npy", "target": "f32::[1:, ::2]"}},
                {"delete": {"target": "(?!i64$).*"}},
            ],
            "output": "out.npy",
        }
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy", allow_pickle=False), ARRAYS["i64"])
    np.testing.assert_array_equal(np.load(tmp_path / "slice.npy", allow_pickle=False), ARRAYS["f32"][1:, ::2])
    back = bs.open(tmp_path / "out.npy")
    assert list(back) == ["out"]  # a .npy is named by its stem when read


def test_npy_output_of_several_tensors_is_refused_at_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "m.npz", **ARRAYS)
    with pytest.raises(bs.FormatError, match=rf"exactly one tensor, and the alias written has {len(ARRAYS)}.*\.npz"):
        bs.check({"inputs": ["m.npz"], "output": "out.npy"})
    with pytest.raises(bs.FormatError, match="exactly one tensor"):
        bs.run({"inputs": ["m.npz"], "output": "out.npy"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]


def test_npz_output_creates_missing_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "w.npy", ARRAYS["f32"])
    bs.run({"inputs": ["w.npy"], "output": "a/b/out.npz"})
    with np.load(tmp_path / "a" / "b" / "out.npz") as got:
        np.testing.assert_array_equal(got["w"], ARRAYS["f32"])
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(bs.FormatError, match="is a directory"):
        bs.run({"inputs": ["w.npy"], "output": "dir.npz"})
