"""Train-step throughput, and the wall-clock saving of an NPP schedule over next-token prediction.

  python bench/train_throughput.py --config configs/tiny.py [--set model.dim=768 --set train.global_batch_size=8]
      [--steps 20] [--schedules '((2,0.5),(1,0.5))' '((4,0.25),(2,0.25),(1,0.5))'] [--total_steps 200]
      [--external 'python other_impl.py ...']

1. Steady state per patch side: steps/s, tokens/s and TFLOP/s per device (after compilation and warm-up).
2. For each schedule, the wall-clock of a full run of --total_steps steps (all steps compiled ahead of time, the
   same synthetic batches, so only the steps are timed) against plain next-token prediction over the same images,
   printed as a ratio; the paper claims ~0.6x.
3. --external: time another implementation's command in the same process tree, printed beside ours as a ratio.

Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import subprocess
import time

import jax
import numpy as np

from npp_jax import metrics as metrics_lib
from npp_jax import npp
from npp_jax import sharding
from npp_jax import train
from npp_jax.models import gpt


def load_config(path: str, overrides: list[str]):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(ast.literal_eval(value)) if not isinstance(node[leaf], str) else value
  return config


def synthetic_batch(config, mesh, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  batch = config.train.global_batch_size
  local = {"tokens": rng.integers(0, config.model.vocab_size, (batch, config.model.block_size), dtype=np.int32),
           "labels": rng.integers(0, config.model.num_classes, (batch,), dtype=np.int32)}
  return sharding.global_batch(local, mesh)


def compiled_steps(setup: train.Setup) -> dict:
  abstract_batch = train.abstract_batch(setup)
  return {s.patch_side: train.make_train_step(setup, s.patch_side).lower(setup.abstract_state, abstract_batch)
          .compile() for s in setup.stages}


def steady_state(config, mesh, steps: int, patch_sides: list[int]) -> dict[int, float]:
  """Seconds per step for each patch side."""
  config = config.copy_and_resolve_references()
  config.npp.stages = tuple((k, 1.0 / len(patch_sides)) for k in patch_sides)
  config.train.total_steps = max(len(patch_sides) * 10, 10)
  setup = train.build(config, mesh, config.train.global_batch_size)
  fns = compiled_steps(setup)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
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
  setup = train.build(config, mesh, config.train.global_batch_size)
  fns = compiled_steps(setup)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
  batches = [synthetic_batch(config, mesh, seed) for seed in range(4)]
  state, m = fns[setup.stages[0].patch_side](state, batches[0])  # first dispatch outside the clock
  jax.block_until_ready(m)
  start = time.perf_counter()
  for step in range(1, total_steps):
    state, m = fns[npp.stage_at(setup.stages, step).patch_side](state, batches[step % len(batches)])
  jax.block_until_ready(m)
  return (time.perf_counter() - start) * total_steps / (total_steps - 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per patch side")
  parser.add_argument("--total_steps", type=int, default=200, help="steps of each full schedule")
  parser.add_argument("--schedules", nargs="*", default=["((2, 0.5), (1, 0.5))", "((4, 0.25), (2, 0.25), (1, 0.5))"])
  parser.add_argument("--skip_schedules", action="store_true")
  parser.add_argument("--external", default="", help="a command to time beside our full next-token run")
  args = parser.parse_args()

  config = load_config(args.config, args.set)
  mesh = sharding.make_mesh(config.mesh.shape)
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}, "
        f"parameters {gpt.num_parameters(config.model):,}, batch {config.train.global_batch_size}, "
        f"dtype {config.model.dtype}", flush=True)
  schedules = [ast.literal_eval(s) for s in args.schedules]
  sides = sorted({k for s in schedules for k, _ in s} | {1})
  steady_state(config, mesh, args.steps, sides)
  if args.skip_schedules:
    return
  baseline = full_schedule(config, mesh, ((1, 1.0),), args.total_steps)
  print(f"next-token prediction, {args.total_steps} steps: {baseline:.2f} s", flush=True)
  for stages in schedules:
    seconds = full_schedule(config, mesh, stages, args.total_steps)
    fraction = npp.tokens_per_step_fraction(npp.make_stages(stages, args.total_steps, gpt.grid_side(config.model)))
    print(f"NPP {stages}: {seconds:.2f} s, wall-clock ratio {seconds / baseline:.3f} "
          f"(input-token ratio {fraction:.3f})", flush=True)
  if args.external:
    start = time.perf_counter()
    subprocess.run(args.external, shell=True, check=True)
    external = time.perf_counter() - start
    print(f"external command: {external:.2f} s; ours (next-token, compiled steps only) {baseline:.2f} s; "
          f"ratio ours/external {baseline / external:.3f}", flush=True)


if __name__ == "__main__":
  main()
