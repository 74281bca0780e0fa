"""Benchmarks of the low-rank transforms (issue 10), beside ``run.py`` (whose helpers it reuses).

    python benches/lora_bench.py [--repeat 3] [--jobs rsvd,exact,extract,mergekit,merge] [--threads N]
                                 [--mergekit-repeat 1] [--mergekit-timeout 3600]

Every command runs as a process under ``/usr/bin/time -v`` (wall time and peak RSS), page cache
warmed first, best wall time of ``--repeat`` runs and the largest peak RSS, like ``run.py``. Outputs
are deleted after timing. Jobs, all in one batch (timings on the shared 2-core VMs vary 2–4× between
batches, so only compare rows of one run):

rsvd      Randomized rank-64 SVD of a 4096×14336 F32 matrix (224 MiB; a decaying spectrum
          ``L·diag(1/i)·R`` of rank 256 scaled to unit RMS, plus Gaussian noise of std 0.05):
          - ours: ``phlora: {target: w, target_a: a, target_b: b, rank: 64, method: randomized}``
            (factors only, 4.5 MiB written), and the "start-up floor": the same file through
            ``delete: w`` (parses the header, reads no tensor, writes an empty file).
            Factorization time = best phlora wall − best floor wall, so it includes getting the
            matrix (an F32 matrix is mapped where it lies, not read).
          - numpy: the same algorithm written here (Gaussian sketch with 10 extra vectors, 2 power
            iterations re-orthonormalized by QR, SVD of QᵀW), timed around the call inside a
            Python subprocess (imports and reading the file excluded; process wall also shown).
          - torch: ``torch.svd_lowrank(W, q=74, niter=2)``, timed the same way (when importable).
          Relative error ‖W − B·A‖/‖W‖: ours computed in NumPy from the written factors, the others
          from their singular values (√(‖W‖² − Σσᵢ²)/‖W‖); "exact" from the eigenvalues of W·Wᵀ
          (NumPy, computed once and cached next to the matrix).
exact     Exact thin SVD of a 2048×2048 F32 Gaussian matrix: ours ``phlora`` rank 2048 method exact
          (factors written, 32 MiB) minus its read floor, against ``numpy.linalg.svd(W,
          full_matrices=False)`` and ``torch.linalg.svd`` inside subprocesses (call only).
extract   ``extract_lora`` rank 16 over a ~1 GiB BF16 pair: the base is ``run.py``'s
          ``ckpt-bf16.safetensors`` (make_checkpoint.py), the fine-tune = base + a seeded rank-16
          delta (entries of std ≈ 0.002, a tenth of the weights') on every 2-D weight, generated
          here streaming (``ckpt-bf16-ft16.safetensors``). Targets: peak RSS ≤ 512 MiB.
mergekit  A 214 MB (decimal; 204 MiB) BF16 Llama pair, ``llama-214mb/{base,ft}/`` with
          ``config.json`` (LlamaForCausalLM, 8 layers, hidden 1024, intermediate 2816, 16 heads
          and 16 KV heads, vocab 2048, untied) and ``model.safetensors``; the fine-tune = base +
          rank-16 deltas on q,k,v,o,gate,up,down. ``mergekit-extract-lora --model FT --base-model
          BASE --out-path OUT --max-rank 16`` (from ``$MERGEKIT_VENV``, default ``/work/venv-mk``;
          run ``--mergekit-repeat`` times, default once, with ``--mergekit-timeout``) against ours
          ``extract_lora: {target: '.*_proj\\.weight', rank: 16}``. Target from the issue: ours ≥ 20×
          faster at ≤ 1/4 of MergeKit's peak RSS. The adapters' reconstruction errors
          ‖Δ − s·B·A‖/‖Δ‖ (s = lora_alpha/r per module, Δ = ft − base in f32) are computed here in
          NumPy over the 56 projections, for both adapters (max and mean). MergeKit also stores
          ``embed_tokens``, ``lm_head`` and (as unsupported module types) the RMSNorm weights at full
          rank (``modules_to_save``); ours extracts only the projections. MergeKit gets absolute paths: with a relative ``--base-model`` it
          looks the name up on the Hub when writing the model card.
merge     ``merge_lora`` of the ``extract`` job's adapter into the ~1 GiB base (0.94 GiB written)
          against ``cp`` of the same file. Target: within 2× of ``cp``.

Data lives in ``$BENCH_DIR`` (default ``bench-data/`` at the repo root, gitignored): 224 MiB +
16 MiB matrices, the 0.94 GiB pair (1.9 GiB), the Llama pair (2 × 204 MiB); generated on first use.
The table's "ours ÷ this" columns divide ours by the row's tool (time: < 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402
from make_checkpoint import CHUNK_BYTES, numpy_dtype, write_checkpoint, write_streamed  # noqa: E402

MiB = bench.MiB
RSVD = dict(m=4096, n=14336, rank=64, oversample=10, power=2)
EXACT_N = 2048
LORA_RANK = 16
DELTA_STD = 0.002  # std of the fine-tune's delta entries (the base's weights have std 0.02)
LLAMA = dict(layers=8, hidden=1024, intermediate=2816, heads=16, vocab=2048)
PROJ = r".*_proj\.weight"
ST_DTYPES = {"BF16": "bf16", "F32": "f32"}


# ----------------------------------------------------------------------------------------------
# Data


def save_tensor(path: Path, name: str, array: np.ndarray) -> None:
    sys.path.insert(0, str(HERE.parent / "examples"))
    from make_tiny_gpt2 import save_safetensors

    tmp = path.with_name(path.name + ".tmp")
    save_safetensors(tmp, {name: array})
    os.replace(tmp, path)


def lowrank_matrix(path: Path) -> Path:
    if not path.exists():
        print(f"generating {path} ...", file=sys.stderr, flush=True)
        rng = np.random.default_rng(10)
        m, n, k = RSVD["m"], RSVD["n"], 256
        w = (rng.standard_normal((m, k), dtype=np.float32) * (1.0 / np.arange(1, k + 1, dtype=np.float32))) @ \
            rng.standard_normal((k, n), dtype=np.float32)
        w /= np.float32(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
        w += np.float32(0.05) * rng.standard_normal((m, n), dtype=np.float32)
        save_tensor(path, "w", w)
    return path


def exact_spectrum(path: Path) -> np.ndarray:
    """σᵢ² of the matrix in ``path`` (descending), from eigvalsh(W·Wᵀ); cached as ``.sigma2.npy``."""
    cache = path.with_suffix(".sigma2.npy")
    if not cache.exists():
        print(f"computing the exact spectrum of {path.name} (once) ...", file=sys.stderr, flush=True)
        from safetensors.numpy import load_file

        w = load_file(str(path))["w"]
        gram = (w @ w.T).astype(np.float64)
        del w
        np.save(cache, np.sort(np.clip(np.linalg.eigvalsh(gram), 0, None))[::-1])
    return np.load(cache)


def square_matrix(path: Path) -> Path:
    if not path.exists():
        print(f"generating {path} ...", file=sys.stderr, flush=True)
        save_tensor(path, "w", np.random.default_rng(11).standard_normal((EXACT_N, EXACT_N), dtype=np.float32))
    return path


def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def header_bytes(header: dict) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def write_finetune(base: Path, out: Path, pattern: str, rank: int, seed: int) -> None:
    """``out`` = ``base`` with ``+ B @ A`` (seeded, rank ``rank``) on every 2-D tensor whose name
    matches ``pattern``, streamed from a memory map of the base (row blocks of ~8 MiB)."""
    print(f"generating {out} ...", file=sys.stderr, flush=True)
    header, start = read_header(base)
    header = dict(header)
    header["__metadata__"] = {"format": "pt", "generator": f"benches/lora_bench.py: base + rank-{rank} deltas"}
    entries = sorted((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__")
    text = header_bytes(header)
    mm = np.memmap(base, dtype=np.uint8, mode="r")
    rng = np.random.default_rng(seed)
    sigma = np.float32(np.sqrt(DELTA_STD / np.sqrt(rank)))  # std of (B @ A)ᵢⱼ = √rank·σ²
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, name, info in entries:
            lo, hi = (start + o for o in info["data_offsets"])
            shape = info["shape"]
            if len(shape) == 2 and re.fullmatch(pattern, name):
                dt = numpy_dtype(ST_DTYPES[info["dtype"]])
                m, n = shape
                w = mm[lo:hi].view(dt).reshape(m, n)
                a = rng.standard_normal((rank, n), dtype=np.float32) * sigma
                b = rng.standard_normal((m, rank), dtype=np.float32) * sigma
                rows = max(1, CHUNK_BYTES // (4 * n))
                for r0 in range(0, m, rows):
                    f.write((w[r0:r0 + rows].astype(np.float32) + b[r0:r0 + rows] @ a).astype(dt).tobytes())
            else:
                for c in range(lo, hi, CHUNK_BYTES):
                    f.write(mm[c:min(hi, c + CHUNK_BYTES)].tobytes())
    del mm
    os.replace(tmp, out)


def gib_pair(data: Path) -> tuple[Path, Path]:
    base = data / "ckpt-bf16.safetensors"
    if not base.exists():
        print(f"generating {base} ...", file=sys.stderr, flush=True)
        write_checkpoint(base, dtype="bf16")
    ft = data / "ckpt-bf16-ft16.safetensors"
    if not ft.exists():
        write_finetune(base, ft, r".*\.weight", LORA_RANK, seed=16)
    return base, ft


def llama_layout() -> list[tuple[str, tuple[int, ...], str]]:
    h, i, v = LLAMA["hidden"], LLAMA["intermediate"], LLAMA["vocab"]
    t = [("model.embed_tokens.weight", (v, h), "weight")]
    for layer in range(LLAMA["layers"]):
        p = f"model.layers.{layer}"
        t.append((f"{p}.input_layernorm.weight", (h,), "norm"))
        t += [(f"{p}.self_attn.{x}_proj.weight", (h, h), "weight") for x in "qkvo"]
        t.append((f"{p}.post_attention_layernorm.weight", (h,), "norm"))
        t += [(f"{p}.mlp.gate_proj.weight", (i, h), "weight"), (f"{p}.mlp.up_proj.weight", (i, h), "weight"),
              (f"{p}.mlp.down_proj.weight", (h, i), "weight")]
    t += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "weight")]
    return t


def llama_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": LLAMA["hidden"], "intermediate_size": LLAMA["intermediate"],
        "num_hidden_layers": LLAMA["layers"], "num_attention_heads": LLAMA["heads"],
        "num_key_value_heads": LLAMA["heads"], "head_dim": LLAMA["hidden"] // LLAMA["heads"],
        "vocab_size": LLAMA["vocab"], "max_position_embeddings": 2048, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2,
    }


def llama_pair(data: Path) -> tuple[Path, Path]:
    root = data / "llama-214mb"
    base, ft = root / "base", root / "ft"
    for d in (base, ft):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(llama_config(), indent=2) + "\n")
    if not (base / "model.safetensors").exists():
        print(f"generating {base}/model.safetensors ...", file=sys.stderr, flush=True)
        write_streamed(base / "model.safetensors", llama_layout(), "bf16", seed=20, generator="benches/lora_bench.py")
    if not (ft / "model.safetensors").exists():
        write_finetune(base / "model.safetensors", ft / "model.safetensors", PROJ, LORA_RANK, seed=21)
    return base, ft


# ----------------------------------------------------------------------------------------------
# Measuring


class Result:
    """One row of the table."""

    def __init__(self, job: str, tool: str, m: bench.Measure | None = None, timed: float | None = None,
                 err: str = "", note: str = ""):
        self.job, self.tool, self.err, self.note = job, tool, err, note
        self.wall = m.best if m and m.times else None
        self.rss = m.rss_mib if m and m.rss_kib else None
        self.timed = timed if timed is not None else self.wall
        self.m = m


def run_out(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[float, int, str]:
    """Like ``run.run_once`` but keeps stdout: wall seconds, peak RSS KiB, stdout."""
    full = [bench.TIME, "-v", *cmd] if bench.TIME else cmd
    start = time.perf_counter()
    proc = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    if bench.TIME:
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    else:  # only the children's peak is visible without /usr/bin/time
        import resource

        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, rss, proc.stdout


def measure(cmd: list[str], warm: list[Path], out: Path | None, repeat: int, keep: bool = False,
            timeout: float | None = None, env: dict | None = None) -> tuple[bench.Measure, list[str]]:
    """``run.measure`` with stdout kept and several inputs warmed; ``keep`` leaves the last output."""
    m = bench.Measure()
    for p in warm:
        for f in (sorted(p.rglob("*")) if p.is_dir() else [p]):
            if f.is_file():
                bench.warm(f)
    outs = []
    for i in range(repeat):
        if out is not None:
            bench.remove(out)
        subprocess.run(["sync"], check=True)
        wall, rss, stdout = run_out(cmd, timeout=timeout, env=env)
        m.times.append(wall)
        m.rss_kib.append(rss)
        outs.append(stdout)
        if out is not None and out.exists():
            m.out_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
            if not (keep and i == repeat - 1):
                bench.remove(out)
    return m, outs


ONE_BLAS_THREAD = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def inner(py: str, mode: str, path: Path, repeat: int, env: dict | None = None) -> tuple[bench.Measure, float, float]:
    """This script's ``_inner`` mode in a subprocess: (process measure, best timed call, relerr)."""
    m, outs = measure([py, __file__, "_inner", mode, str(path)], [path], None, repeat,
                      env=dict(os.environ, **env) if env else None)
    docs = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return m, min(d["seconds"] for d in docs), docs[-1].get("relerr", float("nan"))


