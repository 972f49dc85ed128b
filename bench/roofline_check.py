"""How far the dry run's roofline model (npp_jax/trainers/roofline.py) is from a measured step, on this machine.

  python bench/roofline_check.py [--widths tiny,B] [--steps 10] [--batch 8] [--layers 2]

1. Measures this CPU's rates the way the chip table states a chip's: the FLOP/s of a large matrix product in the
   model's compute dtype (float32 accumulation), and the bytes/s of a large elementwise pass (read + write).
2. For each width (tiny: configs/tiny.py; B: GPT-B's width, heads and vocabulary at --layers layers and --batch
   sequences), compiles the next-token train step on one device, predicts its time from the compiled FLOPs and
   memory bytes at those rates, then times it (after two warm-up steps) and prints measured / predicted.

The model is a lower bound on the step time: a ratio above 1 is how far real steps fall short of peak rates (and
of overlapping memory traffic with compute). Not a test: it prints figures; run it on a quiet machine.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from npp_jax import cli
from npp_jax import huge_pages
from npp_jax import config as config_lib
from npp_jax import sharding
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import roofline

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _seconds(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def gemm_rate(dtype: str, n: int = 2048) -> float:
  """FLOP/s of an n x n x n product in `dtype` with float32 accumulation (what the model's products do)."""
  a = jnp.ones((n, n), dtype)
  product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  return 2 * n**3 / _seconds(product, a, a)


def copy_bandwidth(megabytes: int = 256) -> float:
  """Bytes/s of one elementwise pass over a large float32 array (each element read once and written once)."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  return 2 * x.nbytes / _seconds(jax.jit(lambda v: v * 1.5 + 1.0), x)


def width_config(width: str, batch: int, layers: int):
  if width == "tiny":
    config = config_lib.load_file(str(TINY))
  else:
    config = config_lib.base_config()
    config.model = config_lib.model_config(width)
    config.model.n_layer = layers
  config.train.global_batch_size = batch
  config.npp.stages = ((1, 1.0),)
  config.train.total_steps = 100
  config.optim.warmup_steps = 0
  return config


def check(width: str, batch: int, layers: int, steps: int) -> dict:
  config = width_config(width, batch, layers)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  setup = gpt_trainer.build(config, mesh, config.train.global_batch_size)
  step = gpt_trainer.compile_train_step(setup, 1)
  _, cost = roofline.estimate(config, mesh, 1, step)
  peak, bandwidth = gemm_rate(config.model.dtype), copy_bandwidth()
  prediction = roofline.predict(cost, peak, bandwidth, None)

  state = gpt_trainer.fresh_state(setup)
  rng = np.random.default_rng(0)
  local = {"tokens": rng.integers(0, config.model.vocab_size, (batch, config.model.block_size), np.int32),
           "labels": rng.integers(0, config.model.num_classes, (batch,), np.int32)}
  data = sharding.global_batch(local, mesh)
  for _ in range(2):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  measured = (time.perf_counter() - start) / steps
  row = {"width": width, "dim": config.model.dim, "layers": config.model.n_layer, "batch": batch,
         "dtype": config.model.dtype, "gemm_tflops": peak / 1e12, "copy_gbs": bandwidth / 1e9,
         "compiled_gflops": cost.flops / 1e9, "hbm_gib": cost.hbm_bytes / 2**30,
         "predicted_ms": prediction.step_s * 1e3, "bound": prediction.bound, "measured_ms": measured * 1e3,
         "measured_over_predicted": measured / prediction.step_s}
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
  return row


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  flags.DEFINE_list("widths", ["tiny", "B"], "tiny and/or GPT sizes (B, L, ...) at --layers layers", flag_values=fv)
  flags.DEFINE_integer("steps", 10, "timed steps per width", flag_values=fv)
  flags.DEFINE_integer("batch", 8, "sequences per step", flag_values=fv)
  flags.DEFINE_integer("layers", 2, "layers of the GPT-size widths", flag_values=fv)


def run(fv: flags.FlagValues) -> None:
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  for width in fv.widths:
    check(width, fv.batch, fv.layers, fv.steps)


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages(this_program=True)
  sys.exit(main())
