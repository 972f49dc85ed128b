"""Train-step throughput, and the wall-clock saving of an NPP schedule over next-token prediction.

  python bench/train_throughput.py --config configs/tiny.py [--config.model.dim=768
      --config.train.global_batch_size=8] [--steps 20] [--schedules '((2,0.5),(1,0.5))'
      --schedules '((4,0.25),(2,0.25),(1,0.5))'] [--total_steps 200] [--external 'python other_impl.py ...']

1. Steady state per patch side: steps/s, tokens/s and TFLOP/s per device (after compilation and warm-up).
2. For each schedule, the wall-clock of a full run of --total_steps steps (all steps compiled ahead of time, the
   same synthetic batches, so only the steps are timed) against plain next-token prediction over the same images,
   printed as a ratio; the paper claims ~0.6x.
3. --external: time another implementation's command in the same process tree, printed beside ours as a ratio.
4. --profile: where one next-token step's time goes (products, RNG and the other work of the forward and backward
   passes, and the optimizer update), from a profiler trace of the compiled step matched to its optimised HLO.
   Tracing adds overhead per operation: read the shares, not the milliseconds.

Not a test: it prints figures.
"""

from __future__ import annotations

import ast
import collections
import gzip
import json
import pathlib
import re
import subprocess
import tempfile
import sys
import time

import jax
import numpy as np
from absl import flags

from npp_jax import cli
from npp_jax import config_schema
from npp_jax import huge_pages
from npp_jax import npp
from npp_jax import sharding
from npp_jax.models import gpt
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import metrics as metrics_lib


