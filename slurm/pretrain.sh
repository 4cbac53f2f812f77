#!/usr/bin/env bash
# Pretrain a megamem model on a SLURM cluster. Submit from the megamem checkout:
#
#   sbatch slurm/pretrain.sh configs/tiny_cpu.yaml [--deepspeed ds_configs/zero3.json] [--section.key VALUE ...]
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=8 slurm/pretrain.sh CONFIG ...  # 32 GPUs
#
# sbatch options on the command line override the defaults below (1 task, 2 CPUs: a job that fits any
# node). One task = one rank (one GPU, or one core on a CPU-only cluster). Environment hook, preemption and launchers: docs/slurm.md.
#SBATCH --job-name=megamem-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=megamem-%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool folder: find the checkout from the submit directory
MEGAMEM_ROOT=${MEGAMEM_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
if [ ! -f "$MEGAMEM_ROOT/slurm/common.sh" ]; then
  echo "error: $MEGAMEM_ROOT is not a megamem checkout: submit from the checkout or set MEGAMEM_ROOT" >&2
  exit 2
fi
source "$MEGAMEM_ROOT/slurm/common.sh"
megamem_run "$@"
