# Two commands set up everything on a fresh machine:
#   make demo   create .venv, install pinned versions, run the default training (python dpo.py)
#   make test   the same set-up, then the test suite
# pyproject.toml declares version ranges (bring your own CUDA torch); this file pins what it installs.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,lora,tensorboard,wandb,bench,quantization,vision
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

# Wheels the lent GPU machine lacks (it reaches no package registry) for `benchmarks/device_check.py`'s TRL
# comparison, fetched here into .whl/ (ignored by git, at most 64 MiB): carry it with the tree, `carry: [".whl"]`.
WHEELS ?= .whl
DEVICE_WHEELS = trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2
.PHONY: device-wheels
device-wheels:
	grep -qxF '/$(WHEELS)/' .git/info/exclude || echo '/$(WHEELS)/' >> .git/info/exclude
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
	  --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d $(WHEELS) $(DEVICE_WHEELS)
	@size=$$(du -sm $(WHEELS) | cut -f1); echo "$(WHEELS): $$size MiB"; \
	  test $$size -le 64 || { echo "$(WHEELS) is over the 64 MiB that travels with the tree"; exit 1; }
