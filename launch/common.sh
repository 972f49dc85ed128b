# shellcheck shell=bash
# Helpers shared by the launch scripts: logging, option parsing, shell quoting,
# and the dry-run aware `run`. Source it; it defines functions only.
#
# The sourcing script sets:
#   SCRIPT_NAME  name used in log and error lines
#   DRY_RUN      1 = print commands (stdout, one per line, shell-quoted), run nothing
#
# Written for bash 3.2 too (macOS laptops launch TPU jobs): no associative
# arrays, no mapfile, no expansion of possibly empty arrays under `set -u`.

# Prints a timestamped progress line on stderr (stdout is kept for dry-run output).
log() {
  printf '%s [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SCRIPT_NAME" "$*" >&2
}

# Prints one clear error sentence on stderr and exits with status 2.
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

# Quotes one word for a POSIX shell; words made of safe characters stay bare
# so the printed commands read naturally.
shell_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    local sq="'"
    printf "'%s'" "${word//$sq/$sq\\$sq$sq}"
  fi
}

# Prints the words as one shell-quoted command line (no trailing newline).
quote_words() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    shell_quote "$word"
    sep=" "
  done
}

# Prints the command as one copy-pastable line on stdout.
print_cmd() {
  quote_words "$@"
  printf '\n'
}

# Dry run: prints the command. Otherwise logs it and runs it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    print_cmd "$@"
  else
    log "+ $(quote_words "$@")"
    "$@"
  fi
}

# Prints a '#' comment line in the dry-run plan (nothing otherwise).
plan_note() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '# %s\n' "$*"
  fi
}

# Option values: `--opt VALUE` and `--opt=VALUE` are both accepted. Call as
#   opt_value "$@"; X=$OPT_VALUE; shift "$OPT_SHIFT"
# from the parsing loop, with $1 the option itself.
# shellcheck disable=SC2034  # OPT_VALUE and OPT_SHIFT are read by the caller
opt_value() {
  if [[ $1 == --*=* ]]; then
    OPT_VALUE=${1#*=}
    OPT_SHIFT=1
  elif (($# >= 2)) && [[ $2 != --* ]]; then
    OPT_VALUE=$2
    OPT_SHIFT=2
  else
    die "option ${1%%=*} needs a value."
  fi
}

# As opt_value, for options whose value may itself start with "--" (XLA flags,
# extra gcloud flags).
# shellcheck disable=SC2034  # OPT_VALUE and OPT_SHIFT are read by the caller
opt_raw_value() {
  if [[ $1 == --*=* ]]; then
    OPT_VALUE=${1#*=}
    OPT_SHIFT=1
  elif (($# >= 2)); then
    OPT_VALUE=$2
    OPT_SHIFT=2
  else
    die "option $1 needs a value."
  fi
}

# Dies if --dry-run sits among the trainer's arguments (after --): it is surely
# meant for the launcher, and running for real instead would be a bad surprise.
reject_forwarded_dry_run() {
  local arg
  for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then
      die "--dry-run after -- would go to the trainer; put it before -- (the trainer's own flag is --dry_run)."
    fi
  done
}

# Dies unless the value is non-empty; the message names the flag and the env var.
require() {
  local value=$1 flag=$2 env_name=$3
  if [[ -z $value ]]; then
    die "missing $flag (or set \$$env_name)."
  fi
}

# Dies unless the value is a non-negative integer.
require_uint() {
  local value=$1 flag=$2
  if ! [[ $value =~ ^[0-9]+$ ]]; then
    die "$flag must be a non-negative integer (got '$value')."
  fi
}

# XLA flags for GPU training. The latency-hiding scheduler overlaps collectives
# with compute; it is the flag the JAX "GPU performance tips" page and NVIDIA's
# JAX-Toolbox images enable. Flags already in $XLA_FLAGS and the extra ones
# come after it, so they win.
gpu_xla_flags() {
  local extra=$1
  local flags="--xla_gpu_enable_latency_hiding_scheduler=true"
  if [[ -n ${XLA_FLAGS:-} ]]; then
    flags="$flags $XLA_FLAGS"
  fi
  if [[ -n $extra ]]; then
    flags="$flags $extra"
  fi
  printf '%s' "$flags"
}

# Dies unless the memory fraction is a number in (0, 1].
require_fraction() {
  local value=$1 flag=$2
  if ! [[ $value =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]]; then
    die "$flag must be a number in (0, 1] (got '$value')."
  fi
}

# --- Shared by the GPU launchers (gpu_node.sh, gpu_slurm.sbatch) -----------------
# The sourcing script sets the defaults of CONFIG, WORKDIR, VENV, MEM_FRACTION,
# EXTRA_XLA_FLAGS and TRAIN_ARGS=(), and defines usage().

# Handles one option shared by the GPU launchers; sets OPT_SHIFT. Dies on an
# unknown option. Call as: gpu_option "$@"; shift "$OPT_SHIFT"
# shellcheck disable=SC2034  # the variables set here are read by the caller
gpu_option() {
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; OPT_SHIFT=1 ;;
    --config|--config=*) opt_value "$@"; CONFIG=$OPT_VALUE ;;
    --config.*) TRAIN_ARGS+=("$1"); OPT_SHIFT=1 ;;
    --workdir|--workdir=*) opt_value "$@"; WORKDIR=$OPT_VALUE ;;
    --venv|--venv=*) opt_value "$@"; VENV=$OPT_VALUE ;;
    --mem-fraction|--mem-fraction=*) opt_value "$@"; MEM_FRACTION=$OPT_VALUE ;;
    --xla-flags|--xla-flags=*) opt_raw_value "$@"; EXTRA_XLA_FLAGS=$OPT_VALUE ;;
    --) shift; reject_forwarded_dry_run "$@"; TRAIN_ARGS+=("$@"); OPT_SHIFT=$(($# + 1)) ;;
    *) die "unknown argument '$1' (see --help)." ;;
  esac
}

validate_gpu_train() {
  require "$CONFIG" --config CONFIG
  require "$WORKDIR" --workdir WORKDIR
  require_fraction "$MEM_FRACTION" --mem-fraction
}

# Sets CMD to the trainer command for one process. $1: CUDA_VISIBLE_DEVICES
# value, or empty to keep the inherited one. XLA_PYTHON_CLIENT_MEM_FRACTION is
# the share of GPU memory JAX preallocates (its default is 0.75; NVIDIA's JAX
# guide uses 0.8-0.9 for training).
build_gpu_train_cmd() {
  CMD=(env "XLA_FLAGS=$(gpu_xla_flags "$EXTRA_XLA_FLAGS")" "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
  if [[ -n $1 ]]; then
    CMD+=("CUDA_VISIBLE_DEVICES=$1")
  fi
  CMD+=("$VENV/bin/python" -m npp_jax.main --config "$CONFIG" --workdir "$WORKDIR")
  if ((${#TRAIN_ARGS[@]})); then
    CMD+=("${TRAIN_ARGS[@]}")
  fi
}

# Dies unless the venv's Python exists (real runs only).
require_venv() {
  if [[ $DRY_RUN == 0 && ! -x $VENV/bin/python ]]; then
    die "no Python at $VENV/bin/python: run 'launch/gpu_node.sh install' first, or pass --venv."
  fi
}
