"""The workdir life cycle the GPT and tokenizer trainers share: one trainer per workdir, DONE only after the final step
verifies, SIGTERM saves and leaves, and everything is let go on the way out (also after an error)."""

import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from npp_jax import errors
from npp_jax.checkpoints import checkpoint
from npp_jax.checkpoints import integrity
from npp_jax.checkpoints import workdir_lock
from npp_jax.trainers import workdir as workdir_lib


def config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": {"dim": 4}, "seed": 0})


def state_at(step: int) -> dict:
  return {"step": jnp.asarray(step, jnp.int32), "params": {"w": jnp.full((4,), float(step))}}


def abstract() -> dict:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state_at(0))


def trained(path, steps, *, fingerprint="data-a", total=None) -> tuple[int, int]:
  """A minimal trainer on the shared life cycle; returns (start step, last step)."""
  with workdir_lib.Run(str(path), lambda line: None) as run:
    run.open(config(), keep=5)
    state, start = run.restore_or_init(abstract(), fingerprint, lambda: state_at(0))
    for step in range(start + 1, steps + 1):
      run.save(step, state_at(step), {"step": step, "data": fingerprint})
    if total is not None:
      run.finish(total, restored_final=start == total)
  return start, steps


def done(path) -> pathlib.Path:
  return pathlib.Path(path) / workdir_lib.DONE_FILE


def test_one_trainer_per_workdir_and_the_lock_is_released_after_an_error(tmp_path):
  with workdir_lib.Run(str(tmp_path), lambda line: None):
    with pytest.raises(workdir_lock.WorkdirInUse):
      workdir_lib.Run(str(tmp_path), lambda line: None)
  with pytest.raises(RuntimeError, match="inside"):
    with workdir_lib.Run(str(tmp_path), lambda line: None):
      raise RuntimeError("inside")
  with workdir_lib.Run(str(tmp_path), lambda line: None):  # free again
    pass


def test_done_only_after_the_final_step_verifies(tmp_path):
  trained(tmp_path, 2)
  assert not done(tmp_path).exists()  # not finished: no stop sign
  assert trained(tmp_path, 3, total=3) == (2, 3)  # resumed at 2
  assert done(tmp_path).read_text().strip() == "3"


def test_no_done_for_a_final_step_that_is_damaged_or_unrecorded(tmp_path):
  trained(tmp_path, 2)
  step_dir = pathlib.Path(tmp_path) / checkpoint.CHECKPOINT_DIR / "2"
  (step_dir / integrity.record_name(0)).unlink()  # killed between the commit and the record
  with workdir_lib.Run(str(tmp_path), lambda line: None) as run:
    run.open(config(), keep=5)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be verified"):
      run.finish(2, restored_final=False)
  assert not done(tmp_path).exists()
  # A restart that restored the final step counts it as verified.
  assert trained(tmp_path, 2, total=2) == (2, 2)
  assert done(tmp_path).read_text().strip() == "2"


def test_sigterm_asks_to_save_and_leave_and_the_previous_handler_comes_back(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  with workdir_lib.Run(str(tmp_path), lambda line: None) as run:
    run.open(config(), keep=5)
    assert not run.stop_requested(1, log_every=10)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process lives on
    assert run.stop_requested(1, log_every=10)
    run.save(1, state_at(1), {"step": 1, "data": "data-a"})
    run.leave(1)
  assert signal.getsignal(signal.SIGTERM) is previous
  assert not done(tmp_path).exists()
  assert trained(tmp_path, 1)[0] == 1  # the saved step resumes


def test_a_workdir_of_other_data_or_settings_is_refused(tmp_path):
  trained(tmp_path, 1)
  with pytest.raises(errors.InvalidInput, match="trained on other data"):
    trained(tmp_path, 2, fingerprint="data-b")
  with workdir_lib.Run(str(tmp_path), lambda line: None) as run:
    other = config()
    other.model.dim = 8
    with pytest.raises(errors.InvalidInput, match=r"model.dim differ"):
      run.open(other, keep=5)


def test_a_non_finite_loss_is_a_user_error_that_names_the_step():
  workdir_lib.Run.check_finite({"loss": 1.0, "grad_norm": 2.0, "lr": float("nan")}, 3)  # lr is not checked
  with pytest.raises(workdir_lib.NonFiniteLossError, match="non-finite loss=nan at step 3") as failure:
    workdir_lib.Run.check_finite({"loss": float("nan")}, 3)
  assert isinstance(failure.value, errors.UserError)