def synthetic_batch(config, mesh, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  batch = config.train.global_batch_size
  local = {"tokens": rng.integers(0, config.model.vocab_size, (batch, config.model.block_size), dtype=np.int32),
           "labels": rng.integers(0, config.model.num_classes, (batch,), dtype=np.int32)}
  return sharding.global_batch(local, mesh)


def compiled_steps(setup: gpt_trainer.Setup) -> dict:
  return {s.patch_side: gpt_trainer.compile_train_step(setup, s.patch_side) for s in setup.stages}


def steady_state(config, mesh, steps: int, patch_sides: list[int]) -> dict[int, float]:
  """Seconds per step for each patch side."""
  config = config.copy_and_resolve_references()
  config.npp.stages = tuple((k, 1.0 / len(patch_sides)) for k in patch_sides)
  config.train.total_steps = max(len(patch_sides) * 10, 10)
  setup = gpt_trainer.build(config, mesh, config.train.global_batch_size)
  fns = compiled_steps(setup)
  state = gpt_trainer.fresh_state(setup)
  batch = synthetic_batch(config, mesh)
  grid = gpt.grid_side(config.model)
  seconds = {}
  for k in patch_sides:
    for _ in range(2):  # warm-up
      state, m = fns[k](state, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
      state, m = fns[k](state, batch)
    jax.block_until_ready(m)
    seconds[k] = (time.perf_counter() - start) / steps
    seq = npp.coarse_grid(grid, k) ** 2
    batch_size = config.train.global_batch_size
    flops = metrics_lib.train_flops_per_sequence(config.model, seq) * batch_size / seconds[k]
    print(f"patch side {k}: sequence {seq}, {1 / seconds[k]:.2f} steps/s, {batch_size * seq / seconds[k]:,.0f} "
          f"tokens/s, {batch_size / seconds[k]:,.1f} images/s, {flops / jax.device_count() / 1e12:.3f} "
          f"TFLOP/s per device", flush=True)
  return seconds


def full_schedule(config, mesh, stages, total_steps: int) -> float:
  """Wall-clock seconds of `total_steps` steps of a schedule, compilation excluded."""
  config = config.copy_and_resolve_references()
  config.npp.stages = stages
  config.train.total_steps = total_steps
  setup = gpt_trainer.build(config, mesh, config.train.global_batch_size)
  fns = compiled_steps(setup)
  state = gpt_trainer.fresh_state(setup)
  batches = [synthetic_batch(config, mesh, seed) for seed in range(4)]
  state, m = fns[setup.stages[0].patch_side](state, batches[0])  # first dispatch outside the clock
  jax.block_until_ready(m)
  start = time.perf_counter()
  for step in range(1, total_steps):
    state, m = fns[npp.stage_at(setup.stages, step).patch_side](state, batches[step % len(batches)])
  jax.block_until_ready(m)
  return (time.perf_counter() - start) * total_steps / (total_steps - 1)


def _category(hlo_line: str) -> str:
  """What an instruction of the compiled step does, from its kind and the JAX op that made it."""
  name = re.search(r'op_name="([^"]*)"', hlo_line)
  name = name.group(1) if name else ""
  product = "__ynn_fusion" in hlo_line or " dot(" in hlo_line or "dot_general" in name
  rng = any(word in name for word in ("_bernoulli", "_uniform", "threefry", "random_bits"))
  phase = "backward" if "transpose(jvp(" in name else "forward" if "jvp(" in name else ""
  if not phase:
    return "optimizer update and the rest"
  return f"{phase}: " + ("products" if product else "dropout RNG" if rng else "other (norms, softmax, copies, ...)")


def step_profile(config, mesh, patch_side: int = 1, steps: int = 5) -> None:
  """Prints the traced time of one step by category (see _category)."""
  config = config.copy_and_resolve_references()
  config.npp.stages = ((patch_side, 1.0),)
  config.train.total_steps = 10
  setup = gpt_trainer.build(config, mesh, config.train.global_batch_size)
  step = compiled_steps(setup)[patch_side]
  state, batch = gpt_trainer.fresh_state(setup), synthetic_batch(config, mesh)
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  lines = {m.group(1): line for line in step.as_text().splitlines()
           for m in [re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)] if m}
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    events = json.load(gzip.open(next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))))["traceEvents"]
  seconds = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event["name"] in lines:
      seconds[_category(lines[event["name"]])] += event.get("dur", 0) / 1e6 / steps
  total = sum(seconds.values())
  print(f"one step, patch side {patch_side}, traced: {total * 1e3:.1f} ms of operations", flush=True)
  for category, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
    print(f"  {category:45s} {value * 1e3:8.1f} ms  {value / total:6.1%}", flush=True)


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config(fv, argv, "Config file; --config.key=value overrides its fields.", config_schema.TRAINER,
                    default="configs/tiny.py")
  flags.DEFINE_integer("steps", 20, "Timed steps per patch side.", flag_values=fv)
  flags.DEFINE_integer("total_steps", 200, "Steps of each full schedule.", flag_values=fv)
  flags.DEFINE_multi_string("schedules", ["((2, 0.5), (1, 0.5))", "((4, 0.25), (2, 0.25), (1, 0.5))"],
                            "NPP schedules to time (repeatable).", flag_values=fv)
  flags.DEFINE_bool("skip_schedules", False, "Only the steady state per patch side.", flag_values=fv)
  flags.DEFINE_string("external", "", "A command to time beside our full next-token run.", flag_values=fv)
  flags.DEFINE_bool("profile", False, "Also print where a next-token step's time goes.", flag_values=fv)


def run(fv: flags.FlagValues) -> None:
  config = fv.config
  mesh = sharding.make_mesh(config.mesh.shape)
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}, "
        f"parameters {gpt.num_parameters(config.model):,}, batch {config.train.global_batch_size}, "
        f"dtype {config.model.dtype}", flush=True)
  schedules = [ast.literal_eval(s) for s in fv.schedules]
  sides = sorted({k for s in schedules for k, _ in s} | {1})
  steady_state(config, mesh, fv.steps, sides)
  if fv.profile:
    step_profile(config, mesh)
  if fv.skip_schedules:
    return
  baseline = full_schedule(config, mesh, ((1, 1.0),), fv.total_steps)
  print(f"next-token prediction, {fv.total_steps} steps: {baseline:.2f} s", flush=True)
  for stages in schedules:
    seconds = full_schedule(config, mesh, stages, fv.total_steps)
    fraction = npp.tokens_per_step_fraction(npp.make_stages(stages, fv.total_steps, gpt.grid_side(config.model)))
    print(f"NPP {stages}: {seconds:.2f} s, wall-clock ratio {seconds / baseline:.3f} "
          f"(input-token ratio {fraction:.3f})", flush=True)
  if fv.external:
    start = time.perf_counter()
    subprocess.run(fv.external, shell=True, check=True)
    external = time.perf_counter() - start
    print(f"external command: {external:.2f} s; ours (next-token, compiled steps only) {baseline:.2f} s; "
          f"ratio ours/external {baseline / external:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages(this_program=True)
  sys.exit(main())
