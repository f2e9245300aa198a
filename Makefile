# Set-up and the two main commands. Everything is installed into a local
# virtualenv by these targets; nothing needs to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: demo test bench bench-compare info sanitize clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,cpu,milvus,serve,bench]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m aladin_fast demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Benchmarks: `make bench` times every suite (BENCH_ARGS="-k rerank" picks some) and writes
# benchmarks/results/<machine>.json + .png; `make bench-compare` times again into build/bench/
# and exits non-zero when an aladin_fast row is slower than BENCH_BASELINE by > BENCH_THRESHOLD
# (BENCH_METRIC=fraction_of_sgemm compares against the run's own sgemm on a busy machine).
BENCH_ARGS ?=
BENCH_BASELINE ?=
BENCH_THRESHOLD ?= 0.1
BENCH_METRIC ?= time
BENCH_PYTEST := -m pytest benchmarks -q --benchmark-enable --benchmark-only -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) $(BENCH_PYTEST) --benchmark-json=benchmarks/results/raw.json $(BENCH_ARGS)
	$(PY) benchmarks/report.py benchmarks/results/raw.json

bench-compare: $(VENV)/.installed
	mkdir -p build/bench
	$(PY) $(BENCH_PYTEST) --benchmark-json=build/bench/raw.json $(BENCH_ARGS)
	$(PY) benchmarks/report.py build/bench/raw.json --out build/bench --name new
	$(PY) benchmarks/report.py --compare $(or $(BENCH_BASELINE),benchmarks/results/$$($(PY) benchmarks/machine.py).json) \
		build/bench/new.json --threshold $(BENCH_THRESHOLD) --metric $(BENCH_METRIC)

info: $(VENV)/.installed
	$(PY) -m aladin_fast info

# Opt-in ASan + UBSan run of the CPU-kernel tests (record: docs/reliability.md). The instrumented
# extension is built into build/sanitize/ (the .venv's aladin_fast/_C*.so is left alone) and
# imported from a package view there (symlinks to the sources + the instrumented _C) through
# PYTHONPATH; python is not instrumented, so the ASan runtime is preloaded.
# `make sanitize SANITIZE_DEPS=` uses an existing .venv without re-running its set-up.
SANITIZE_DIR := build/sanitize
SANITIZE_DEPS ?= $(VENV)/.installed
SANITIZE_TESTS ?= tests/test_cpu_kernel_raw.py tests/test_alignment.py tests/test_autograd.py \
	tests/test_nonfinite.py tests/test_large_inputs.py tests/test_validation.py tests/test_determinism.py \
	tests/test_fuzz.py
SANITIZE_K ?= not peak_memory and not triton and not compile
SANITIZE_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONPATH=$(CURDIR)/$(SANITIZE_DIR)/pkg

$(SANITIZE_DIR)/.built: setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc)
	ALADIN_FAST_SANITIZE=1 $(PY) setup.py -q build_ext --force --build-lib $(SANITIZE_DIR)/lib --build-temp $(SANITIZE_DIR)/temp
	touch $@

sanitize: $(SANITIZE_DEPS) $(SANITIZE_DIR)/.built
	rm -rf $(SANITIZE_DIR)/pkg && mkdir -p $(SANITIZE_DIR)/pkg/aladin_fast
	for f in aladin_fast/*; do case $$f in *.so) ;; *) ln -s $(CURDIR)/$$f $(SANITIZE_DIR)/pkg/aladin_fast/ ;; esac; done
	ln -s $(CURDIR)/kernels $(SANITIZE_DIR)/pkg/aladin_fast/kernels
	cp $(SANITIZE_DIR)/lib/aladin_fast/_C*.so $(SANITIZE_DIR)/pkg/aladin_fast/
	cd $(SANITIZE_DIR) && $(SANITIZE_ENV) $(abspath $(PY)) -c "import aladin_fast._C as c; \
		assert '/$(SANITIZE_DIR)/pkg/' in c.__file__, c.__file__; print('instrumented extension:', c.__file__)"
	$(SANITIZE_ENV) $(VENV)/bin/pytest -q -p no:cacheprovider --capture=sys $(SANITIZE_TESTS) -k "$(SANITIZE_K)"

clean:
	rm -rf build *.egg-info aladin_fast/_C*.so $(VENV)
