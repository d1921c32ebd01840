# make demo   trains the two-moons Bayesian flow, prints the zuko-vs-fastbnf step time, writes plots
# make test   runs the whole test suite (the benchmarks too, as plain tests)
# make bench  runs the benchmarks and writes benchmarks/results/<machine>-<date>.md and plots
# make lint   ruff check, ruff format --check and clang-format --dry-run -Werror (as CI does)
#
# Each target sets up what it needs in the current Python: an importable torch is kept (a CUDA
# torch on a GPU machine, say), otherwise torch==2.13.0 is installed; then fastbnf is installed
# in editable mode with its extension built.

PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check -q
STAMP = .make/setup.stamp
SOURCES = setup.py pyproject.toml fastbnf/_build.py fastbnf/_build_cuda.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

# Pinned: another version of a formatter formats differently.
LINTERS = ruff==0.17.6 clang-format==23.1.5
CSRC_FILES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 2>/dev/null)

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install ninja pybind11 numpy pytest pytest-benchmark matplotlib zuko==1.6.0 peft transformers accelerate lightning
	MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p .make && touch $(STAMP)

demo: setup
	$(PYTHON) -m examples.two_moons

test: setup
	$(PYTHON) -m pytest -q --benchmark-disable tests benchmarks

bench: setup
	$(PYTHON) -m pytest -q benchmarks --benchmark-only --benchmark-json=.make/bench.json
	$(PYTHON) -m benchmarks.report .make/bench.json

lint:
	$(PIP) install $(LINTERS)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	clang-format --style=file --dry-run -Werror $(CSRC_FILES)

clean:
	rm -rf .make build fastbnf/*.so *.egg-info
