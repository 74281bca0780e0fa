"""Issue 14 item 3: where paths resolve. A path written in a plan file resolves against that
file's folder; one given on the command line or in Python against the working directory; `~` is
the home directory everywhere; `hf://org/name[@revision]` opens from the Hugging Face cache (and
downloads through huggingface_hub when it is importable)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import brainsurgery as bs
from helpers import assert_one_error, write_st

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["brainsurgery", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        input=stdin,
        timeout=120,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(14)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}


def test_plan_file_paths_resolve_against_its_folder(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    """Inputs, output, save, load and execute paths in a plan file are relative to its folder,
    wherever it is run from; the nested plan's relative to its own folder."""
    proj = tmp_path / "proj"
    (proj / "sub").mkdir(parents=True)
    write_st(proj / "in.safetensors", weights)
    write_st(proj / "extra.safetensors", {"e": weights["b"] * 3})
    (proj / "sub" / "nested.yaml").write_text("transforms:\n  - save: {path: ../saved-nested.npz, target: b}\n")
    (proj / "plan.yaml").write_text(
        "inputs: [in.safetensors]\n"
        "transforms:\n"
        "  - scale_: {target: w, by: 2}\n"
        "  - load: {path: extra.safetensors, alias: extra}\n"
        "  - copy: {from: 'extra::e', to: 'model::e'}\n"
        "  - save: {path: saved.npz, target: w}\n"
        "  - execute: {path: sub/nested.yaml}\n"
        "output: out/model.safetensors\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, plan in [(elsewhere, "../proj/plan.yaml"), (proj, "plan.yaml"), (tmp_path, str(proj / "plan.yaml"))]:
        ok(run([plan, "--no-progress"], cwd=cwd))
        out = load_file(str(proj / "out" / "model.safetensors"))
        np.testing.assert_array_equal(out["w"], weights["w"] * np.float32(2))
        np.testing.assert_array_equal(out["e"], weights["b"] * 3)
        np.testing.assert_array_equal(np.load(proj / "saved.npz")["w"], weights["w"] * np.float32(2))
        np.testing.assert_array_equal(np.load(proj / "saved-nested.npz")["b"], weights["b"])
        assert not (cwd / "out").exists() or cwd == proj
        for name in ["out/model.safetensors", "saved.npz", "saved-nested.npz"]:
            (proj / name).unlink()


def test_command_line_paths_resolve_against_the_working_directory(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    """`-o`, `-e` and checkpoint arguments are the working directory's, even with a plan file
    in another folder."""
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "scale.yaml").write_text("transforms:\n  - scale_: {target: w, by: 3}\n")
    write_st(tmp_path / "m.safetensors", weights)
    ok(run(["plans/scale.yaml", "m.safetensors", "-e", "save: path: s.npz, target: b", "-o", "o.safetensors"], cwd=tmp_path))
    np.testing.assert_array_equal(load_file(str(tmp_path / "o.safetensors"))["w"], weights["w"] * np.float32(3))
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["b"], weights["b"])
    assert not (tmp_path / "plans" / "o.safetensors").exists()


