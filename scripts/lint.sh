#!/usr/bin/env bash
# The lint: formatting, and clippy with warnings as errors on every target, the Python bindings
# included (`--features python`: pyo3's build needs a Python >= 3.11 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets --features python -- -D warnings
