# The two set-up commands of the README, and what they are made of.
#   make demo   install what is missing, start the demo mesh and stay attached (Ctrl-C stops it)
#   make test   install what is missing, run the whole test suite
# Heavy installs are shared per user in $(GREYMESH_HOME) (see deploy/install.sh).

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-unit bench

install:
	@deploy/install.sh

demo: install
	$(VENV)/bin/greymesh up --foreground

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The unit tier only (no Kafka, OPA, Envoy, ClickHouse or mesh), for a quick check while
# working; tiers are given per test module in tests/conftest.py (TIERS). PyTorch runs on
# one thread here: on 2 busy cores its default threads spin, 3-4x the time of one.
OMP_NUM_THREADS ?= 1
test-unit: $(PY)
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) $(PY) -m pytest -q -m unit $(PYTEST_ARGS)

# The installer only when there is no environment yet (its checks take ~40 s).
$(PY):
	@deploy/install.sh

bench: install
	@for b in tests/benchmarks/bench_*.py; do echo "==> $$b"; $(PY) $$b || exit 1; done
