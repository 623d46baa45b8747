# The two commands: `make demo` and `make test`. Each bootstraps .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zerollm-installed
PYTEST_ARGS ?=

.PHONY: demo test bench lint clean-venv

$(STAMP): setup.cfg setup.py launch/bootstrap.sh
	VENV=$(VENV) bash launch/bootstrap.sh

test: $(STAMP)
	$(PY) -m pytest -q --durations=30 $(PYTEST_ARGS) tests

demo: $(STAMP)
	bash launch/demo.sh

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
