#!/usr/bin/env bash
# Run the main job on the embedded dataset (the bundled protein, simulated).
HABINIT_EXTRAS=test
source "$(dirname "$0")/env.sh"
exec .venv/bin/habinit demo "$@"
