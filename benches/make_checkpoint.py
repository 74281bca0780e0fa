"""Write a ~1 GiB decoder-shaped safetensors checkpoint for the benchmark, streaming.

    python benches/make_checkpoint.py OUT.safetensors [--dtype bf16|f32] [--scale N] [--layers N] [--seed S]

Layout (per layer ``i``, names in the Llama style):

    model.layers.{i}.input_layernorm.weight           (2048,)
    model.layers.{i}.self_attn.o_proj.weight          (2048, 2048)
    model.layers.{i}.post_attention_layernorm.weight  (2048,)
    model.layers.{i}.mlp.up_proj.weight               (8192, 2048)

That is 20 Mi elements + 4096 norm elements per layer: 40 MiB (+8 KiB) in BF16.

- ``--dtype bf16`` (default): 24 layers → 960 MiB + 192 KiB ≈ 0.94 GiB; the MLP weights are
  768 MiB, so fanning each out to 4 experts writes 4·768 + 192 = 3264 MiB ≈ 3.19 GiB.
- ``--dtype f32``: the same shapes in F32 take twice the bytes, so the layer count is halved
  (12 layers) to stay at the same ≈0.94 GiB.
- ``--scale N`` multiplies the layer count (``--scale 2``: 48 BF16 layers ≈ 1.88 GiB).
- ``--layers N`` sets the layer count directly (overrides the two rules above).

All tensors (norms included) have the chosen dtype. Values are seeded normals (std 0.02; the norms
are ones) generated and written 8 MiB at a time, so memory stays small whatever the size. The file
layout is ``examples/make_tiny_gpt2.save_safetensors``'s: 8-byte little-endian header length, a
JSON header padded to 8 bytes with spaces, then the tensors back to back in header order.
Only NumPy (and ml_dtypes for BF16) are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

import numpy as np

HIDDEN = 2048
INTERMEDIATE = 8192
BASE_LAYERS = 24  # BF16 layers at --scale 1
CHUNK_BYTES = 8 << 20

_DTYPES = {"bf16": ("BF16", 2), "f32": ("F32", 4)}


def numpy_dtype(name: str) -> np.dtype:
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float32)


def layout(layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in file order; kind is "norm" (ones) or "weight" (normals)."""
    tensors = []
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors.append((f"{p}.input_layernorm.weight", (HIDDEN,), "norm"))
        tensors.append((f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN), "weight"))
        tensors.append((f"{p}.post_attention_layernorm.weight", (HIDDEN,), "norm"))
        tensors.append((f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), "weight"))
    return tensors


def default_layers(dtype: str, scale: int) -> int:
    _, itemsize = _DTYPES[dtype]
    return BASE_LAYERS * scale * 2 // itemsize


def write_streamed(
    path: Path, tensors: list[tuple[str, tuple[int, ...], str]], dtype: str, seed: int = 0, generator: str = "benches/make_checkpoint.py"
) -> int:
    """Write ``tensors`` (``(name, shape, kind)``; kind "norm" gives ones, "weight" seeded normals of
    std 0.02) to ``path`` in ``dtype``, 8 MiB at a time, atomically via a temporary name; returns
    the file's size in bytes. ``benches/lora_bench.py`` writes its own layouts with it."""
    st_dtype, itemsize = _DTYPES[dtype]
    np_dtype = numpy_dtype(dtype)
    header: dict[str, object] = {"__metadata__": {"format": "pt", "generator": generator}}
    offset = 0
    for name, shape, _ in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    rng = np.random.default_rng(seed)
    chunk_elems = CHUNK_BYTES // itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, shape, kind in tensors:
            remaining = int(np.prod(shape))
            while remaining:
                n = min(remaining, chunk_elems)
                if kind == "norm":
                    block = np.ones(n, np_dtype)
                else:
                    block = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)).astype(np_dtype)
                f.write(block.tobytes())
                remaining -= n
    os.replace(tmp, path)
    return 8 + len(text) + offset


def write_checkpoint(path: Path, dtype: str = "bf16", layers: int | None = None, scale: int = 1, seed: int = 0) -> int:
    """Write the checkpoint to ``path`` (atomically via a temporary name); returns its size in bytes."""
    layers = default_layers(dtype, scale) if layers is None else layers
    return write_streamed(path, layout(layers), dtype, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--scale", type=int, default=1, help="multiply the layer count (default 1)")
    parser.add_argument("--layers", type=int, default=None, help="layer count (overrides --dtype/--scale rules)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = write_checkpoint(args.out, args.dtype, args.layers, args.scale, args.seed)
    print(f"wrote {args.out}: {size / 2**30:.3f} GiB")


if __name__ == "__main__":
    main()
