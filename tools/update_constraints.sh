#!/usr/bin/env bash
# Refresh constraints.txt: install the newest releases of megamem's dependencies into a fresh
# environment (.venv-latest), then pin exactly what was installed, direct and transitive.
# Run the suite on the new pins before committing them: bash tools/run_tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MEGAMEM_LATEST=1 VENV=.venv-latest bash tools/setup_env.sh
out="$(mktemp)"
{
  echo "# Exact versions of every Python package megamem's tested environment holds (direct and transitive)."
  echo "# tools/setup_env.sh installs under these pins; refresh with tools/update_constraints.sh."
  echo "# torch is pinned without its build label (+cpu / +cu128): the build comes from the machine's wheel index."
  echo "# Generated $(date -u +%F) with $(.venv-latest/bin/python --version)."
  .venv-latest/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > "$out"
mv "$out" constraints.txt
echo "[constraints] wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages); now run: bash tools/run_tests.sh"
