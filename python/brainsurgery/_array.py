"""``brainsurgery.Array``: the NumPy arrays brainsurgery hands out, which also export DLPack for
every dtype (imported on first use: NumPy is not loaded by ``import brainsurgery``)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from brainsurgery import _core


class Array(np.ndarray):
    """A NumPy array that hands its memory to DLPack consumers for every brainsurgery dtype.

    NumPy's own ``__dlpack__`` refuses bfloat16 and the float8 types (they come from ml_dtypes);
    this one exports them with DLPack's codes, so ``torch.from_dlpack(ck[name])`` views a bf16 or
    float8 tensor of the mapped file without a copy. Everything else is a plain ``np.ndarray``:
    slices and ufunc results stay ``Array`` (and export too), ``np.asarray`` gives the plain
    array, and pickles hold a plain ``np.ndarray`` (loading one needs no brainsurgery).

    The capsule is versioned when the consumer asks (``max_version`` ≥ 1.0) and carries DLPack's
    ``READ_ONLY`` flag when the array is not writeable. Views of a checkpoint are copy-on-write
    private mappings, so a consumer that writes anyway (torch ignores the flag) changes private
    pages only: never the file, and never a crash.
    """

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        return _core.dlpack(self, stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self) -> tuple[Literal[1], Literal[0]]:
        # kDLCPU, device 0: every NumPy array is in host memory.
        return (1, 0)

    def __reduce__(self) -> Any:
        # Pickled as the plain array it is, so a pickle loads without brainsurgery.
        return self.view(np.ndarray).__reduce__()
