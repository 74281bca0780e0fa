"""The plain-PyTorch baseline for format conversion (jobs P and Q of run.py).

    python benches/baseline_torch.py {to_bin,from_bin} INPUT OUTPUT

- ``to_bin``:   ``safetensors.torch.load_file`` (every tensor read into RAM) then ``torch.save``.
- ``from_bin``: ``torch.load(mmap=True, weights_only=True)`` (tensors stay mapped) then
                ``safetensors.torch.save_file`` (which builds the whole file in memory).

It needs torch; run.py skips it when torch is not importable.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file


def main(job: str, src: str, dst: str) -> None:
    if job == "to_bin":
        torch.save(load_file(src), dst)
    elif job == "from_bin":
        save_file(torch.load(src, mmap=True, weights_only=True), dst, metadata={"format": "pt"})
    else:
        raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
