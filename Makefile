# Two commands on a fresh machine (python3 and make):
#   make run    set up (venv, install, migrate, demo lab, demo login) and run web + worker + lab workload
#   make test   the whole test suite: embedded default (SQLite), then production profile (PostgreSQL + Redis)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/dr_portal
REDIS_TEST_URL ?= redis://127.0.0.1:6379/7

.PHONY: run setup test lint test-embedded test-production services bench model screenshots clean nbd-client

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || { sh tests/apt.sh python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(STAMP)
	$(BIN)/python manage.py migrate --noinput
	@if [ -z "$$REDIS_URL" ]; then $(BIN)/python manage.py migrate --database channels --noinput; fi
	$(BIN)/python manage.py seed_lab

# make run PORT=8080 serves on another port (default 8000); runportal --port does the same without make.
PORT ?= 8000
run: setup
	$(BIN)/python manage.py runportal --port $(PORT)

test: lint test-embedded test-production

# Both profiles run on three pytest-xdist workers: most tests wait on real processes (a qcluster, Daphne,
# vcsim, a browser); with two workers the suite kept 1.1 of the two CPUs busy on average (950 s of CPU in
# 14 min), so a third worker fills the waits. Each worker has its own databases and, on the production
# profile, its own Redis database (REDIS_URL's number + the worker's: 7, 8 and 9 here).
# `make test PYTEST_PARALLEL=` runs them one at a time.
PYTEST_PARALLEL ?= -n 3 --durations=25

# Lint and format first: a style slip fails in seconds, not after twenty minutes of tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The cluster tests (tests/test_cluster.py) run the production profile whatever the run's profile, so they run
# once, in test-production; run alone on the embedded profile they use PostgreSQL and Redis at their defaults.
test-embedded: $(STAMP) nbd-client
	sh tests/apt.sh chromium
	env -u DATABASE_URL -u REDIS_URL $(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not cluster"

# The second profile runs only what touches the database, the channel layer or the broker: the engine's,
# the lab adapter's and the vSphere adapter's own tests use none of them and ran in the first profile.
NO_DB_TESTS := tests/test_transfer_nbd.py tests/test_transfer_nbd_props.py tests/test_transfer_engine.py tests/test_transfer_threads.py tests/test_transfer_props.py tests/test_transfer_delta_props.py tests/test_lab_hypervisor.py tests/test_vsphere_vcsim.py tests/test_windows_rules.py tests/test_platform_contract.py tests/test_code_shape.py tests/test_docs_truth.py
# The nbd failbacks keep their session rows in the database like every failback, but what they test is the
# transport (nbdkit servers, libnbd, resume into the same exports), which no profile changes; the workflow's
# own use of PostgreSQL and Redis is run by the direct-mode failbacks. They run once, in the first profile.
ONCE_TESTS := tests/test_failback_nbd.py tests/test_vsphere_nbd.py

test-production: $(STAMP) services nbd-client
	sh tests/apt.sh nginx openssl
	DATABASE_URL=$(PG_TEST_URL) REDIS_URL=$(REDIS_TEST_URL) $(BIN)/python -m pytest $(PYTEST_PARALLEL) $(addprefix --ignore=,$(NO_DB_TESTS) $(ONCE_TESTS))

services:
	sh tests/services.sh

# The nbd transport: Debian's nbdkit (the test servers), libnbd's Python binding (the engine's client), nbdcopy
# (libnbd-bin: bench/transfer_nbd.py times libnbd's own copier beside the engine) and
# openssl (the tests' certificates). The venv reaches the binding through two symlinks in its
# site-packages (nbd.py and its C extension), not through the system's whole site-packages.
nbd-client: $(STAMP)
	sh tests/apt.sh nbdkit python3-libnbd libnbd-bin openssl
	sh tests/nbd_venv.sh $(VENV)

# A longer, randomised search of the workflow's state machine than the one `make test` runs.
model: $(STAMP)
	MODEL_EXAMPLES=$${MODEL_EXAMPLES:-100} MODEL_STEPS=$${MODEL_STEPS:-40} MODEL_RANDOM=1 env -u DATABASE_URL -u REDIS_URL $(BIN)/python -m pytest -m model -s

bench: $(STAMP)
	$(BIN)/python bench/transfer.py

screenshots: $(STAMP)
	sh tests/apt.sh chromium
	$(BIN)/python tests/screenshots.py

clean:
	rm -rf $(VENV) var
