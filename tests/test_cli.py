"""The ``brainsurgery`` command line (SPEC §2 plan merging/overrides, §10): a tmp dir, a run, a
comparison against NumPy / the official safetensors reader / bytes written by hand."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import brainsurgery as bs
from helpers import assert_one_error, cli, dump_plan, header_dict, listing, pymod, sha256, tensor_order, write_st

ROOT = Path(__file__).resolve().parent.parent

TENSORS = {
    "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b.weight": np.linspace(-1, 1, 8, dtype=np.float32),
    "h.weight": np.arange(6, dtype=np.float16),
    "ids": np.arange(5, dtype=np.int64),
}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    write_st(tmp_path / "in.safetensors", TENSORS, {"format": "pt"})
    return tmp_path


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "error" not in proc.stderr.lower(), proc.stderr
    return proc


SIMPLE = [
    {"scale_": {"target": "a\\.weight", "by": 2}},
    {"copy": {"from": "b.weight", "to": "b.copy"}},
    {"delete": {"target": "ids"}},
]


def simple_expected() -> dict[str, np.ndarray]:
    return {
        "a.weight": TENSORS["a.weight"] * 2,
        "b.weight": TENSORS["b.weight"],
        "h.weight": TENSORS["h.weight"],
        "b.copy": TENSORS["b.weight"],
    }


def assert_tensors(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_bare_plan_equals_run_subcommand(ws: Path) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "transforms": SIMPLE, "output": {"path": "o1.safetensors"}})
    ok(cli(["p.yaml"], cwd=ws))
    ok(cli(["run", "p.yaml", "output.path=o2.safetensors"], cwd=ws))
    assert_tensors(load_file(str(ws / "o1.safetensors")), simple_expected())
    assert_tensors(load_file(str(ws / "o2.safetensors")), simple_expected())
    # Same plan document except the output path: the tensors and their layout are identical.
    h1, h2 = header_dict(ws / "o1.safetensors"), header_dict(ws / "o2.safetensors")
    h1.pop("__metadata__")
    h2.pop("__metadata__")
    assert h1 == h2


def test_check_validates_prints_summary_and_writes_nothing(ws: Path) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "transforms": SIMPLE, "output": {"path": "out/dir", "shard": "16B"}})
    before = listing(ws)
    proc = ok(cli(["check", "p.yaml"], cwd=ws))
    assert "plan is valid" in proc.stdout
    # output summary: the alias and the number of tensors it would write (4), added/removed
    summary = [line for line in proc.stdout.splitlines() if "model" in line and "tensors" in line]
    assert summary, proc.stdout
    assert re.search(r"\b4 tensors\b", summary[0]), summary[0]
    assert re.search(r"\b1 added\b", summary[0]) and re.search(r"\b1 removed\b", summary[0]), summary[0]
    assert "memory" in proc.stdout.lower(), proc.stdout
    assert listing(ws) == before
    # A plan that fails the header-level check makes `check` fail the same way as `run`.
    dump_plan(ws / "bad.yaml", {"inputs": ["in.safetensors"], "transforms": [{"delete": {"target": "nope"}}], "output": "o.safetensors"})
    proc = cli(["check", "bad.yaml"], cwd=ws)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "transforms[0]" in proc.stderr
    assert listing(ws) == sorted(before + ["bad.yaml"])


def test_inspect_lists_header(ws: Path) -> None:
    proc = ok(cli(["inspect", "in.safetensors"], cwd=ws))
    lines = proc.stdout.splitlines()
    total = 0
    for name, array in TENSORS.items():
        row = [line for line in lines if line.split() and line.split()[0] == name]
        assert len(row) == 1, (name, proc.stdout)
        fields = row[0]
        assert array.dtype.name in fields, fields
        dims = [int(d) for d in re.findall(r"\d+", fields.split(array.dtype.name, 1)[1])]
        # shape digits then the size (under 1 KiB: bytes, `48 B`)
        assert dims[:-1] == list(array.shape), fields
        assert fields.endswith(f" {array.nbytes} B"), fields
        total += array.nbytes
    assert any(re.search(rf"\b{len(TENSORS)} tensors\b", line) for line in lines), proc.stdout
    assert any(re.search(rf"\b{total} B\b", line) for line in lines), proc.stdout  # 136 B
    assert "format" in proc.stdout and "pt" in proc.stdout  # the metadata


def test_inspect_directory(ws: Path) -> None:
    write_st(ws / "ck" / "model-00001-of-00002.safetensors", {"x": np.zeros(3, np.float32)})
    write_st(ws / "ck" / "model-00002-of-00002.safetensors", {"y": np.zeros((2, 2), np.int8)})
    proc = ok(cli(["inspect", "ck"], cwd=ws))
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.split()]
    assert "x" in names and "y" in names
    assert re.search(r"\b2 tensors\b", proc.stdout)
    assert re.search(r"\b16 B\b", proc.stdout)


def test_issue9_inspect_long_name_is_shortened_and_whole_in_json(ws: Path) -> None:
    """Issue 9 item 2: a 65,536-byte name made `inspect` panic on its column width."""
    long = "model." + "x" * 65_536 + ".weight"
    write_st(ws / "long.safetensors", {long: np.zeros(2, np.float32), "short": np.zeros((2, 3), np.float32)})
    proc = ok(cli(["inspect", "long.safetensors"], cwd=ws))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("model."))
    shown = row.split()[0]
    assert len(shown) == 100 and "…" in shown and shown.endswith("x.weight"), shown
    assert len(row) < 200 and "float32" in row and "(2,)" in row
    doc = json.loads(ok(cli(["inspect", "--json", "long.safetensors"], cwd=ws)).stdout)
    assert [t["name"] for t in doc["tensors"]] == [long, "short"]
    assert doc["tensors"][1] == {"name": "short", "dtype": "float32", "shape": [2, 3], "nbytes": 24}
    assert doc["format"] == "safetensors" and doc["nbytes"] == 32


SHADOW = "hunter2:*:19000:0:99999:7:::\nsecretd:*:19000:0:99999:7:::\n"


def test_issue9_a_file_that_is_not_a_plan_is_named_so_without_its_content(ws: Path) -> None:
    """Issue 9 item 9: `execute: {path: /etc/shadow}` quoted the file's first line as an unknown
    key; YAML syntax errors quoted lines of the file."""
    (ws / "shadow").write_text(SHADOW)
    (ws / "log.yaml").write_text("error: rootsecret: x\n")
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "transforms": [{"execute": {"path": "shadow"}}]})
    for args in (["check", "shadow"], ["check", "p.yaml"], ["shadow", "-o", "out.safetensors"]):
        message = assert_one_error(cli(args, cwd=ws), 2, "shadow: not a plan")
        assert "hunter2" not in message and "secretd" not in message, message
    message = assert_one_error(cli(["check", "log.yaml"], cwd=ws), 2, "log.yaml", "line 1, column 18")
    assert "rootsecret" not in message, message
    assert not (ws / "out.safetensors").exists()


def test_issue9_non_regular_plan_files_are_refused_before_reading(ws: Path) -> None:
    """A FIFO would block and `/dev/zero` was read for 4.2 GB; a directory is named as one."""
    os.mkfifo(ws / "fifo.yaml")
    (ws / "plans").mkdir()
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "transforms": [{"execute": {"path": "plans"}}]})
    assert_one_error(cli(["check", "fifo.yaml"], cwd=ws, timeout=10), 2, "fifo.yaml: it is a FIFO, not a regular file")
    assert_one_error(cli(["check", "/dev/zero"], cwd=ws, timeout=10), 2, "/dev/zero: it is a character device")
    assert_one_error(cli(["check", "p.yaml"], cwd=ws, timeout=10), 2, "transforms[0].execute.path", "is a directory")
    with open(ws / "big.yaml", "wb") as f:
        f.truncate(16 * 2**20 + 1)
    assert_one_error(cli(["check", "big.yaml"], cwd=ws, timeout=10), 2, "big.yaml: it is larger than the 16 MiB limit")


def test_issue9_long_override_paths_are_linear_and_capped(ws: Path) -> None:
    """Issue 9 item 11b: a 60,000-segment override took > 20 s (quadratic); 150,000 overflowed
    the stack in a nested plan. A path may nest as deep as a plan document (64 levels); a longer
    one is refused, and one past 10,000 steps while it is parsed."""
    deep = "transforms[0].execute.plan." + ".".join(["a"] * 9_990) + "=1"
    proc = cli(["check", "in.safetensors", "-e", "execute: plan: {}", deep], cwd=ws, timeout=10)
    assert_one_error(proc, 2, "a plan document nests at most 64 levels")
    proc = cli(["check", "in.safetensors", ".".join(["a"] * 60_000) + "=1"], cwd=ws, timeout=10)
    assert_one_error(proc, 2, "more than 10000 keys and indices")


def _many_tiny_tensors(path: Path, n: int) -> None:
    """A safetensors file of ``n`` one-element float32 tensors, header written by hand."""
    header = {f"model.layers.{i // 10}.block.{i % 10}.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4 * n))


def _copy_peak_rss_kib(ws: Path, name: str) -> int:
    """Copies ``name`` through the command line in a child process; its peak RSS in KiB."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a child of a large
    # pytest process (torch imported) reported the parent's peak and the slope read as zero.
    code = (
        "import re, sys\n"
        "from brainsurgery import _core\n"
        f"status = _core.cli_main([{name!r}, '-o', 'out-' + {name!r}, '--no-progress'])\n"
        "print(status, re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ws, timeout=60)
    status, rss = proc.stdout.split()[-2:]
    assert status == "0", proc.stdout + proc.stderr
    return int(rss)


def test_issue9_copying_many_tensors_costs_little_per_tensor(ws: Path) -> None:
    """Issue 9 item 11c: copying a 100,000-tensor checkpoint took 2.2 KB of peak memory per
    tensor (JSON trees for the header read and written, the state cloned for the check and the
    run, per-tensor summaries built twice); now under 1 KB. Measured as the slope between 25,000
    and 100,000 tensors, so the interpreter's own memory does not count."""
    _many_tiny_tensors(ws / "small.safetensors", 25_000)
    _many_tiny_tensors(ws / "large.safetensors", 100_000)
    small = _copy_peak_rss_kib(ws, "small.safetensors")
    large = _copy_peak_rss_kib(ws, "large.safetensors")
    per_tensor = (large - small) * 1024 / 75_000
    assert per_tensor < 1500, f"{per_tensor:.0f} bytes of peak RSS per tensor"
    assert tensor_order(ws / "out-large.safetensors") == tensor_order(ws / "large.safetensors")


def test_plan_files_merge_and_overrides_are_typed(ws: Path) -> None:
    dump_plan(
        ws / "base.yaml",
        {
            "inputs": ["in.safetensors"],
            "transforms": [{"delete": {"target": "ids"}}, {"delete": {"target": "h.weight"}}],
            "output": {"path": "merged", "shard": "none"},
        },
    )
    # The later list REPLACES the earlier one; the output mapping MERGES (path kept, sidecars added).
    dump_plan(
        ws / "over.yaml",
        {
            "transforms": [
                {"scale_": {"target": "a\\.weight", "by": 3}},
                {"copy": {"from": "b.weight", "to": "placeholder"}},
            ],
            "output": {"sidecars": False},
        },
    )
    proc = ok(cli(["base.yaml", "over.yaml", "transforms[0].scale_.by=0.5", "transforms[1].copy.to='007'"], cwd=ws))
    assert "error" not in proc.stdout.lower()
    out = ws / "merged" / "model.safetensors"  # shard: none from base.yaml
    assert listing(ws / "merged") == ["model.safetensors"]
    got = load_file(str(out))
    expected = dict(TENSORS)  # the deletes of base.yaml were replaced away: ids and h.weight stay
    expected["a.weight"] = TENSORS["a.weight"] * 0.5  # by=0.5 is a number (not the string "0.5", not 3)
    expected["007"] = TENSORS["b.weight"]  # '007' is a string name, not the integer 7
    assert_tensors(got, expected)


def test_override_with_wrong_type_is_a_plan_error(ws: Path) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "transforms": [{"scale_": {"target": "a.weight", "by": 2}}], "output": "o.safetensors"})
    proc = cli(["p.yaml", "transforms[0].scale_.by='0.5'"], cwd=ws)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "transforms[0]" in proc.stderr
    assert not (ws / "o.safetensors").exists()


