#!/usr/bin/env bash
# Run unimm on several GPU nodes of a SLURM allocation with one srun step.
#
# The launcher resolves the JAX coordinator (first host of the allocation) once and passes it
# down in JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES; every task sets its own JAX_PROCESS_ID
# from SLURM_PROCID, which only exists inside the task (hence the single-quoted bash -c script).
# See launch/README.md.
set -euo pipefail

PROG=${0##*/}
PYTHON=${PYTHON:-python}
PLACEHOLDER_HOST=FIRST_HOST   # printed by --dry-run when the allocation's hosts are unknown

usage() {
  cat <<EOF
Usage: $PROG --nodes=N --gpus-per-node=K --config=CONFIG --workdir=DIR [options]
                [--config.x.y=VALUE ...]
       $PROG --nodes=N --gpus-per-node=K [options] -- COMMAND [ARG ...]

Inside a SLURM allocation (sbatch or salloc), run 'python -m unimm.main' (or COMMAND, given
after --) on N nodes with srun, as one JAX job.

  --nodes=N             nodes to run on (default: \$SLURM_JOB_NUM_NODES inside an allocation)
  --gpus-per-node=K     GPUs per node (default: \$SLURM_GPUS_ON_NODE inside an allocation)
  --per=host|gpu        host (default): one process per node, using all K local GPUs;
                        gpu: K processes per node, one GPU each (CUDA_VISIBLE_DEVICES picked
                        by SLURM_LOCALID)
  --port=PORT           JAX coordinator port on the first node (default 12345)
  --config=CONFIG       config for unimm.main, e.g. configs/harmon.py:1.5b (required unless --)
  --workdir=DIR         checkpoints and metrics, on storage all nodes share (required unless --)
  --config.x.y=VALUE    config override, passed through to unimm.main (repeatable)
  --srun-flag=FLAG      extra srun flag, e.g. --srun-flag=--partition=gpu (repeatable)
  --dry-run             print the srun command and run nothing; outside SLURM the coordinator
                        host is the placeholder $PLACEHOLDER_HOST
  -h, --help            show this help
  -- COMMAND ...        run COMMAND in every task instead of unimm.main

Run it from the repository root (config paths are relative to the working directory).
The Python interpreter is \$PYTHON (default: python).

Examples:
  salloc --nodes=2 --gpus-per-node=8 ...   # or put the line below in an sbatch script
  $PROG --nodes=2 --gpus-per-node=8 --config=configs/harmon.py:1.5b --workdir=/shared/run \\
      --config.train.steps=10000
  $PROG --nodes=2 --gpus-per-node=8 --per=gpu -- python -c 'import jax; print(jax.devices())'
EOF
}

# --- helpers: die, shquote, print_cmd, take_value, is_positive_int ----------------------------

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# --- arguments ---------------------------------------------------------------------------------

NODES=${SLURM_JOB_NUM_NODES:-} GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-} PER=host PORT=12345
CONFIG="" WORKDIR="" DRY_RUN=0
OVERRIDES=() SRUN_FLAGS=() COMMAND=()

