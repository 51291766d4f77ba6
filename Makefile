# Two commands on a fresh machine: `make run` and `make test`. Everything else bootstraps from them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PORT ?= 8080

.PHONY: run test bench demo venv lock clean

venv: $(STAMP)

# The virtual environment is rebuilt whenever pyproject.toml or the pinned constraints change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

## Serve on 127.0.0.1:$(PORT) with local defaults: SQLite under var/, auth disabled (loud warning), CORS open.
run: $(STAMP)
	mkdir -p var
	CDS_AUTH=$${CDS_AUTH-disabled} \
	CDS_PUBLIC_BASE_URL=$${CDS_PUBLIC_BASE_URL-http://127.0.0.1:$(PORT)} \
	CDS_DATABASE_URL=$${CDS_DATABASE_URL-sqlite:///var/feedback.sqlite3} \
	CDS_CORS_ORIGINS=$${CDS_CORS_ORIGINS-*} \
	CDS_FHIR_ALLOWED_BASES=$${CDS_FHIR_ALLOWED_BASES-http://127.0.0.1:*,http://localhost:*} \
	CDS_FHIR_ALLOW_ANONYMOUS=$${CDS_FHIR_ALLOW_ANONYMOUS-true} \
	CDS_BIND=$${CDS_BIND-127.0.0.1:$(PORT)} \
	$(BIN)/gunicorn -c gunicorn.conf.py 'service.app:create_app()'

## Run the whole suite (starts its own PostgreSQL and gunicorn on loopback).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Benchmark (issue 5): in-process time vs json.loads, HTTP vs a do-nothing app, memory, no-prefetch path.
## Prints a table and writes bench/results.json (a few minutes). Uses wrk if installed (Debian: apt-get install
## wrk), else a Python load generator. Pass options with e.g. `make bench BENCH_ARGS="--only in-process"`.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## Fixture FHIR server + service (auth on, throwaway key) + the CLI client, with and without prefetch; stops all.
## Free ports by default; choose with e.g. `make demo DEMO_CDS_PORT=9000 DEMO_FHIR_PORT=9001 DEMO_PATIENT=fn-0001`.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## Re-pin every dependency from pyproject.toml into constraints.txt.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[test]'
	.lock-venv/bin/pip freeze --exclude-editable > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
