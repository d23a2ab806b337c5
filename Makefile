# The README's two commands: `make demo` (the main job) and `make test` (every test).
# Each makes its own virtual environment in .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NODE_STAMP): package.json
	npm install --no-audit --no-fund --silent
	touch $(NODE_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest -q -n 2 tests hil

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) node_modules
