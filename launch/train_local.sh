#!/usr/bin/env bash
# Single-process training on this machine (its CPU, or all its GPUs / TPU
# chips as one process).
#
# Usage:
#   launch/train_local.sh [extra python -m t5x_adapt.train flags...]
#   PRESET=t5gemma_tiny TRAIN_STEPS=300 MODEL_DIR=/tmp/run launch/train_local.sh
#   launch/train_local.sh --gin.BATCH_SIZE=16 --gin.LEARNING_RATE=1e-3
#
# Overridable variables (defaults in brackets):
#   PYTHON             interpreter [.venv/bin/python if present, else python3]
#   RECIPE             one gin file holding model and run settings, e.g.
#                      gin/adapt/t5gemma_tiny_prefixlm_kd.gin (instead of
#                      PRESET + RUN_GIN; its TASK and mesh stand unless set)
#   PRESET             model preset, gin/models/<PRESET>.gin [gemma2_tiny]
#   RUN_GIN            run file [gin/runs/pretrain_encdec.gin for t5gemma*
#                      presets, else gin/runs/pretrain.gin]
#   TASK               seqio task or mixture [corpus_prefix_lm_spm8k for
#                      t5gemma* presets, else corpus_lm_spm8k]
#   MODEL_DIR          run directory [/tmp/t5x_adapt/<PRESET>]
#   TRAIN_STEPS        [100]
#   DATA_PARALLELISM, FSDP_PARALLELISM, TENSOR_PARALLELISM
#                      [the run file's: -1 (all devices), 1, 1]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/common.sh
MODEL_DIR=${MODEL_DIR:-/tmp/t5x_adapt/$PRESET}

export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
train_command "$@"
exec "${TRAIN_CMD[@]}"
