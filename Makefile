# Set-up and the two main commands. Everything is installed into a local
# virtualenv by these targets; nothing needs to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: demo test bench info sanitize clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,cpu,milvus,serve]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m aladin_fast demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-only -p no:cacheprovider --benchmark-json=benchmarks/results/raw.json
	$(PY) benchmarks/report.py benchmarks/results/raw.json

info: $(VENV)/.installed
	$(PY) -m aladin_fast info

clean:
	rm -rf build *.egg-info aladin_fast/_C*.so $(VENV)
