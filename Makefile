# Two commands do everything on a fresh machine (Python 3.10+, pip, gcc):
#   make demo   set up .venv, then run the embedded default end to end
#   make test   set up .venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; GPU users set TORCH_SPEC to the build they want (e.g. "torch==2.13.0" from the CUDA index).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sora demo

# The report test renders report.html in headless Chromium (Debian's `chromium`): installed here when apt can,
# else that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1; } || \
		echo "make: chromium not installed (needs root and apt); the report.html rendering test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check sora_model pipelines tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
