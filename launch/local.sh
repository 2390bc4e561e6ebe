#!/usr/bin/env bash
# Run unimm on one host as N cooperating JAX processes (or one plain process).
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, the same
# variables the SLURM launcher sets, so multi-process code paths can be exercised on a laptop
# (with --cpu-devices faking several CPU devices per process). See launch/README.md.
set -euo pipefail

PROG=${0##*/}
PYTHON=${PYTHON:-python}

usage() {
  cat <<EOF
Usage: $PROG --config=CONFIG --workdir=DIR [options] [--config.x.y=VALUE ...]
       $PROG [options] -- COMMAND [ARG ...]

Start N processes of 'python -m unimm.main' on this host (or COMMAND, given after --),
wait for all of them, and exit non-zero if any fails (the others are then stopped).

  --config=CONFIG       config for unimm.main, e.g. configs/harmon.py:tiny (required unless --)
  --workdir=DIR         checkpoints and metrics (required unless --); all processes share it
  --config.x.y=VALUE    config override, passed through to unimm.main (repeatable)
  --processes=N         number of processes (default 1: a plain single-process run)
  --cpu-devices=M       run on the CPU with M fake devices per process
                        (XLA_FLAGS=--xla_force_host_platform_device_count=M, JAX_PLATFORMS=cpu)
  --port=PORT           coordinator port on localhost (default 12345; used when N > 1)
  --dry-run             print the command of every process, one per line, and run nothing
  -h, --help            show this help
  -- COMMAND ...        run COMMAND in each process instead of unimm.main (tests, debugging)

With N > 1 every output line is prefixed with "[i] ", i being the process id.
Run it from the repository root (config paths are relative to the working directory).
The Python interpreter is \$PYTHON (default: python).

Examples:
  $PROG --config=configs/harmon.py:tiny --workdir=/tmp/tiny --config.train.steps=10
  $PROG --processes=2 --cpu-devices=4 --config=configs/harmon.py:tiny --workdir=/tmp/tiny2
  $PROG --processes=2 --cpu-devices=1 -- python -c 'import os; print(os.environ["JAX_PROCESS_ID"])'
EOF
}

# --- helpers: die, shquote, print_cmd, take_value, is_positive_int ----------------------------

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# --- arguments ---------------------------------------------------------------------------------

PROCESSES=1 CPU_DEVICES="" PORT=12345 CONFIG="" WORKDIR="" DRY_RUN=0
OVERRIDES=() COMMAND=()

parse_args() {
  while (($#)); do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --processes|--processes=*) take_value "$@"; PROCESSES=$VALUE; shift "$SHIFT" ;;
      --cpu-devices|--cpu-devices=*) take_value "$@"; CPU_DEVICES=$VALUE; shift "$SHIFT" ;;
      --port|--port=*) take_value "$@"; PORT=$VALUE; shift "$SHIFT" ;;
      --workdir|--workdir=*) take_value "$@"; WORKDIR=$VALUE; shift "$SHIFT" ;;
      --config|--config=*) take_value "$@"; CONFIG=$VALUE; shift "$SHIFT" ;;
      # absl needs "name=value" in one word here, or it would read the value as a positional.
      --config.*=*) OVERRIDES+=("$1"); shift ;;
      --config.*) die "write config overrides as $1=VALUE" ;;
      --) shift; COMMAND=("$@"); (($#)) || die "'--' must be followed by a command"; break ;;
      *) die "unknown argument $1 (see --help)" ;;
    esac
  done
}

