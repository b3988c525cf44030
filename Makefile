# The two commands a newcomer needs (see README):
#   make demo   - the real-model demo (all-MiniLM-L6-v2 shipped by a package, no network)
#   make test   - lint, type-check, the strict docs build and the whole test suite (asyncio, uvloop)
# Each sets up .venv from nothing the first time (and again when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned: an unpinned torch pulls gigabytes of CUDA wheels on a CPU machine.
TORCH  ?= torch==2.13.0

.PHONY: demo test lint typecheck docs docs-build bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m batchio demo $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check batchio tests bench examples
	$(PY) -m ruff format --check batchio tests bench examples

typecheck: $(VENV)/.installed
	$(PY) -m mypy

# Coverage bars (branch coverage), set from what the suite reaches: the whole package, and the
# core modules (batchio/_*.py), whose per-batch safety nets must be exercised, not assumed.
COV_ALL  ?= 95
COV_CORE ?= 97

test: lint typecheck docs-build
	$(PY) -m pytest --cov --cov-report= --cov-fail-under=$(COV_ALL) $(ARGS)
	$(PY) -m coverage report --include='batchio/_*.py' --fail-under=$(COV_CORE)

# The docs site (mkdocs.yml): `make docs` serves it at http://127.0.0.1:8000 and rebuilds on edits;
# `make test` builds it with --strict, so a broken link or anchor, an unknown cross-reference or a
# public object without a docstring fails. The Material banner about MkDocs 2 is noise in CI; never
# add --quiet: it drops the warnings before --strict counts them, and the build passes.
DOCS_SITE ?= site

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve $(ARGS)

docs-build: $(VENV)/.installed
	$(PY) -m ruff check docs/_tools
	$(PY) -m ruff format --check docs/_tools
	$(PY) -m mypy docs/_tools
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir $(DOCS_SITE)

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) -m bench.suite $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis $(DOCS_SITE)