parse_args() {
  while (($#)); do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --nodes|--nodes=*) take_value "$@"; NODES=$VALUE; shift "$SHIFT" ;;
      --gpus-per-node|--gpus-per-node=*) take_value "$@"; GPUS_PER_NODE=$VALUE; shift "$SHIFT" ;;
      --per|--per=*) take_value "$@"; PER=$VALUE; shift "$SHIFT" ;;
      --port|--port=*) take_value "$@"; PORT=$VALUE; shift "$SHIFT" ;;
      --srun-flag|--srun-flag=*) take_value "$@"; SRUN_FLAGS+=("$VALUE"); shift "$SHIFT" ;;
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
  [[ -n $NODES ]] || die "missing required flag --nodes (see --help)"
  [[ -n $GPUS_PER_NODE ]] || die "missing required flag --gpus-per-node (see --help)"
  is_positive_int "$NODES" || die "--nodes must be a positive integer (got '$NODES')"
  is_positive_int "$GPUS_PER_NODE" \
    || die "--gpus-per-node must be a positive integer (got '$GPUS_PER_NODE')"
  [[ $PER == host || $PER == gpu ]] || die "--per must be host or gpu (got '$PER')"
  is_positive_int "$PORT" || die "--port must be a positive integer (got '$PORT')"
  if ((${#COMMAND[@]})); then
    [[ -z $CONFIG && -z $WORKDIR && ${#OVERRIDES[@]} -eq 0 ]] \
      || die "--config, --workdir and --config.* are for unimm.main; with -- put them in COMMAND"
  else
    [[ -n $CONFIG ]] || die "missing required flag --config (see --help)"
    [[ -n $WORKDIR ]] || die "missing required flag --workdir (see --help)"
  fi
}

# --- the srun command --------------------------------------------------------------------------

# The coordinator runs in process 0, which srun places on the first host of the allocation
# (--relative=0 below). Sets COORDINATOR_HOST.
resolve_coordinator_host() {
  local hosts=()
  if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null; then
    # mapfile rather than "| head -n1": head closing the pipe early would fail under pipefail.
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    ((${#hosts[@]})) || die "scontrol found no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    COORDINATOR_HOST=${hosts[0]}
  elif ((DRY_RUN)); then
    echo "$PROG: dry run outside a SLURM allocation: coordinator host shown as $PLACEHOLDER_HOST" >&2
    COORDINATOR_HOST=$PLACEHOLDER_HOST
  elif [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
    die "SLURM_JOB_NODELIST is unset: run inside an allocation (sbatch or salloc)"
  else
    die "scontrol not found: it is needed to read the first host of SLURM_JOB_NODELIST"
  fi
}

# The script each task runs through bash -c. It is single-quoted on purpose: $SLURM_PROCID and
# $SLURM_LOCALID must expand inside the task, not in this launcher. The command follows as "$@".
task_script() {
  local script='export JAX_PROCESS_ID=$SLURM_PROCID; '
  if [[ $PER == gpu ]]; then
    # Every task of a node sees the node's GPUs (srun below binds none to tasks); task i keeps
    # the i-th of them. Indexing SLURM's own list, rather than using SLURM_LOCALID as the GPU
    # number, stays right when the job holds only some GPUs of a node without device cgroups.
    script+='IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"; '
    script+='export CUDA_VISIBLE_DEVICES=${gpus[SLURM_LOCALID]:-$SLURM_LOCALID}; '
  fi
  script+='exec "$@"'
  echo "$script"
}

# Fill LAUNCH with the whole command line: environment, srun, task script, program.
build_launch() {
  local num_processes local_device_ids srun_layout
  if [[ $PER == host ]]; then
    num_processes=$NODES
    srun_layout=(--ntasks-per-node=1 "--gpus-per-task=$GPUS_PER_NODE")
    # 0,1,...,K-1: all local GPUs. Without it jax.distributed.initialize() would see SLURM and
    # restrict each process to the single device numbered SLURM_LOCALID (0).
    local_device_ids=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
  else
    num_processes=$((NODES * GPUS_PER_NODE))
    # GPUs per node rather than per task, and no binding: with --gpus-per-task=1 SLURM may narrow
    # each task to one GPU already, renumbered or not depending on the site, and SLURM_LOCALID
    # would no longer index the visible GPUs. Each task picks its GPU itself (task_script).
    srun_layout=("--ntasks-per-node=$GPUS_PER_NODE" "--gpus-per-node=$GPUS_PER_NODE" --gpu-bind=none)
    local_device_ids=0   # the one GPU left visible to the process
  fi

  local program=(${COMMAND[@]+"${COMMAND[@]}"})
  if ((${#program[@]} == 0)); then
    # --multiprocess: unimm.main calls jax.distributed.initialize() whatever the environment.
    program=("$PYTHON" -m unimm.main "--config=$CONFIG" "--workdir=$WORKDIR" --multiprocess
             ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  fi

  LAUNCH=(env "JAX_COORDINATOR_ADDRESS=$COORDINATOR_HOST:$PORT"
          "JAX_NUM_PROCESSES=$num_processes" "JAX_LOCAL_DEVICE_IDS=$local_device_ids"
          # --export=ALL: the JAX_* variables above must reach the tasks even where a site makes
          # srun export nothing by default. --relative=0: start at the allocation's first node,
          # the coordinator host, even when the allocation has more nodes than --nodes.
          srun --export=ALL "--nodes=$NODES" "${srun_layout[@]}" --relative=0
          ${SRUN_FLAGS[@]+"${SRUN_FLAGS[@]}"}
          bash -c "$(task_script)" unimm-task "${program[@]}")
}

main() {
  parse_args "$@"
  validate
  resolve_coordinator_host
  build_launch
  if ((DRY_RUN)); then
    print_cmd "${LAUNCH[@]}"
  else
    exec "${LAUNCH[@]}"
  fi
}

main "$@"