def rsvd_numpy(w: np.ndarray, rank: int, oversample: int, power: int, seed: int = 0):
    """Halko–Martinsson–Tropp randomized SVD: Gaussian sketch, QR after every product."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(w @ rng.standard_normal((w.shape[1], rank + oversample), dtype=np.float32))
    for _ in range(power):
        z, _ = np.linalg.qr(w.T @ q)
        q, _ = np.linalg.qr(w @ z)
    ub, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ ub[:, :rank]), s[:rank], vt[:rank]


def relerr_from_sigma(norm2: float, s: np.ndarray) -> float:
    return float(np.sqrt(max(norm2 - float(np.sum(np.asarray(s, np.float64) ** 2)), 0.0) / norm2))


def inner_main(mode: str, path: str) -> None:
    from safetensors.numpy import load_file

    w = load_file(path)["w"]
    norm2 = float(np.sum(w.astype(np.float64) ** 2))
    r, p, q = RSVD["rank"], RSVD["oversample"], RSVD["power"]
    if mode.endswith("torch"):
        import torch

        t = torch.from_numpy(w)
        torch.manual_seed(0)
        start = time.perf_counter()
        if mode == "rsvd_torch":
            _, s, _ = torch.svd_lowrank(t, q=r + p, niter=q)
        else:
            _, s, _ = torch.linalg.svd(t, full_matrices=False)
        seconds = time.perf_counter() - start
        s = s.numpy()
    else:
        start = time.perf_counter()
        if mode == "rsvd_numpy":
            _, s, _ = rsvd_numpy(w, r, p, q)
        else:
            _, s, _ = np.linalg.svd(w, full_matrices=False)
        seconds = time.perf_counter() - start
    doc = {"seconds": seconds}
    if mode.startswith("rsvd"):
        doc["relerr"] = relerr_from_sigma(norm2, s[:r])
    print(json.dumps(doc))


def factors_relerr(w_path: Path, f_path: Path) -> float:
    from safetensors.numpy import load_file

    w = load_file(str(w_path))["w"]
    f = load_file(str(f_path))
    return float(np.linalg.norm(w - f["b"].astype(np.float32) @ f["a"].astype(np.float32)) / np.linalg.norm(w))


def adapter_errors(base: Path, ft: Path, adapter: Path) -> list[float]:
    """‖Δ − s·B·A‖/‖Δ‖ for every LoRA module of a PEFT adapter (Δ = ft − base, f32)."""
    import ml_dtypes  # noqa: F401 - registers "bfloat16" with NumPy, which safe_open needs for BF16
    from safetensors import safe_open

    cfg = json.loads((adapter / "adapter_config.json").read_text())

    def pattern_get(pat: dict, module: str, default):
        for key, value in (pat or {}).items():
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        return default

    errs = []
    with safe_open(str(adapter / "adapter_model.safetensors"), "numpy") as ad, \
            safe_open(str(base), "numpy") as fb, safe_open(str(ft), "numpy") as ff:
        for key in sorted(ad.keys()):
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            a = ad.get_tensor(key).astype(np.float32)
            b = ad.get_tensor(key.replace("lora_A", "lora_B")).astype(np.float32)
            r = pattern_get(cfg.get("rank_pattern"), module, cfg["r"])
            alpha = pattern_get(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
            s = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
            delta = ff.get_tensor(module + ".weight").astype(np.float32) - fb.get_tensor(module + ".weight").astype(np.float32)
            if cfg.get("fan_in_fan_out"):
                delta = delta.T
            errs.append(float(np.linalg.norm(delta - np.float32(s) * (b @ a)) / np.linalg.norm(delta)))
    return errs


def reported_errors(stdout: str) -> list[float]:
    """Relative errors from brainsurgery's ``--summarize`` factorization rows (or summary line)."""
    rows = [m.group(1) for line in stdout.splitlines()
            if re.search(r"\s(randomized|exact)\s", line) and (m := re.search(r"\s([0-9.]+(?:[eE][+-]?\d+)?)\s*$", line))]
    return [float(x) for x in rows or re.findall(r"relative error (?:≤ |= |)([0-9.eE+-]+)", stdout)]