def test_options_may_come_before_the_plan(ws: Path) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "output": "o.safetensors"})
    ok(cli(["--threads", "1", "p.yaml"], cwd=ws))
    assert (ws / "o.safetensors").exists()


def test_issue9_threads_beyond_four_per_core_are_clamped(ws: Path) -> None:
    """Issue 9 item 11a: `--threads 100000` started 100,000 threads."""
    proc = ok(cli(["in.safetensors", "-o", "out.safetensors", "--threads", "100000"], cwd=ws, timeout=60))
    m = re.search(r"notice: 100000 threads requested, more than 4 per core on (\d+) cores; using (\d+)", proc.stderr)
    assert m and int(m[2]) == 4 * int(m[1]), proc.stderr
    assert_tensors(load_file(ws / "out.safetensors"), TENSORS)


def test_threads_one(ws: Path) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "transforms": SIMPLE, "output": "o.safetensors"})
    ok(cli(["p.yaml", "--threads", "1"], cwd=ws))
    assert_tensors(load_file(str(ws / "o.safetensors")), simple_expected())


def test_summarize_prints_one_line_per_transform(ws: Path) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "transforms": SIMPLE, "output": "o.safetensors"})
    proc = ok(cli(["p.yaml", "--summarize"], cwd=ws))
    lines = proc.stdout.splitlines()
    for i, transform in enumerate(SIMPLE):
        (name,) = transform
        hits = [line for line in lines if re.match(rf"\s*\[{i}\]\s+{re.escape(name)}\b", line)]
        assert len(hits) == 1, (i, name, proc.stdout)
    assert len([line for line in lines if re.match(r"\s*\[\d+\]", line)]) == len(SIMPLE)
    quiet = ok(cli(["p.yaml", "--no-summarize", "output=o2.safetensors"], cwd=ws))
    assert not [line for line in quiet.stdout.splitlines() if re.match(r"\s*\[\d+\]", line)], quiet.stdout


