# make test  : set up .venv (pinned requirements.txt), build the C++ extension, run the tests
# make bench : the same set-up, then the microbenchmarks (table, bench/results/latest.json)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.extension-built
SOURCES := CMakeLists.txt pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*.h csrc/*/*.h)

.PHONY: test bench build lint clean

test: $(BUILT)
	$(PY) -m pytest

bench: $(BUILT)
	$(PY) -m bench $(BENCH_ARGS)

build: $(BUILT)

lint: $(DEPS)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install -r requirements.txt
	touch $@

# --no-build-isolation: CMake must find the torch installed above, not a fresh download.
$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build $(BUILT)