# ----------------------------------------------------------------------------------------------
# Jobs


def job_rsvd(ctx) -> list[Result]:
    path = lowrank_matrix(ctx.data / "lr-4096x14336-f32.safetensors")
    sigma2 = exact_spectrum(path)
    r = RSVD["rank"]
    exact = float(np.sqrt(sigma2[r:].sum() / sigma2.sum()))
    out = ctx.data / "lr-factors.safetensors"
    job = f"1 rSVD rank {r}, 4096×14336 F32"
    print(f"[rsvd] brainsurgery phlora ...", file=sys.stderr, flush=True)
    plan = ["-I", str(path), "-e", f"phlora: {{target: w, target_a: a, target_b: b, rank: {r}, method: randomized}}",
            "-o", str(out)]
    m, _ = measure(ctx.bs(plan), [path], out, ctx.repeat, keep=True)
    ours_err = factors_relerr(path, out)
    bench.remove(out)
    print(f"[rsvd] brainsurgery phlora --threads 1 ...", file=sys.stderr, flush=True)
    m1, _ = measure(ctx.bs(plan, threads=1), [path], out, ctx.repeat)
    # The floor is the process without the factorization: start-up, the header, an output
    # written. Our run maps the matrix rather than reading it (F32 in the work type), so a floor
    # that reads the matrix (as this one did before) would flatter us by the read.
    print(f"[rsvd] start-up floor ...", file=sys.stderr, flush=True)
    floor, _ = measure(ctx.bs(["-I", str(path), "-e", "delete: w", "-o", str(out)]),
                       [path], out, ctx.repeat)
    print(f"    ours {m.times} 1 thread {m1.times} floor {floor.times}", file=sys.stderr)
    met = "met" if m.best - floor.best <= 0.5 else "MISSED"
    rows = [Result(job, "ours phlora (factors)", m, timed=m.best - floor.best, err=f"{ours_err:.4f}",
                   note=f"timed = wall − start-up floor (mapping the matrix included); target ≤ 0.5 s: {met}; exact rank-{r} error {exact:.4f}"),
            Result(job, "ours phlora, --threads 1", m1, timed=m1.best - floor.best, note="timed = wall − start-up floor"),
            Result(job, "ours start-up floor", floor, note="header only: reads no tensor, writes an empty checkpoint")]
    print(f"[rsvd] numpy ...", file=sys.stderr, flush=True)
    mn, tn, en = inner(ctx.py, "rsvd_numpy", path, ctx.repeat)
    rows.append(Result(job, "NumPy rSVD (same algorithm)", mn, timed=tn, err=f"{en:.4f}", note="timed = the call only"))
    mn1, tn1, en1 = inner(ctx.py, "rsvd_numpy", path, ctx.repeat, env=ONE_BLAS_THREAD)
    rows.append(Result(job, "NumPy rSVD, 1 BLAS thread", mn1, timed=tn1, err=f"{en1:.4f}", note="timed = the call only"))
    if ctx.have_torch:
        print(f"[rsvd] torch ...", file=sys.stderr, flush=True)
        mt, tt, et = inner(ctx.py, "rsvd_torch", path, ctx.repeat)
        rows.append(Result(job, "torch.svd_lowrank(q=74, niter=2)", mt, timed=tt, err=f"{et:.4f}", note="timed = the call only"))
    return rows


