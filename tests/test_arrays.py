"""Arrays both ways without copies (issue 11 items 1, 5, 7): views out as ``brainsurgery.Array``
with DLPack for every dtype, arrays in (NumPy, DLPack, buffers) borrowed by the engine,
``brainsurgery.save`` and ``brainsurgery.to_torch``.

References are independent of the engine: NumPy computes the expected values and addresses,
outputs are compared byte for byte with what a plan run writes, and torch (when installed)
checks the DLPack side; torch tests skip cleanly without it.
"""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import brainsurgery as bs
from brainsurgery import _core

RNG = np.random.default_rng(11)
TENSORS = {
    "w": RNG.standard_normal((3, 4)).astype(np.float32),
    "h": RNG.standard_normal(5).astype(np.float16),
    "bf": RNG.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
    "e4": RNG.standard_normal(4).astype(ml_dtypes.float8_e4m3fn),
    "e5": RNG.standard_normal(4).astype(ml_dtypes.float8_e5m2),
    "ids": np.arange(4, dtype=np.int64),
    "mask": np.array([True, False, True]),
}
# What NumPy's .npz and .npy can hold (no bf16 or float8).
NUMPY_NATIVE = {k: v for k, v in TENSORS.items() if v.dtype.type.__module__ == "numpy"}


@pytest.fixture
def src(write):
    return write(TENSORS, metadata={"format": "pt"})


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Producer:
    """A DLPack producer that is not a NumPy array (as a torch or JAX tensor is)."""

    def __init__(self, array: np.ndarray, device: tuple[int, int] = (1, 0)) -> None:
        self.array = array
        self.device = device
        self.calls = 0

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device

    def __dlpack__(self, **kwargs):
        self.calls += 1
        return self.array.__dlpack__(**kwargs)


# ---------------------------------------------------------------- views out


def test_views_are_read_only_arrays_over_the_mapping(src):
    ck = bs.open(src)
    for name, expected in TENSORS.items():
        view = ck[name]
        assert isinstance(view, bs.Array) and isinstance(view, np.ndarray)
        assert not view.flags.writeable and not view.flags.owndata
        assert view.dtype == expected.dtype and view.tobytes() == expected.tobytes()
        # The view's memory is the mapped tensor buffer itself.
        buffer = np.frombuffer(memoryview(ck._core.buffer(name)), np.uint8)
        assert address(view) == address(buffer)
    assert np.shares_memory(ck["w"], ck["w"])


def test_array_behaves_as_a_numpy_array(src):
    ck = bs.open(src)
    w = ck["w"]
    total = w + 1
    assert isinstance(total, bs.Array) and total.flags.writeable
    np.testing.assert_array_equal(total, TENSORS["w"] + 1)
    plain = np.asarray(w)
    assert type(plain) is np.ndarray and np.shares_memory(plain, w)
    # Pickles hold a plain ndarray, loadable without brainsurgery.
    back = pickle.loads(pickle.dumps(ck["bf"]))
    assert type(back) is np.ndarray and back.dtype == ml_dtypes.bfloat16
    assert back.tobytes() == TENSORS["bf"].tobytes()
    assert isinstance(w[1:], bs.Array) and np.shares_memory(w[1:], w)


def test_import_brainsurgery_does_not_import_numpy():
    code = "import sys, brainsurgery; print('numpy' in sys.modules, hasattr(brainsurgery, 'save'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


@pytest.mark.parametrize("name", list(TENSORS))
def test_dlpack_export_is_zero_copy_for_every_dtype(src, name):
    # Consumed by the engine's DLPack importer (any consumer would do): the same memory, the
    # same dtype, the versioned capsule read-only.
    ck = bs.open(src)
    view = ck[name]
    info = _core.borrow(Producer(view))
    assert info["via"] == "dlpack" and not info["copied"]
    assert info["address"] == address(view)
    assert info["dtype"] == ck.dtype(name) and info["shape"] == view.shape