def _expected_shards(sizes: list[int], budget: int) -> list[list[int]]:
    """SPEC §6.2 greedy packing: tensors in order; a shard closes when the next would overflow."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > budget:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


@pytest.mark.parametrize("output", ["sharded", {"path": "sharded"}])
def test_shard_size_option_produces_shards(ws: Path, output: Any) -> None:
    tensors = {f"t{i}": np.full(100, i, np.float32) for i in range(5)}  # 400 B each
    write_st(ws / "big.safetensors", tensors)
    dump_plan(ws / "p.yaml", {"inputs": ["big.safetensors"], "output": output})
    ok(cli(["p.yaml", "--shard-size", "1KiB"], cwd=ws))
    groups = _expected_shards([400] * 5, 1024)  # 1KiB = 1024 bytes → [[0,1],[2,3],[4]]
    n = len(groups)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    assert listing(ws / "sharded") == sorted(names + ["model.safetensors.index.json"])
    for k, group in enumerate(groups):
        got = load_file(str(ws / "sharded" / names[k]))
        assert sorted(got) == sorted(f"t{i}" for i in group)
        for i in group:
            np.testing.assert_array_equal(got[f"t{i}"], tensors[f"t{i}"])


def test_version(ws: Path) -> None:
    proc = ok(cli(["--version"], cwd=ws))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proc.stdout.strip() == f"brainsurgery {pyproject}"
    assert bs.__version__ == pyproject
    assert ok(pymod(["--version"], cwd=ws)).stdout.strip() == f"brainsurgery {pyproject}"


def test_python_dash_m(ws: Path) -> None:
    dump_plan(ws / "p.yaml", {"inputs": ["in.safetensors"], "transforms": SIMPLE, "output": "o.safetensors"})
    ok(pymod(["p.yaml"], cwd=ws))
    assert_tensors(load_file(str(ws / "o.safetensors")), simple_expected())
    proc = pymod(["p.yaml", "output=o.safetensors", "transforms[0].scale_.target=nope"], cwd=ws)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_usage_errors_exit_2(ws: Path) -> None:
    assert cli(["--no-such-option"], cwd=ws).returncode == 2
    assert cli(["check"], cwd=ws).returncode == 2  # a plan is required
    proc = cli(["does-not-exist.yaml"], cwd=ws)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "does-not-exist.yaml" in proc.stderr


def _bf16_tensor(path: Path, name: str) -> np.ndarray:
    """A BF16 tensor read by hand from the file bytes (the safetensors NumPy API has no bf16)."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        entry = header[name]
        begin, end = entry["data_offsets"]
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    assert entry["dtype"] == "BF16", entry
    return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(entry["shape"])