def job_exact(ctx) -> list[Result]:
    path = square_matrix(ctx.data / "sq-2048-f32.safetensors")
    out = ctx.data / "sq-factors.safetensors"
    n = EXACT_N
    job = f"2 exact thin SVD {n}×{n} F32"
    print(f"[exact] brainsurgery phlora exact ...", file=sys.stderr, flush=True)
    m, _ = measure(ctx.bs(["-I", str(path), "-e",
                           f"phlora: {{target: w, target_a: a, target_b: b, rank: {n}, method: exact}}", "-o", str(out)]),
                   [path], out, ctx.repeat)
    floor, _ = measure(ctx.bs(["-I", str(path), "-e", "dump: {target: w, verbosity: stat}", "-e", "delete: w", "-o", str(out)]),
                       [path], out, ctx.repeat)
    print(f"    ours {m.times} floor {floor.times}", file=sys.stderr)
    rows = [Result(job, "ours phlora exact (factors)", m, timed=m.best - floor.best, note="timed = wall − read floor"),
            Result(job, "ours read floor (dump stat)", floor)]
    print(f"[exact] numpy ...", file=sys.stderr, flush=True)
    mn, tn, _ = inner(ctx.py, "svd_numpy", path, ctx.repeat)
    rows.append(Result(job, "numpy.linalg.svd(full_matrices=False)", mn, timed=tn, note="timed = the call only"))
    mn1, tn1, _ = inner(ctx.py, "svd_numpy", path, ctx.repeat, env=ONE_BLAS_THREAD)
    rows.append(Result(job, "numpy.linalg.svd, 1 BLAS thread", mn1, timed=tn1, note="timed = the call only"))
    if ctx.have_torch:
        print(f"[exact] torch ...", file=sys.stderr, flush=True)
        mt, tt, _ = inner(ctx.py, "svd_torch", path, ctx.repeat)
        rows.append(Result(job, "torch.linalg.svd(full_matrices=False)", mt, timed=tt, note="timed = the call only"))
    return rows


def extract_cmd(ctx, base: Path, ft: Path, out: Path, target: str, threads: int | None = None) -> list[str]:
    # Single quotes in YAML flow: the regex's backslash stays literal.
    return ctx.bs(threads=threads, args=["--summarize", f"inputs=[base::{base},ft::{ft}]", "-e",
                   f"extract_lora: {{base: base, finetuned: ft, target: '{target}', rank: {LORA_RANK}, path: '{out}'}}"])


def job_extract(ctx) -> list[Result]:
    base, ft = gib_pair(ctx.data)
    out = ctx.data / "lora-gib-r16"
    job = "3 extract_lora r16, 0.94 GiB BF16 pair"
    print(f"[extract] brainsurgery extract_lora ...", file=sys.stderr, flush=True)
    m, outs = measure(extract_cmd(ctx, base, ft, out, PROJ), [base, ft], out, ctx.repeat, keep=True)
    errs = reported_errors(outs[-1])
    ctx.adapter = out  # kept for the merge job
    tmp = ctx.data / "lora-gib-r16-t1"
    print(f"[extract] brainsurgery extract_lora --threads 1 ...", file=sys.stderr, flush=True)
    m1, _ = measure(extract_cmd(ctx, base, ft, tmp, PROJ, threads=1), [base, ft], tmp, ctx.repeat)
    print(f"    ours {m.times} 1 thread {m1.times}", file=sys.stderr)
    rss_ok = "met" if m.rss_mib <= 512 else "MISSED"
    return [Result(job, "ours extract_lora", m, err=f"max {max(errs):.4f}" if errs else "",
                   note=f"target RSS ≤ 512 MiB: {rss_ok}; {len(errs)} matrices"),
            Result(job, "ours extract_lora, --threads 1", m1)]


