"""Launch scripts (launch/): the exact commands of their dry runs, their errors, and the TPU babysitter's loop.

Every script runs in a clean environment (no NAME/ZONE/... inherited). Dry-run output is one shell-quoted
command per line ('#' lines are notes), so each line is parsed back with shlex and compared as an argv list.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

import system_packages

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_vm.sh"
GPU_NODE = LAUNCH / "gpu_node.sh"
GPU_SLURM = LAUNCH / "gpu_slurm.sbatch"
XLA_GPU = "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"
TPU_BASE = ["--name", "npp-xl", "--zone", "us-east5-a"]

# Tools a dry run must never start.
TRAPPED_TOOLS = ("gcloud", "srun", "sbatch", "scontrol", "pip", "pip3", "uv", "git", "python3", "curl")


def _trap_bin(tmp_path: pathlib.Path) -> pathlib.Path:
  """A directory of stand-ins for the real tools, each recording its call into trap_calls.txt."""
  bin_dir = tmp_path / "trap_bin"
  if not bin_dir.exists():
    bin_dir.mkdir()
    calls = shlex.quote(str(tmp_path / "trap_calls.txt"))
    for tool in TRAPPED_TOOLS:
      path = bin_dir / tool
      path.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
      path.chmod(0o755)
  return bin_dir


def _run(script: pathlib.Path, *args: str, tmp_path: pathlib.Path, path_prefix: pathlib.Path | None = None,
         **env: str) -> subprocess.CompletedProcess:
  """Runs a script in a clean environment; by default the trapped tools come first on PATH."""
  prefix = _trap_bin(tmp_path) if path_prefix is None else path_prefix
  full_env = {"PATH": f"{prefix}:{os.environ['PATH']}", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), **env}
  return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60, env=full_env,
                        cwd=tmp_path, check=False)


def _commands(result: subprocess.CompletedProcess) -> list[list[str]]:
  """The dry run's commands as argv lists (notes dropped); fails on a non-zero exit."""
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line and not line.startswith("#")]


def _dry_result(script: pathlib.Path, *args: str, tmp_path: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
  """A dry run (--dry-run goes first: after `--` it would belong to the trainer); it must start no tool."""
  result = _run(script, "--dry-run", *args, tmp_path=tmp_path, **env)
  calls = tmp_path / "trap_calls.txt"
  assert not calls.exists(), calls.read_text()
  return result


def _dry(script: pathlib.Path, *args: str, tmp_path: pathlib.Path, **env: str) -> list[list[str]]:
  return _commands(_dry_result(script, *args, tmp_path=tmp_path, **env))


def _remote(cmd: list[str]) -> str:
  """The --command=... of a `gcloud compute tpus tpu-vm ssh` argv."""
  (value,) = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  return value


def _assert_shell_syntax(code: str) -> None:
  """The remote command parses in bash and in a POSIX sh (a worker's login shell may be either)."""
  for shell in ("bash", "sh"):
    if shutil.which(shell):
      result = subprocess.run([shell, "-n", "-c", code], capture_output=True, text=True, check=False)
      assert result.returncode == 0, (shell, result.stderr)


def _fail(script: pathlib.Path, *args: str, tmp_path: pathlib.Path) -> str:
  """Runs a dry run that must fail; returns its stderr."""
  result = _dry_result(script, *args, tmp_path=tmp_path)
  assert result.returncode != 0
  assert result.stdout == ""
  assert "Traceback" not in result.stderr
  return result.stderr


# --- tpu_vm.sh -------------------------------------------------------------------------------------------------


def test_tpu_create_spot_vm(tmp_path):
  cmds = _dry(TPU, "create", *TPU_BASE, "--accelerator", "v5p-64", "--spot", tmp_path=tmp_path)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "npp-xl", "--zone=us-east5-a",
                   "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]]


def test_tpu_create_queued_reserved_with_project_and_extra_flag(tmp_path):
  cmds = _dry(TPU, "create", *TPU_BASE, "--accelerator=v6e-16", "--queued", "--reserved", "--project", "my-proj",
              "--create-arg", "--network=my-net", tmp_path=tmp_path)
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "create", "npp-xl", "--zone=us-east5-a",
                   "--node-id=npp-xl", "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e",
                   "--reserved", "--network=my-net", "--project=my-proj"]]


