#!/bin/bash
# 8x152M MoE (paper size) on 2 nodes x 4 H100. Submit from the repository root:
#   sbatch scripts/slurm/8x152M.sh [--set section.key=value ...]
# Command-line options override the lines below (e.g. sbatch --nodes=4 --time=8:00:00 ...);
# the launcher, scripts/slurm/launcher.sh, documents the environment knobs and the requeue flow.
#SBATCH --job-name=moe-8x152M
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@180
#SBATCH --requeue

# sbatch runs a spooled copy of this file, so the launcher is found through the directory sbatch
# was called from (the repository root), not through $0.
export CONFIG=configs/8x152M.yaml
exec bash "${MOE_REPO:-$SLURM_SUBMIT_DIR}/scripts/slurm/launcher.sh" "$@"