def job_mergekit(ctx) -> list[Result]:
    base, ft = llama_pair(ctx.data)
    base_st, ft_st = base / "model.safetensors", ft / "model.safetensors"
    job = "4 LoRA r16, 214 MB Llama pair"
    ours_out = ctx.data / "lora-llama-ours"
    print(f"[mergekit] brainsurgery extract_lora ...", file=sys.stderr, flush=True)
    m, outs = measure(extract_cmd(ctx, base_st, ft_st, ours_out, PROJ), [base, ft], ours_out, ctx.repeat, keep=True)
    reported = reported_errors(outs[-1])
    ours_errs = adapter_errors(base_st, ft_st, ours_out)
    bench.remove(ours_out)
    print(f"    ours {m.times}", file=sys.stderr)
    rows = [Result(job, "ours extract_lora", m,
                   err=f"max {max(ours_errs):.4f}, mean {np.mean(ours_errs):.4f} ({len(ours_errs)})",
                   note=f"reported max {max(reported):.4f}" if reported else "")]
    mk = Path(os.environ.get("MERGEKIT_VENV", "/work/venv-mk")) / "bin" / "mergekit-extract-lora"
    if not mk.exists():
        rows.append(Result(job, "mergekit-extract-lora", note=f"skipped: {mk} missing"))
        return rows
    mk_out = ctx.data / "lora-llama-mergekit"
    cmd = [str(mk), "--model", str(ft), "--base-model", str(base), "--out-path", str(mk_out),
           "--max-rank", str(LORA_RANK), "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print(f"[mergekit] {' '.join(cmd)} ({ctx.mk_repeat}×, timeout {ctx.mk_timeout} s) ...", file=sys.stderr, flush=True)
    try:
        mm, _ = measure(cmd, [base, ft], mk_out, ctx.mk_repeat, keep=True, timeout=ctx.mk_timeout, env=env)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"    mergekit failed: {e}", file=sys.stderr)
        rows.append(Result(job, "mergekit-extract-lora", note=f"failed: {str(e).splitlines()[0][:120]}"))
        return rows
    print(f"    mergekit {mm.times}", file=sys.stderr)
    mk_errs = adapter_errors(base_st, ft_st, mk_out)
    bench.remove(mk_out)
    speed = mm.best / m.best
    mem = m.rss_mib / mm.rss_mib
    verdict = "met" if speed >= 20 and mem <= 0.25 else "MISSED"
    rows.append(Result(job, "mergekit-extract-lora 0.1.5", mm,
                       err=f"max {max(mk_errs):.4f}, mean {np.mean(mk_errs):.4f} ({len(mk_errs)})",
                       note=f"ours {speed:.0f}× faster at {mem:.2f}× the RSS (target ≥ 20×, ≤ 0.25×: {verdict})"))
    return rows


