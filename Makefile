# Two commands do everything on a fresh machine (Python 3.10+, pip, gcc):
#   make demo   set up .venv, then run the embedded default end to end
#   make test   set up .venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; GPU users set TORCH_SPEC to the build they want (e.g. "torch==2.13.0" from the CUDA index).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sora demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check sora_model pipelines tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
