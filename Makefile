# znorm_kernels: the two commands a newcomer needs, each setting everything up on a fresh machine.
#   make test    create .venv, install the pinned dependencies and the package (editable), run the tests
#   make bench   the same set-up, then the main benchmark job on the best device present
# PYTHON=python3 (e.g. on the lent GPU machines, which reach no registry) uses that interpreter instead of
# .venv and installs only what it lacks.

PYTHON ?=
VENV := .venv
export CUDA_HOME ?= /usr/local/cuda

ifeq ($(strip $(PYTHON)),)
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
else
PY := $(PYTHON)
SETUP := setup-system
endif

SOURCES := setup.py pyproject.toml requirements.txt $(wildcard csrc/*)

.PHONY: test bench lint train gpu-check mutation clean setup-system

# The library's tests and the benchmark's own (its logic, and the GPU probe rehearsed on the CPU).
test: $(SETUP)
	$(PY) -m pytest tests bench

bench: $(SETUP)
	$(PY) -m bench $(ARGS)

# The prepared check for a lent GPU machine (no registry there): build, tests on CUDA, full benchmark, all
# under OUT, within about 6 minutes on an H100. SMOKE=1 runs it in a tiny CPU form (no GPU needed).
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=/path/to/results [SMOKE=1] [PYTHON=python3]"; exit 64; }
	PYTHON=$(or $(PYTHON),python3) bash bench/gpu_check.sh "$(OUT)" $(if $(SMOKE),--smoke)

# Mutation testing of the code the contract rests on ([tool.mutmut] in pyproject.toml; docs/testing.md):
# every mutant of those modules, each against the tests that reach it, then the survivors listed. Long (about
# 2 hours on 2 cores); resumable (mutants/ keeps what was done).
mutation: $(SETUP)
	$(PY) -m pip install --quiet "mutmut==3.8.1"
	TRITON_INTERPRET=0 OMP_NUM_THREADS=1 $(PY) -m mutmut run --max-children 2
	TRITON_INTERPRET=0 $(PY) -m mutmut results

lint: $(SETUP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

train: $(SETUP)
	$(PY) -m znorm_kernels.cifar $(ARGS)

# A fresh virtual environment with the pinned dependencies, then the package itself (editable, so that
# compiled extensions are built in place by setup.py). Re-runs when the build inputs change.
# This is CI's build: the CUDA kernel is compiled (a compile check where no GPU is present) for one arch,
# sm_90 (H100/H200), to keep it to a few minutes; ZNORM_CUDA_ARCHS overrides (setup.py's default: 8.0;9.0).
$(VENV)/.installed: $(SOURCES)
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -r requirements.txt
	ZNORM_CUDA_ARCHS="$${ZNORM_CUDA_ARCHS:-9.0}" $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# An existing interpreter: install only the missing dependencies (none when torch, triton and pytest are
# there), then build the package in place without touching the network.
setup-system:
	$(PY) -c "$$MISSING_DEPS" > .missing-deps
	if [ -s .missing-deps ]; then $(PY) -m pip install --quiet $$(cat .missing-deps) || echo "warning: could not install $$(cat .missing-deps); tests that need them skip"; fi
	rm -f .missing-deps
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e . || $(PY) setup.py build_ext --inplace

define MISSING_DEPS
import importlib.util
wanted = {"torch": "torch", "numpy": "numpy", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark",
          "ninja": "ninja", "tqdm": "tqdm", "matplotlib": "matplotlib", "torchvision": "torchvision",
          "hypothesis": "hypothesis", "lightning": "lightning", "transformers": "transformers",
          "accelerate": "accelerate"}
print(" ".join(pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None))
endef
export MISSING_DEPS

clean:
	rm -rf build *.egg-info znorm_kernels/*.so .pytest_cache .ruff_cache mutants
