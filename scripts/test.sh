#!/usr/bin/env bash
# Install what the tests need (into .venv) and run them.
HABINIT_EXTRAS=test
source "$(dirname "$0")/env.sh"
exec .venv/bin/python -m pytest -q tests "$@"
