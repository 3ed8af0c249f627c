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

.PHONY: install run examples test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The FHIR R4 test server (Medplum's engine, sandbox/fhir_server): npm packages, Node 22 pinned from npm.
$(FHIR_STAMP): $(FHIR_SERVER)/package.json $(FHIR_SERVER)/package-lock.json
	cd $(FHIR_SERVER) && npm ci --no-audit --no-fund
	touch $(FHIR_STAMP)

## run: the CDS Hooks service on http://127.0.0.1:8000 with its embedded defaults (SQLite file
## imid-rems.sqlite, clinic zone = the machine's). JWT checks are switched OFF here, for local use only
## (logged loudly); production sets IMID_REMS_CDS_CLIENTS and never passes --insecure-no-auth.
HOST ?= 127.0.0.1
PORT ?= 8000
run: $(STAMP)
	@echo "imid-rems CDS Hooks service: http://$(HOST):$(PORT)/cds-services   (Ctrl-C stops it)"
	@echo "try: curl -s -X POST http://$(HOST):$(PORT)/cds-services/imid-rems-order-sign -H 'Content-Type: application/json' --data @tests/scenarios/frp-test-8-days-stale/request.json"
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

## bench: in-process evaluation latency, then order-sign over HTTP next to a bare FastAPI endpoint
## (timing never gates the tests)
bench: $(STAMP)
	$(BIN)/python -m tests.bench_evaluate
	$(BIN)/python -m tests.bench_http

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(FHIR_SERVER)/node_modules
