# Two commands set up everything on a fresh machine:
#   make demo   create .venv, install pinned versions, run the default training (python dpo.py)
#   make test   the same set-up, then the test suite
# pyproject.toml declares version ranges (bring your own CUDA torch); this file pins what it installs.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,lora,tensorboard,wandb,bench
STAMP   = $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: demo test typecheck setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PIP) install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: setup
	$(PY) dpo.py

test: setup
	$(PY) -m pytest

typecheck: setup  # mypy --strict on the public API modules (list in pyproject.toml)
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/memory.py --jobs 1
	$(PY) benchmarks/data_prep.py

clean:
	rm -rf $(VENV) runs .pytest_cache
