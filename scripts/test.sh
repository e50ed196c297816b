#!/usr/bin/env bash
# Install what the tests need (into .venv) and run them.
# The 'scipion' extra brings Scipion (pyworkflow, pwem, scipion-em-relion; it pins NumPy 1.26), so the
# protocol tests run a headless Scipion project; without it they skip.
HABINIT_EXTRAS=test,scipion
source "$(dirname "$0")/env.sh"
exec .venv/bin/python -m pytest -q --durations=15 tests "$@"
