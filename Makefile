# The two set-up commands of the README, and what they are made of.
#   make demo   install what is missing, start the demo mesh and stay attached (Ctrl-C stops it)
#   make test   install what is missing, run the whole test suite
# Heavy installs are shared per user in $(GREYMESH_HOME) (see deploy/install.sh).

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench

install:
	@deploy/install.sh

demo: install
	$(VENV)/bin/greymesh up --foreground

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	@for b in tests/benchmarks/bench_*.py; do echo "==> $$b"; $(PY) $$b || exit 1; done
