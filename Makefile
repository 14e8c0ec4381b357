# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: on this project's machines 2.13.0 is a local CPU build (a range pulls CUDA)
	$(PY) -m pip install -q 'torch==2.13.0'
	$(PY) -m pip install -q -e '.[all,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/dptrain privacy epsilon --sampling-rate 0.0042666667 --noise-multiplier 1.12 --steps 14040 --delta 1e-5
	$(VENV)/bin/dptrain privacy calibrate --epsilon 8 --delta 1e-5 --dataset-size 60000 --batch-size 256 --epochs 60
	@rm -rf runs/demo-actg175-eps8
	$(VENV)/bin/dptrain train recipes/actg175-mlp.yaml --set privacy.epsilon=8 --out runs/demo-actg175-eps8

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/accounting.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
