"""The training CLI as a user runs it (`python -m npp_jax.main`, in a subprocess): bad inputs end with one `error:`
line and a non-zero exit, SIGTERM saves and exits 0 and the run resumes from that step, a NaN stops the run, and
the dry run reports parameters and memory."""

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from npp_jax.checkpoints import checkpoint
from npp_jax.config import load_file as load_config_file
from npp_jax.models import gpt
from test_pipeline import labelled_views, write_codes

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tiny.py"


def cli_env(devices: int = 1) -> dict[str, str]:
  # One device unless a test needs a mesh; the cheapest backend optimisation level keeps compiles short.
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}


def run_cli(*args: str, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "npp_jax.main", *args], cwd=REPO, env=cli_env(devices),
                        capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
  """A non-zero exit whose stderr ends with exactly one `error: ...` line naming the problem, and no traceback."""
  assert result.returncode != 0, result.stdout + result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def tiny_parameters() -> int:
  """The tiny model's parameter count, from the built (abstract) model rather than the formula."""
  abstract = nnx.eval_shape(lambda: gpt.GPT(load_config_file(str(REPO / TINY)).model, rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# -- bad command lines and inputs -----------------------------------------------------------------------------


def test_unknown_config_key(tmp_path):
  result = run_cli("--config", TINY, "--workdir", str(tmp_path), "--config.nope=1")
  assert_one_line_error(result, "nope")
  assert not (tmp_path / "checkpoints").exists()


def test_missing_config_and_workdir(tmp_path):
  assert_one_line_error(run_cli("--workdir", str(tmp_path)), "--config is required")
  assert_one_line_error(run_cli("--config", TINY), "--workdir is required")


def test_missing_codes_directory(tmp_path):
  missing = tmp_path / "no_codes_here"
  result = run_cli("--config", TINY, "--workdir", str(tmp_path / "run"), "--config.data.kind=codes",
                   f"--config.data.codes_dir={missing}")
  assert_one_line_error(result, f"data.codes_dir='{missing}' does not exist")
  assert not (tmp_path / "run").exists()  # refused before the workdir is made


def test_codes_of_another_grid_and_vocabulary(tmp_path):
  # 4x4 codes of a 128-code vocabulary, for the tiny model's 8x8 grid and 64 codes.
  codes = write_codes(tmp_path / "codes", labelled_views(8), [0] * 8, vocab=128)
  result = run_cli("--config", TINY, "--workdir", str(tmp_path / "run"), "--config.data.kind=codes",
                   f"--config.data.codes_dir={codes}")
  assert_one_line_error(result, "do not fit the config", "vocabulary of 128 but the model has vocab_size=64",
                        "4x4 grid but the model's block_size is 64 (8x8)")


def test_code_id_outside_the_vocabulary(tmp_path):
  views = np.zeros((32, 1, 64), np.uint16)
  views[17, 0, 5] = 64  # the tiny model has 64 codes; the manifest does not say otherwise
  codes = write_codes(tmp_path / "codes", views, [i % 10 for i in range(32)], vocab=64, grid=8, num_classes=10)
  result = run_cli("--config", TINY, "--workdir", str(tmp_path / "run"), "--config.data.kind=codes",
                   f"--config.data.codes_dir={codes}")
  assert_one_line_error(result, "record 17", "holds code id 64, outside the model's vocabulary of 64")


def test_workdir_of_another_model(tmp_path):
  other = load_config_file(str(REPO / TINY))
  other.model.n_layer = 3
  checkpoint.write_config(str(tmp_path), other)
  result = run_cli("--config", TINY, "--workdir", str(tmp_path))
  assert_one_line_error(result, "holds a run with other settings (model.n_layer differ)")
  assert checkpoint.read_config(str(tmp_path)).model.n_layer == 3  # left as it was


def test_global_batch_that_does_not_split_over_the_mesh(tmp_path):
  result = run_cli("--config", TINY, "--workdir", str(tmp_path), "--config.train.global_batch_size=12", devices=8)
  assert_one_line_error(result, "micro-batch of 12 does not split over the 8 devices")


def test_non_finite_loss_exits_with_one_line(tmp_path):
  result = run_cli("--config", TINY, "--workdir", str(tmp_path), "--config.optim.lr=1e30",
                   "--config.train.total_steps=10", "--config.train.log_every=1")
  assert_one_line_error(result, "error: non-finite", "the last good checkpoint is kept")


# -- preemption ---------------------------------------------------------------------------------------------


def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config", TINY, "--workdir", str(workdir), "--config.train.total_steps=30",
          "--config.train.log_every=1", "--config.train.checkpoint_every=25"]
  with open(tmp_path / "stderr.txt", "w") as stderr:
    # Progress is absl logging on stderr ("I... gpt_trainer.py:NNN] [3/30] ..."); stdout would hold only results.
    proc = subprocess.Popen([sys.executable, "-m", "npp_jax.main", *args], cwd=REPO, env=cli_env(),
                            stdout=stderr, stderr=subprocess.PIPE, text=True)
    output = []
    deadline = time.time() + 300
    try:
      for line in proc.stderr:
        output.append(line)
        if "] [3/30]" in line:
          proc.send_signal(signal.SIGTERM)
        assert time.time() < deadline, "".join(output)
      assert proc.wait(timeout=120) == 0, "".join(output)
    finally:
      if proc.poll() is None:
        proc.kill()
  saved = [line for line in output if "] SIGTERM: saved step" in line]
  assert len(saved) == 1, "".join(output)
  stopped = int(re.search(r"SIGTERM: saved step (\d+)", saved[0]).group(1))
  assert 3 <= stopped < 25
  assert (workdir / "checkpoints" / str(stopped)).is_dir()
  assert not (workdir / "DONE").exists()

  resumed = run_cli(*args)
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from step {stopped}" in resumed.stderr
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 31))  # every step once: the resumed run went on from the saved step
  assert (workdir / "DONE").read_text().strip() == "30"


# -- dry run ------------------------------------------------------------------------------------------------


def _check_dry_run(result: subprocess.CompletedProcess, parameters: int, sides: list[tuple[int, int]]):
  assert result.returncode == 0, result.stderr
  assert f"parameters: {parameters:,}" in result.stdout.splitlines()
  for side, seq in sides:
    line = [text for text in result.stdout.splitlines() if text.startswith(f"patch side {side} (sequence {seq})")]
    assert len(line) == 1, result.stdout
    assert "TFLOPs per step" in line[0] and "per device: arguments" in line[0] and "total" in line[0]
    total_gib = float(line[0].split("total ")[1].split(" GiB")[0])
    assert total_gib > 0


def test_dry_run_reports_parameters_and_memory():
  parameters = tiny_parameters()
  assert parameters == 140_288
  _check_dry_run(run_cli("--config", TINY, "--dry_run"), parameters, [(2, 16), (1, 64)])


@pytest.mark.slow
def test_dry_run_of_gpt_b():
  """Compiles GPT-B's two stages from the abstract state (about a minute on a CPU)."""
  result = run_cli("--config", "configs/gpt_b.py", "--dry_run", timeout=900)
  _check_dry_run(result, 110_888_448, [(2, 64), (1, 256)])


def test_relative_workdir_checkpoints(tmp_path):
  """Orbax refuses relative paths; the trainer must resolve them (users type `--workdir runs/x`)."""
  relative = os.path.relpath(tmp_path / "run", REPO)
  result = run_cli("--config", TINY, "--workdir", relative, "--config.train.total_steps=4",
                   "--config.train.checkpoint_every=2", "--config.train.log_every=2")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
