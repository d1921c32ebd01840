# make demo   trains the two-moons Bayesian flow, prints the zuko-vs-fastbnf step time, writes plots
# make test   runs the whole test suite (the benchmarks too, as plain tests)
# make bench  runs the benchmarks and writes benchmarks/results/<machine>.md and plots
#
# Each target sets up what it needs in the current Python: an importable torch is kept (a CUDA
# torch on a GPU machine, say), otherwise torch==2.13.0 is installed; then fastbnf is installed
# in editable mode with its extension built.

PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check -q
STAMP = .make/setup.stamp
SOURCES = setup.py pyproject.toml fastbnf/_build.py fastbnf/_build_cuda.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install ninja pybind11 numpy pytest pytest-benchmark matplotlib zuko==1.6.0
	MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p .make && touch $(STAMP)

demo: setup
	$(PYTHON) -m examples.two_moons

test: setup
	$(PYTHON) -m pytest -q --benchmark-disable tests benchmarks

bench: setup
	$(PYTHON) -m pytest -q benchmarks --benchmark-only --benchmark-json=.make/bench.json
	$(PYTHON) -m benchmarks.report .make/bench.json

clean:
	rm -rf .make build fastbnf/*.so *.egg-info