def test_numpy_consumes_our_capsules_read_only(src):
    ck = bs.open(src)
    got = np.from_dlpack(ck["w"])
    assert np.shares_memory(got, ck["w"])
    assert not got.flags.writeable  # the READ_ONLY flag of the versioned capsule
    np.testing.assert_array_equal(got, TENSORS["w"])
    legacy = _core.dlpack(ck["w"])
    assert "dltensor" in repr(legacy) and "versioned" not in repr(legacy)
    assert "dltensor_versioned" in repr(_core.dlpack(ck["w"], max_version=(1, 0)))


def test_dlpack_export_arguments(src):
    ck = bs.open(src)
    w = ck["w"]
    with pytest.raises(BufferError, match="CPU memory"):
        w.__dlpack__(dl_device=(2, 0))
    with pytest.raises(ValueError, match="stream"):
        w.__dlpack__(stream=5)
    # copy=True exports a fresh copy.
    info = _core.borrow(_Wrap(lambda **kw: _core.dlpack(w, copy=True, max_version=(1, 0))))
    assert info["address"] != address(w)
    with pytest.raises(TypeError, match="NumPy array"):
        _core.dlpack([1, 2, 3])


class _Wrap:
    def __init__(self, fn):
        self.fn = fn

    def __dlpack_device__(self):
        return (1, 0)

    def __dlpack__(self, **kwargs):
        return self.fn(**kwargs)


def test_exported_capsule_keeps_the_mapping_alive(src, tmp_path):
    ck = bs.open(src)
    capsule = ck["bf"].__dlpack__(max_version=(1, 0))
    del ck
    gc.collect()
    # Only the capsule holds the view now; the engine reads it back through DLPack.
    out = tmp_path / "kept.safetensors"
    bs.save({"bf": _Wrap(lambda **kw: capsule)}, out)
    assert bs.open(out)["bf"].tobytes() == TENSORS["bf"].tobytes()


# ---------------------------------------------------------------- arrays in


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(5, dtype=np.float16),
        RNG.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        RNG.standard_normal(3).astype(ml_dtypes.float8_e4m3fn),
        np.arange(4, dtype=np.int32),
        np.arange(4, dtype=np.uint64),
        np.array(3.5),
        np.zeros((0, 3), np.float32),
    ],
    ids=lambda a: f"{a.dtype}{list(a.shape)}",
)
def test_numpy_arrays_are_borrowed_without_a_copy(array):
    info = _core.borrow(array)
    assert not info["copied"] and info["via"] == "numpy"
    assert info["nbytes"] == array.nbytes and info["shape"] == array.shape
    if array.size:
        assert info["address"] == address(array)


def test_buffer_objects_are_borrowed_without_a_copy():
    raw = bytearray(np.arange(4, dtype=np.uint8).tobytes())
    info = _core.borrow(memoryview(raw))
    assert info["via"] == "buffer" and not info["copied"] and info["dtype"] == "uint8"
    assert info["address"] == address(np.frombuffer(raw, np.uint8))


def test_non_contiguous_and_big_endian_arrays_are_copied_and_documented_so(tmp_path):
    t = np.arange(12, dtype=np.float32).reshape(3, 4).T
    big = np.arange(5, dtype=">i4")
    assert _core.borrow(t)["copied"] and _core.borrow(big)["copied"]
    assert _core.borrow(big)["dtype"] == "int32"
    out = tmp_path / "o.safetensors"
    bs.save({"t": t, "big": big, "rev": np.arange(4.0)[::-1]}, out)
    ck = bs.open(out)
    np.testing.assert_array_equal(ck["t"], t)
    np.testing.assert_array_equal(ck["big"], big.astype("<i4"))
    np.testing.assert_array_equal(ck["rev"], [3.0, 2.0, 1.0, 0.0])


def test_dlpack_producers_are_borrowed_and_strided_ones_gathered():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    info = _core.borrow(Producer(a))
    assert info["via"] == "dlpack" and not info["copied"] and info["address"] == address(a)
    t = Producer(a.T)
    info = _core.borrow(t)
    assert info["copied"] and info["shape"] == (3, 2)


