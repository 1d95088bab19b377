# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The pinned torch takes the local CPU wheel on our machines; elsewhere override TORCH= to keep your own build.
TORCH ?= torch==2.13.0

.PHONY: demo test test-llamacpp setup bench bench-firm bench-scale bench-probes clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/critlayer scan smollm2-135m --out critlayer-demo --force

test: setup
	$(BIN)/python -m pytest -q

# llama.cpp's own engine (the llamacpp extra, built from source: 3-15 minutes on 2 cores) and the tests that run it.
# Built for AVX2, which every x86 CPU here runs: a native build's AMX kernels fault where the kernel grants no AMX
# state (they did on our AMX machines). `make test-llamacpp LLAMACPP_CMAKE=` builds for the local CPU instead.
LLAMACPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
test-llamacpp: setup
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(BIN)/pip install --quiet --no-cache-dir -e ".[test,llamacpp]"
	$(BIN)/python -m pytest -q -m llamacpp

# The benchmark's own environment: the peers it compares against never enter the project's.
BENCH_VENV := .bench-venv
PEERS := pytorch-cka==1.1.3 short-transformers==1.0.0

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet "$(TORCH)"
	$(BENCH_VENV)/bin/pip install --quiet -e . $(PEERS)
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/bench.py $(BENCH_ARGS)

# Minutes, not hours: the default scan's time to a firm answer against sampling alone and the fixed two-pass scan.
bench-firm: setup
	$(BIN)/python bench/firm.py $(FIRM_ARGS)

# Peak memory, time and planned forward tokens of scan, prune and quantize on random models of real families' shapes.
bench-scale: setup
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

# Whether a built-in's critical blocks hold over probes written by another model (what a streamed scan needs).
bench-probes: setup
	cd bench && ../$(BIN)/python borrowed_probes.py --out ../bench-results/borrowed-probes

clean:
	rm -rf $(VENV) $(BENCH_VENV) critlayer-demo bench-results
