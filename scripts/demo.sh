#!/usr/bin/env bash
# The main job on the embedded dataset: simulate the bundled protein, then run the Scipion
# protocol "homogeneous ab-initio refinement" in a headless Scipion project (CPU, no display).
# Options are passed on: bash scripts/demo.sh --help
HABINIT_EXTRAS=scipion
source "$(dirname "$0")/env.sh"
exec .venv/bin/python scripts/scipion_demo.py "$@"
