# dpfp-jax developer tasks. `make demo` and `make test` each create .venv when missing.
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: demo paper-figures test test-newest-jax test-all lint check-figures docs bench triton-report gpu-memory tpu-compiler tpu-memory clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 && $(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || { \
	  echo "error: dpfp-jax needs Python 3.12 as '$(PYTHON)' (jax 0.11.2 requires it); found: $$(command -v $(PYTHON) >/dev/null 2>&1 && $(PYTHON) --version 2>&1 || echo 'no such command')." >&2; \
	  echo "       install Python 3.12 (e.g. 'pyenv install 3.12') or run 'make PYTHON=/path/to/python3.12 ...'." >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,examples]'
	touch $(STAMP)

# A second environment with the newest jax, jaxlib and flax that pyproject.toml admits (no
# constraints.txt pin), for the tests marked jax_sensitive (a selection of the op, module,
# multi-device and sharded-step tests), since sharding, custom_vjp and Flax behaviour
# changes between jax releases, and .venv stays on the pinned one.
NEWEST_VENV := .venv-newest
NEWEST_PY := $(NEWEST_VENV)/bin/python
NEWEST_STAMP := $(NEWEST_VENV)/.installed

$(NEWEST_PY): | $(PY)
	$(PYTHON) -m venv $(NEWEST_VENV)

$(NEWEST_STAMP): $(NEWEST_PY) pyproject.toml
	$(NEWEST_PY) -m pip install --quiet --upgrade pip
	$(NEWEST_PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test,examples]'
	touch $(NEWEST_STAMP)

# The libtpu that the newest jax's own `tpu` extra pins (read from that jax's metadata), out of the
# import path as for .venv: the jax_sensitive TPU compile tests run with it. A jax is sometimes
# released before the libtpu it pins reaches the package index: then the folder stays empty, the
# reason is printed, and those tests skip (saying why) until a later `make test` finds it.
NEWEST_TPU_COMPILER := $(NEWEST_VENV)/tpu-compiler
NEWEST_TPU_STAMP := $(NEWEST_VENV)/.installed-tpu-compiler

$(NEWEST_TPU_STAMP): $(NEWEST_STAMP)
	@requirement="$$($(NEWEST_PY) -m dpfp_devtools.tpu --libtpu-requirement)"; \
	if $(NEWEST_PY) -m pip install --quiet --no-deps --upgrade --target $(NEWEST_TPU_COMPILER) "$$requirement"; then \
	  touch $(NEWEST_TPU_STAMP); \
	else \
	  echo "NOT CHECKED: $$requirement, which the newest jax's tpu extra pins, cannot be installed from the package index; the TPU compile tests on the newest jax skip"; \
	fi

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

# XLA's GPU compiler without a GPU (about 730 MB, kept out of .venv's import path): the CUDA
# plugin and ptxas/libdevice, on PYTHONPATH only for the deviceless compiles of dpfp_devtools/deviceless.py.
# `make test` installs it too, for one kernel's compile.
CUDA_COMPILER := $(VENV)/cuda-compiler
CUDA_STAMP := $(VENV)/.installed-cuda-compiler

$(CUDA_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(CUDA_COMPILER) -c constraints.txt \
	  jax-cuda13-plugin jax-cuda13-pjrt nvidia-cuda-nvcc nvidia-nvvm
	touch $(CUDA_STAMP)

# libtpu, the TPU compiler (about 690 MB; constraints.txt pins the version jax's own `tpu` extra
# pins), kept out of .venv's import path: importable, it makes jax try to start a TPU runtime
# whenever a backend initialises with JAX_PLATFORMS unset. dpfp_devtools/tpu.py loads it from the
# folder DPFP_TPU_COMPILER names, for compiles on abstract TPU devices (no TPU needed).
TPU_COMPILER := $(VENV)/tpu-compiler
TPU_STAMP := $(VENV)/.installed-tpu-compiler

$(TPU_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(TPU_COMPILER) -c constraints.txt libtpu
	touch $(TPU_STAMP)

tpu-compiler: $(TPU_STAMP)

# The documentation site (docs/, Sphinx + MyST): `make docs` writes docs/_build/html. Warnings are
# errors (-W, all reported: --keep-going), cross-references are checked (-n), and every page is
# re-read (-E), since Sphinx re-reports an unchanged page's warnings only when it reads it again.
DOCS_STAMP := $(VENV)/.installed-docs
DOCS_HTML := docs/_build/html

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	JAX_PLATFORMS=cpu $(PY) -m sphinx -b html -W --keep-going -n -E -q docs $(DOCS_HTML)

# The browser test of the built site (tests/test_docs_site.py): Debian's chromium and its driver,
# installed with apt-get (as root, or through sudo) when missing, and selenium into .venv.
BROWSER_STAMP := $(VENV)/.installed-browser

$(BROWSER_STAMP): $(STAMP)
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing chromium and chromium-driver with apt-get for the browser test (needs root)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y chromium chromium-driver; \
	fi
	$(PY) -m pip install --quiet -c constraints.txt -e '.[browser]'
	touch $(BROWSER_STAMP)

demo: $(STAMP)
	$(PY) examples/associative_retrieval.py --quick --out out/retrieval

# The paper's synthetic figures (docs/paper_figures.md). Plain: redraw the figures and the capacity
# table from the committed CSV (seconds). RESUME=1: first run the grid's points missing from it
# (hours; a rerun skips the finished ones); FRESH=1: rerun every point. JOBS=N points at a time.
JOBS ?= 1
PAPER_FIGURES_RUN := $(if $(FRESH),--run --fresh,$(if $(RESUME),--run))
paper-figures: $(STAMP)
	$(PY) examples/paper_figures.py $(PAPER_FIGURES_RUN) --jobs $(JOBS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every measured figure in README.md, docs/*.md and examples/README.md is tied to a generated
# report under docs/reports/ (dpfp_devtools/figures.py says how); tests/test_figures.py runs the
# same check in `make test`.
check-figures: $(STAMP)
	$(PY) -m dpfp_devtools.figures

# XLA:CPU emits unoptimised machine code for the tests (LLVM at -O0; XLA's own graph passes still
# run): their programs are small, so compiling dominates, and this makes `make test` about a third
# faster. Results agree with optimised code up to rounding, which every tolerance allows; the TPU
# compiles (libtpu's) gave the same memory figures either way where checked (scan, the TPU kernel).
# `make test-all` compiles as users do.
FAST_COMPILE := XLA_FLAGS="$(XLA_FLAGS) --xla_backend_optimization_level=0"

# DPFP_TPU_COMPILER: the TPU compile tests (tests/test_tpu_compile.py) run, and fail without libtpu
# instead of skipping. DPFP_CUDA_COMPILER: the one fast deviceless H200 compile in
# tests/test_deviceless.py runs (the fused chunk kernel at K = 128, checked against its report
# rows; about 12 s of compiling, after an install of 17 to 64 s).
test: lint docs test-newest-jax $(TPU_STAMP) $(CUDA_STAMP)
	$(FAST_COMPILE) DPFP_TPU_COMPILER=$(TPU_COMPILER) DPFP_CUDA_COMPILER=$(CUDA_COMPILER) $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

test-newest-jax: $(NEWEST_STAMP) $(NEWEST_TPU_STAMP)
	$(NEWEST_PY) -c 'import flax, jax, jaxlib; print(f"newest admitted: jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}")'
	$(FAST_COMPILE) env $$([ -f $(NEWEST_TPU_STAMP) ] && echo DPFP_TPU_COMPILER=$(NEWEST_TPU_COMPILER)) $(NEWEST_PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m 'jax_sensitive and not slow' tests

# DPFP_DOCS_SITE: the browser test opens the site `docs` built, and fails without chromium.
test-all: lint docs $(CUDA_STAMP) $(TPU_STAMP) $(BROWSER_STAMP)
	DPFP_CUDA_COMPILER=$(CUDA_COMPILER) DPFP_TPU_COMPILER=$(TPU_COMPILER) DPFP_DOCS_SITE=$(DOCS_HTML) $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m ''

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.ops
	$(PY) -m benchmarks.chunk
	$(PY) -m benchmarks.chunk --crossover

triton-report: $(CUDA_STAMP)
	PYTHONPATH=$(CUDA_COMPILER) $(PY) -m benchmarks.triton_report

gpu-memory: $(BENCH_STAMP) $(CUDA_STAMP)
	PYTHONPATH=$(CUDA_COMPILER) $(PY) -m benchmarks.gpu --deviceless

tpu-memory: $(TPU_STAMP)
	DPFP_TPU_COMPILER=$(TPU_COMPILER) $(PY) -m benchmarks.tpu --deviceless

clean:
	rm -rf $(VENV) $(NEWEST_VENV) .pytest_cache build *.egg-info docs/_build