def test_strided_dlpack_tensor_is_saved_in_row_major_order(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    view = a.transpose(2, 0, 1)[::2]
    bs.save({"v": Producer(view)}, tmp_path / "v.safetensors")
    np.testing.assert_array_equal(bs.open(tmp_path / "v.safetensors")["v"], view)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([1.0, 2.0], TypeError, "a list is not an array"),
        ("text", TypeError, "a str is not an array"),
        (np.array([object()]), TypeError, "dtype object"),
        (np.array(["a", "b"]), TypeError, "dtype <U1 cannot be tensors"),
        (np.zeros(2, ml_dtypes.int4), TypeError, "dtype int4 cannot be tensors"),
        (np.zeros(2, np.complex128), TypeError, "complex128"),
    ],
    ids=["list", "str", "object", "unicode", "int4", "complex128"],
)
def test_what_is_not_a_tensor_is_refused_clearly(bad, error, message):
    with pytest.raises(error, match=message):
        _core.borrow(bad)


def test_a_device_tensor_is_refused_before_its_data_is_asked_for(tmp_path):
    cuda = Producer(np.zeros(3, np.float32), device=(2, 0))
    with pytest.raises(ValueError, match=r"on CUDA .*move it to the CPU first with \.cpu\(\)"):
        _core.borrow(cuda)
    assert cuda.calls == 0
    with pytest.raises(ValueError, match="tensor `gpu`: .*cpu"):
        bs.save({"ok": np.zeros(2), "gpu": cuda}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_save_argument_errors(tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="tensor names are str"):
        bs.save({1: np.zeros(2)}, out)
    with pytest.raises(ValueError, match="given twice"):
        bs.save([("a", np.zeros(2)), ("a", np.ones(2))], out)
    with pytest.raises(TypeError, match="mapping of names to arrays"):
        bs.save(np.zeros(2), out)
    with pytest.raises(TypeError, match="tensor `b`: a list is not an array"):
        bs.save({"a": np.zeros(2), "b": [1, 2]}, out)
    with pytest.raises(bs.FormatError, match="bfloat16 cannot be stored in .npz"):
        bs.save({"b": np.zeros(2, ml_dtypes.bfloat16)}, tmp_path / "x.npz")
    with pytest.raises(bs.PlanError, match="unknown format"):
        bs.save({"a": np.zeros(2)}, out, format="onnx")
    assert sorted(os.listdir(tmp_path)) == []


def test_borrowed_arrays_outlive_their_names(tmp_path):
    # The engine holds the only reference to these arrays while it writes.
    out = tmp_path / "o.safetensors"
    bs.save([(f"t{i}", np.full(1000, i, np.float32)) for i in range(3)], out)
    gc.collect()
    ck = bs.open(out)
    for i in range(3):
        assert (ck[f"t{i}"] == i).all()


def test_views_outlive_the_checkpoint_and_the_inputs(src, tmp_path):
    ck = bs.open(src)
    views = {name: ck[name] for name in ck}
    del ck
    gc.collect()
    out = tmp_path / "again.safetensors"
    bs.save(views, out)
    del views
    gc.collect()
    again = bs.open(out)
    for name, expected in TENSORS.items():
        assert again[name].tobytes() == expected.tobytes()


# ---------------------------------------------------------------- save = what a plan writes


@pytest.mark.parametrize(
    "target, tensors",
    [
        ("out.safetensors", TENSORS),
        ("out.bin", TENSORS),
        ("out.npz", NUMPY_NATIVE),
        ("out.npy", {"w": TENSORS["w"]}),
        ("outdir", TENSORS),
    ],
)
def test_save_writes_the_bytes_a_plan_run_writes(write, tmp_path, target, tensors):
    src = write(tensors, metadata={"format": "pt"})
    ran = tmp_path / "ran" / target
    saved = tmp_path / "saved" / target
    ran.parent.mkdir()
    saved.parent.mkdir()
    output = {"path": str(ran), "shard": 100} if target == "outdir" else str(ran)
    bs.run({"inputs": [str(src)], "output": output}, quiet=True)
    # Owned in-memory copies, so the bytes come from the arrays, not from a file.
    arrays = {name: np.array(value, copy=True) for name, value in tensors.items()}
    metadata = bs.open(ran).metadata
    report = bs.save(arrays, saved, metadata=metadata, shard_size=100 if target == "outdir" else None)
    if ran.is_dir():
        files = sorted(os.listdir(ran))
        assert files == sorted(os.listdir(saved)) and len(files) > 2
        for name in files:
            assert (ran / name).read_bytes() == (saved / name).read_bytes(), name
    else:
        assert ran.read_bytes() == saved.read_bytes()
    assert [t["name"] for t in report["tensors"]] == list(tensors)
    assert report["total_bytes"] == sum(a.nbytes for a in tensors.values())
    assert report["written"] and all(Path(p).exists() for p in report["written"])


def test_save_metadata_and_no_leftovers_on_error(tmp_path):
    out = tmp_path / "m.safetensors"
    bs.save({"w": TENSORS["w"]}, out, metadata={"note": "x"})
    meta = bs.open(out).metadata
    assert meta["note"] == "x" and meta["format"] == "pt" and meta["brainsurgery.version"] == bs.__version__
    before = sha(out)
    with pytest.raises(bs.FormatError):
        bs.save({"w": TENSORS["w"], "b": TENSORS["bf"]}, tmp_path / "m.npz")
    assert sha(out) == before and sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# ---------------------------------------------------------------- torch


def test_to_torch_without_torch_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        bs.to_torch(np.zeros(2))


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["bf", "e4", "e5", "w", "h", "ids", "mask"])
def test_torch_from_dlpack_views_the_mapping_for_every_dtype(torch, src, name):
    ck = bs.open(src)
    view = ck[name]
    t = torch.from_dlpack(view)
    assert t.data_ptr() == address(view)
    assert str(t.dtype) == f"torch.{ck.dtype(name)}"
    expected = TENSORS[name].astype(np.float32) if name in ("bf", "e4", "e5") else TENSORS[name]
    np.testing.assert_array_equal(t.float().numpy() if name in ("bf", "e4", "e5") else t.numpy(), expected)


