"""One-GPU check: train MFU per size and remat choice at the largest batch that fits (beside the dry run's roofline
prediction of the same step on this chip, so the first run tests the model), sampling images/s with guidance, and
the NPP/NTP wall-clock ratio at GPT-B. Run through bench/gpu_check.sh (one command, <= 8 minutes).

  python bench/gpu_check.py [--sizes B,L,XL] [--remat none,full] [--budget_s 450] [--dry_run]

--dry_run shrinks every model to 2 layers at a small width and batches to a few sequences, so the whole script
runs on a CPU in a minute or two: it checks the code paths, not the speed. Figures go to stdout, one line each,
and a JSON summary last. bf16 compute, float32 parameters and optimizer state, random weights and codes.
Anchor for sampling: LlamaGen on one A100 at 256 px, about 118 / 47 / 24 images/s for B / L / XL at its largest
batch (as reported in the NAR paper).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from npp_jax import cli
from npp_jax import config as config_lib
from npp_jax import npp
from npp_jax import sharding
from npp_jax.models import gpt
from npp_jax.sampling import decoding
from npp_jax.trainers import chips
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import metrics as metrics_lib
from npp_jax.trainers import roofline

TRAIN_BATCHES = (256, 128, 64, 32, 16)  # tried largest first; the first that compiles and runs is reported
SAMPLE_BATCHES = (64, 256)


def size_config(size: str, dry_run: bool):
  config = config_lib.base_config()
  config.model = config_lib.model_config(size)
  config.model.dtype = "bfloat16"
  if dry_run:
    config.model.update(n_layer=2, dim=128, n_head=4, vocab_size=512, num_classes=10, block_size=64)
  config.optim.warmup_steps = 0
  return config


def _is_out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def compiled_state(config, patch_sides: list[int]):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  config.npp.stages = tuple((k, 1.0 / len(patch_sides)) for k in patch_sides)
  config.train.total_steps = 1000
  setup = gpt_trainer.build(config, mesh, config.train.global_batch_size)
  state = gpt_trainer.fresh_state(setup)
  steps = {s.patch_side: gpt_trainer.compile_train_step(setup, s.patch_side) for s in setup.stages}
  rng = np.random.default_rng(0)
  batch = config.train.global_batch_size
  local = {"tokens": rng.integers(0, config.model.vocab_size, (batch, config.model.block_size), np.int32),
           "labels": rng.integers(0, config.model.num_classes, (batch,), np.int32)}
  return steps, state, sharding.global_batch(local, mesh)


def train_mfu(size: str, remat: str, dry_run: bool, steps: int) -> dict:
  for batch in (TRAIN_BATCHES if not dry_run else (4, 2)):
    config = size_config(size, dry_run)
    config.model.remat = remat
    config.train.global_batch_size = batch
    try:
      fns, state, data = compiled_state(config, [1])
      state, m = fns[1](state, data)
      jax.block_until_ready(m)
      start = time.perf_counter()
      for _ in range(steps):
        state, m = fns[1](state, data)
      jax.block_until_ready(m)
    except Exception as e:  # pylint: disable=broad-except
      if _is_out_of_memory(e):
        continue
      raise
    seconds = (time.perf_counter() - start) / steps
    flops = metrics_lib.train_flops_per_sequence(config.model, config.model.block_size) * batch / seconds
    peak = metrics_lib.peak_flops(jax.devices()[0])
    return {"size": size, "remat": remat, "batch": batch, "step_s": seconds, "tflops": flops / 1e12,
            "mfu": flops / peak if peak else None, **predicted(config, fns[1], seconds)}
  return {"size": size, "remat": remat, "batch": None, "note": "no batch fits"}


def predicted(config, compiled, measured_s: float) -> dict:
  """The dry run's roofline prediction of this step on this chip, beside the measurement (None off the chip
  table, e.g. on a CPU)."""
  chip = chips.chip(jax.devices()[0].device_kind)
  if chip is None:
    return {"predicted_step_s": None}
  _, cost = roofline.estimate(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), 1, compiled)
  prediction = roofline.predict_on_chip(cost, chip)
  return {"predicted_step_s": prediction.step_s, "predicted_bound": prediction.bound,
          "predicted_mfu": prediction.mfu, "measured_over_predicted": measured_s / prediction.step_s}


def sampling_speed(size: str, batch: int, dry_run: bool) -> dict:
  config = size_config(size, dry_run)
  model = gpt.GPT(config.model, rngs=nnx.Rngs(0))
  model.output[...] = np.random.default_rng(0).normal(0, 0.02, model.output.shape).astype(np.float32)
  sampler = decoding.Sampler(model, dtype="bfloat16", devices=jax.devices()[:1])
  labels = np.arange(batch) % config.model.num_classes
  settings = decoding.SamplingSettings(cfg_scale=2.0)
  sampler(labels, jax.random.key(0), settings).block_until_ready()
  start = time.perf_counter()
  sampler(labels, jax.random.key(1), settings).block_until_ready()
  seconds = time.perf_counter() - start
  return {"size": size, "batch": batch, "images_per_s": batch / seconds}


def schedule_ratio(dry_run: bool, total_steps: int) -> dict:
  """Wall-clock of NPP's two-stage schedule over that of next-token prediction, GPT-B, same images."""
  config = size_config("B", dry_run)
  config.model.remat = "full"
  config.train.global_batch_size = 64 if not dry_run else 4
  fns, state, data = compiled_state(config, [2, 1])
  seconds = {}
  for name, stages in (("ntp", ((1, 1.0),)), ("npp", ((2, 0.5), (1, 0.5)))):
    plan = npp.make_stages(stages, total_steps, gpt.grid_side(config.model))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for step in range(total_steps):
      state, m = fns[npp.stage_at(plan, step).patch_side](state, data)
    jax.block_until_ready(m)
    seconds[name] = time.perf_counter() - start
  return {"ntp_s": seconds["ntp"], "npp_s": seconds["npp"], "ratio": seconds["npp"] / seconds["ntp"]}


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_list("sizes", ["B", "L", "XL"], "GPT sizes.", flag_values=fv)
  flags.DEFINE_list("remat", ["none", "full"], "Remat choices to train with.", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "Timed train steps per measurement.", flag_values=fv)
  flags.DEFINE_integer("schedule_steps", 20, "Steps of each schedule in the NPP/NTP ratio.", flag_values=fv)
  flags.DEFINE_float("budget_s", 450, "Skip what remains once this much time has gone.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Tiny models: check the script on a CPU.", flag_values=fv)


def run(fv: flags.FlagValues) -> None:
  started = time.monotonic()
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  summary = {"train": [], "sampling": [], "schedule": None}

  def in_budget(what: str) -> bool:
    if time.monotonic() - started < fv.budget_s:
      return True
    print(f"skipped (over the {fv.budget_s:.0f} s budget): {what}", flush=True)
    return False

  for size in fv.sizes:
    for remat in fv.remat:
      if in_budget(f"train {size} remat={remat}"):
        row = train_mfu(size, remat, fv.dry_run, fv.steps)
        summary["train"].append(row)
        print("train", json.dumps(row), flush=True)
  for size in fv.sizes:
    for batch in (SAMPLE_BATCHES if not fv.dry_run else (2,)):
      if in_budget(f"sampling {size} batch {batch}"):
        row = sampling_speed(size, batch, fv.dry_run)
        summary["sampling"].append(row)
        print("sampling", json.dumps(row), flush=True)
  if in_budget("NPP/NTP schedule ratio"):
    summary["schedule"] = schedule_ratio(fv.dry_run, fv.schedule_steps)
    print("schedule", json.dumps(summary["schedule"]), flush=True)
  print(json.dumps(summary))


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
