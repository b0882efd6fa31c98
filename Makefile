PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo bench lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

demo: $(BIN)/.installed
	$(BIN)/hessinv train

bench: $(BIN)/.installed
	$(BIN)/python bench/solve.py

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info
