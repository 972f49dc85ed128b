#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Cloud TPU VM launcher for npp_jax: create a slice (or a queued resource), ship
# and install the project on every worker, start training on all workers with
# the workdir in a gs:// bucket, and babysit a spot slice through preemptions.
# Run `launch/tpu_vm.sh --help` for the options; launch/README.md has recipes.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
SCRIPT_NAME=tpu_vm.sh
DRY_RUN=0
# shellcheck source=common.sh
. "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [options] [--config.KEY=VALUE ...] [-- ARGS...]

Commands:
  create    create the TPU VM slice (or a queued resource with --queued)
  setup     ship the project to every worker and install it in a venv
  train     (re)start `python -m npp_jax.main` on every worker, detached;
            each worker appends its output to ~/npp-logs/train-<host>.log
  babysit   keep a run alive: recreate a preempted/failed slice, set it up and
            restart training (it resumes from the newest checkpoint in the
            workdir) until WORKDIR/DONE exists; then delete the slice
  status    describe the slice (or the queued resource)
  logs      print the end of one worker's training log
  stop      stop the trainer on every worker (SIGTERM: it saves, then exits)
  delete    delete the slice (or the queued resource and its node)

Options (flags win over the environment variables in brackets):
  --name NAME              TPU VM / node name                        [NAME]
  --zone ZONE              e.g. us-east5-a                           [ZONE]
  --project PROJECT        default: gcloud's configured project      [PROJECT]
  --queued                 use a queued resource (its id is NAME too)  [QUEUED=1]
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               print this help

  create / babysit:
  --accelerator TYPE       e.g. v5p-64, v5litepod-16, v6e-8, v4-32   [ACCELERATOR]
  --runtime-version V      default from the TPU generation: v2-alpha-tpuv5
                           (v5p), v2-alpha-tpuv5-lite (v5e),
                           v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4)
                                                                     [RUNTIME_VERSION]
  --spot | --reserved      capacity type (default: on-demand)        [CAPACITY=spot|reserved]
  --create-arg ARG         extra flag for the create command, repeatable,
                           e.g. --create-arg --network=my-net

  setup / babysit:
  --src DIR                git checkout to ship with `git archive` (default:
                           this repository); uncommitted changes are not shipped [SRC]
  --repo-url URL           clone URL used on every worker instead of --src [REPO_URL]
  --ref REF                commit, branch or tag to ship (default: HEAD with
                           --src, main with --repo-url)             [REF]
  --remote-dir DIR         source directory on the workers (default: npp-jax,
                           under the home directory)                 [REMOTE_DIR]
  --remote-venv DIR        venv on the workers (default: npp-venv)   [REMOTE_VENV]
  --python-version V       venv Python, fetched by uv if the image lacks it
                           (default: 3.11)                           [PYTHON_VERSION]

  train / babysit:
  --config FILE            e.g. configs/gpt_xl.py                    [CONFIG]
  --workdir gs://B/RUN     checkpoints and metrics; must be gs:// (every worker
                           writes there, and it outlives the VMs)    [WORKDIR]
  --bucket B --run RUN     shorthand for --workdir gs://B/RUN        [BUCKET, RUN_NAME]
  --config.KEY=VALUE       passed on to npp_jax.main, as is everything after --

  babysit:
  --poll-seconds N         seconds between checks (default: 300)     [POLL_SECONDS]
  --max-attempts N         give up after N recreations/restarts (default: 50) [MAX_ATTEMPTS]
  --backoff-seconds N      wait after a failed attempt, doubled each time
                           (default: 60, capped by --max-backoff-seconds 1800)
  --keep-when-done         keep the slice once the run is complete

  logs:
  --worker N               worker to read (default: 0)
  --lines N                lines to print (default: 200)

Examples:
  launch/tpu_vm.sh create --name npp-xl --zone us-east5-a --accelerator v5p-64 --spot
  launch/tpu_vm.sh setup  --name npp-xl --zone us-east5-a
  launch/tpu_vm.sh train  --name npp-xl --zone us-east5-a \
      --config configs/gpt_xl.py --workdir gs://my-bucket/npp/gpt_xl
  launch/tpu_vm.sh babysit --name npp-xl --zone us-east5-a --accelerator v5p-64 \
      --spot --config configs/gpt_xl.py --workdir gs://my-bucket/npp/gpt_xl
EOF
}

# --- Options (environment variables give the defaults) -----------------------

