#!/usr/bin/env bash
# Inference on this machine (its CPU, or its GPUs / TPU chips as one
# process): a checkpoint's predictions, one JSON line per prompt of a text
# file or per example of a task's split (t5x_adapt/infer.py).
#
# Usage:
#   CHECKPOINT_PATH=/tmp/run/checkpoints/300 PRESET=t5gemma_tiny \
#     PROMPTS_FILE=prompts.txt TASK=sentiment_spm8k OUTPUT_FILE=out.jsonl \
#     FEATURE_LENGTHS="{'inputs': 64, 'targets': 8}" launch/infer_local.sh
#   ... launch/infer_local.sh --gin.DecodeOptions.method="'beam'"
#
# Overridable variables (defaults in brackets):
#   PYTHON             interpreter [.venv/bin/python if present, else python3]
#   CHECKPOINT_PATH    a step directory (MODEL_DIR/checkpoints/<step>) or a
#                      parameter checkpoint [required]
#   OUTPUT_FILE        JSON lines [required]
#   PRESET             the checkpoint's model preset [gemma2_tiny]
#   PROMPTS_FILE       one prompt a line [unset: TASK's SPLIT]
#   VOCABULARY         SentencePiece model of the prompts [TASK's inputs']
#   TASK               seqio task or mixture [corpus_prefix_lm_spm8k for
#                      t5gemma* presets, else corpus_lm_spm8k]
#   SPLIT              [validation]
#   FEATURE_LENGTHS    [{'inputs': 128, 'targets': 128}]
#   BATCH_SIZE         global batch [8]
#   NUM_EXAMPLES       the first examples of each task [all]
#   DATA_PARALLELISM, FSDP_PARALLELISM, TENSOR_PARALLELISM
#                      [infer.gin's: -1 (all devices), 1, 1]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset RECIPE  # Recipes configure training; infer reads PRESET.
source launch/common.sh

ARGS=(--gin.CHECKPOINT_PATH="'${CHECKPOINT_PATH:?set CHECKPOINT_PATH}'"
      --gin.OUTPUT_FILE="'${OUTPUT_FILE:?set OUTPUT_FILE}'"
      --gin.MIXTURE_OR_TASK_NAME="'$TASK'"
      --gin.SPLIT="'${SPLIT:-validation}'"
      --gin.TASK_FEATURE_LENGTHS="${FEATURE_LENGTHS:-"{'inputs': 128, 'targets': 128}"}"
      --gin.BATCH_SIZE="${BATCH_SIZE:-8}")
[[ -n ${PROMPTS_FILE:-} ]] && ARGS+=(--gin.PROMPTS_FILE="'$PROMPTS_FILE'")
[[ -n ${VOCABULARY:-} ]] && ARGS+=(--gin.VOCABULARY="'$VOCABULARY'")
[[ -n ${NUM_EXAMPLES:-} ]] && ARGS+=(--gin.NUM_EXAMPLES="$NUM_EXAMPLES")

export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
gin_command infer gin/runs/infer.gin "${ARGS[@]}" "$@"
exec "${GIN_CMD[@]}"