@pytest.mark.parametrize("accelerator,runtime", [("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                 ("v4-32", "tpu-ubuntu2204-base")])
def test_tpu_runtime_follows_generation(tmp_path, accelerator, runtime):
  (cmd,) = _dry(TPU, "create", *TPU_BASE, "--accelerator", accelerator, tmp_path=tmp_path)
  assert f"--version={runtime}" in cmd
  assert "--spot" not in cmd and "--reserved" not in cmd


def test_tpu_options_come_from_the_environment(tmp_path):
  result = _dry_result(TPU, "create", tmp_path=tmp_path, NAME="env-tpu", ZONE="europe-west4-a",
                ACCELERATOR="v5p-8", RUNTIME_VERSION="v2-alpha-tpuv5-custom", CAPACITY="spot")
  assert _commands(result) == [["gcloud", "compute", "tpus", "tpu-vm", "create", "env-tpu", "--zone=europe-west4-a",
                                "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5-custom", "--spot"]]


def test_tpu_setup_ships_git_archive_to_all_workers(tmp_path):
  cmds = _dry(TPU, "setup", *TPU_BASE, tmp_path=tmp_path)
  tarball = f"{tmp_path}/npp-jax-src-npp-xl.tar.gz"
  assert cmds[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "npp-xl:npp-jax-src.tar.gz",
                     "--zone=us-east5-a", "--worker=all"]
  assert cmds[2][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "npp-xl", "--zone=us-east5-a", "--worker=all"]
  assert len(cmds) == 3
  remote = _remote(cmds[2])
  assert 'tar -xzf "$HOME"/npp-jax-src.tar.gz -C "$HOME"/npp-jax' in remote
  assert 'uv venv --quiet --allow-existing --python 3.11 "$HOME"/npp-venv' in remote
  assert remote.endswith('uv pip install --quiet --python "$HOME"/npp-venv/bin/python -e "$HOME"/npp-jax "jax[tpu]"')
  _assert_shell_syntax(remote)


def test_tpu_setup_from_repo_url_clones_the_ref(tmp_path):
  cmds = _dry(TPU, "setup", *TPU_BASE, "--repo-url", "https://github.com/me/npp-jax.git", "--ref", "v1.0",
              "--remote-venv", "/opt/venv", tmp_path=tmp_path)
  assert len(cmds) == 1 and "--worker=all" in cmds[0]
  remote = _remote(cmds[0])
  assert remote.startswith('rm -rf "$HOME"/npp-jax && git clone --quiet https://github.com/me/npp-jax.git '
                           '"$HOME"/npp-jax && git -C "$HOME"/npp-jax checkout --quiet v1.0 && ')
  assert "-e \"$HOME\"/npp-jax \"jax[tpu]\"" in remote and "--python /opt/venv/bin/python" in remote
  _assert_shell_syntax(remote)


def test_tpu_train_runs_main_on_all_workers_with_bucket_workdir(tmp_path):
  cmds = _dry(TPU, "train", *TPU_BASE, "--config", "configs/gpt_xl.py", "--bucket", "my-bucket", "--run", "xl-1",
              "--config.train.global_batch_size=512", "--", "--config.seed=3", tmp_path=tmp_path)
  assert len(cmds) == 1
  assert cmds[0][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "npp-xl", "--zone=us-east5-a", "--worker=all"]
  remote = _remote(cmds[0])
  assert ('nohup "$HOME"/npp-venv/bin/python -m npp_jax.main --config configs/gpt_xl.py --workdir gs://my-bucket/xl-1'
          ' --config.train.global_batch_size=512 --config.seed=3 >> "$HOME"/npp-logs/train-"$(hostname)".log 2>&1'
          ' < /dev/null & echo $! > "$HOME"/npp-train.pid') in remote
  assert remote.startswith('cd "$HOME"/npp-jax && mkdir -p "$HOME"/npp-logs && ')
  assert 'kill "$pid"' in remote  # a previous trainer is stopped first (SIGTERM: it saves)
  _assert_shell_syntax(remote)


def test_tpu_train_quotes_awkward_arguments(tmp_path):
  odd = "--config.note=it's a \"test\" $HOME"
  (cmd,) = _dry(TPU, "train", *TPU_BASE, "--config", "configs/gpt b.py", "--workdir", "gs://b/r", odd,
                tmp_path=tmp_path)
  words = shlex.split(_remote(cmd))  # how the worker's shell splits it
  i = words.index("npp_jax.main")
  assert words[i + 1:i + 6] == ["--config", "configs/gpt b.py", "--workdir", "gs://b/r", odd]


def test_tpu_train_needs_a_gs_workdir_and_a_config(tmp_path):
  err = _fail(TPU, "train", *TPU_BASE, "--config", "configs/gpt_xl.py", "--workdir", "/tmp/run", tmp_path=tmp_path)
  assert "--workdir must be a gs:// path" in err
  err = _fail(TPU, "train", *TPU_BASE, "--workdir", "gs://b/r", tmp_path=tmp_path)
  assert "missing --config" in err
  err = _fail(TPU, "train", *TPU_BASE, "--config", "c.py", tmp_path=tmp_path)
  assert "missing --workdir" in err


@pytest.mark.parametrize("args,message", [
    (["create", "--zone", "z", "--accelerator", "v5p-64"], "missing --name (or set $NAME)"),
    (["create", "--name", "n", "--accelerator", "v5p-64"], "missing --zone (or set $ZONE)"),
    (["create", "--name", "n", "--zone", "z"], "missing --accelerator"),
    (["create", "--name", "n", "--zone", "z", "--accelerator", "v5p-64", "--spot", "--reserved"],
     "--spot and --reserved exclude each other"),
    (["create", "--name", "n", "--zone", "z", "--accelerator", "tpu64"], "--accelerator must look like"),
    (["create", "--name", "n", "--zone", "z", "--accelerator", "v9x-8"],
     "no default runtime for 'v9x-8': pass --runtime-version"),
    (["create", "--name", "--zone", "z"], "option --name needs a value"),
    (["launch", "--name", "n", "--zone", "z"], "unknown command 'launch'"),
    (["status", "--name", "n", "--zone", "z", "--frobnicate"], "unknown option '--frobnicate'"),
    ([], "missing COMMAND"),
])
def test_tpu_bad_options_fail_with_one_clear_line(tmp_path, args, message):
  err = _fail(TPU, *args, tmp_path=tmp_path)
  assert f"tpu_vm.sh: error: {message}" in err


def test_tpu_status_delete_stop_logs(tmp_path):
  (status,) = _dry(TPU, "status", *TPU_BASE, tmp_path=tmp_path)
  assert status == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "npp-xl", "--zone=us-east5-a"]
  (delete,) = _dry(TPU, "delete", *TPU_BASE, "--queued", tmp_path=tmp_path)
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "npp-xl", "--zone=us-east5-a",
                    "--force", "--quiet"]
  (stop,) = _dry(TPU, "stop", *TPU_BASE, tmp_path=tmp_path)
  assert "--worker=all" in stop and 'kill "$pid"' in _remote(stop)
  _assert_shell_syntax(_remote(stop))
  (logs,) = _dry(TPU, "logs", *TPU_BASE, "--worker", "3", "--lines", "50", tmp_path=tmp_path)
  assert "--worker=3" in logs and _remote(logs) == 'tail -n 50 "$HOME"/npp-logs/train-*.log'


def test_tpu_babysit_dry_run_prints_one_iteration(tmp_path):
  result = _dry_result(TPU, "babysit", *TPU_BASE, "--accelerator", "v5p-64", "--spot", "--queued", "--config",
                       "configs/gpt_xl.py", "--workdir", "gs://b/xl/", "--poll-seconds", "120", tmp_path=tmp_path)
  cmds = _commands(result)
  heads = [" ".join(c[:5]) if c[0] == "gcloud" else c[0] for c in cmds]
  assert heads == [
      "git",  # the source is packed once
      "gcloud storage ls gs://b/xl/DONE",
      "gcloud compute tpus queued-resources delete",  # when DONE exists
      "gcloud compute tpus queued-resources describe",
      "gcloud compute tpus tpu-vm ssh",  # is the trainer alive?
      "gcloud compute tpus tpu-vm scp",  # setup ...
      "gcloud compute tpus tpu-vm ssh",
      "gcloud compute tpus tpu-vm ssh",  # ... and train
      "gcloud compute tpus queued-resources delete",  # preempted: delete and recreate
      "gcloud compute tpus queued-resources create",
      "sleep",
  ]
  assert "--format=value(state.state)" in cmds[3]
  assert "NPP_TRAIN_ALIVE" in _remote(cmds[4])
  assert "--workdir gs://b/xl " in _remote(cmds[7])
  assert cmds[9][-2:] == ["--runtime-version=v2-alpha-tpuv5", "--spot"]
  assert cmds[-1] == ["sleep", "120"]
  assert "# 1. stop if the run is complete" in result.stdout


def test_tpu_babysit_validates_everything_up_front(tmp_path):
  err = _fail(TPU, "babysit", *TPU_BASE, "--config", "c.py", "--workdir", "gs://b/r", tmp_path=tmp_path)
  assert "missing --accelerator" in err
  err = _fail(TPU, "babysit", *TPU_BASE, "--accelerator", "v5p-64", "--config", "c.py", "--workdir", "gs://b/r",
              "--poll-seconds", "soon", tmp_path=tmp_path)
  assert "--poll-seconds must be a non-negative integer" in err


# --- The remote snippets, run for real by a local POSIX sh in a scratch home -----------------------------------

FAKE_TRAINER = """#!/bin/sh
echo "trainer args: $*"
trap 'echo "trainer: SIGTERM, saved"; exit 0' TERM
while :; do sleep 0.1; done
"""


def _sh(code: str, home: pathlib.Path) -> subprocess.CompletedProcess:
  """Runs a remote snippet the way a worker's login shell would, with `home` as $HOME."""
  env = {"PATH": os.environ["PATH"], "HOME": str(home)}
  return subprocess.run(["sh", "-c", code], capture_output=True, text=True, timeout=30, env=env, cwd=home,
                        check=False)


def test_remote_train_alive_and_stop_snippets_work(tmp_path):
  home = tmp_path / "worker"
  (home / "npp-jax").mkdir(parents=True)
  (home / "npp-venv" / "bin").mkdir(parents=True)
  trainer = home / "npp-venv" / "bin" / "python"
  trainer.write_text(FAKE_TRAINER)
  trainer.chmod(0o755)
  plan = _dry(TPU, "babysit", *TPU_BASE, "--accelerator", "v5p-64", "--config", "configs/gpt_xl.py", "--workdir",
              "gs://b/xl", "--repo-url", "https://example.com/r.git", tmp_path=tmp_path)
  ssh = [_remote(c) for c in plan if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  alive, train = ssh[0], ssh[2]
  (stop,) = _dry(TPU, "stop", *TPU_BASE, tmp_path=tmp_path)
  stop = _remote(stop)
  pid_file = home / "npp-train.pid"
  try:
    assert _sh(alive, home).stdout.strip() == "NPP_TRAIN_DEAD"
    assert _sh(train, home).returncode == 0  # returns at once: the trainer is detached
    pid = int(pid_file.read_text())
    assert _sh(alive, home).stdout.strip() == "NPP_TRAIN_ALIVE"
    assert _sh(stop, home).returncode == 0
    assert not pid_file.exists()
    assert _sh(alive, home).stdout.strip() == "NPP_TRAIN_DEAD"
  finally:
    if pid_file.exists():
      os.kill(int(pid_file.read_text()), 15)
  (log,) = (home / "npp-logs").glob("train-*.log")
  text = log.read_text()
  assert "=== start " in text
  assert "trainer args: -m npp_jax.main --config configs/gpt_xl.py --workdir gs://b/xl" in text
  assert "trainer: SIGTERM, saved" in text  # stopped gracefully, not killed
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_remote_setup_snippet_unpacks_and_installs(tmp_path):
  home = tmp_path / "worker"
  src = tmp_path / "src"
  (home / ".local" / "bin").mkdir(parents=True)
  (src / "npp_jax").mkdir(parents=True)
  (src / "npp_jax" / "__init__.py").write_text("")
  subprocess.run(["tar", "-czf", str(home / "npp-jax-src.tar.gz"), "-C", str(src), "."], check=True)
  uv = home / ".local" / "bin" / "uv"
  uv.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(tmp_path / "uv_calls.txt"))}\n')
  uv.chmod(0o755)
  (home / "npp-jax").mkdir()
  (home / "npp-jax" / "stale.py").write_text("")  # an older copy is replaced, not merged
  cmds = _dry(TPU, "setup", *TPU_BASE, tmp_path=tmp_path)
  result = _sh(_remote(cmds[-1]), home)
  assert result.returncode == 0, result.stderr
  assert (home / "npp-jax" / "npp_jax" / "__init__.py").exists()
  assert not (home / "npp-jax" / "stale.py").exists()
  assert (tmp_path / "uv_calls.txt").read_text().splitlines() == [
      f"venv --quiet --allow-existing --python 3.11 {home}/npp-venv",
      f"pip install --quiet --python {home}/npp-venv/bin/python -e {home}/npp-jax jax[tpu]",
  ]


