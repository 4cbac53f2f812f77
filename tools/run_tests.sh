#!/usr/bin/env bash
# Set up the environment if needed (tools/setup_env.sh: .venv under constraints.txt), then run the
# test suite. Extra arguments go to pytest.
#   MEGAMEM_LATEST=1  run on the newest releases instead of the pins (.venv-latest/): the drift check
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
if [ "${MEGAMEM_LATEST:-0}" = 1 ]; then VENV=${VENV:-.venv-latest}; else VENV=${VENV:-.venv}; fi
exec "$VENV/bin/python" -m pytest tests "$@"
