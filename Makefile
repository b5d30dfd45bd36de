# MedBridge: `make run` starts the whole stack, `make test` runs the whole test suite.
# Both set themselves up on a fresh machine (venv in .venv, torch 2.13.0 CPU first) and are idempotent.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(PY) $(VENV)
	@rm -f $(VENV)/.installed-*
	@touch $@

run: setup
	$(BIN)/medbridge run

# The fault suite on its own (its outages and recovery times are timed), then everything else on two pytest
# workers (most tests wait on sockets and timers, not the CPU; every test has its own ports, databases, folders).
# Exit status 5 = nothing selected (PYTEST_ARGS chose tests of the other half).
TEST_WORKERS ?= 2

test: setup
	bash scripts/test-services.sh
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m "not faults" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/e2e_latency.py

clean:
	rm -rf var .pytest_cache