NAME=${NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
QUEUED=${QUEUED:-0}
ACCELERATOR=${ACCELERATOR:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
CAPACITY=${CAPACITY:-}
SRC=${SRC:-}
REPO_URL=${REPO_URL:-}
REF=${REF:-}
REMOTE_DIR=${REMOTE_DIR:-npp-jax}
REMOTE_VENV=${REMOTE_VENV:-npp-venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
BUCKET=${BUCKET:-}
RUN_NAME=${RUN_NAME:-}
POLL_SECONDS=${POLL_SECONDS:-300}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-50}
BACKOFF_SECONDS=${BACKOFF_SECONDS:-60}
MAX_BACKOFF_SECONDS=${MAX_BACKOFF_SECONDS:-1800}
KEEP_WHEN_DONE=0
WORKER=0
LINES=200
CREATE_ARGS=()
TRAIN_ARGS=()

# Fixed paths on the workers (relative ones are under the home directory).
REMOTE_TARBALL=npp-jax-src.tar.gz
REMOTE_LOG_DIR=npp-logs
REMOTE_PID_FILE=npp-train.pid
STOP_GRACE_SECONDS=300

COMMAND=""
parse_args() {
  while (($#)); do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --spot) set_capacity spot; shift ;;
      --reserved) set_capacity reserved; shift ;;
      --keep-when-done) KEEP_WHEN_DONE=1; shift ;;
      --name|--name=*) opt_value "$@"; NAME=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --zone|--zone=*) opt_value "$@"; ZONE=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --project|--project=*) opt_value "$@"; PROJECT=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --accelerator|--accelerator=*) opt_value "$@"; ACCELERATOR=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --runtime-version|--runtime-version=*) opt_value "$@"; RUNTIME_VERSION=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --create-arg|--create-arg=*) opt_raw_value "$@"; CREATE_ARGS+=("$OPT_VALUE"); shift "$OPT_SHIFT" ;;
      --src|--src=*) opt_value "$@"; SRC=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --repo-url|--repo-url=*) opt_value "$@"; REPO_URL=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --ref|--ref=*) opt_value "$@"; REF=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --remote-dir|--remote-dir=*) opt_value "$@"; REMOTE_DIR=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --remote-venv|--remote-venv=*) opt_value "$@"; REMOTE_VENV=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --python-version|--python-version=*) opt_value "$@"; PYTHON_VERSION=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --config|--config=*) opt_value "$@"; CONFIG=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --config.*) TRAIN_ARGS+=("$1"); shift ;;
      --workdir|--workdir=*) opt_value "$@"; WORKDIR=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --bucket|--bucket=*) opt_value "$@"; BUCKET=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --run|--run=*) opt_value "$@"; RUN_NAME=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --poll-seconds|--poll-seconds=*) opt_value "$@"; POLL_SECONDS=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --max-attempts|--max-attempts=*) opt_value "$@"; MAX_ATTEMPTS=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --backoff-seconds|--backoff-seconds=*) opt_value "$@"; BACKOFF_SECONDS=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --max-backoff-seconds|--max-backoff-seconds=*)
        opt_value "$@"; MAX_BACKOFF_SECONDS=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --worker|--worker=*) opt_value "$@"; WORKER=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --lines|--lines=*) opt_value "$@"; LINES=$OPT_VALUE; shift "$OPT_SHIFT" ;;
      --) shift; reject_forwarded_dry_run "$@"; TRAIN_ARGS+=("$@"); break ;;
      -*) die "unknown option '$1' (see --help)." ;;
      *)
        [[ -z $COMMAND ]] || die "one command only (got '$COMMAND' and '$1')."
        COMMAND=$1; shift ;;
    esac
  done
}

set_capacity() {
  if [[ -n $CAPACITY && $CAPACITY != "$1" ]]; then
    die "--spot and --reserved exclude each other."
  fi
  CAPACITY=$1
}

# --- Validation ----------------------------------------------------------------

default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "" ;;
  esac
}

validate_common() {
  require "$NAME" --name NAME
  require "$ZONE" --zone ZONE
  [[ $QUEUED == 0 || $QUEUED == 1 ]] || die "QUEUED must be 0 or 1 (got '$QUEUED')."
}

