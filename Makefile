# make test  : set up .venv (pinned requirements.txt), build the C++ extension, run the tests
# make bench : the same set-up, then the microbenchmarks (table, bench/results/<date>_<commit>.json)
# make sanitize : the C++ extension built with ASan + UBSan into build/sanitize/, and the native
#                 tests run against it (tools/sanitize.sh; SANITIZE_ARGS replaces the pytest args)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.extension-built
SOURCES := CMakeLists.txt pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*.h csrc/*/*.h)

.PHONY: test bench build lint sanitize clean

test: $(BUILT)
	$(PY) -m pytest

bench: $(BUILT)
	$(PY) -m bench $(BENCH_ARGS)

build: $(BUILT)

lint: $(DEPS)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# A separate CMake tree (build/sanitize): the normal build and topn_kernels/_C.abi3.so are untouched.
sanitize: $(DEPS)
	VENV=$(VENV) tools/sanitize.sh $(SANITIZE_ARGS)

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
