# The two commands a person needs on a fresh Debian 12 machine (as root):
#   make demo   install what is missing, then boot a guest, trace it and show the result
#   make test   install what is missing, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: demo test deps system-deps agent bench clean

demo: deps
	$(VENV)/bin/vmtrace demo

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

deps: system-deps $(STAMP)

system-deps:
	@bash scripts/install-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The guest agent as one self-contained file to copy into any guest.
agent: deps
	$(VENV)/bin/vmtrace agent --export dist/vmtrace-agent.pyz

bench: deps
	$(VENV)/bin/vmtrace bench overhead --quick

clean:
	rm -rf $(VENV) dist build src/*.egg-info .pytest_cache
