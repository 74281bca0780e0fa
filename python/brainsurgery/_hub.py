"""Downloads for ``hf://org/name[@revision]`` inputs (issue 14 item 3).

The engine opens such an input from the local Hugging Face cache; when it is not there, it calls
:func:`download` (installed as its fetcher when ``brainsurgery._core`` is imported), which fetches
only the weight, config and tokenizer files with ``huggingface_hub`` if that is installed.
"""

import importlib


def download(repo: str, revision: str, patterns: list[str]) -> str | None:
    """The snapshot folder of ``repo`` at ``revision`` after downloading the files matching
    ``patterns`` into the cache ``huggingface_hub`` uses; ``None`` when it is not installed.
    Errors (offline, unknown repo, no access) propagate; the engine reports them with the command
    to run."""
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        return None
    folder: str = hub.snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns)
    return folder