def job_merge(ctx) -> list[Result]:
    base, ft = gib_pair(ctx.data)
    if ctx.adapter is None or not ctx.adapter.exists():
        ctx.adapter = ctx.data / "lora-gib-r16"
        print(f"[merge] extracting the adapter (untimed) ...", file=sys.stderr, flush=True)
        run_out(extract_cmd(ctx, base, ft, ctx.adapter, PROJ))
    out = ctx.data / "out-merged.safetensors"
    job = "5 merge_lora r16 into 0.94 GiB BF16"
    print(f"[merge] brainsurgery merge_lora ...", file=sys.stderr, flush=True)
    m, _ = measure(ctx.bs([f"inputs=[base::{base}]", "-e", f"merge_lora: {{target: base, adapter: '{ctx.adapter}'}}",
                           "-o", str(out)]), [base, ctx.adapter], out, ctx.repeat)
    print(f"[merge] cp ...", file=sys.stderr, flush=True)
    mc, _ = measure(["cp", str(base), str(out)], [base], out, ctx.repeat)
    print(f"    ours {m.times} cp {mc.times}", file=sys.stderr)
    ratio = m.best / mc.best
    return [Result(job, "ours merge_lora", m, note=f"{ratio:.2f}× cp (target ≤ 2×: {'met' if ratio <= 2 else 'MISSED'})"),
            Result(job, "cp", mc)]