# --- The babysitter's real loop, against a fake gcloud ----------------------------------------------------------

FAKE_GCLOUD = """#!{python}
import json, os, pathlib, sys
box = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
args = sys.argv[1:]
with open(box / "calls.jsonl", "a") as f:
  f.write(json.dumps(args) + "\\n")
state_file = box / "state"
if args[:2] == ["storage", "ls"]:
  sys.exit(0 if (box / "done").exists() else 1)
verb = args[3]
if verb == "describe":
  state = state_file.read_text().strip()
  if state == "MISSING":
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'x' was not found")
  print(state)
elif verb == "delete":
  state_file.write_text("MISSING")
elif verb == "create":
  if (box / "no_capacity").exists():
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.create) no capacity")
  state_file.write_text("READY")
elif verb == "ssh":
  command = [a for a in args if a.startswith("--command=")][0]
  if "NPP_TRAIN_ALIVE" in command:
    if (box / "trainer").exists():
      print("NPP_TRAIN_ALIVE")
      (box / "done").touch()  # the run finishes while the babysitter sleeps
    else:
      print("NPP_TRAIN_DEAD")
  elif "npp_jax.main" in command:
    (box / "trainer").touch()
"""


@pytest.fixture
def fake_gcloud(tmp_path):
  box = tmp_path / "box"
  bin_dir = tmp_path / "bin"
  box.mkdir()
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  return box, bin_dir


