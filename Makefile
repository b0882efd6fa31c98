PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The exact torch of CI and of the recorded figures (pyproject.toml accepts a range: a user's
# `pip install .` keeps the torch they have).
TORCH := torch==2.13.0

.PHONY: test demo bench bench-record dist-check lint clean

# pip prints what it downloads and installs (the first run fetches torch from pip's configured index: the
# CPU wheel, ~200 MB, where that index serves it; stock PyPI on Linux serves the CUDA build, several GB:
# PIP_INDEX_URL=https://download.pytorch.org/whl/cpu make test)
$(BIN)/.installed: pyproject.toml
	@echo "==> $(VENV): creating the virtual environment and installing hessinv[dev] with $(TORCH)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install --progress-bar on $(TORCH)
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@echo "==> $(VENV) ready"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

demo: $(BIN)/.installed
	$(BIN)/hessinv train

# the solve benchmark into runs/bench (the repository's recorded results stay as they are)
bench: $(BIN)/.installed
	$(BIN)/python bench/solve.py

# re-record bench/results/solve_<device>.json and regenerate docs/benchmarks.md
bench-record: $(BIN)/.installed
	$(BIN)/python bench/solve.py --update-repo

# build the sdist and the wheel, install each into a fresh venv, import hessinv (.ci/dist-check)
dist-check: $(BIN)/.installed
	.ci/dist-check $(BIN)/python

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info
