#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# One GPU node: install npp_jax in a venv, or train with one process that drives
# all the node's GPUs. Run `launch/gpu_node.sh --help` for the options.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
SCRIPT_NAME=gpu_node.sh
DRY_RUN=0
# shellcheck source=common.sh
. "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_node.sh install [--venv DIR] [--base-python PY] [--dry-run]
       launch/gpu_node.sh train --config FILE --workdir DIR [options]
                                [--config.KEY=VALUE ...] [-- ARGS...]

Commands:
  install   create the venv and `pip install -e . "jax[cuda12]"` into it
  train     run `python -m npp_jax.main` from the repository root: one process
            that drives every visible GPU of this node

Options (flags win over the environment variables in brackets):
  --venv DIR               virtual environment (default: <repo>/.venv)  [VENV]
  --base-python PY         Python >= 3.11 that creates the venv (default: python3)
                                                                  [BASE_PYTHON]
  --config FILE            e.g. configs/gpt_b.py                  [CONFIG]
  --workdir DIR            checkpoints and metrics: a local path or gs://;
                           training resumes from the newest checkpoint there [WORKDIR]
  --gpus N                 use GPUs 0..N-1 (default: all visible)  [GPUS]
  --mem-fraction F         XLA_PYTHON_CLIENT_MEM_FRACTION (default: 0.9) [MEM_FRACTION]
  --xla-flags "FLAGS"      extra XLA flags, after the defaults and $XLA_FLAGS
                                                                  [EXTRA_XLA_FLAGS]
  --config.KEY=VALUE       passed on to npp_jax.main, as is everything after --
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               print this help

Example (GPT-B on one 8-GPU node):
  launch/gpu_node.sh install
  launch/gpu_node.sh train --config configs/gpt_b.py --workdir /data/runs/gpt_b
EOF
}

VENV=${VENV:-$REPO_ROOT/.venv}
BASE_PYTHON=${BASE_PYTHON:-python3}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
GPUS=${GPUS:-}
MEM_FRACTION=${MEM_FRACTION:-0.9}
EXTRA_XLA_FLAGS=${EXTRA_XLA_FLAGS:-}
TRAIN_ARGS=()
COMMAND=""

parse_args() {
  while (($#)); do
    case $1 in
      --gpus|--gpus=*) opt_value "$@"; GPUS=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --base-python|--base-python=*) opt_value "$@"; BASE_PYTHON=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      install|train)
        [[ -z $COMMAND ]] || die "one command only (got '$COMMAND' and '$1')."
        COMMAND=$1; shift ;;
      *) gpu_option "$@"; shift "$OPT_SHIFT" ;;
    esac
  done
}

# "0,1,...,N-1" for --gpus N; empty keeps the inherited CUDA_VISIBLE_DEVICES.
visible_devices() {
  local ids="" i
  if [[ -z $GPUS ]]; then
    return 0
  fi
  require_uint "$GPUS" --gpus
  ((GPUS >= 1)) || die "--gpus must be at least 1."
  for ((i = 0; i < GPUS; i++)); do
    ids="$ids${ids:+,}$i"
  done
  printf '%s' "$ids"
}

do_install() {
  if [[ $DRY_RUN == 0 && ! -x $VENV/bin/python ]]; then
    "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
      die "'$BASE_PYTHON' is missing or older than Python 3.11 (jax 0.10 needs 3.11): pass --base-python."
  fi
  run cd "$REPO_ROOT"
  run "$BASE_PYTHON" -m venv "$VENV"
  run "$VENV/bin/python" -m pip install --upgrade pip
  run "$VENV/bin/python" -m pip install -e . "jax[cuda12]"
}

do_train() {
  local devices
  validate_gpu_train
  devices=$(visible_devices)
  require_venv
  build_gpu_train_cmd "$devices"
  run cd "$REPO_ROOT"
  if [[ $DRY_RUN == 1 ]]; then
    print_cmd "${CMD[@]}"
  else
    log "+ $(quote_words "${CMD[@]}")"
    exec "${CMD[@]}"  # exec: a SIGTERM to this script reaches the trainer, which saves
  fi
}

main() {
  parse_args "$@"
  case $COMMAND in
    install) do_install ;;
    train) do_train ;;
    "") usage >&2; die "missing COMMAND (install or train)." ;;
  esac
}

main "$@"
