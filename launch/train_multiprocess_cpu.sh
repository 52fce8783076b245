#!/usr/bin/env bash
# N local processes with simulated CPU devices, joined by jax.distributed
# (gloo collectives): a multi-host job on one machine, for testing. Process 0
# prints to the terminal; process i logs to $LOG_DIR/process_<i>.log. If one
# process fails the others are stopped; Ctrl-C / SIGTERM reach all of them.
# Every process reads the same global batches and feeds its rows of each, so
# the run logs the losses of one process with the same mesh and its
# checkpoints resume on any number of processes (tests/test_multihost.py).
#
# Usage:
#   launch/train_multiprocess_cpu.sh [extra python -m t5x_adapt.train flags...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 DATA_PARALLELISM=2 \
#     FSDP_PARALLELISM=2 TENSOR_PARALLELISM=2 TRAIN_STEPS=20 \
#     launch/train_multiprocess_cpu.sh
#
# Overridable variables (defaults in brackets):
#   NUM_PROCESSES        [2]
#   DEVICES_PER_PROCESS  simulated CPU devices in each process [4]
#   COORDINATOR_ADDRESS  process 0's host:port [127.0.0.1:$PORT]
#   PORT                 [12355]
#   LOG_DIR              [$MODEL_DIR/process_logs]
#   STOP_GRACE_SECONDS   SIGTERM -> SIGKILL delay when stopping [30]
#   PYTHON, RECIPE, PRESET, RUN_GIN, TASK, MODEL_DIR, TRAIN_STEPS, DATA_PARALLELISM,
#   FSDP_PARALLELISM, TENSOR_PARALLELISM: as in launch/train_local.sh
#   (MODEL_DIR defaults to /tmp/t5x_adapt/<PRESET>_multiprocess)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/common.sh
MODEL_DIR=${MODEL_DIR:-/tmp/t5x_adapt/${PRESET}_multiprocess}
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-12355}
COORDINATOR_ADDRESS=${COORDINATOR_ADDRESS:-127.0.0.1:$PORT}
LOG_DIR=${LOG_DIR:-$MODEL_DIR/process_logs}
STOP_GRACE_SECONDS=${STOP_GRACE_SECONDS:-30}

mkdir -p "$LOG_DIR"
export JAX_PLATFORMS=cpu
XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count="
export XLA_FLAGS="$XLA_FLAGS$DEVICES_PER_PROCESS"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}

pids=()
# SIGTERM first (a process may save a checkpoint), SIGKILL after the grace.
stop_all() {
  kill ${pids[@]+"${pids[@]}"} 2>/dev/null || true
  for ((t = 0; t < STOP_GRACE_SECONDS; t++)); do
    [[ -z $(jobs -pr) ]] && return 0
    sleep 1
  done
  kill -9 ${pids[@]+"${pids[@]}"} 2>/dev/null || true
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  train_command --coordinator_address="$COORDINATOR_ADDRESS" \
    --num_processes="$NUM_PROCESSES" --process_id="$i" "$@"
  cmd=("${TRAIN_CMD[@]}")
  if ((i == 0)); then
    "${cmd[@]}" > >(tee "$LOG_DIR/process_0.log") 2>&1 &
  else
    "${cmd[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    echo "a process failed; stopping the others (logs: $LOG_DIR)" >&2
    stop_all
    break
  fi
done
wait || true
exit "$status"
