# Defaults and the training command shared by the launch scripts (sourced).
#
# Sourced from the repository root. PYTHON defaults to the project's .venv
# when there is one, else python3.
# Reads (all optional): PYTHON, PRESET, RUN_GIN, TASK, MODEL_DIR, TRAIN_STEPS,
# DATA_PARALLELISM, FSDP_PARALLELISM, TENSOR_PARALLELISM.
# `train_command ARGS...` sets the array TRAIN_CMD to the
# `python -m t5x_adapt.train ...` command line, with ARGS appended.

if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then
  PYTHON=$PWD/.venv/bin/python
fi
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gemma2_tiny}
if [[ $PRESET == t5gemma* ]]; then
  RUN_GIN=${RUN_GIN:-gin/runs/pretrain_encdec.gin}
  TASK=${TASK:-corpus_prefix_lm_spm8k}
else
  RUN_GIN=${RUN_GIN:-gin/runs/pretrain.gin}
  TASK=${TASK:-corpus_lm_spm8k}
fi
TRAIN_STEPS=${TRAIN_STEPS:-100}
DATA_PARALLELISM=${DATA_PARALLELISM:--1}
FSDP_PARALLELISM=${FSDP_PARALLELISM:-1}
TENSOR_PARALLELISM=${TENSOR_PARALLELISM:-1}

train_command() {
  TRAIN_CMD=("$PYTHON" -m t5x_adapt.train
             --gin_file="$RUN_GIN"
             --gin_file="gin/models/$PRESET.gin"
             --gin.MODEL_DIR="'$MODEL_DIR'"
             --gin.TRAIN_STEPS="$TRAIN_STEPS"
             --gin.MIXTURE_OR_TASK_NAME="'$TASK'"
             --gin.DATA_PARALLELISM="$DATA_PARALLELISM"
             --gin.FSDP_PARALLELISM="$FSDP_PARALLELISM"
             --gin.TENSOR_PARALLELISM="$TENSOR_PARALLELISM"
             "$@")
}
