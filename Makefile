# Two entry points: `make demo` and `make test`. Both create .venv when missing.
# torch==2.13.0 is installed only when no torch is importable: the venv sees the
# system site-packages, so a user's own (e.g. CUDA) torch is kept.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

.PHONY: demo test lint clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	@touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[$*]"
	@touch $@

demo: $(VENV)/.installed-plot
	$(VENV)/bin/sentinel demo

test: $(VENV)/.installed-dev,plot,hf,lightning
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n auto  # one worker per core (pytest-xdist); tests use one torch thread

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) sentinel-report
