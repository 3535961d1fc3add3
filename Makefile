# dsvl2 — every target does its own set-up on a fresh machine.
#   make demo    answer a question about an image with the shipped demo model
#   make test    the test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
IMAGE   ?= dsvl2/demo/examples/chart.png
QUESTION ?= What is the value of bar D?

.PHONY: setup demo test test-all browser bench clean demo-model

$(BIN)/dsvl2: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: the CPU wheel on disk (never let pip resolve a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/dsvl2

demo: setup
	$(BIN)/dsvl2 chat --image $(IMAGE) "$(QUESTION)"

browser:
	bash scripts/install-browser.sh || echo "chromium could not be installed: the web-page test will be skipped"

# The whole suite runs again as an AVX2-only CPU sees it (dsvl2's avx2 kernel build and torch's own
# AVX2 kernels: parity bounds, bit-identity claims and kernel tests all meet that CPU's rounding), and
# the kernel and fast-path tests once more on the generic build, whatever CPU this is (docs/performance.md).
PORTABLE_TESTS := tests/test_cpu_kernels.py tests/test_cpu_builds.py tests/test_fast_inference.py tests/test_plan.py

test: setup browser
	$(BIN)/python -m pytest -q
	DSVL2_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q
	DSVL2_CPU_ISA=generic $(BIN)/python -m pytest -q $(PORTABLE_TESTS)

test-all: setup browser
	$(BIN)/python -m pytest -q -m ''

bench: setup
	$(BIN)/python bench/decode.py

demo-model: setup
	$(BIN)/python -m dsvl2.demo.build --out dsvl2/demo/model

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
