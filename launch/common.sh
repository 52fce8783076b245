# Defaults and the training command shared by the launch scripts (sourced).
#
# Sourced from the repository root. PYTHON defaults to the project's .venv
# when there is one, else python3.
# Reads (all optional): PYTHON, RECIPE, PRESET, RUN_GIN, TASK, MODEL_DIR,
# TRAIN_STEPS, DATA_PARALLELISM, FSDP_PARALLELISM, TENSOR_PARALLELISM.
# RECIPE is one gin file that includes its model and run settings (e.g.
# gin/adapt/t5gemma_2b_2b_prefixlm_kd.gin); without it, RUN_GIN + PRESET.
# The mesh sizes and TASK are passed only when set (a recipe's own values
# stand otherwise; the run files default to data=-1, fsdp=1, tensor=1).
# `train_command ARGS...` sets the array TRAIN_CMD to the
# `python -m t5x_adapt.train ...` command line, with ARGS appended.
# `gin_command MODULE RUN_FILE ARGS...` sets the array GIN_CMD to
# `python -m t5x_adapt.MODULE` with RUN_FILE, PRESET's model file, the mesh
# sizes that are set, and ARGS (eval_local.sh, infer_local.sh).

if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then
  PYTHON=$PWD/.venv/bin/python
fi
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gemma2_tiny}
if [[ -n ${RECIPE:-} ]]; then
  GIN_FILES=(--gin_file="$RECIPE")
else
  if [[ $PRESET == t5gemma* ]]; then
    RUN_GIN=${RUN_GIN:-gin/runs/pretrain_encdec.gin}
    TASK=${TASK:-corpus_prefix_lm_spm8k}
  else
    RUN_GIN=${RUN_GIN:-gin/runs/pretrain.gin}
    TASK=${TASK:-corpus_lm_spm8k}
  fi
  GIN_FILES=(--gin_file="$RUN_GIN" --gin_file="gin/models/$PRESET.gin")
fi
TRAIN_STEPS=${TRAIN_STEPS:-100}

train_command() {
  TRAIN_CMD=("$PYTHON" -m t5x_adapt.train "${GIN_FILES[@]}"
             --gin.MODEL_DIR="'$MODEL_DIR'"
             --gin.TRAIN_STEPS="$TRAIN_STEPS")
  [[ -n ${TASK:-} ]] && TRAIN_CMD+=(--gin.MIXTURE_OR_TASK_NAME="'$TASK'")
  mesh_flags TRAIN_CMD
  TRAIN_CMD+=("$@")
}

# Appends --gin.<AXIS>=N to the array named $1 for each mesh size set.
mesh_flags() {
  local -n flags_array=$1
  local axis
  for axis in DATA_PARALLELISM FSDP_PARALLELISM TENSOR_PARALLELISM; do
    [[ -n ${!axis:-} ]] && flags_array+=(--gin.$axis="${!axis}")
  done
  return 0
}

gin_command() {
  local module=$1 run_file=$2
  shift 2
  GIN_CMD=("$PYTHON" -m "t5x_adapt.$module" --gin_file="$run_file"
           --gin_file="gin/models/$PRESET.gin")
  mesh_flags GIN_CMD
  GIN_CMD+=("$@")
}