def _calls(box: pathlib.Path) -> list[str]:
  """Each gcloud call, shortened to its verb ('storage ls', 'describe', 'ssh:alive', ...)."""
  out = []
  for line in (box / "calls.jsonl").read_text().splitlines():
    args = json.loads(line)
    if args[:2] == ["storage", "ls"]:
      out.append("ls")
    elif args[3] == "ssh":
      command = _remote(args)
      out.append("ssh:alive" if "NPP_TRAIN_ALIVE" in command else
                 "ssh:train" if "npp_jax.main" in command else "ssh:setup")
    else:
      out.append(args[3])
  return out


BABYSIT_ARGS = ("babysit", *TPU_BASE, "--accelerator", "v5p-64", "--spot", "--config", "configs/gpt_xl.py",
                "--workdir", "gs://b/xl", "--repo-url", "https://example.com/npp.git", "--poll-seconds", "0",
                "--backoff-seconds", "0")


def test_babysit_recreates_a_preempted_slice_and_stops_when_done(tmp_path, fake_gcloud):
  box, bin_dir = fake_gcloud
  (box / "state").write_text("PREEMPTED")
  result = _run(TPU, *BABYSIT_ARGS, tmp_path=tmp_path, path_prefix=bin_dir, FAKE_GCLOUD_DIR=str(box))
  assert result.returncode == 0, result.stderr
  assert _calls(box) == [
      "ls", "describe", "delete", "create",  # preempted: recreate
      "ls", "describe", "ssh:alive", "ls", "ssh:setup", "ssh:train",  # fresh slice: set up, start training
      "ls", "describe", "ssh:alive",  # training runs
      "ls", "delete",  # DONE: clean up
  ]
  assert "slice is PREEMPTED; deleting and recreating it" in result.stderr
  assert "the run is complete" in result.stderr


