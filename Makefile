# make test: lint and the whole test suite; make bench: `hla bench` on its default. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
# installed before the project, so that pip keeps it rather than pulling a CUDA build; +cpu fails loudly where
# the CPU wheel is not available instead of downloading several GB (override: make test TORCH=torch==2.x)
TORCH ?= torch==2.13.0+cpu
# the integration tests need diffusers and transformers; without them they are skipped
EXTRAS ?= dev,diffusers,transformers
PYTEST_ARGS ?= -n 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install '$(TORCH)'
	$(BIN)/pip install -e '.[$(EXTRAS)]' '$(TORCH)'
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/hla bench

clean:
	rm -rf $(VENV) bench-out
