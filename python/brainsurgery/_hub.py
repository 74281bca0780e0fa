"""Downloads for ``hf://org/name[@revision]`` inputs (issue 14 item 3).

The engine opens such an input from the local Hugging Face cache; when it is not there, it calls
:func:`download` (installed as its fetcher when ``brainsurgery._core`` is imported), which fetches
only the weight, config and tokenizer files with ``huggingface_hub`` if that is installed.
"""

import fnmatch
import importlib

# Weight files by preference: a repo with safetensors is not downloaded a second time as .bin.
_WEIGHTS = (("*.safetensors", "model.safetensors.index.json"), ("*.bin", "pytorch_model.bin.index.json"))
# Never weights of the model: training state, other frameworks' copies.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin")
_SIDECARS = ("*.json", "*.model", "*.txt", "*.tiktoken")


def _choose(files: list[str]) -> list[str]:
    """The top-level files worth fetching (a folder such as ``original/`` holds other copies):
    the safetensors weights when there are any, else the ``.bin`` ones, plus configs and
    tokenizer files."""
    top = [f for f in files if "/" not in f]
    chosen: list[str] = []
    for patterns in _WEIGHTS:
        chosen = [f for f in top if any(fnmatch.fnmatch(f, p) for p in patterns) and f not in _NOT_WEIGHTS]
        if any(not f.endswith(".json") for f in chosen):
            break
    sidecars = [f for f in top if any(fnmatch.fnmatch(f, p) for p in _SIDECARS)]
    return sorted(set(chosen) | set(sidecars))


def download(repo: str, revision: str, patterns: list[str]) -> str | None:
    """The snapshot folder of ``repo`` at ``revision`` after downloading the files matching
    ``patterns`` into the cache ``huggingface_hub`` uses; ``None`` when it is not installed.
    Errors (offline, unknown repo, no access) propagate; the engine reports them with the command
    to run."""
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        return None
    # Exact top-level names when the repo's listing is available (`*` in patterns crosses `/`).
    list_files = getattr(hub, "list_repo_files", None)
    if list_files is not None:
        chosen = _choose(list(list_files(repo, revision=revision)))
        if chosen:
            patterns = chosen
    folder: str = hub.snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns)
    return folder