def test_babysit_gives_up_after_max_attempts(tmp_path, fake_gcloud):
  box, bin_dir = fake_gcloud
  (box / "state").write_text("FAILED")
  (box / "no_capacity").touch()
  result = _run(TPU, *BABYSIT_ARGS, "--max-attempts", "3", "--keep-when-done", tmp_path=tmp_path,
                path_prefix=bin_dir, FAKE_GCLOUD_DIR=str(box))
  assert result.returncode == 1
  assert _calls(box).count("create") == 3
  assert "giving up: 3 attempts used" in result.stderr


# --- gpu_node.sh -------------------------------------------------------------------------------------------------


def test_gpu_node_train(tmp_path):
  cmds = _dry(GPU_NODE, "train", "--config", "configs/gpt_b.py", "--workdir", "/data/runs/gpt_b", "--gpus", "8",
              "--config.train.global_batch_size=256", "--", "--dry_run", tmp_path=tmp_path)
  assert cmds == [["cd", str(REPO)],
                  ["env", XLA_GPU, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7",
                   f"{REPO}/.venv/bin/python", "-m", "npp_jax.main", "--config", "configs/gpt_b.py",
                   "--workdir", "/data/runs/gpt_b", "--config.train.global_batch_size=256", "--dry_run"]]


def test_gpu_node_train_keeps_user_xla_flags_after_the_defaults(tmp_path):
  cmds = _dry(GPU_NODE, "train", "--config", "c.py", "--workdir", "gs://b/r", "--mem-fraction", ".8",
              "--xla-flags", "--xla_dump_to=/tmp/d", "--venv", "/opt/v", tmp_path=tmp_path,
              XLA_FLAGS="--xla_gpu_deterministic_ops=true")
  env_words = cmds[1][:4]
  assert env_words == ["env", f"{XLA_GPU} --xla_gpu_deterministic_ops=true --xla_dump_to=/tmp/d",
                       "XLA_PYTHON_CLIENT_MEM_FRACTION=.8", "/opt/v/bin/python"]


