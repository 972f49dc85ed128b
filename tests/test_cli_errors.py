"""Every CLI ends a user or environment error with exit status 1 and one `error:` sentence that names the path and
the cause: broken config files, unknown keys, a workdir another trainer holds, an unwritable workdir, damaged
checkpoints, output paths that are files."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

from npp_jax import config as config_lib
from npp_jax import convert
from npp_jax import evaluate
from npp_jax import sample
from npp_jax import train_classifier
from npp_jax import train_tokenizer
from npp_jax.checkpoints import checkpoint
from npp_jax.checkpoints import workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def one_sentence(stderr: str, *fragments: str) -> str:
  """The error: exactly one `error:` line, the last one (log lines may come before it), and no traceback."""
  lines = stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert "Traceback" not in stderr and len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


@pytest.fixture
def broken_config(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(:\n")
  return path


def damaged_checkpoint(directory: pathlib.Path, params: dict) -> None:
  """A model directory whose only checkpoint has a flipped byte in its largest data file."""
  checkpoint.write_config(str(directory), config_lib.load_file(TINY))
  mngr = checkpoint.manager(str(directory))
  checkpoint.save(mngr, 1, {"params": params}, {"step": 1})
  checkpoint.finish(mngr)
  mngr.close()
  data = max((p for p in (directory / "checkpoints" / "1").rglob("*") if p.is_file() and "/d/" in str(p)),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 1
  data.write_bytes(bytes(raw))


# -- python -m npp_jax.main -----------------------------------------------------------------------------------


def test_main_a_second_trainer_is_refused(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path))  # this process is the first trainer
  try:
    result = run_module("npp_jax.main", "--config", TINY, "--workdir", str(tmp_path))
  finally:
    lock.close()
  assert result.returncode == 1
  one_sentence(result.stderr, f"{tmp_path} is in use by pid {os.getpid()} on ", " since 20")
  assert not (tmp_path / "config.json").exists()  # nothing was written


def test_main_a_broken_config_file(tmp_path, broken_config):
  result = run_module("npp_jax.main", "--config", str(broken_config), "--workdir", str(tmp_path / "w"))
  assert result.returncode == 1
  one_sentence(result.stderr, f"config file {broken_config} cannot be loaded: SyntaxError")


def test_main_an_unwritable_workdir(tmp_path):
  (tmp_path / "file").write_text("")
  result = run_module("npp_jax.main", "--config", TINY, "--workdir", str(tmp_path / "file" / "run"))
  assert result.returncode == 1
  one_sentence(result.stderr, f"cannot write to the workdir {tmp_path / 'file' / 'run'}: Not a directory")


def test_main_a_workdir_whose_only_checkpoint_is_damaged(tmp_path):
  damaged_checkpoint(tmp_path, {"w": jnp.arange(4096.0)})
  result = run_module("npp_jax.main", "--config", TINY, "--workdir", str(tmp_path), "--config.train.total_steps=2")
  assert result.returncode == 1
  one_sentence(result.stderr, f"no checkpoint in {tmp_path}/checkpoints could be restored", "1.corrupt-")
  assert "checkpoint step 1 is damaged" in result.stderr  # the log line that names the step and the reason
  assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints").iterdir()] == ["1"]  # moved aside, not deleted


# -- python -m npp_jax.prepare --------------------------------------------------------------------------------


def test_prepare_an_unknown_config_key_is_the_only_line(tmp_path):
  result = run_module("npp_jax.prepare", "--config", TINY, "--config.data.nope=1", "--out", str(tmp_path))
  assert result.returncode == 1
  one_sentence(result.stderr, "data.nope is not a field of the prepare config")  # and no INFO lines before it


# -- the CLIs with a main(argv) ---------------------------------------------------------------------------------


def test_sample_out_naming_a_file(tmp_path, capsys):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "vq.pt").write_bytes(b"")
  (tmp_path / "out").write_text("")
  assert sample.main(["sample", "--checkpoint", str(tmp_path / "ckpt"), "--vq", str(tmp_path / "vq.pt"), "--out",
                      str(tmp_path / "out"), "--num_images", "2", "--cfg_scale", "1"]) == 1
  one_sentence(capsys.readouterr().err, f"--out {tmp_path / 'out'} is a file")


def test_sample_a_damaged_checkpoint(tmp_path, capsys):
  damaged_checkpoint(tmp_path / "run", {"w": jnp.arange(4096.0)})
  (tmp_path / "vq.pt").write_bytes(b"")
  assert sample.main(["sample", "--checkpoint", str(tmp_path / "run"), "--vq", str(tmp_path / "vq.pt"), "--out",
                      str(tmp_path / "out"), "--num_images", "2", "--cfg_scale", "1"]) == 1
  one_sentence(capsys.readouterr().err, "checkpoint step 1 of", "is damaged", "differs from what was written")


def test_evaluate_samples_that_are_a_directory(tmp_path, capsys):
  assert evaluate.main(["evaluate", "--samples", str(tmp_path), "--ref", str(tmp_path / "ref.npz"), "--inception",
                        str(tmp_path / "inception.pth"), "--out", str(tmp_path / "r.json")]) == 1
  one_sentence(capsys.readouterr().err, str(tmp_path))


def test_convert_a_broken_config_and_an_empty_source(tmp_path, capsys, broken_config):
  src = tmp_path / "gpt.pt"
  src.write_bytes(b"")
  assert convert.main(["convert", "gpt", "--src", str(src), "--out", str(tmp_path / "o"), "--config",
                       str(broken_config)]) == 1
  one_sentence(capsys.readouterr().err, f"config file {broken_config} cannot be loaded")
  assert convert.main(["convert", "gpt", "--src", str(src), "--out", str(tmp_path / "o"), "--config", TINY]) == 1
  one_sentence(capsys.readouterr().err, str(src))


def test_train_tokenizer_a_second_trainer_and_a_broken_config(tmp_path, capsys, broken_config):
  assert train_tokenizer.main(["t", "--config", str(broken_config), "--workdir", str(tmp_path)]) == 1
  one_sentence(capsys.readouterr().err, "cannot be loaded: SyntaxError")
  lock = workdir_lock.acquire(str(tmp_path))
  try:
    assert train_tokenizer.main(["t", "--config", str(REPO / "configs" / "vq_fashion.py"), "--workdir",
                                 str(tmp_path)]) == 1
  finally:
    lock.close()
  one_sentence(capsys.readouterr().err, f"{tmp_path} is in use by pid {os.getpid()}")


def test_train_classifier_missing_data(tmp_path, capsys):
  assert train_classifier.main(["train_classifier", "--config", str(REPO / "configs" / "fashion_classifier.py"),
                                "--out", str(tmp_path / "c"), f"--config.data_dir={tmp_path / 'none'}"]) == 1
  one_sentence(capsys.readouterr().err, str(tmp_path / "none"))
