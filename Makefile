# difflab: two commands on a fresh clone. Both create or reuse .venv.
#   make demo   the main job (train a small digits model, sample it, write a grid)
#   make test   the test suite (CPU, a few minutes)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch when none is present and CUDA is not wanted; set TORCH_SPEC to override
# (e.g. TORCH_SPEC="torch" for a CUDA build). pyproject keeps a range, not this pin.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-slow bench clean install

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/difflab demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow tests

bench: $(VENV)/.installed
	$(PY) benchmarks/train_digits.py

clean:
	rm -rf $(VENV) runs .pytest_cache