def test_gpu_node_install(tmp_path):
  cmds = _dry(GPU_NODE, "install", "--base-python", "python3.11", tmp_path=tmp_path)
  venv = f"{REPO}/.venv"
  assert cmds == [["cd", str(REPO)],
                  ["python3.11", "-m", "venv", venv],
                  [f"{venv}/bin/python", "-m", "pip", "install", "--upgrade", "pip"],
                  [f"{venv}/bin/python", "-m", "pip", "install", "-e", ".", "jax[cuda12]"]]


@pytest.mark.parametrize("args,message", [
    (["train", "--workdir", "/w"], "missing --config (or set $CONFIG)"),
    (["train", "--config", "c.py"], "missing --workdir (or set $WORKDIR)"),
    (["train", "--config", "c.py", "--workdir", "/w", "--gpus", "0"], "--gpus must be at least 1"),
    (["train", "--config", "c.py", "--workdir", "/w", "--mem-fraction", "1.5"], "--mem-fraction must be a number"),
    ([], "missing COMMAND"),
])
def test_gpu_node_bad_options(tmp_path, args, message):
  assert f"gpu_node.sh: error: {message}" in _fail(GPU_NODE, *args, tmp_path=tmp_path)


# --- gpu_slurm.sbatch ------------------------------------------------------------------------------------------


