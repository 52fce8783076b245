#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: the same command on every worker VM
# (gcloud compute tpus tpu-vm ssh --worker=all). Each worker runs one process;
# jax.distributed finds the pod's workers from the TPU metadata itself
# (--distributed=yes makes sure it is called). Run it from your workstation.
#
# Prerequisites: the repository at $REMOTE_DIR on every worker with its
# dependencies (e.g. `pip install -e . "jax[tpu]"`), and a MODEL_DIR that all
# workers can reach (a gs:// bucket).
#
# Usage:
#   TPU_NAME=my-v4-32 ZONE=us-central2-b MODEL_DIR=gs://my-bucket/runs/r1 \
#     PRESET=t5gemma_2b_2b TRAIN_STEPS=100000 FSDP_PARALLELISM=16 \
#     launch/train_tpu_pod.sh [extra python -m t5x_adapt.train flags...]
#
# Overridable variables (defaults in brackets):
#   TPU_NAME, ZONE       required
#   PROJECT              gcloud project [gcloud's default]
#   MODEL_DIR            required (gs://...)
#   REMOTE_DIR           repository on the workers [~/t5x_adapt]
#   PYTHON               interpreter on the workers [python3]
#   RECIPE, PRESET, RUN_GIN, TASK, TRAIN_STEPS, DATA_PARALLELISM, FSDP_PARALLELISM,
#   TENSOR_PARALLELISM: as in launch/train_local.sh
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}
ZONE=${ZONE:?set ZONE to the TPU zone}
PROJECT=${PROJECT:-}
MODEL_DIR=${MODEL_DIR:?set MODEL_DIR to a directory all workers reach (gs://)}
REMOTE_DIR=${REMOTE_DIR:-'~/t5x_adapt'}
PYTHON=${PYTHON:-python3}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

train_command --distributed=yes "$@"
# REMOTE_DIR stays unquoted so that ~ expands on the workers; every argument
# of the train command is quoted for the remote shell.
remote_command="cd $REMOTE_DIR && TF_CPP_MIN_LOG_LEVEL=3"
remote_command+=" $(printf '%q ' "${TRAIN_CMD[@]}")"

project=()
if [[ -n $PROJECT ]]; then project=(--project "$PROJECT"); fi
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" \
  ${project[@]+"${project[@]}"} \
  --worker=all --command "$remote_command"
