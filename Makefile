.DEFAULT_GOAL := all

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

.PHONY: build-dev
build-dev: ## Build and install the package (editable) with the dev dependencies
	python3 -m pip install -q -e '.[dev]'

.PHONY: format
format: ## Format the Rust code
	cargo fmt

.PHONY: lint
lint: ## cargo fmt --check and clippy with warnings as errors (scripts/lint.sh)
	bash scripts/lint.sh

.PHONY: test
test: ## The README's test command: install, cargo test, pytest
	bash scripts/test.sh

.PHONY: wheel
wheel: ## A stripped manylinux2014 abi3 wheel in dist/ (zig as the linker: pip install ziglang)
	maturin build --release --zig --compatibility manylinux2014 --strip --out dist

.PHONY: wheel-test
wheel-test: wheel ## Install the wheel into a fresh venv of each Python found and run the CLI
	BRAINSURGERY_WHEEL_TEST=1 python3 -m pytest -q tests/test_wheel.py

.PHONY: bench
bench: ## The ~1 GiB benchmark (several minutes; see benches/README.md)
	python3 benches/run.py

.PHONY: demo
demo: ## The README's demo
	python3 examples/make_tiny_gpt2.py && brainsurgery examples/demo.yaml --summarize

.PHONY: all
all: format lint test ## Format, lint and test
