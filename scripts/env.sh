# Shared by demo.sh and test.sh: a project virtual environment in .venv with the
# package installed (editable) and the extras named in $HABINIT_EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${HABINIT_EXTRAS}]"
