# Two commands on a fresh machine (each installs what it needs into .venv):
#   make demo   - end-to-end sync on an embedded PostgreSQL (no Docker)
#   make test   - lint, type-check and the test suite (starts its own PostgreSQL)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

# The editable install leaves airflow_sync_provider.egg-info in the checkout (its metadata lives in
# site-packages).  With the checkout on sys.path (tests, demo) Airflow then finds the provider's
# entry points twice, and the Task SDK's plugin loader stops at the duplicate "sync_status" plugin,
# dropping every plugin after it: the OpenLineage listener, so tasks sent no lineage events.
DROP_EGG_INFO = rm -rf airflow_sync_provider.egg-info

.PHONY: install demo ui test lint pytest clean bench latency

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) --quiet -e ".[test]"
	$(DROP_EGG_INFO)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m sync_dev.demo $(DEMO_ARGS)

# The reference DAGs in the Airflow UI (airflow standalone) against embedded case-study databases.
#   make ui                  - UI on http://localhost:8080
#   make ui UI_PORT=8081     - on another port (or SYNC_UI_PORT=8081 in the environment)
ui: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m sync_dev.standalone $(if $(UI_PORT),--ui-port $(UI_PORT))

lint: install
	$(VENV)/bin/ruff check airflow_sync_provider sync_dev dags tests benchmarks
	$(VENV)/bin/ruff format --check airflow_sync_provider sync_dev dags tests benchmarks
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

# Benchmarks side by side with the peers (raw COPY limit, Airflow hooks, pandas, dlt): see benchmarks/README.md.
#   make bench                        - full run (1M rows, 10M-row memory run; ~12-15 min)
#   make bench BENCH_ARGS="--quick"   - small scale (~3 min)
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/uv pip install --python $(PY) --quiet -e ".[test,bench]"
	$(DROP_EGG_INFO)
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Latency of the three inventory DAGs under airflow standalone (see README "Latency"; ~18 min; a quiet
# machine: the figures are the scheduler's and the CPUs' as much as ours).
#   make latency LATENCY_ARGS="--quick --no-variants"   - the real-time DAG only, 10 s per rate
latency: $(VENV)/.bench-installed
	$(PY) -m benchmarks.latency $(LATENCY_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
