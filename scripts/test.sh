#!/usr/bin/env bash
# The README's test command: install the package with its dev dependencies (this builds the Rust
# extension), then run the Rust tests and the Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[dev]'
cargo test --quiet
python3 -m pytest -q