def test_python_plans_resolve_against_the_working_directory(
    tmp_path: Path, weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    write_st(tmp_path / "data" / "m.safetensors", weights)
    monkeypatch.chdir(tmp_path / "data")
    bs.run({"inputs": ["m.safetensors"], "transforms": [{"scale_": {"target": "b", "by": 0.5}}], "output": "o.safetensors"}, quiet=True)
    np.testing.assert_array_equal(load_file(str(tmp_path / "data" / "o.safetensors"))["b"], weights["b"] * np.float32(0.5))
    # A plan file given to Python still resolves against its own folder.
    (tmp_path / "p.yaml").write_text("inputs: [data/m.safetensors]\noutput: data/p.safetensors\n")
    bs.run(tmp_path / "p.yaml", quiet=True)
    np.testing.assert_array_equal(load_file(str(tmp_path / "data" / "p.safetensors"))["w"], weights["w"])
    # Its document (what Plan.from_yaml reads) carries absolute paths, so it runs from anywhere.
    doc = bs._core.plan_document(str(tmp_path / "p.yaml"))
    assert doc["inputs"] == [str(tmp_path / "data" / "m.safetensors")]


def test_home_is_expanded(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    write_st(home / "m.safetensors", weights)
    (tmp_path / "plan.yaml").write_text("inputs: ['~/m.safetensors']\ntransforms:\n  - save: {path: ~/s.npz, target: w}\noutput: ~/o.safetensors\n")
    ok(run(["plan.yaml", "-e", "save: path: '~/t.npz', target: b"], cwd=tmp_path, env={"HOME": str(home)}))
    np.testing.assert_array_equal(load_file(str(home / "o.safetensors"))["w"], weights["w"])
    np.testing.assert_array_equal(np.load(home / "s.npz")["w"], weights["w"])
    np.testing.assert_array_equal(np.load(home / "t.npz")["b"], weights["b"])


def fake_cache(root: Path, weights: dict[str, np.ndarray]) -> Path:
    """A Hugging Face hub cache as huggingface_hub lays it out: blobs, snapshots holding links to
    them, refs naming the commit of `main` and of the tag `v1`."""
    repo = root / "models--org--tiny"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    for commit, scale in [(COMMIT, 1), (OTHER, 2)]:
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        blob = blobs / f"{commit[:8]}-weights"
        write_st(blob, {k: v * np.float32(scale) for k, v in weights.items()})
        (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
        (snapshot / "config.json").write_text("{}\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(OTHER)
    return root


def test_hf_ids_open_from_the_cache(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    cache = fake_cache(tmp_path / "cache", weights)
    env = {"HF_HUB_CACHE": str(cache)}
    (tmp_path / "plan.yaml").write_text("inputs: [a::hf://org/tiny, b::hf://org/tiny@v1]\noutput: {path: o.safetensors, alias: b}\n")
    ok(run(["plan.yaml", "-e", "assign: {from: 'a::w', to: 'b::w'}"], cwd=tmp_path, env=env))
    out = load_file(str(tmp_path / "o.safetensors"))
    np.testing.assert_array_equal(out["w"], weights["w"])
    np.testing.assert_array_equal(out["b"], weights["b"] * np.float32(2))
    # A commit hash, on the command line; HF_HOME/hub when HF_HUB_CACHE is unset.
    env = {"HF_HOME": str(tmp_path)}
    (tmp_path / "cache").rename(tmp_path / "hub")
    ok(run([f"hf://org/tiny@{OTHER}", "-o", "p.safetensors"], cwd=tmp_path, env=env))
    np.testing.assert_array_equal(load_file(str(tmp_path / "p.safetensors"))["w"], weights["w"] * np.float32(2))
    ok(run(["inspect", "hf://org/tiny"], cwd=tmp_path, env=env))


def no_hub(tmp_path: Path, body: str) -> dict[str, str]:
    """An environment whose `huggingface_hub` is the module `body` (shadowing any installed one)."""
    fake = tmp_path / "fakehub"
    (fake / "huggingface_hub").mkdir(parents=True, exist_ok=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(body)
    return {"PYTHONPATH": os.pathsep.join([str(fake), *sys.path])}


def test_hf_ids_not_cached_say_what_to_run(tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), **no_hub(tmp_path, "raise ImportError('absent')\n")}
    proc = run(["hf://org/missing@dev", "-o", "o.safetensors"], cwd=tmp_path, env=env)
    assert_one_error(proc, 2, "hf://org/missing@dev", "not in the Hugging Face cache", "huggingface_hub is not installed",
                     "huggingface-cli download org/missing --revision dev --include '*.safetensors' '*.json'")
    # Offline: the download's own error, and the command.
    env.update(no_hub(tmp_path, "def snapshot_download(**kw):\n    raise OSError('offline: no network')\n"))
    proc = run(["check", "hf://org/missing"], cwd=tmp_path, env=env)
    assert_one_error(proc, 2, "downloading it failed", "offline: no network", "huggingface-cli download org/missing")
    # Malformed ids are refused before anything is looked up.
    assert_one_error(run(["check", "hf://a/b/c"], cwd=tmp_path, env=env), 2, "expected hf://org/name[@revision]")


def test_hf_ids_download_weights_and_configs_only(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    """Not cached and huggingface_hub importable: snapshot_download with allow_patterns, then
    the snapshot it returns is opened (here a stand-in that fills the cache and logs its call)."""
    cache = tmp_path / "cache"
    stub = (
        "import json, os, shutil\n"
        "def snapshot_download(repo_id, revision, allow_patterns):\n"
        f"    log = {str(tmp_path / 'calls.jsonl')!r}\n"
        "    with open(log, 'a') as f:\n"
        "        f.write(json.dumps([repo_id, revision, allow_patterns]) + '\\n')\n"
        f"    src = {str(tmp_path / 'remote')!r}\n"
        f"    dst = os.path.join(os.environ['HF_HUB_CACHE'], 'models--org--tiny', 'snapshots', {COMMIT!r})\n"
        "    shutil.copytree(src, dst)\n"
        "    os.makedirs(os.path.join(dst, '..', '..', 'refs'), exist_ok=True)\n"
        "    open(os.path.join(dst, '..', '..', 'refs', revision), 'w').write(" + repr(COMMIT) + ")\n"
        "    return dst\n"
    )
    write_st(tmp_path / "remote" / "model.safetensors", weights)
    env = {"HF_HUB_CACHE": str(cache), **no_hub(tmp_path, stub)}
    ok(run(["hf://org/tiny", "-e", "scale_: target: w, by: 2", "-o", "o.safetensors"], cwd=tmp_path, env=env))
    np.testing.assert_array_equal(load_file(str(tmp_path / "o.safetensors"))["w"], weights["w"] * np.float32(2))
    # Cached now: the second run does not download.
    ok(run(["check", "hf://org/tiny"], cwd=tmp_path, env=env))
    calls = (tmp_path / "calls.jsonl").read_text().splitlines()
    assert len(calls) == 1
    import json

    repo, revision, patterns = json.loads(calls[0])
    assert (repo, revision) == ("org/tiny", "main")
    assert "*.safetensors" in patterns and "*.json" in patterns and "*" not in patterns


def test_hf_ids_in_python(tmp_path: Path, weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_cache(tmp_path / "cache", weights)))
    monkeypatch.chdir(tmp_path)
    bs.run({"inputs": ["hf://org/tiny@v1"], "output": "o.safetensors"}, quiet=True)
    np.testing.assert_array_equal(load_file(str(tmp_path / "o.safetensors"))["b"], weights["b"] * np.float32(2))


def test_downloads_choose_top_level_safetensors_over_bin() -> None:
    """A repo with both safetensors and .bin weights (and a folder of original checkpoints) is
    fetched once: the top-level safetensors, configs and tokenizer files."""
    from brainsurgery._hub import _choose

    files = [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "pytorch_model.bin", "original/consolidated.00.pth",
        "tokenizer.model", "training_args.bin", "README.md",
    ]
    assert _choose(files) == sorted([
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.model",
    ])
    assert _choose(["config.json", "pytorch_model.bin", "training_args.bin"]) == ["config.json", "pytorch_model.bin"]
