#!/usr/bin/env bash
# Evaluation on this machine (its CPU, or its GPUs / TPU chips as one
# process): perplexity and the task's own metrics of one checkpoint, or of
# every checkpoint of a run not yet evaluated (t5x_adapt/eval.py).
#
# Usage:
#   launch/eval_local.sh [extra python -m t5x_adapt.eval flags...]
#   MODEL_DIR=/tmp/run PRESET=t5gemma_tiny TASK=sentiment_spm8k \
#     FEATURE_LENGTHS="{'inputs': 64, 'targets': 8}" launch/eval_local.sh
#   CHECKPOINT_PATH=/tmp/run/checkpoints/300 PRESET=t5gemma_tiny \
#     launch/eval_local.sh --gin.NUM_EXAMPLES=200
#
# Results: OUTPUT_DIR/<task>/<step>.json, OUTPUT_DIR/results.jsonl and
# TensorBoard scalars in OUTPUT_DIR/<task>/.
#
# Overridable variables (defaults in brackets):
#   PYTHON             interpreter [.venv/bin/python if present, else python3]
#   PRESET             the checkpoint's model preset [gemma2_tiny]
#   TASK               seqio task or mixture [corpus_prefix_lm_spm8k for
#                      t5gemma* presets, else corpus_lm_spm8k]
#   CHECKPOINT_PATH    one checkpoint: a step directory (MODEL_DIR/
#                      checkpoints/<step>) or a parameter checkpoint [unset:
#                      every checkpoint of MODEL_DIR without results]
#   MODEL_DIR          the run [/tmp/t5x_adapt/<PRESET> without
#                      CHECKPOINT_PATH]
#   OUTPUT_DIR         [MODEL_DIR/eval, or the step directory's run's eval/]
#   FEATURE_LENGTHS    [{'inputs': 128, 'targets': 128} for t5gemma*
#                      presets, else {'targets': 128}]
#   BATCH_SIZE         global batch [8]
#   NUM_EXAMPLES       the first examples of each task [all]
#   DATA_PARALLELISM, FSDP_PARALLELISM, TENSOR_PARALLELISM
#                      [eval.gin's: -1 (all devices), 1, 1]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset RECIPE  # Recipes configure training; eval reads PRESET.
source launch/common.sh
if [[ $PRESET == t5gemma* ]]; then
  FEATURE_LENGTHS=${FEATURE_LENGTHS:-"{'inputs': 128, 'targets': 128}"}
else
  FEATURE_LENGTHS=${FEATURE_LENGTHS:-"{'targets': 128}"}
fi

ARGS=(--gin.MIXTURE_OR_TASK_NAME="'$TASK'"
      --gin.TASK_FEATURE_LENGTHS="$FEATURE_LENGTHS"
      --gin.BATCH_SIZE="${BATCH_SIZE:-8}")
if [[ -n ${CHECKPOINT_PATH:-} ]]; then
  ARGS+=(--gin.CHECKPOINT_PATH="'$CHECKPOINT_PATH'")
  [[ -n ${MODEL_DIR:-} ]] && ARGS+=(--gin.MODEL_DIR="'$MODEL_DIR'")
else
  ARGS+=(--gin.MODEL_DIR="'${MODEL_DIR:-/tmp/t5x_adapt/$PRESET}'")
fi
[[ -n ${OUTPUT_DIR:-} ]] && ARGS+=(--gin.OUTPUT_DIR="'$OUTPUT_DIR'")
[[ -n ${NUM_EXAMPLES:-} ]] && ARGS+=(--gin.NUM_EXAMPLES="$NUM_EXAMPLES")

export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
gin_command eval gin/runs/eval.gin "${ARGS[@]}" "$@"
exec "${GIN_CMD[@]}"
