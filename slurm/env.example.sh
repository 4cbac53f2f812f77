# Example environment hook for slurm/pretrain.sh and slurm/adapter.sh: copy to slurm/env.sh (not
# tracked by git) or point MEGAMEM_ENV_SETUP at your own file. The batch shell sources it before
# anything else, so what it exports reaches every rank.
module load cuda/12.4 nccl 2>/dev/null || true    # your site's module names
source "$MEGAMEM_ROOT/.venv/bin/activate"         # or: conda activate megamem
# export NCCL_IB_HCA=mlx5                         # fabric settings of your cluster
# export HF_HOME=/scratch/$USER/hf                 # caches on a shared file system