def test_readme_demo(tmp_path: Path) -> None:
    """The README's command, `brainsurgery examples/demo.yaml` from the repository's root, in a
    copy of its layout: the plan's paths are relative to examples/ (issue 14 item 3)."""
    examples = tmp_path / "examples"
    made = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_tiny_gpt2.py"), str(examples / "tiny-gpt2")],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    demo = (ROOT / "examples" / "demo.yaml").read_text()
    assert "gpt2::tiny-gpt2" in demo and "path: ../out/tiny-gpt2-bf16" in demo
    shutil.copy(ROOT / "examples" / "demo.yaml", examples / "demo.yaml")
    source = examples / "tiny-gpt2" / "model.safetensors"
    before = sha256(source)
    # `cd examples && brainsurgery demo.yaml` writes the same files (issue 14 item 3).
    ok(cli(["demo.yaml"], cwd=examples))
    from_examples = {p: sha256(tmp_path / "out" / "tiny-gpt2-bf16" / p) for p in listing(tmp_path / "out" / "tiny-gpt2-bf16")}
    shutil.rmtree(tmp_path / "out")
    proc = ok(cli(["examples/demo.yaml"], cwd=tmp_path))
    assert "wrote" in proc.stdout and "out/tiny-gpt2-bf16" in proc.stdout
    assert {p: sha256(tmp_path / "out" / "tiny-gpt2-bf16" / p) for p in listing(tmp_path / "out" / "tiny-gpt2-bf16")} == from_examples
    assert sha256(source) == before

    # Every assertion of the plan passed (exit 0). Check the result independently.
    original = load_file(str(source))
    out_dir = tmp_path / "out" / "tiny-gpt2-bf16"
    assert "config.json" in listing(out_dir)  # sidecar copied
    (out_file,) = [out_dir / p for p in listing(out_dir) if p.endswith(".safetensors")]
    header = header_dict(out_file)
    meta = header.pop("__metadata__")
    assert meta["format"] == "pt"
    expected_names = [re.sub(r"^h\.(\d+)\.", r"layers.\1.", k) for k in original]
    assert list(header) == expected_names  # input order kept, renamed in place; nothing added
    for old, new in zip(original, expected_names, strict=True):
        array = original[old]
        if array.dtype == np.int64:
            assert header[new]["dtype"] == "I64"
            continue
        assert header[new]["dtype"] == "BF16", (new, header[new])
        assert header[new]["shape"] == list(array.shape)
        want = array * np.float32(0.5) if re.fullmatch(r"layers\.\d+\.attn\.c_proj\.weight", new) else array
        got = _bf16_tensor(out_file, new)
        np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16), err_msg=new)


