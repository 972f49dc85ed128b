"""Sampling throughput: the jitted decode loop of `npp_jax.sampling` against per-token Python loops, in one run.

  python bench/sample_throughput.py [--batch 16] [--cfg_scale 2.0] [--dtype float32] [--b_layers 2]

For each model it prints images/s and tokens/s of
  - `generate`: the whole sampler (prefill + block_size-1 steps in one jitted lax.scan, guidance batched),
  - `jit-step loop`: a Python loop over a jitted single decode step (the usual first attempt),
  - `eager loop`: a Python loop calling model.decode op by op, nothing jitted,
and the speed-up of `generate` over each. Models: the fixture-size GPT (2 layers, dim 128, 8x8 codes, vocab 512) and a
GPT-B-width model (dim 768, 12 heads, 16x16 codes, vocab 16384) with --b_layers layers (GPT-B has 12; fewer keep
the eager baseline affordable on a CPU). Weights are random; speed does not depend on them. Compilation is excluded
(one warm-up call each, none for the eager loop, whose per-step cost includes re-tracing and compiling the layer
scan on every call). The eager loop makes only --eager_tokens tokens and is scaled to a whole image: with a static
KV cache every step costs the same. The first sample's tokens are compared between the three paths as a sanity check.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from npp_jax import cli
from npp_jax import huge_pages
from npp_jax import config as config_lib
from npp_jax.models.gpt import GPT
from npp_jax.sampling import decoding


def make_model(name: str, layers: int, dtype: str) -> GPT:
  cfg = config_lib.model_config("B")
  if name == "fixture":
    cfg.update(dim=128, n_layer=2, n_head=4, vocab_size=512, num_classes=10, block_size=64)
  else:
    cfg.update(n_layer=layers)
  cfg.dtype = dtype
  model = GPT(cfg, rngs=nnx.Rngs(0))
  model.output[...] = np.random.default_rng(0).normal(0, 0.02, model.output.shape).astype(np.float32)
  return model


def _pick(model, logits, sample_keys, t, cfg_scale):
  """Guidance + plain temperature-1 sampling of token t, with the sampler's per-sample keys."""
  logits = decoding.guide(logits[:, -1], cfg_scale, True)
  step_keys = jax.vmap(jax.random.fold_in, (0, None))(sample_keys, t)
  return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


def loop_sample(model, labels, key, cfg_scale, step=None, num_tokens=None):
  """Per-token Python loop over the first num_tokens tokens (default all); `step(model, cache, previous, t,
  sample_keys)` if given (jitted), else eager ops."""
  rows = jnp.stack([labels, jnp.full_like(labels, model.null_class)], axis=1).reshape(-1)
  sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(labels.shape[0], dtype=jnp.uint32))
  cache = model.init_cache(rows.shape[0], max_len=model.cfg.block_size)
  logits, cache = model.decode(model.class_embedding(rows), cache, 0)
  tokens = [_pick(model, logits, sample_keys, 0, cfg_scale)]

  def eager_step(model, cache, previous, t, sample_keys):
    x = jnp.repeat(model.token_embedding(previous), 2, axis=0)[:, None]
    logits, cache = model.decode(x, cache, t)
    return cache, _pick(model, logits, sample_keys, t, cfg_scale)

  step = step or eager_step
  for t in range(1, num_tokens or model.cfg.block_size):
    cache, token = step(model, cache, tokens[-1], jnp.int32(t), sample_keys)
    tokens.append(token)
  return jnp.stack(tokens, axis=1)


def timed(fn, repeats: int, warm_up: bool = True) -> tuple[float, np.ndarray]:
  out = np.asarray(fn()) if warm_up else None  # compilation
  start = time.perf_counter()
  for _ in range(repeats):
    out = np.asarray(fn())
  return (time.perf_counter() - start) / repeats, out


def bench(name: str, args) -> None:
  model = make_model(name, args.b_layers, args.dtype)
  cfg = model.cfg
  labels = jnp.arange(args.batch, dtype=jnp.int32) % cfg.num_classes
  key = jax.random.key(0)
  sampler = decoding.Sampler(model, dtype=args.dtype)
  settings = decoding.SamplingSettings(cfg_scale=args.cfg_scale)
  cfg_scale = jnp.float32(args.cfg_scale)

  @nnx.jit
  def jit_step(model, cache, previous, t, sample_keys):
    x = jnp.repeat(model.token_embedding(previous), 2, axis=0)[:, None]
    logits, cache = model.decode(x, cache, t)
    return cache, _pick(model, logits, sample_keys, t, cfg_scale)

  eager_tokens = min(args.eager_tokens, cfg.block_size)
  runs = {  # label: (function, repeats, warm-up, tokens it makes per image)
      "generate": (lambda: sampler(labels, key, settings), args.repeats, True, cfg.block_size),
      "jit-step loop": (lambda: loop_sample(model, labels, key, cfg_scale, jit_step), args.repeats, True,
                        cfg.block_size),
      "eager loop": (lambda: loop_sample(model, labels, key, cfg_scale, num_tokens=eager_tokens), 1, False,
                     eager_tokens),
  }
  print(f"\n{name}: dim {cfg.dim}, {cfg.n_layer} layers, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
        f"{cfg.block_size} tokens/image, batch {args.batch} (x2 rows with guidance), {args.dtype}, "
        f"{jax.devices()[0].device_kind} x{len(jax.local_devices())}")
  seconds, outputs = {}, {}
  for label, (fn, repeats, warm_up, tokens) in runs.items():
    seconds[label], outputs[label] = timed(fn, repeats, warm_up)
    # Every step costs the same (static cache), so a partial run scales to a whole image.
    seconds[label] *= cfg.block_size / tokens
    images_per_s = args.batch / seconds[label]
    print(f"  {label:14s} {seconds[label]:8.3f} s/batch  {images_per_s:9.2f} images/s  "
          f"{images_per_s * cfg.block_size:10.0f} tokens/s  generate is {seconds[label] / seconds['generate']:6.1f}x")
  same = [float(np.mean(outputs[k][0] == outputs["generate"][0, :outputs[k].shape[1]]))
          for k in ("jit-step loop", "eager loop")]
  print(f"  eager loop timed over {eager_tokens} of {cfg.block_size} tokens and scaled; first sample's tokens "
        f"equal to generate's: jit-step loop {same[0]:.0%}, eager loop {same[1]:.0%}")


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # No config.
  flags.DEFINE_integer("batch", 16, "Images per batch.", flag_values=fv)
  flags.DEFINE_float("cfg_scale", 2.0, "Guidance scale.", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", decoding.COMPUTE_DTYPES, "Compute dtype.", flag_values=fv)
  flags.DEFINE_integer("b_layers", 2, "Layers of the GPT-B-width model (GPT-B has 12).", flag_values=fv)
  flags.DEFINE_integer("repeats", 3, "Timed calls per path.", flag_values=fv)
  flags.DEFINE_integer("eager_tokens", 16, "Tokens per image the (slow) eager loop makes.", flag_values=fv)
  flags.DEFINE_list("models", ["fixture", "b_width"], "Models to time.", flag_values=fv)


def run(fv: flags.FlagValues) -> None:
  for name in fv.models:
    bench(name, fv)


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages(this_program=True)
  sys.exit(main())
