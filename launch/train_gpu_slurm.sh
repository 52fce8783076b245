#!/usr/bin/env bash
#SBATCH --job-name=t5x_adapt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Training on a GPU cluster with SLURM: one process per GPU (8 tasks on each
# of 2 nodes by default). srun starts the tasks; jax.distributed reads the
# coordinator, process count and index from SLURM's environment
# (SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, ...) and gives
# each process the GPU of its local task id, so do not bind GPUs per task.
#
# Usage (from the repository root, which is the job's working directory):
#   MODEL_DIR=/shared/runs/r1 PRESET=t5gemma_2b_2b TRAIN_STEPS=100000 \
#     FSDP_PARALLELISM=8 sbatch launch/train_gpu_slurm.sh [extra train flags]
#   sbatch --nodes=4 launch/train_gpu_slurm.sh   # override the #SBATCH lines
#
# Overridable variables (defaults in brackets):
#   REPO_DIR             repository [$SLURM_SUBMIT_DIR]
#   PYTHON               interpreter [$REPO_DIR/.venv/bin/python if present,
#                        else python3]
#   MODEL_DIR            required: a directory on a shared file system
#   RECIPE, PRESET, RUN_GIN, TASK, TRAIN_STEPS, DATA_PARALLELISM, FSDP_PARALLELISM,
#   TENSOR_PARALLELISM: as in launch/train_local.sh
set -euo pipefail

# sbatch runs a copy of this script, so locate the repository by the
# submission directory, not by the script's path.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR"
source launch/common.sh
MODEL_DIR=${MODEL_DIR:?set MODEL_DIR to a directory on a shared file system}

export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
train_command "$@"
srun --kill-on-bad-exit=1 "${TRAIN_CMD[@]}"
