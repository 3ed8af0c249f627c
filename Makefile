# The two commands: `make run` and `make test`. Each creates what it needs (.venv) itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NOW ?= 2026-11-21T10:00:00-05:00
TZ_CLINIC ?= America/New_York
EXAMPLES := lenalidomide-adult-male-ongoing-clean frp-test-8-days-stale revlimid-kitchen-sink-many-problems

FHIR_SERVER := sandbox/fhir_server
FHIR_STAMP := $(FHIR_SERVER)/node_modules/.package-lock.json

.PHONY: install run serve examples test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The FHIR engine of the sandbox and the tests (Medplum's, sandbox/fhir_server): npm packages, Node 22 pinned from npm.
$(FHIR_STAMP): $(FHIR_SERVER)/package.json $(FHIR_SERVER)/package-lock.json
	cd $(FHIR_SERVER) && npm ci --no-audit --no-fund
	touch $(FHIR_STAMP)

## run: the whole local stack on a fresh machine: the FHIR engine with ~50 synthetic IMiD patients and the
## scenario corpus, the sandbox EHR (SMART authorization server, launcher, CDS hooks page) on
## http://$(HOST):$(SANDBOX_PORT)/ and the imid-rems service on http://$(HOST):$(PORT) (JWT checks on, trusting
## the sandbox; SQLite file imid-rems.sqlite). Prints the one URL to open; Ctrl-C stops everything.
HOST ?= 127.0.0.1
PORT ?= 8000
SANDBOX_PORT ?= 8080
PATIENTS ?= 50
run: $(STAMP) $(FHIR_STAMP)
	$(BIN)/imid-rems sandbox run --host $(HOST) --port $(SANDBOX_PORT) --service-port $(PORT) --patients $(PATIENTS)

## serve: the CDS Hooks service alone, JWT checks OFF (local development only; logged loudly)
serve: $(STAMP)
	$(BIN)/imid-rems serve --host $(HOST) --port $(PORT) --insecure-no-auth

## examples: evaluate the example requests offline and print the CDS Hooks answers
examples: $(STAMP)
	@for name in $(EXAMPLES); do \
	  dir=tests/scenarios/$$name; \
	  now=$$($(BIN)/python -c "import json,sys; print(json.load(open(sys.argv[1]))['now'])" $$dir/expected.json); \
	  tz=$$($(BIN)/python -c "import json,sys; print(json.load(open(sys.argv[1]))['timezone'])" $$dir/expected.json); \
	  echo "== $$name (now $$now, clinic zone $$tz)"; \
	  $(BIN)/imid-rems evaluate $$dir/request.json --now "$$now" --tz "$$tz" || exit $$?; \
	done

## test: lint, type-check, then every test (unit, contract, scenario corpus)
test: lint typecheck $(FHIR_STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## bench: in-process evaluation latency, order-sign over HTTP next to a bare FastAPI endpoint, seed generation,
## the refill scan over 1,000 and 10,000 seeded patients next to bare paging (timing never gates the tests)
bench: $(STAMP)
	$(BIN)/python -m tests.bench_evaluate
	$(BIN)/python -m tests.bench_http
	$(BIN)/python -m tests.bench_seed
	$(BIN)/python -m tests.bench_refill_scan

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(FHIR_SERVER)/node_modules