def test_to_torch_of_a_mapping_and_of_plain_arrays(torch, src):
    ck = bs.open(src)
    tensors = bs.to_torch(ck)
    assert list(tensors) == list(ck)
    assert tensors["bf"].dtype == torch.bfloat16 and tensors["e4"].dtype == torch.float8_e4m3fn
    plain = np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)
    t = bs.to_torch(plain)
    assert t.dtype == torch.bfloat16 and t.data_ptr() == address(plain)
    same = torch.ones(2)
    assert bs.to_torch(same) is same


def test_torch_tensors_are_borrowed_and_saved(torch, tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)
    info = _core.borrow(t)
    assert info["dtype"] == "bfloat16" and info["address"] == t.data_ptr() and not info["copied"]
    e4 = torch.linspace(-2, 2, 6).to(torch.float8_e4m3fn)
    out = tmp_path / "t.safetensors"
    bs.save({"t": t, "tt": t.T, "e4": e4}, out)
    ck = bs.open(out)
    assert ck["t"].tobytes() == t.view(torch.int16).numpy().tobytes()
    assert ck["tt"].tobytes() == t.T.contiguous().view(torch.int16).numpy().tobytes()
    assert ck["e4"].tobytes() == e4.view(torch.uint8).numpy().tobytes()


TRAIN_ON_VIEWS = """
import sys, torch, brainsurgery as bs
ck = bs.open(sys.argv[1])
w = torch.from_dlpack(ck["bf"])
assert w.data_ptr() == ck["bf"].__array_interface__["data"][0]
w.add_(1.0)                                  # an in-place write into the mapped page
model = torch.nn.Linear(3, 2, bias=False).to(torch.bfloat16)
model.load_state_dict(bs.to_torch({"weight": ck["bf"]}), assign=True)
model.weight.grad = torch.ones_like(model.weight)
torch.optim.SGD(model.parameters(), lr=0.5).step()
print("survived")
"""


def test_torch_writes_and_optimizer_steps_never_reach_the_file(torch, src):
    before = sha(src)
    proc = subprocess.run([sys.executable, "-c", TRAIN_ON_VIEWS, str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "survived" in proc.stdout
    assert sha(src) == before
    assert bs.open(src)["bf"].tobytes() == TENSORS["bf"].tobytes()