validate_create() {
  require "$ACCELERATOR" --accelerator ACCELERATOR
  [[ $ACCELERATOR =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    die "--accelerator must look like v5p-64, v5litepod-16 or v6e-8 (got '$ACCELERATOR')."
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR")
    [[ -n $RUNTIME_VERSION ]] ||
      die "no default runtime for '$ACCELERATOR': pass --runtime-version."
  fi
  case $CAPACITY in
    ""|spot|reserved) ;;
    *) die "CAPACITY must be spot or reserved (got '$CAPACITY')." ;;
  esac
}

validate_setup() {
  if [[ -n $REPO_URL ]]; then
    [[ -n $REF ]] || REF=main
  else
    [[ -n $SRC ]] || SRC=$REPO_ROOT
    [[ -n $REF ]] || REF=HEAD
    [[ -e $SRC/.git ]] || die "--src must be a git checkout (no .git in '$SRC')."
  fi
  [[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] ||
    die "--python-version must look like 3.11 (got '$PYTHON_VERSION')."
}

validate_train() {
  require "$CONFIG" --config CONFIG
  if [[ -z $WORKDIR && -n $BUCKET ]]; then
    require "$RUN_NAME" --run RUN_NAME
    WORKDIR="gs://${BUCKET#gs://}"
    WORKDIR="${WORKDIR%/}/$RUN_NAME"
  fi
  [[ -n $WORKDIR ]] || die "missing --workdir gs://BUCKET/RUN (or --bucket and --run, or set \$WORKDIR)."
  [[ $WORKDIR == gs://?* ]] ||
    die "--workdir must be a gs:// path: every worker writes its part of each checkpoint there," \
      "and it must outlive the VMs (got '$WORKDIR')."
  WORKDIR=${WORKDIR%/}
}

validate_babysit() {
  require_uint "$POLL_SECONDS" --poll-seconds
  require_uint "$MAX_ATTEMPTS" --max-attempts
  require_uint "$BACKOFF_SECONDS" --backoff-seconds
  require_uint "$MAX_BACKOFF_SECONDS" --max-backoff-seconds
  ((MAX_ATTEMPTS >= 1)) || die "--max-attempts must be at least 1."
}

# --- Command builders: each sets the array CMD ------------------------------------

add_project() {
  if [[ -n $PROJECT ]]; then
    CMD+=("--project=$PROJECT")
  fi
}

# Which gcloud group manages the slice: the node itself, or its queued resource.
resource_group() {
  if [[ $QUEUED == 1 ]]; then echo queued-resources; else echo tpu-vm; fi
}

build_create() {
  if [[ $QUEUED == 1 ]]; then
    CMD=(gcloud compute tpus queued-resources create "$NAME" "--zone=$ZONE" "--node-id=$NAME"
      "--accelerator-type=$ACCELERATOR" "--runtime-version=$RUNTIME_VERSION")
  else
    CMD=(gcloud compute tpus tpu-vm create "$NAME" "--zone=$ZONE"
      "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME_VERSION")
  fi
  if [[ -n $CAPACITY ]]; then
    CMD+=("--$CAPACITY")
  fi
  if ((${#CREATE_ARGS[@]})); then
    CMD+=("${CREATE_ARGS[@]}")
  fi
  add_project
}

build_delete() {
  CMD=(gcloud compute tpus "$(resource_group)" delete "$NAME" "--zone=$ZONE")
  if [[ $QUEUED == 1 ]]; then
    CMD+=(--force)  # also deletes the node of the queued resource
  fi
  CMD+=(--quiet)
  add_project
}

build_describe() {  # $1: a --format value, or empty for the full description
  CMD=(gcloud compute tpus "$(resource_group)" describe "$NAME" "--zone=$ZONE")
  if [[ -n $1 ]]; then
    CMD+=("--format=$1")
  fi
  add_project
}

build_describe_state() {
  if [[ $QUEUED == 1 ]]; then
    build_describe 'value(state.state)'
  else
    build_describe 'value(state)'
  fi
}

build_ssh() {  # $1: worker ("all" or an index), $2: the remote shell command
  CMD=(gcloud compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$1" "--command=$2")
  add_project
}

build_done_check() {
  CMD=(gcloud storage ls "$WORKDIR/DONE")
  add_project
}

local_tarball() {
  printf '%s/npp-jax-src-%s.tar.gz' "${TMPDIR:-/tmp}" "$NAME"
}

# --- Remote shell snippets (run by each worker's login shell) -------------------

# A path on the workers, quoted; relative paths are under the home directory.
remote_path() {
  if [[ $1 == /* ]]; then
    shell_quote "$1"
  else
    # shellcheck disable=SC2016  # $HOME must expand on the worker
    printf '"$HOME"/%s' "$(shell_quote "$1")"
  fi
}

remote_fetch_source() {
  local dir; dir=$(remote_path "$REMOTE_DIR")
  if [[ -n $REPO_URL ]]; then
    printf 'rm -rf %s && git clone --quiet %s %s && git -C %s checkout --quiet %s' \
      "$dir" "$(shell_quote "$REPO_URL")" "$dir" "$dir" "$(shell_quote "$REF")"
  else
    printf 'rm -rf %s && mkdir -p %s && tar -xzf %s -C %s' \
      "$dir" "$dir" "$(remote_path "$REMOTE_TARBALL")" "$dir"
  fi
}

# uv installs a Python >= 3.11 when the image has an older one (the TPU images
# are Ubuntu 22.04 with Python 3.10; jax 0.10 needs 3.11).
remote_install() {
  local dir venv
  dir=$(remote_path "$REMOTE_DIR")
  venv=$(remote_path "$REMOTE_VENV")
  # shellcheck disable=SC2016  # $HOME and $PATH must expand on the worker
  printf '%s && { %s || %s || %s; } && %s && %s' \
    'export PATH="$HOME/.local/bin:$PATH"' \
    'command -v uv >/dev/null' 'python3 -m pip install --user --quiet uv' \
    'curl -LsSf https://astral.sh/uv/install.sh | sh' \
    "uv venv --quiet --allow-existing --python $(shell_quote "$PYTHON_VERSION") $venv" \
    "uv pip install --quiet --python $venv/bin/python -e $dir \"jax[tpu]\""
}

# Stops a running trainer by its pid file: SIGTERM (it saves a checkpoint),
# then SIGKILL after the grace period. Always succeeds.
remote_stop() {
  local pid_file; pid_file=$(remote_path "$REMOTE_PID_FILE")
  local fmt
  # shellcheck disable=SC2016  # $pid and $i are the worker's variables
  fmt='if [ -f %s ]; then pid=$(cat %s); if kill "$pid" 2>/dev/null; then'
  # shellcheck disable=SC2016
  fmt+=' i=0; while [ "$i" -lt %s ] && kill -0 "$pid" 2>/dev/null; do sleep 1; i=$((i+1)); done;'
  # shellcheck disable=SC2016
  fmt+=' kill -9 "$pid" 2>/dev/null; fi; rm -f %s; fi; true'
  # shellcheck disable=SC2059  # the format is built above
  printf "$fmt" "$pid_file" "$pid_file" "$STOP_GRACE_SECONDS" "$pid_file"
}

# Starts the trainer detached (it survives the ssh session) and records its pid.
remote_train() {
  local dir venv log pid_file main_cmd
  dir=$(remote_path "$REMOTE_DIR")
  venv=$(remote_path "$REMOTE_VENV")
  log="$(remote_path "$REMOTE_LOG_DIR")/train-\"\$(hostname)\".log"
  pid_file=$(remote_path "$REMOTE_PID_FILE")
  main_cmd="$venv/bin/python $(quote_words -m npp_jax.main --config "$CONFIG" --workdir "$WORKDIR")"
  if ((${#TRAIN_ARGS[@]})); then
    main_cmd="$main_cmd $(quote_words "${TRAIN_ARGS[@]}")"
  fi
  local fmt='cd %s && mkdir -p %s && { %s; }'
  # shellcheck disable=SC2016  # $(date) and $! expand on the worker
  fmt+=' && echo "=== start $(date -u) ===" >> %s && { nohup %s >> %s 2>&1 < /dev/null & echo $! > %s; }'
  # shellcheck disable=SC2059  # the format is built above
  printf "$fmt" "$dir" "$(remote_path "$REMOTE_LOG_DIR")" "$(remote_stop)" "$log" "$main_cmd" "$log" "$pid_file"
}

# Prints NPP_TRAIN_ALIVE or NPP_TRAIN_DEAD on each worker.
remote_alive_check() {
  local pid_file; pid_file=$(remote_path "$REMOTE_PID_FILE")
  # shellcheck disable=SC2016  # $(cat) expands on the worker
  printf 'if [ -f %s ] && kill -0 "$(cat %s)" 2>/dev/null; then echo NPP_TRAIN_ALIVE; else echo NPP_TRAIN_DEAD; fi' \
    "$pid_file" "$pid_file"
}

# --- Actions ---------------------------------------------------------------------
# Each returns non-zero on failure (they also run where `set -e` is suspended).

do_create() {
  build_create
  run "${CMD[@]}" || return
  if [[ $QUEUED == 1 && $DRY_RUN == 0 ]]; then
    log "queued resource '$NAME' requested; it is usable once its state is ACTIVE (see: status)."
  fi
}

do_delete() {
  build_delete
  run "${CMD[@]}"
}

make_archive() {
  if [[ -n $REPO_URL ]]; then
    return 0
  fi
  if [[ $DRY_RUN == 0 && -n $(git -C "$SRC" status --porcelain --untracked-files=no) ]]; then
    log "warning: '$SRC' has uncommitted changes; only $REF is shipped."
  fi
  run git -C "$SRC" archive --format=tar.gz "--output=$(local_tarball)" "$REF"
}

do_setup() {  # $1: 1 = make the source tarball first (also done when it has vanished)
  if [[ -z $REPO_URL ]]; then
    if [[ $1 == 1 || ($DRY_RUN == 0 && ! -f $(local_tarball)) ]]; then
      make_archive || return
    fi
    CMD=(gcloud compute tpus tpu-vm scp "$(local_tarball)" "$NAME:$REMOTE_TARBALL" "--zone=$ZONE" --worker=all)
    add_project
    run "${CMD[@]}" || return
  fi
  build_ssh all "$(remote_fetch_source) && $(remote_install)"
  run "${CMD[@]}"
}

do_train() {
  build_ssh all "$(remote_train)"
  run "${CMD[@]}" || return
  if [[ $DRY_RUN == 0 ]]; then
    log "training started on every worker; logs: launch/tpu_vm.sh logs --name $NAME --zone $ZONE"
  fi
}

do_stop() {
  build_ssh all "$(remote_stop)"
  run "${CMD[@]}"
}

do_logs() {
  build_ssh "$WORKER" "tail -n $LINES $(remote_path "$REMOTE_LOG_DIR")/train-*.log"
  run "${CMD[@]}"
}

do_status() {
  build_describe ""
  run "${CMD[@]}"
}

# --- Babysitter ------------------------------------------------------------------

run_is_done() {
  build_done_check
  "${CMD[@]}" >/dev/null 2>&1
}

# Prints the slice state (READY, ACTIVE, PREEMPTED, ...), MISSING or UNKNOWN.
slice_state() {
  local err_file state
  err_file=$(mktemp)
  build_describe_state
  if state=$("${CMD[@]}" 2>"$err_file"); then
    printf '%s' "${state:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$err_file"; then
    printf 'MISSING'
  else
    log "could not read the slice state: $(tail -n 1 "$err_file")"
    printf 'UNKNOWN'
  fi
  rm -f "$err_file"
}

# Returns 0 if the trainer runs on every worker, 1 if one is dead, 2 if unknown.
trainer_alive() {
  local out rc=0
  build_ssh all "$(remote_alive_check)"
  out=$("${CMD[@]}" 2>&1) || rc=$?
  if [[ $out == *NPP_TRAIN_DEAD* ]]; then
    return 1
  elif [[ $rc == 0 && $out == *NPP_TRAIN_ALIVE* ]]; then
    return 0
  fi
  return 2
}

ATTEMPTS=0
FAILURES=0

# Counts one recovery attempt; gives up once the budget is spent.
next_attempt() {
  if ((ATTEMPTS >= MAX_ATTEMPTS)); then
    log "giving up: $ATTEMPTS attempts used (--max-attempts $MAX_ATTEMPTS) and the run is not done."
    exit 1
  fi
  ATTEMPTS=$((ATTEMPTS + 1))
}

# Sleeps after a failed attempt: BACKOFF_SECONDS doubled per consecutive failure.
backoff() {
  local delay=$BACKOFF_SECONDS i
  FAILURES=$((FAILURES + 1))
  for ((i = 1; i < FAILURES && delay < MAX_BACKOFF_SECONDS; i++)); do
    delay=$((delay * 2))
  done
  ((delay <= MAX_BACKOFF_SECONDS)) || delay=$MAX_BACKOFF_SECONDS
  log "attempt $ATTEMPTS failed; retrying in ${delay}s."
  sleep "$delay"
}

babysit_plan() {
  local restart_states="PREEMPTED, TERMINATED, STOPPED, FAILED or SUSPENDED"
  plan_note "babysit: one iteration of the loop (dry run, nothing is run)."
  if [[ -z $REPO_URL ]]; then
    plan_note "once, before the loop: pack the source."
    make_archive
  fi
  plan_note "1. stop if the run is complete (exit status 0 means WORKDIR/DONE exists);" \
    "then delete the slice unless --keep-when-done:"
  build_done_check; print_cmd "${CMD[@]}"
  build_delete; print_cmd "${CMD[@]}"
  plan_note "2. read the slice state:"
  build_describe_state; print_cmd "${CMD[@]}"
  plan_note "3. READY/ACTIVE: is the trainer alive on every worker?"
  build_ssh all "$(remote_alive_check)"; print_cmd "${CMD[@]}"
  plan_note "4. READY/ACTIVE but a trainer is not running: set up, then restart" \
    "(it resumes from the newest checkpoint):"
  do_setup 0
  do_train
  plan_note "5. $restart_states: delete and recreate (missing: create only); step 4 follows on a later iteration:"
  do_delete
  do_create
  plan_note "6. other states (CREATING, PROVISIONING, WAITING_FOR_RESOURCES, ...): wait." \
    "Then sleep; after a failed attempt back off ${BACKOFF_SECONDS}s doubling up to" \
    "${MAX_BACKOFF_SECONDS}s; give up after $MAX_ATTEMPTS attempts:"
  print_cmd sleep "$POLL_SECONDS"
}

babysit() {
  local state status unreachable=0
  if [[ $DRY_RUN == 1 ]]; then
    babysit_plan
    return 0
  fi
  log "babysitting '$NAME' in $ZONE for $WORKDIR (poll ${POLL_SECONDS}s, at most $MAX_ATTEMPTS attempts)."
  make_archive
  while true; do
    if run_is_done; then
      log "found $WORKDIR/DONE: the run is complete."
      if [[ $KEEP_WHEN_DONE == 0 ]]; then
        do_delete || log "could not delete '$NAME'; delete it by hand."
      fi
      return 0
    fi
    state=$(slice_state)
    case $state in
      READY|ACTIVE)
        status=0
        trainer_alive || status=$?
        if ((status == 0)); then
          FAILURES=0
          unreachable=0
          log "slice $state, trainer running on every worker."
          sleep "$POLL_SECONDS"
          continue
        elif ((status == 2 && unreachable < 2)); then
          unreachable=$((unreachable + 1))
          log "could not reach every worker; checking again in ${POLL_SECONDS}s."
          sleep "$POLL_SECONDS"
          continue
        fi
        unreachable=0
        if run_is_done; then
          continue
        fi
        next_attempt
        log "attempt $ATTEMPTS/$MAX_ATTEMPTS: slice $state but the trainer is not running everywhere;" \
          "setting up and restarting (it resumes from the newest checkpoint)."
        if do_setup 0 && do_train; then
          sleep "$POLL_SECONDS"
        else
          backoff
        fi
        ;;
      MISSING)
        next_attempt
        log "attempt $ATTEMPTS/$MAX_ATTEMPTS: slice '$NAME' does not exist; creating it."
        do_create || backoff
        ;;
      PREEMPTED|TERMINATED|STOPPED|FAILED|SUSPENDED)
        next_attempt
        log "attempt $ATTEMPTS/$MAX_ATTEMPTS: slice is $state; deleting and recreating it."
        { do_delete && do_create; } || backoff
        ;;
      *)
        log "slice is $state; waiting ${POLL_SECONDS}s."
        sleep "$POLL_SECONDS"
        ;;
    esac
  done
}

# --- Main ------------------------------------------------------------------------

main() {
  parse_args "$@"
  if [[ -z $COMMAND ]]; then
    usage >&2
    die "missing COMMAND (create, setup, train, babysit, status, logs, stop or delete)."
  fi
  case $COMMAND in
    create|setup|train|babysit|status|logs|stop|delete) ;;
    *) die "unknown command '$COMMAND' (see --help)." ;;
  esac
  validate_common
  case $COMMAND in
    create) validate_create; do_create ;;
    setup) validate_setup; do_setup 1 ;;
    train) validate_train; do_train ;;
    babysit)
      validate_create; validate_setup; validate_train; validate_babysit
      babysit ;;
    status) do_status ;;
    logs)
      require_uint "$WORKER" --worker
      require_uint "$LINES" --lines
      do_logs ;;
    stop) do_stop ;;
    delete) do_delete ;;
  esac
}

main "$@"
