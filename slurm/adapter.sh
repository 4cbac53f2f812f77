#!/usr/bin/env bash
# Adapter (finetuning) runs of megamem on a SLURM cluster: the same scripts/train.py, the same
# preemption and requeue handling as slurm/pretrain.sh, defaults 1 task × 2 CPUs, 8 h (add --ntasks-per-node,
# --gpus-per-node for more ranks).
#
#   sbatch slurm/adapter.sh CONFIG [--deepspeed ds_configs/zero2.json] [--section.key VALUE ...]
#
# The config (base model, adapter settings) is passed through unchanged. See docs/slurm.md.
#SBATCH --job-name=megamem-adapter
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=megamem-%x-%j.out
set -euo pipefail
MEGAMEM_ROOT=${MEGAMEM_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
if [ ! -f "$MEGAMEM_ROOT/slurm/common.sh" ]; then
  echo "error: $MEGAMEM_ROOT is not a megamem checkout: submit from the checkout or set MEGAMEM_ROOT" >&2
  exit 2
fi
source "$MEGAMEM_ROOT/slurm/common.sh"
megamem_run "$@"
