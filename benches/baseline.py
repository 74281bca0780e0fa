"""The plain-Python baseline: what a throw-away NumPy + safetensors script does for each job.

    python benches/baseline.py {cast,scale,experts} INPUT.safetensors OUTPUT.safetensors

It is the usual script: open the input with ``safetensors.safe_open(framework="numpy")`` (which
reads BF16 as ``ml_dtypes.bfloat16``), read every tensor into memory with ``get_tensor`` (a copy),
apply the NumPy operation, collect the results in a dict and write it with
``safetensors.numpy.save_file``. The whole output therefore sits in RAM at once (peak RSS ≈ output
size, or more), which is what the engine is meant to avoid.

- ``cast``:    every tensor ``.astype(np.float16)`` (BF16 → F16, ml_dtypes' cast).
- ``scale``:   every tensor ``* np.float32(0.5)`` (F32 stays F32).
- ``experts``: every ``model.layers.N.mlp.up_proj.weight`` is stored four times as
               ``model.layers.N.mlp.experts.E.up_proj.weight`` (the same array, no extra copies in
               RAM) and the original is dropped; everything else is passed through.
"""

from __future__ import annotations

import re
import sys

import ml_dtypes  # noqa: F401 - registers "bfloat16" with NumPy, which safe_open needs for BF16
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.up_proj\.weight")


def main(job: str, src: str, dst: str) -> None:
    out: dict[str, np.ndarray] = {}
    experts: dict[str, np.ndarray] = {}
    with safe_open(src, framework="numpy") as f:
        metadata = f.metadata()
        for name in f.keys():
            t = f.get_tensor(name)
            if job == "cast":
                out[name] = t.astype(np.float16)
            elif job == "scale":
                out[name] = t * np.float32(0.5)
            elif job == "experts":
                m = MLP.fullmatch(name)
                if m:
                    for e in range(4):
                        experts[f"model.layers.{m.group(1)}.mlp.experts.{e}.up_proj.weight"] = t
                else:
                    out[name] = t
            else:
                raise SystemExit(f"unknown job {job!r}")
    out.update(experts)  # new tensors after the kept ones, as the engine orders them
    save_file(out, dst, metadata=metadata)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