def test_demo_check_does_not_write(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_gpt2.py"), str(tmp_path / "g")], check=True, capture_output=True)
    plan = (ROOT / "examples" / "demo.yaml").read_text().replace("gpt2::tiny-gpt2", "gpt2::g").replace("../out/tiny-gpt2-bf16", "o")
    (tmp_path / "demo.yaml").write_text(plan)
    proc = ok(cli(["check", "demo.yaml"], cwd=tmp_path))
    assert "plan is valid" in proc.stdout
    assert not (tmp_path / "o").exists()
    shutil.rmtree(tmp_path / "g")


# The 0.2 tool's examples/validation.yaml, as its authors wrote it (comments shortened), on the
# tiny GPT-2 laid out where it expects it; the single-tensor round trip goes to the work folder
# instead of /tmp. It needs `set`, `diff` with `mode`, and a `load` of what an earlier `save`
# writes (issue 15 items 1, 2, 7).
VALIDATION_PLAN = """\
inputs:  # Define input checkpoints to load before transforms execute.
  - models/test/gpt2  # Use local GPT-2 test checkpoint as the primary model alias.
output: { path: models/test/validation, shard: 100MB }  # Save final model output.
transforms:  # Ordered transform pipeline; each item runs sequentially.
  - set: {}  # Print current runtime flags.
  - set: { dry-run: false, preview: false, verbose: false }  # Force deterministic runtime flags.
  - help: diff  # Smoke-test help lookup for the diff transform.
  - dump: { target: ["*all"], format: compact }  # Smoke-test compact dump formatting.

  - prefixes: { mode: list }  # Confirm prefix registry can be listed.
  - prefixes: { mode: add, alias: scratch }  # Add a scratch alias.
  - zeroes: { target: scratch::z, shape: [4] }  # Create a zero-initialized tensor in scratch alias.
  - ones: { target: scratch::o, shape: [4] }  # Create a one-initialized tensor in scratch alias.
  - rand: { target: scratch::r, shape: [4], distribution: uniform, low: 0.1, high: 0.2, seed: 7 }
  - assert: { shape: { of: scratch::z, is: [4] } }  # Verify zero tensor has expected shape.
  - assert: { shape: { of: scratch::o, is: [4] } }  # Verify ones tensor has expected shape.
  - assert: { shape: { of: scratch::r, is: [4] } }  # Verify random tensor has expected shape.
  - assert: { iszero: scratch::z }  # Verify zero tensor values are all zeros.
  - assert: { not: { iszero: scratch::o } }  # Verify ones tensor is not all zeros.
  - assert: { not: { iszero: scratch::r } }  # Verify random tensor is not all zeros.
  - prefixes: { mode: rename, from: scratch, to: scratch2 }  # Validate alias rename semantics.
  - assert: { exists: scratch2::z }  # Confirm tensor remains accessible under renamed alias.
  - prefixes: { mode: remove, alias: scratch2 }  # Validate alias removal semantics.
  - prefixes: { mode: add, alias: scratch2 }  # Recreate alias so subsequent tests can use it.
  - zeroes: { target: scratch2::z2, shape: [1] }  # Recreate a simple tensor in recreated alias.
  - assert: { iszero: scratch2::z2 }  # Confirm recreated alias writes are valid.

  - copy: { from: "ln_f.weight::[:8]", to: demo.x }  # Seed demo.x with a stable source slice.
  - copy: { from: "ln_f.weight::[:8]", to: demo.y }  # Seed demo.y from same source.
  - scale_: { target: demo.y, by: 2.0 }  # Convert demo.y into 2*x.
  - copy: { from: demo.x, to: demo.sum }  # Pre-create add destination.
  - copy: { from: demo.x, to: demo.diff }  # Pre-create subtract destination.
  - copy: { from: demo.x, to: demo.prod }  # Pre-create multiply destination.
  - add: { from_a: demo.x, from_b: demo.x, to: demo.sum }  # Compute sum = x + x.
  - assert: { equal: { left: demo.sum, right: demo.y } }  # Verify sum matches expected doubled tensor.
  - subtract: { from_a: demo.sum, from_b: demo.x, to: demo.diff }  # Compute diff = sum - x.
  - assert: { equal: { left: demo.diff, right: demo.x } }  # Verify subtraction restores original x.
  - multiply: { from_a: demo.x, from_b: demo.x, to: demo.prod }  # Compute elementwise product.
  - add_: { from: demo.x, to: demo.diff }  # In-place add x into diff.
  - assert: { equal: { left: demo.diff, right: demo.y } }  # Verify in-place add produced doubled tensor.
  - subtract_: { from: demo.x, to: demo.diff }  # In-place subtract x from diff.
  - assert: { equal: { left: demo.diff, right: demo.x } }  # Verify in-place subtract returns to x.
  - scale: { from: demo.x, to: demo.scaled, by: 2.0 }  # Create scaled copy using out-of-place scale.
  - assert: { equal: { left: demo.scaled, right: demo.y } }  # Verify out-of-place scale output.
  - scale_: { target: demo.scaled, by: 0.5 }  # In-place rescale by reciprocal factor.
  - assert: { equal: { left: demo.scaled, right: demo.x } }  # Verify in-place scale roundtrip.

  - fill: { from: demo.x, to: demo.fill_const, mode: constant, value: 1.0 }  # Constant fill.
  - assert: { not: { iszero: demo.fill_const } }  # Verify constant fill is not all zeros.
  - fill: { from: demo.x, to: demo.fill_rand, mode: rand, distribution: normal, mean: 0.0, std: 0.1, seed: 11 }
  - assert: { shape: { of: demo.fill_rand, is: [8] } }  # Verify random fill preserves source shape.
  - fill_: { target: demo.fill_const, mode: tensor, values: [0, 1, 2, 3, 4, 5, 6, 7] }  # Explicit content.
  - clamp: { from: demo.fill_const, to: demo.clamped, min: 2.0, max: 5.0 }  # Out-of-place clamp.
  - clamp_: { target: demo.clamped, min: 3.0, max: 4.0 }  # In-place tighten clamped range.
  - cast: { from: demo.clamped, to: demo.cast16, dtype: float16 }  # Out-of-place cast to float16.
  - assert: { dtype: { of: demo.cast16, is: float16 } }  # Verify cast dtype is float16.
  - cast_: { target: demo.cast16, to: float32 }  # In-place cast back to float32.
  - assert: { dtype: { of: demo.cast16, is: float32 } }  # Verify in-place cast dtype is float32.

  - split: { from: demo.fill_const, to: [demo.left, demo.right], sizes: [4, 4] }  # Split into two parts.
  - concat: { from: [demo.left, demo.right], to: demo.rebuilt, dim: 0 }  # Re-concatenate split outputs.
  - assert: { equal: { left: demo.rebuilt, right: demo.fill_const } }  # Verify split+concat roundtrip.
  - reshape: { from: demo.fill_const, to: demo.two_by_four, shape: [2, 4] }  # Out-of-place reshape.
  - reshape_: { target: demo.two_by_four, shape: [4, 2] }  # In-place reshape.
  - permute: { from: demo.two_by_four, to: demo.permuted, order: [1, 0] }  # Permute dimensions.
  - matmul: { from_a: demo.two_by_four, from_b: demo.permuted, to: demo.matmul }  # Matrix multiply.
  - assert: { shape: { of: demo.matmul, is: [4, 4] } }  # Verify matmul result shape.

  - copy: { from: "ln_f.weight::[:8]", to: demo.move_src }  # Create source tensor for move test.
  - move: { from: demo.move_src, to: demo.move_dst }  # Move tensor to new name.
  - assert: { exists: demo.move_dst }  # Verify destination exists after move.
  - assert: { not: { exists: demo.move_src } }  # Verify source removed after move.
  - copy: { from: demo.x, to: demo.assign_src }  # Create source tensor for assign test.
  - copy: { from: demo.y, to: demo.assign_dst }  # Create destination tensor for assign overwrite.
  - assign: { from: demo.assign_src, to: demo.assign_dst }  # Overwrite destination values from source.
  - assert: { equal: { left: demo.assign_src, right: demo.assign_dst } }  # Verify assign.

  - copy: { from: "h.0.attn.c_proj.weight::[:4,:4]", to: demo.matrix.weight }  # Seed 2D matrix for PHLoRA.
  - phlora_: { target: demo.matrix.weight, rank: 2 }  # In-place low-rank reconstruction on matrix.
  - copy: { from: demo.matrix.weight, to: demo.matrix.source.weight }  # Duplicate reconstructed matrix.
  - phlora: { target: demo.matrix.source.weight, target_a: demo.matrix.a.weight, target_b: demo.matrix.b.weight, rank: 2 }
  - assert: { shape: { of: demo.matrix.weight, is: [4, 4] } }  # Verify reconstructed matrix shape.
  - assert: { shape: { of: demo.matrix.a.weight, is: [2, 4] } }  # Verify A factor shape.
  - assert: { shape: { of: demo.matrix.b.weight, is: [4, 2] } }  # Verify B factor shape.
  - assert: { not: { iszero: demo.matrix.a.weight } }  # Verify A factor carries non-zero signal.
  - assert: { not: { iszero: demo.matrix.b.weight } }  # Verify B factor carries non-zero signal.

  - save: { path: brainsurgery_validation_x.safetensors, target: demo.x }  # Save single tensor.
  - load: { path: brainsurgery_validation_x.safetensors, to: demo.x_loaded, format: safetensors }  # Reload it.
  - assert: { equal: { left: demo.x_loaded, right: demo.x } }  # Verify save/load roundtrip identity.
  - load: { path: models/test/gpt2, alias: orig }  # Load pristine checkpoint under separate alias.
  - diff: { mode: aliases, left_alias: model, right_alias: orig }  # Diff full alias namespaces.
  - assert: { equal: { left: "orig::(.+)", right: "\\\\1" } }  # Every orig tensor equals the model's.

  - execute:  # Validate nested execution path using inline transform list.
      transforms:  # Nested transforms to execute atomically inside execute command.
        - copy: { from: "model::ln_f.weight::[:8]", to: model::demo.exec.base }  # Seed base tensor.
        - scale: { from: model::demo.exec.base, to: model::demo.exec.double, by: 2.0 }  # Doubled tensor.
        - copy: { from: model::demo.exec.base, to: model::demo.exec.sum }  # Pre-create add destination.
        - add: { from_a: model::demo.exec.base, from_b: model::demo.exec.base, to: model::demo.exec.sum }
        - assert: { equal: { left: model::demo.exec.double, right: model::demo.exec.sum } }  # Verify.

  - copy: { from: demo.x, to: demo.to_delete }  # Create tensor explicitly for delete validation.
  - delete: { target: demo.to_delete }  # Delete one known tensor.
  - assert: { not: { exists: demo.to_delete } }  # Verify deleted tensor is absent.
  - delete: { target: "demo\\\\..+" }  # Delete all remaining demo namespace artifacts.
  - delete: { target: "orig::(.+)" }  # Delete all tensors from orig alias.
  - delete: { target: "scratch2::(.+)" }  # Delete all tensors from scratch2 alias.

  - exit: {}  # End execution loop explicitly; keep as the final transform.
"""


def test_issue15_the_original_validation_plan_runs(tmp_path: Path, gpt2_tensors: dict[str, np.ndarray]) -> None:
    from conftest import save_safetensors

    save_safetensors(tmp_path / "models" / "test" / "gpt2" / "model.safetensors", gpt2_tensors, {"format": "pt"})
    (tmp_path / "validation.yaml").write_text(VALIDATION_PLAN)
    proc = cli(["validation.yaml", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("set flags: dry-run=false, preview=false, verbose=false\n")
    assert "diff model vs orig (eps 0): 29 pairs compared, 0 differ" in proc.stdout
    x = load_file(str(tmp_path / "brainsurgery_validation_x.safetensors"))
    np.testing.assert_array_equal(x["demo.x"], gpt2_tensors["ln_f.weight"][:8])
    out = load_file(str(tmp_path / "models" / "test" / "validation" / "model.safetensors"))
    assert set(out) == set(gpt2_tensors)
    for name, want in gpt2_tensors.items():
        np.testing.assert_array_equal(out[name], want)
