"""The training loop in-process: a run stopped by SIGTERM and resumed equals an uninterrupted one step for step,
a non-finite loss stops the run and keeps the last good checkpoint, and a workdir of another model or other data is
refused."""

import json
import logging
import os
import pathlib
import signal

import jax
import numpy as np
import pytest

from npp_jax import sharding
from npp_jax.checkpoints import checkpoint
from npp_jax.checkpoints import integrity
from npp_jax.config import load_file as load_config_file
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import metrics as metrics_lib
from npp_jax.trainers import workdir as workdir_lib

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
TOTAL, STOP_AFTER, CHECKPOINT_EVERY = 40, 12, 15


def tiny_config(**train_overrides):
  config = load_config_file(str(TINY))
  config.train.update({"total_steps": TOTAL, "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY,
                       **train_overrides})
  config.data.num_images = 512
  return config


def single_device_mesh():
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


def logged(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def saved_steps(workdir) -> list[int]:
  mngr = checkpoint.manager(str(workdir), read_only=True)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def host(tree):
  """Host copies that own their memory (the next step donates the device buffers)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """(workdir, final params, {step: loss}) of the tiny run from 0 to TOTAL without a stop."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  state = gpt_trainer.run(tiny_config(), str(workdir), mesh=single_device_mesh())
  losses = {m["step"]: m["loss"] for m in logged(workdir)}
  return workdir, host(state["params"]), losses


def test_uninterrupted_run(uninterrupted):
  workdir, _, losses = uninterrupted
  assert sorted(losses) == list(range(1, TOTAL + 1))
  assert saved_steps(workdir) == [15, 30, 40]
  assert (workdir / workdir_lib.DONE_FILE).read_text().strip() == str(TOTAL)
  for step in (15, 30, TOTAL):  # every step, the final one included, got its integrity record
    assert integrity.verify(workdir / checkpoint.CHECKPOINT_DIR / str(step)) is None
  # The synthetic patterns are learnable: the loss falls well below log(vocab) = 4.16 in both stages.
  assert losses[20] < 3.5 and losses[TOTAL] < losses[21]
  stages = {m["step"]: m["patch_side"] for m in logged(workdir)}
  assert stages[20] == 2 and stages[21] == 1


def test_sigterm_then_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
  _, final_params, losses = uninterrupted
  workdir = tmp_path / "interrupted"
  write_scalars = metrics_lib.Writer.scalars

  def preempt_after_logging(self, step, values):
    write_scalars(self, step, values)
    if step == STOP_AFTER:
      os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the loop sees it at this step's boundary

  with monkeypatch.context() as patch:
    patch.setattr(metrics_lib.Writer, "scalars", preempt_after_logging)
    state = gpt_trainer.run(tiny_config(), str(workdir), mesh=single_device_mesh())
  assert int(state["step"]) == STOP_AFTER
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop gave the signal back
  assert saved_steps(workdir) == [STOP_AFTER]  # the SIGTERM save (not a periodic one)
  assert not (workdir / workdir_lib.DONE_FILE).exists()
  before = {m["step"]: m["loss"] for m in logged(workdir)}
  assert sorted(before) == list(range(1, STOP_AFTER + 1))

  state = gpt_trainer.run(tiny_config(), str(workdir), mesh=single_device_mesh())
  after = {m["step"]: m["loss"] for m in logged(workdir)}
  assert sorted(after) == list(range(1, TOTAL + 1))  # resumed at STOP_AFTER + 1, not from 0
  for step in range(1, TOTAL + 1):
    assert after[step] == pytest.approx(losses[step], abs=1e-6), step
  got = host(state["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got, final_params)
  assert saved_steps(workdir) == [15, 30, 40]  # keep_checkpoints=3
  assert (workdir / workdir_lib.DONE_FILE).exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_config(checkpoint_every=1, keep_checkpoints=2)
  config.optim.lr = 1e30
  saved = {}
  save = checkpoint.save

  def remember(mngr, step, state, meta):
    saved[step] = host(state["params"])
    save(mngr, step, state, meta)

  monkeypatch.setattr(checkpoint, "save", remember)
  message = r"non-finite (loss|grad_norm)=[-a-z]+(, grad_norm=[-a-z]+)? at step \d+; the last good checkpoint is kept"
  with pytest.raises(workdir_lib.NonFiniteLossError, match=message) as failure:
    gpt_trainer.run(config, str(tmp_path), mesh=single_device_mesh())
  bad_step = int(str(failure.value).split("at step ")[1].split(";")[0])
  good_step = bad_step - 1
  assert max(saved) == good_step and saved_steps(tmp_path)[-1] == good_step
  # The kept checkpoint is intact: it restores, and holds exactly the finite parameters saved at that step.
  setup = gpt_trainer.build(config, single_device_mesh(), config.data.num_images)
  mngr = checkpoint.manager(str(tmp_path), read_only=True)
  try:
    restored, meta = checkpoint.restore(mngr, good_step, setup.abstract_state)
  finally:
    mngr.close()
  assert int(restored["step"]) == meta["step"] == good_step
  params = host(restored["params"])
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
  jax.tree.map(np.testing.assert_array_equal, params, saved[good_step])


def test_a_checkpoint_between_log_steps_never_holds_non_finite_parameters(tmp_path):
  # lr=1e30: the gradient becomes NaN at step 3 while that step's loss is still finite; step 3 is a checkpoint
  # step but not a log step, so only the pre-save check stands between the NaN update and the disk.
  config = tiny_config(log_every=10, checkpoint_every=3)
  config.optim.lr = 1e30
  with pytest.raises(workdir_lib.NonFiniteLossError):
    gpt_trainer.run(config, str(tmp_path), mesh=single_device_mesh())
  setup = gpt_trainer.build(config, single_device_mesh(), config.data.num_images)
  mngr = checkpoint.manager(str(tmp_path), read_only=True)
  try:
    for step in mngr.all_steps():
      restored, _ = checkpoint.restore(mngr, step, setup.abstract_state)
      assert all(np.isfinite(p).all() for p in jax.tree.leaves(host(restored["params"]))), f"checkpoint {step}"
  finally:
    mngr.close()


def test_workdir_of_another_model_is_refused(uninterrupted):
  workdir, _, _ = uninterrupted
  config = tiny_config()
  config.model.dim = 32
  with pytest.raises(ValueError, match=r"holds a run with other settings \(model.dim differ\); use a new workdir"):
    gpt_trainer.run(config, str(workdir), mesh=single_device_mesh())


def test_workdir_trained_on_other_data_is_refused(uninterrupted):
  workdir, _, _ = uninterrupted
  config = tiny_config()
  config.data.num_images = 1024  # another synthetic data set (its fingerprint differs)
  with pytest.raises(ValueError, match="was trained on other data"):
    gpt_trainer.run(config, str(workdir), mesh=single_device_mesh())


class Killed(BaseException):
  """Stands for kill -9 at a chosen moment (BaseException: nothing in the trainer may swallow it)."""


def test_done_is_written_only_after_the_final_step_is_committed_and_recorded(tmp_path, monkeypatch, caplog):
  config = tiny_config(total_steps=6, checkpoint_every=3, log_every=2)
  config.npp.stages = ((1, 1.0),)  # one stage: one compilation
  write_record = integrity.write_record

  def killed_at(step):
    def write(step_dir, *args):
      if pathlib.Path(step_dir).name == str(step):
        raise Killed()
      return write_record(step_dir, *args)
    return write

  # Killed when step 3 has committed but before its record: the resume restores it unchecked, with a note, and
  # its first logged loss (step 4) says that it averages one step, not log_every=2.
  with monkeypatch.context() as patch, pytest.raises(Killed):
    patch.setattr(integrity, "write_record", killed_at(3))
    gpt_trainer.run(config, str(tmp_path), mesh=single_device_mesh())
  assert not (tmp_path / workdir_lib.DONE_FILE).exists() and saved_steps(tmp_path) == [3]
  caplog.set_level(logging.INFO)  # the trainer logs through absl
  caplog.clear()
  # Killed after the final step committed but before it was recorded and verified: still no DONE.
  with monkeypatch.context() as patch, pytest.raises(Killed):
    patch.setattr(integrity, "write_record", killed_at(6))
    gpt_trainer.run(config, str(tmp_path), mesh=single_device_mesh())
  out = caplog.text
  assert "has no integrity record" in out and "resumed from step 3" in out
  assert "step 4: the loss and grad_norm above average the 1 steps since the resume at step 3, not 2" in out
  assert saved_steps(tmp_path) == [3, 6] and not (tmp_path / workdir_lib.DONE_FILE).exists()
  # The next start finds the run complete: it restores step 6, trains nothing and writes DONE.
  gpt_trainer.run(config, str(tmp_path), mesh=single_device_mesh())
  assert (tmp_path / workdir_lib.DONE_FILE).read_text().strip() == "6"


def test_sigterm_during_start_up_saves_instead_of_killing(tmp_path, monkeypatch):
  """The handler is installed before anything slow: a SIGTERM while the tokenizer and data load is honoured at the
  first step boundary (before, the default action killed the process with -15)."""
  config = tiny_config(total_steps=6, checkpoint_every=6, log_every=2)
  config.npp.stages = ((1, 1.0),)
  load_tokenizer = gpt_trainer._load_tokenizer

  def signal_during_start_up(cfg):
    os.kill(os.getpid(), signal.SIGTERM)
    return load_tokenizer(cfg)

  monkeypatch.setattr(gpt_trainer, "_load_tokenizer", signal_during_start_up)
  state = gpt_trainer.run(config, str(tmp_path), mesh=single_device_mesh())
  assert int(state["step"]) == 1 and saved_steps(tmp_path) == [1]
  assert not (tmp_path / workdir_lib.DONE_FILE).exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_heldout_loss_is_the_next_token_loss_on_the_heldout_codes(tmp_path):
  from flax import nnx

  from npp_jax.models import gpt
  from test_pipeline import write_codes

  rng = np.random.default_rng(0)
  views = rng.integers(0, 64, (70, 2, 64)).astype(np.uint16)
  labels = rng.integers(0, 10, 70).tolist()
  heldout_dir = write_codes(tmp_path / "heldout", views, labels, vocab=64, grid=8, num_classes=10)
  config = tiny_config(total_steps=20, log_every=5)
  config.eval.heldout_every = 10
  config.data.update(heldout_codes_dir=str(heldout_dir), heldout_images=0)
  state = gpt_trainer.run(config, str(tmp_path / "run"), mesh=single_device_mesh())

  rows = [m for m in logged(tmp_path / "run") if "heldout_loss" in m]
  assert [m["step"] for m in rows] == [10, 20]
  # Independently: the final model's log-softmax at each position, scored against the next code, over the 64
  # images that fill two batches of 32 (view 0 of each, its own label), in float64.
  model = nnx.merge(nnx.graphdef(gpt.GPT(config.model, rngs=nnx.Rngs(0))), state["params"])
  tokens, classes = views[:64, 0].astype(np.int32), np.asarray(labels[:64], np.int32)
  logits = np.asarray(model(tokens, classes, patch_side=1, deterministic=True), np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)
  expected = -np.take_along_axis(log_probs, tokens[..., None], axis=-1).mean()
  assert rows[-1]["heldout_loss"] == pytest.approx(expected, rel=1e-5)
  assert rows[0]["heldout_loss"] != rows[-1]["heldout_loss"]


def test_heldout_loss_without_heldout_codes_is_refused_before_anything_is_written(tmp_path):
  config = tiny_config()
  config.eval.heldout_every = 10
  with pytest.raises(ValueError, match="eval.heldout_every=10 needs held-out codes"):
    gpt_trainer.run(config, str(tmp_path / "run"), mesh=single_device_mesh())
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_heldout_codes_of_a_split_are_prepared_once_into_the_workdir(tmp_path):
  """data.heldout_split: the source's test split through the config's tokenizer, into WORKDIR/codes_test, reused."""
  from npp_jax.config import load_file
  from npp_jax.data import prepare
  from test_sources import write_idx

  rng = np.random.default_rng(0)
  for prefix, n in (("train", 30), ("t10k", 20)):
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), 0x803,
              False)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), 0x801, False)
  config = load_file(str(TINY.with_name("fashion.py")))
  config.data.update(dir=str(tmp_path), heldout_split="test", encode_batch_size=20)
  config.eval.heldout_every = 5
  logs = []
  directory = prepare.heldout_codes_once(config, str(tmp_path / "run"), logs.append)
  assert directory == str(tmp_path / "run" / "codes_test")
  manifest = json.loads((tmp_path / "run" / "codes_test" / "manifest.json").read_text())
  assert manifest["num_images"] == 20 and manifest["source"]["split"] == "test"
  assert prepare.heldout_codes_once(config, str(tmp_path / "run"), logs.append) == directory
  assert len(logs) == 1  # prepared once, then reused
  config.data.update(heldout_codes_dir="elsewhere")
  assert prepare.heldout_codes_once(config, str(tmp_path / "run"), logs.append) == "elsewhere"
