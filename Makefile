# Omni sessions. `make run` serves on 127.0.0.1:8000; `make test` runs the tests.
# Both create .venv and install requirements.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# A PostgreSQL server for the second test run (CI has one; elsewhere it is used when reachable).
TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/omni

.PHONY: install browser run test test-embedded test-postgres bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) manage.py migrate --noinput
	@if [ -z "$$ANTHROPIC_API_KEY" ] && [ -z "$$ANTHROPIC_BASE_URL" ]; then \
	  echo "******************************************************************"; \
	  echo "*  No ANTHROPIC_API_KEY: answering with the OFFLINE MODEL.        *"; \
	  echo "*  Replies are canned echoes. Export ANTHROPIC_API_KEY for Claude. *"; \
	  echo "******************************************************************"; \
	fi
	OMNI_AUTH=$${OMNI_AUTH:-off} \
	OMNI_OFFLINE_MODEL=$${OMNI_OFFLINE_MODEL:-$$( [ -z "$$ANTHROPIC_API_KEY$$ANTHROPIC_BASE_URL" ] && echo 1 || echo 0 )} \
	$(VENV)/bin/daphne -b $(HOST) -p $(PORT) omni.asgi:application

test: test-embedded test-postgres

# The page's browser tests drive Debian's Chromium (Playwright's own browser
# download cannot work here). Needs root (CI runs as root) when it is missing.
browser:
	@command -v chromium >/dev/null || (echo "installing chromium (apt-get)"; apt-get update && apt-get install -y chromium)

test-embedded: install browser
	$(PY) -m pytest

# The same suite on PostgreSQL, less what does not depend on the database engine
# (run once above). Under CI=true it must run (and fails without a server).
test-postgres: install browser
	@if [ "$$CI" = "true" ] || $(PY) -c "import psycopg,sys; psycopg.connect('$(TEST_POSTGRES_URL)'.rsplit('/',1)[0]+'/postgres', connect_timeout=2).close()" 2>/dev/null; then \
	  echo "== the suite again on PostgreSQL ($(TEST_POSTGRES_URL))"; \
	  DATABASE_URL=$(TEST_POSTGRES_URL) $(PY) -m pytest -m "not engine_agnostic"; \
	else \
	  echo "== PostgreSQL not reachable at $(TEST_POSTGRES_URL): skipped the PostgreSQL run (CI runs it)"; \
	fi

bench: install
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache
