"""The one CLI convention: every entry point answers --help with its flags, and a bad command line is one sentence."""

import importlib
import os
import re
import subprocess
import sys

import pytest

from npp_jax import cli
from npp_jax import errors

ENTRY_POINTS = {
    "main": ("--config", "--workdir", "--dry_run", "--num_processes"),
    "prepare": ("--config", "--out", "--process_index"),
    "sample": ("--config", "--checkpoint", "--vq", "--num_images", "--cfg_scale", "--top_k", "--batch_size"),
    "evaluate": ("--samples", "--ref", "--inception", "--batch_size", "--ref_stats", "--min_samples"),
    "convert": ("--config", "--src", "--out", "--key", "--checkpoint", "--raw"),
    "train_tokenizer": ("--config", "--workdir"),
    "train_classifier": ("--config", "--out"),
    "demo": ("--checkpoint", "--vq", "--host", "--port", "--max_images", "--dtype", "--api_port", "--rows",
             "--schedule", "--chunk", "--max_pending", "--[no]page"),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_lists_every_flag(name, capsys):
  module = importlib.import_module(f"npp_jax.{name}")
  assert module.main([name, "--help"]) == 0
  out = capsys.readouterr().out
  assert f"python -m npp_jax.{name}" in out
  for flag in ENTRY_POINTS[name]:
    assert flag in out, flag
  assert not re.search(r"--[a-z]+-[a-z]", out)  # One style: underscores, never dashes, inside a flag name.


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_a_bad_flag_is_one_sentence(name, capsys):
  module = importlib.import_module(f"npp_jax.{name}")
  argv = [name, "vq"] if name == "convert" else [name]
  assert module.main([*argv, "--no_such_flag=1"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "no_such_flag" in err and err.count("\n") == 1


def test_config_overrides_are_checked_against_the_config(capsys):
  main = importlib.import_module("npp_jax.main")
  assert main.main(["main", "--config", "configs/tiny.py", "--config.no_such_field=1", "--dry_run"]) == 1
  assert "no_such_field" in capsys.readouterr().err
  sample = importlib.import_module("npp_jax.sample")
  assert sample.main(["sample", "--checkpoint", "c", "--vq", "v", "--cfg_scale", "2", "--out", "o",
                      "--config.model.dim=8"]) == 1
  assert capsys.readouterr().err == "error: --config.model.dim overrides a field of --config FILE, which is not given\n"


def test_required_flags_are_named(capsys):
  evaluate = importlib.import_module("npp_jax.evaluate")
  assert evaluate.main(["evaluate", "--ref", "r.npz", "--inception", "w.pth"]) == 1
  assert capsys.readouterr().err == "error: --samples is required (see --help)\n"


def test_user_errors_only_become_one_sentence(capsys):
  def define(fv, argv):
    del fv, argv

  def fails_with(error):
    def body(fv):
      raise error
    return body

  assert cli.main(fails_with(FileNotFoundError("no such\nfile")), define, ["x"]) == 1
  assert capsys.readouterr().err == "error: no such file\n"
  assert cli.main(fails_with(errors.InvalidInput("--x must be\npositive")), define, ["x"]) == 1
  assert capsys.readouterr().err == "error: --x must be positive\n"
  with pytest.raises(KeyError):  # A bug keeps its traceback.
    cli.main(fails_with(KeyError("bug")), define, ["x"])
  with pytest.raises(ValueError, match="not a user's"):  # So does a ValueError that is not a UserError.
    cli.main(fails_with(ValueError("not a user's")), define, ["x"])


INTERNAL_ERROR = """
import sys
import jax
import jax.numpy as jnp
from npp_jax import cli, errors

@jax.jit
def step(x):
  if x.shape[0] == 2:
    raise ValueError("an internal check failed while tracing")  # a bug, as jax, numpy or our code would raise it
  return x

def body(fv):
  if sys.argv[1] == "user":
    raise errors.InvalidInput("--steps must be positive, got 0")
  step(jnp.ones(2))

sys.exit(cli.main(body, lambda fv, argv: None, sys.argv[:1]))
"""


@pytest.mark.parametrize("kind", ["internal", "user"])
def test_an_internal_value_error_from_a_jitted_function_keeps_its_traceback(kind):
  proc = subprocess.run([sys.executable, "-c", INTERNAL_ERROR, kind], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1, proc.stderr
  if kind == "internal":
    assert "Traceback (most recent call last)" in proc.stderr and "in step" in proc.stderr, proc.stderr
    assert "\nValueError: an internal check failed while tracing\n" in proc.stderr, proc.stderr
    assert not proc.stderr.startswith("error: ")
  else:
    assert proc.stderr == "error: --steps must be positive, got 0\n"


def test_help_as_a_user_runs_it():
  proc = subprocess.run([sys.executable, "-m", "npp_jax.sample", "--help"], capture_output=True, text=True,
                        timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": ""}, cwd=str(cli.__file__).rsplit("/", 2)[0])
  assert proc.returncode == 0, proc.stderr
  assert "--num_images" in proc.stdout