class Ctx:
    def __init__(self, args):
        self.data = bench.bench_dir()
        self.data.mkdir(parents=True, exist_ok=True)
        self.repeat = args.repeat
        self.mk_repeat = args.mergekit_repeat
        self.mk_timeout = args.mergekit_timeout
        self.threads = args.threads
        self.py = sys.executable
        self.exe = bench.brainsurgery_exe()
        self.have_torch = subprocess.run([self.py, "-c", "import torch"], capture_output=True).returncode == 0
        self.adapter: Path | None = None

    def bs(self, args: list[str], threads: int | None = None) -> list[str]:
        return [self.exe, "run", "--no-progress", "--threads", str(self.threads if threads is None else threads), *args]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_inner":
        inner_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", default="rsvd,exact,extract,mergekit,merge")
    parser.add_argument("--threads", type=int, default=0, help="brainsurgery --threads (0: one per core)")
    parser.add_argument("--mergekit-repeat", type=int, default=1)
    parser.add_argument("--mergekit-timeout", type=float, default=3600)
    args = parser.parse_args()
    ctx = Ctx(args)
    funcs = {"rsvd": job_rsvd, "exact": job_exact, "extract": job_extract, "mergekit": job_mergekit, "merge": job_merge}
    print(f"brainsurgery: {ctx.exe}; RSS via {'/usr/bin/time -v' if bench.TIME else 'getrusage'}; "
          f"{os.cpu_count()} CPUs; repeat {args.repeat}; torch {'yes' if ctx.have_torch else 'no'}; data in {ctx.data}",
          file=sys.stderr)
    load_start = os.getloadavg()
    rows: list[Result] = []
    try:
        for job in args.jobs.split(","):
            try:
                rows += funcs[job](ctx)
            except Exception as e:  # one failed job still leaves the others' rows
                print(f"[{job}] failed: {e}", file=sys.stderr)
                rows.append(Result(job, "–", note=f"failed: {str(e).splitlines()[0][:160]}"))
    finally:
        if ctx.adapter is not None:
            bench.remove(ctx.adapter)
    load_end = os.getloadavg()

    fmt = bench.fmt
    print()
    print(f"{datetime.date.today().isoformat()}, {platform.node()}, {os.cpu_count()} CPUs; best of {args.repeat} "
          f"(MergeKit: {args.mergekit_repeat}); load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end")
    print()
    print("| job | tool | timed s | process wall s | peak RSS MiB | ours ÷ this (time) | ours ÷ this (RSS) | rel. error | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    ours_of: dict[str, Result] = {}
    for row in rows:
        if row.tool.startswith("ours") and "floor" not in row.tool and row.job not in ours_of:
            ours_of[row.job] = row
        o = ours_of.get(row.job)
        t_ratio = o.timed / row.timed if o and row is not o and "floor" not in row.tool and o.timed and row.timed else None
        r_ratio = o.rss / row.rss if o and row is not o and "floor" not in row.tool and o.rss and row.rss else None
        print(f"| {row.job} | {row.tool} | {fmt(row.timed, 3)} | {fmt(row.wall, 3)} | {fmt(row.rss, 1)} | "
              f"{fmt(t_ratio, 3)} | {fmt(r_ratio, 3)} | {row.err or '–'} | {row.note or ''} |")


if __name__ == "__main__":
    main()