def test_gpu_slurm_srun_line(tmp_path):
  result = _dry_result(GPU_SLURM, "--config", "configs/gpt_xxl.py", "--workdir", "/shared/runs/xxl/",
                       "--config.train.global_batch_size=1024", tmp_path=tmp_path)
  cmds = _commands(result)
  assert cmds == [["cd", str(REPO)],
                  ["srun", "--kill-on-bad-exit=1", "env", XLA_GPU, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                   f"{REPO}/.venv/bin/python", "-m", "npp_jax.main", "--config", "configs/gpt_xxl.py",
                   "--workdir", "/shared/runs/xxl", "--config.train.global_batch_size=1024"]]
  assert "scontrol requeue" in result.stdout  # the requeue step is described


def test_gpu_slurm_directives():
  directives = [line.split()[1] for line in GPU_SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
  for expected in ("--requeue", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=B:USR1@300",
                   "--open-mode=append"):
    assert expected in directives
  assert not any(d.startswith(("--gpus-per-task", "--gpu-bind")) for d in directives)


@pytest.mark.parametrize("args,message", [
    (["--workdir", "/shared/w"], "missing --config"),
    (["--config", "c.py"], "missing --workdir"),
    (["--config", "c.py", "--workdir", "runs/xxl"], "--workdir must be on storage every node sees"),
    (["--config", "c.py", "--workdir", "/w", "--gpus", "8"], "unknown argument '--gpus'"),
])
def test_gpu_slurm_bad_options(tmp_path, args, message):
  assert f"gpu_slurm.sbatch: error: {message}" in _fail(GPU_SLURM, *args, tmp_path=tmp_path)


def test_gpu_slurm_outside_a_job_refuses_to_run(tmp_path):
  venv = tmp_path / "venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").write_text("#!/bin/sh\nexit 0\n")
  (venv / "python").chmod(0o755)
  result = _run(GPU_SLURM, "--config", "c.py", "--workdir", "/w", "--venv", str(tmp_path / "venv"),
                tmp_path=tmp_path)
  assert result.returncode != 0 and "not inside a SLURM job" in result.stderr


FAKE_SRUN = """#!/bin/sh
echo "$*" >> {calls}
trap 'echo "got SIGTERM" >> {calls}; exit 0' TERM
[ -z "$SRUN_EXIT" ] || exit "$SRUN_EXIT"
while :; do sleep 0.1; done
"""


def _slurm_job(tmp_path: pathlib.Path, **env: str) -> tuple[subprocess.Popen, pathlib.Path, pathlib.Path]:
  """Starts gpu_slurm.sbatch as if SLURM ran it, with stand-ins for srun and scontrol."""
  bin_dir = tmp_path / "slurm_bin"
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True, exist_ok=True)
  bin_dir.mkdir(exist_ok=True)
  (venv / "bin" / "python").write_text("#!/bin/sh\n")
  srun_calls, scontrol_calls = tmp_path / "srun_calls.txt", tmp_path / "scontrol_calls.txt"
  (bin_dir / "srun").write_text(FAKE_SRUN.format(calls=shlex.quote(str(srun_calls))))
  (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(scontrol_calls))}\n')
  for path in [venv / "bin" / "python", bin_dir / "srun", bin_dir / "scontrol"]:
    path.chmod(0o755)
  full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_JOB_ID": "4242",
              "SLURM_SUBMIT_DIR": str(REPO), **env}
  job = subprocess.Popen(["bash", str(GPU_SLURM), "--config", "configs/gpt_xxl.py", "--workdir",
                          str(tmp_path / "run"), "--venv", str(venv)], env=full_env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return job, srun_calls, scontrol_calls


def test_gpu_slurm_time_limit_signal_saves_then_requeues(tmp_path):
  job, srun_calls, scontrol_calls = _slurm_job(tmp_path)
  try:
    for _ in range(200):  # until srun runs (then the traps are set a moment later)
      if srun_calls.exists():
        break
      time.sleep(0.05)
    time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=30)
  finally:
    job.kill()
  assert job.returncode == 0, err
  lines = srun_calls.read_text().splitlines()
  assert lines[0].startswith("--kill-on-bad-exit=1 env XLA_FLAGS=") and "-m npp_jax.main" in lines[0]
  assert lines[1] == "got SIGTERM"  # forwarded to the trainers before the requeue
  assert scontrol_calls.read_text() == "requeue 4242\n"
  assert "time limit near" in err


