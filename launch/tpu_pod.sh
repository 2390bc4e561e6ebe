#!/usr/bin/env bash
# Run unimm on a Cloud TPU VM slice: create it, put the package on every worker, install it,
# start unimm.main on all workers at once, and optionally delete the slice afterwards.
#
# On a TPU slice jax.distributed.initialize() finds the coordinator and the process ids itself,
# so no JAX_* variables are set here; unimm.main only needs --multiprocess to call it.
# See launch/README.md.
set -euo pipefail

PROG=${0##*/}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFAULT_RUNTIME=tpu-ubuntu2204-base
REMOTE_DIR='~/unimm'   # on the workers; the tilde is left for the remote shell to expand

usage() {
  cat <<EOF
Usage: $PROG --name=NAME --zone=ZONE --accelerator=TYPE --config=CONFIG --workdir=DIR
                [options] [--config.x.y=VALUE ...]
       $PROG --name=NAME --zone=ZONE --accelerator=TYPE [options] -- COMMAND [ARG ...]

Create a TPU VM slice, copy this repository to $REMOTE_DIR on every worker (or clone it with
--install-from), pip install it with jax[tpu], then run 'python3 -m unimm.main' (or COMMAND,
given after --, from $REMOTE_DIR) on all workers with gcloud compute tpus tpu-vm ssh --worker=all.

  --name=NAME           TPU VM name (required)
  --zone=ZONE           zone, e.g. us-west4-a (required)
  --accelerator=TYPE    accelerator type, e.g. v5litepod-16, v4-32 (required unless --no-create)
  --runtime=VERSION     TPU software version (default $DEFAULT_RUNTIME)
  --project=PROJECT     Google Cloud project (default: gcloud's configured project)
  --config=CONFIG       config for unimm.main, e.g. configs/harmon.py:1.5b (required unless --)
  --workdir=DIR         checkpoints and metrics; use gs://BUCKET/PATH on multi-host slices so
                        that all workers share it (required unless --)
  --config.x.y=VALUE    config override, passed through to unimm.main (repeatable)
  --no-create           use an existing slice NAME instead of creating it
  --install-from=URL    git clone URL on every worker instead of copying this checkout
  --delete-after        delete the slice when the script ends, whether the run succeeded or not
  --dry-run             print the gcloud commands, one per line, and run nothing
  -h, --help            show this help
  -- COMMAND ...        run COMMAND on every worker instead of unimm.main

Examples:
  $PROG --name=unimm-v5e --zone=us-west4-a --accelerator=v5litepod-16 \\
      --config=configs/harmon.py:1.5b --workdir=gs://my-bucket/harmon-1.5b \\
      --config.train.steps=10000 --delete-after
  $PROG --name=unimm-v5e --zone=us-west4-a --no-create -- python3 -c 'import jax; print(jax.device_count())'
EOF
}

# --- helpers: die, shquote, print_cmd, take_value, is_positive_int ----------------------------

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# --- arguments ---------------------------------------------------------------------------------

NAME="" ZONE="" ACCELERATOR="" RUNTIME=$DEFAULT_RUNTIME PROJECT="" CONFIG="" WORKDIR=""
INSTALL_FROM="" CREATE=1 DELETE_AFTER=0 DRY_RUN=0
OVERRIDES=() COMMAND=()

parse_args() {
  while (($#)); do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --no-create) CREATE=0; shift ;;
      --delete-after) DELETE_AFTER=1; shift ;;
      --name|--name=*) take_value "$@"; NAME=$VALUE; shift "$SHIFT" ;;
      --zone|--zone=*) take_value "$@"; ZONE=$VALUE; shift "$SHIFT" ;;
      --accelerator|--accelerator=*) take_value "$@"; ACCELERATOR=$VALUE; shift "$SHIFT" ;;
      --runtime|--runtime=*) take_value "$@"; RUNTIME=$VALUE; shift "$SHIFT" ;;
      --project|--project=*) take_value "$@"; PROJECT=$VALUE; shift "$SHIFT" ;;
      --install-from|--install-from=*) take_value "$@"; INSTALL_FROM=$VALUE; shift "$SHIFT" ;;
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
  [[ -n $NAME ]] || die "missing required flag --name (see --help)"
  [[ -n $ZONE ]] || die "missing required flag --zone (see --help)"
  ((CREATE == 0)) || [[ -n $ACCELERATOR ]] || die "missing required flag --accelerator (see --help)"
  if ((${#COMMAND[@]})); then
    [[ -z $CONFIG && -z $WORKDIR && ${#OVERRIDES[@]} -eq 0 ]] \
      || die "--config, --workdir and --config.* are for unimm.main; with -- put them in COMMAND"
  else
    [[ -n $CONFIG ]] || die "missing required flag --config (see --help)"
    [[ -n $WORKDIR ]] || die "missing required flag --workdir (see --help)"
    # Each worker writes checkpoints; a local path would give every worker its own partial copy.
    [[ $WORKDIR == gs://* ]] \
      || echo "$PROG: note: --workdir $WORKDIR is not gs://; on a multi-host slice every worker needs the same workdir" >&2
  fi
}

# --- gcloud commands ---------------------------------------------------------------------------

# Run a command, or only print it with --dry-run.
run() {
  if ((DRY_RUN)); then
    print_cmd "$@"
  else
    "$@"
  fi
}

# gcloud compute tpus tpu-vm SUBCOMMAND ..., with --project when one was given.
tpu_vm() {
  run gcloud compute tpus tpu-vm "$@" ${PROJECT:+"--project=$PROJECT"}
}

# Run one shell line on every worker of the slice, in parallel.
on_all_workers() {
  tpu_vm ssh "$NAME" "--zone=$ZONE" --worker=all "--command=$1"
}

create_slice() {
  tpu_vm create "$NAME" "--zone=$ZONE" "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME"
}

delete_slice() {
  tpu_vm delete "$NAME" "--zone=$ZONE" --quiet
}

# Put the source on every worker. It is removed first because copying into an existing
# directory (a second run with --no-create) would nest the checkout inside the old one.
put_source() {
  if [[ -n $INSTALL_FROM ]]; then
    on_all_workers "rm -rf $REMOTE_DIR && git clone --depth=1 $(shquote "$INSTALL_FROM") $REMOTE_DIR"
  else
    on_all_workers "rm -rf $REMOTE_DIR"
    tpu_vm scp --recurse "$REPO" "$NAME:$REMOTE_DIR" "--zone=$ZONE" --worker=all
  fi
}

# Editable install, so that configs/ stays next to the package, in one pip call with jax[tpu]
# so that pip picks a jax that satisfies both. TPU VM images have python3, not always python.
install_package() {
  on_all_workers "python3 -m pip install -e $REMOTE_DIR \"jax[tpu]\""
}

# The line every worker runs: unimm.main (with --multiprocess, so that it calls
# jax.distributed.initialize(), which discovers the slice) or the command given after --.
remote_run_line() {
  local program=(${COMMAND[@]+"${COMMAND[@]}"})
  if ((${#program[@]} == 0)); then
    program=(python3 -m unimm.main "--config=$CONFIG" "--workdir=$WORKDIR" --multiprocess
             ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  fi
  echo "cd $REMOTE_DIR && $(print_cmd "${program[@]}")"
}

main() {
  parse_args "$@"
  validate
  if ((CREATE)); then create_slice; fi
  if ((DELETE_AFTER)); then
    # Delete even when a later step fails: an idle slice still costs money.
    # (An EXIT trap keeps the script's exit status, so a failed run still exits non-zero.)
    trap 'delete_slice || true' EXIT
  fi
  put_source
  install_package
  on_all_workers "$(remote_run_line)"
}

main "$@"