validate() {
  is_positive_int "$PROCESSES" || die "--processes must be a positive integer (got '$PROCESSES')"
  [[ -z $CPU_DEVICES ]] || is_positive_int "$CPU_DEVICES" \
    || die "--cpu-devices must be a positive integer (got '$CPU_DEVICES')"
  is_positive_int "$PORT" || die "--port must be a positive integer (got '$PORT')"
  if ((${#COMMAND[@]})); then
    [[ -z $CONFIG && -z $WORKDIR && ${#OVERRIDES[@]} -eq 0 ]] \
      || die "--config, --workdir and --config.* are for unimm.main; with -- put them in COMMAND"
  else
    [[ -n $CONFIG ]] || die "missing required flag --config (see --help)"
    [[ -n $WORKDIR ]] || die "missing required flag --workdir (see --help)"
  fi
}

# The command every process runs: COMMAND after --, else unimm.main.
build_command() {
  ((${#COMMAND[@]})) && return
  COMMAND=("$PYTHON" -m unimm.main "--config=$CONFIG" "--workdir=$WORKDIR")
  # The flag makes main call jax.distributed.initialize() whatever it infers from the environment.
  ((PROCESSES == 1)) || COMMAND+=(--multiprocess)
  COMMAND+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
}

# XLA_FLAGS for --cpu-devices: the caller's flags, minus any device count of its own (the last
# one would win, but two differing counts in one line only confuse the reader), plus ours.
cpu_xla_flags() {
  local words=() kept=() w
  read -ra words <<< "${XLA_FLAGS:-}"
  for w in ${words[@]+"${words[@]}"}; do
    [[ $w == --xla_force_host_platform_device_count=* ]] || kept+=("$w")
  done
  kept+=("--xla_force_host_platform_device_count=$CPU_DEVICES")
  echo "${kept[*]}"
}

# Fill PROCESS_ENV with the environment of process $1 (as NAME=value words for env(1)).
process_env() {
  PROCESS_ENV=()
  # A single process is a plain run and gets no JAX_* variables: unimm.main would take them
  # as a request to start the distributed runtime (and wants all three or none).
  if ((PROCESSES > 1)); then
    PROCESS_ENV+=("JAX_COORDINATOR_ADDRESS=localhost:$PORT" "JAX_NUM_PROCESSES=$PROCESSES"
                  "JAX_PROCESS_ID=$1")
  fi
  if [[ -n $CPU_DEVICES ]]; then
    PROCESS_ENV+=("XLA_FLAGS=$(cpu_xla_flags)" JAX_PLATFORMS=cpu)
  fi
}

# --- running -----------------------------------------------------------------------------------

PIDS=()

# Stop every process still running. Each was started as its own process group (see main), so
# signalling the group reaches the Python process too, not only its wrapper subshell.
stop_all() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    [[ -n $pid ]] && kill -TERM -- "-$pid" 2>/dev/null || true
  done
}

# Start process $1 in the background with its output lines prefixed by "[$1] ".
start_process() {
  process_env "$1"
  # pipefail (set above) makes the job's status the command's status, not awk's.
  ( env "${PROCESS_ENV[@]}" "${COMMAND[@]}" 2>&1 \
      | awk -v prefix="[$1] " '{ print prefix $0; fflush() }' ) &
  PIDS[$1]=$!
}

# Wait for all processes. Poll instead of waiting on one in particular: when one process dies
# the others usually block forever in a collective, so they must be stopped at once.
wait_all() {
  local failed=0 running=$PROCESSES i status
  while ((running > 0)); do
    for i in "${!PIDS[@]}"; do
      [[ -n ${PIDS[i]} ]] || continue
      kill -0 "${PIDS[i]}" 2>/dev/null && continue
      status=0
      wait "${PIDS[i]}" || status=$?
      PIDS[i]=""
      running=$((running - 1))
      if ((status != 0 && failed == 0)); then
        echo "$PROG: process $i exited with status $status; stopping the others" >&2
        failed=$status
        stop_all
      fi
    done
    ((running == 0)) || sleep 0.2
  done
  return "$failed"
}

main() {
  parse_args "$@"
  validate
  build_command

  if ((DRY_RUN)); then
    local i
    for ((i = 0; i < PROCESSES; i++)); do
      process_env "$i"
      print_cmd env "${PROCESS_ENV[@]}" "${COMMAND[@]}"
    done
    return 0
  fi

  if ((PROCESSES == 1)); then
    process_env 0
    exec env "${PROCESS_ENV[@]}" "${COMMAND[@]}"
  fi

  trap 'stop_all; exit 130' INT
  trap 'stop_all; exit 143' TERM
  # Job control on while starting: each process gets its own process group, so that stop_all
  # can stop whole process trees; off again so that bash does not print job notices.
  set -m
  local i
  for ((i = 0; i < PROCESSES; i++)); do start_process "$i"; done
  set +m
  wait_all
}

main "$@"