def test_gpu_slurm_crash_is_not_requeued_and_done_run_exits(tmp_path):
  job, srun_calls, scontrol_calls = _slurm_job(tmp_path, SRUN_EXIT="3")
  _, err = job.communicate(timeout=30)
  assert job.returncode == 3 and not scontrol_calls.exists(), err
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "DONE").write_text("100\n")
  srun_calls.unlink()
  job, srun_calls, scontrol_calls = _slurm_job(tmp_path)
  _, err = job.communicate(timeout=30)
  assert job.returncode == 0 and not srun_calls.exists()
  assert "the run is complete" in err


# --- All scripts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [TPU, GPU_NODE, GPU_SLURM], ids=lambda p: p.name)
def test_help(tmp_path, script):
  result = _run(script, "--help", tmp_path=tmp_path)
  assert result.returncode == 0 and result.stdout.startswith("Usage:")


@pytest.mark.parametrize("script,args", [
    (TPU, ["train", *TPU_BASE, "--config", "c.py", "--workdir", "gs://b/r"]),
    (GPU_NODE, ["train", "--config", "c.py", "--workdir", "/w"]),
    (GPU_SLURM, ["--config", "c.py", "--workdir", "/w"]),
], ids=["tpu", "gpu_node", "gpu_slurm"])
def test_dry_run_after_double_dash_is_refused(tmp_path, script, args):
  result = _run(script, *args, "--", "--config.seed=1", "--dry-run", tmp_path=tmp_path)
  assert result.returncode == 2 and "put it before --" in result.stderr
  assert not (tmp_path / "trap_calls.txt").exists()


def test_dry_runs_start_nothing(tmp_path):
  """With recording stand-ins for gcloud, srun, pip, git, ... first on PATH, no dry run calls any of them."""
  tpu_all = [*TPU_BASE, "--accelerator", "v5p-64", "--spot", "--config", "configs/gpt_xl.py", "--workdir",
             "gs://b/xl"]
  runs = [
      (TPU, ["create", *tpu_all]), (TPU, ["create", "--queued", *tpu_all]), (TPU, ["setup", *TPU_BASE]),
      (TPU, ["setup", *TPU_BASE, "--repo-url", "https://example.com/r.git"]), (TPU, ["train", *tpu_all]),
      (TPU, ["babysit", *tpu_all]), (TPU, ["babysit", "--queued", *tpu_all]), (TPU, ["status", *TPU_BASE]),
      (TPU, ["logs", *TPU_BASE]), (TPU, ["stop", *TPU_BASE]), (TPU, ["delete", *TPU_BASE]),
      (GPU_NODE, ["install"]), (GPU_NODE, ["train", "--config", "c.py", "--workdir", "/w"]),
      (GPU_SLURM, ["--config", "c.py", "--workdir", "/w"]),
  ]
  for script, args in runs:
    result = _dry_result(script, *args, tmp_path=tmp_path)
    assert result.returncode == 0, (script.name, args, result.stderr)
    assert result.stdout.strip(), (script.name, args)
  # The stand-ins do record a real (non-dry) call.
  assert _run(TPU, "status", *TPU_BASE, tmp_path=tmp_path).returncode == 0
  assert (tmp_path / "trap_calls.txt").read_text() == (
      "gcloud compute tpus tpu-vm describe npp-xl --zone=us-east5-a\n")


def test_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  system_packages.require("shellcheck", shellcheck is not None)
  files = sorted(str(p.relative_to(REPO)) for p in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
  assert "launch/common.sh" in files and len(files) == 4
  result = subprocess.run([shellcheck, *files], capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
