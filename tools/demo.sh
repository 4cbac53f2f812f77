#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: set up, prepare the KJV corpus, train
# its tokenizer, pretrain the tiny memory model and its vanilla control the same way (DeepSpeed
# ZeRO-3, 2 CPU ranks), compare validation perplexities, plot the loss curves, and sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
RANKS=${RANKS:-2}
OUT=${OUT:-outputs/demo}
$PY tools/prepare_corpus.py
[ -f data/tokenizers/kjv-4096/tokenizer.json ] \
  || $PY tools/train_tokenizer.py --input data/corpus/kjv/train.jsonl --out data/tokenizers/kjv-4096
for run in memory vanilla; do
  extra=()
  [ "$run" = vanilla ] && extra=(--memory.vanilla_mode true)
  rm -rf "$OUT/$run"
  echo "== pretraining the $run model ($RANKS ranks, ZeRO-3) =="
  .venv/bin/deepspeed --num_gpus "$RANKS" scripts/train.py --config configs/tiny_cpu.yaml \
    --deepspeed ds_configs/zero3.json --training.output_dir "$OUT/$run" "${extra[@]}" "$@" 2>&1 \
    | grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]"
done
echo "== validation =="
$PY tools/compare_runs.py "$OUT/memory" "$OUT/vanilla" --plot "$OUT/loss_curves.png"
echo "== the memory's contribution: validation loss with it on, off, and each bank replaced by its mean =="
$PY scripts/eval.py --model "$OUT/memory/final" --ablate-memory --max-batches 20 2>&1 \
  | grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]"
echo "== a sample from the memory model =="
$PY scripts/inference.py --model "$OUT/memory/final" --prompt "And God said" --max-new-tokens 48 2>&1 \
  | grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]"
