"""Speculative Jacobi decoding against plain sampling: forward passes per image, images/s, acceptance, quality.

  python bench/speculative.py [--checkpoint runs/fashion] [--windows 4,8,16] [--batches 1,16] [--b_layers 2]

Models:
  fashion   configs/fashion.py's GPT: the weights of --checkpoint (a trainer workdir) when given, else random.
  b_width   a GPT-B-width model (dim 768, 12 heads, 16x16 codes, vocab 16384) with --b_layers layers (GPT-B has
            12) and random weights. Random weights give near-uniform targets, so its acceptance figures say nothing
            about a trained model; its pass costs do: speculative decoding wins when
            passes x (seconds per pass at W) < block_size x (seconds per plain step).
For each batch size and window (0 = plain) and draft initialisation it prints seconds per batch, images/s,
forward passes per image (mean over rows; a batch runs until its slowest row is done, shown as `batch passes`),
and the acceptance rate at each window position (accepted / scored with all earlier drafts accepted).
Timings exclude compilation (one warm-up call) and take the best of --repeats calls; on a shared machine they are
indicative only. With --checkpoint, the shipped Fashion-MNIST classifier's agreement and Frechet distance
(npp_jax/eval/fashion.py) on --quality_samples images compare plain sampling with every --quality_windows window
(draft init: the default).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import types

import jax
import numpy as np
from absl import flags
from flax import nnx

from npp_jax import assets
from npp_jax import cli
from npp_jax import huge_pages
from npp_jax import config as config_lib
from npp_jax import sample as sample_cli
from npp_jax.models.gpt import GPT
from npp_jax.sampling import decoding
from npp_jax.sampling import generation



def make_model(name: str, args) -> tuple[GPT, str, object]:
  """(model, where its weights come from, VQ decode function or None)."""
  if name == "fashion" and args.checkpoint:
    model, _, decode = generation.load_model_and_tokenizer(args.checkpoint, str(assets.FASHION_TOKENIZER))
    return model, f"trained weights from {args.checkpoint}", decode
  if name == "fashion":
    cfg = config_lib.load_file("configs/fashion.py").model
  else:
    cfg = config_lib.model_config("B")
    cfg.update(n_layer=args.b_layers)
  cfg.dtype = "float32"
  model = GPT(cfg, rngs=nnx.Rngs(0))
  # The head is zero-initialised (uniform targets); a small random head gives nearly but not exactly uniform ones.
  model.output[...] = np.random.default_rng(0).normal(0, 0.02, model.output.shape).astype(np.float32)
  return model, "random weights", None


def timed(fn, repeats: int):
  out = jax.block_until_ready(fn())  # compilation
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best, out


def speed_table(model, name, source, args) -> None:
  cfg = model.cfg
  sampler = decoding.Sampler(model, dtype="float32")
  base = decoding.SamplingSettings(cfg_scale=args.cfg_scale)
  print(f"\n{name}: dim {cfg.dim}, {cfg.n_layer} layers, vocab {cfg.vocab_size}, {cfg.block_size} tokens/image, "
        f"{source}, cfg_scale {args.cfg_scale}, float32, {jax.devices()[0].device_kind} x{len(jax.devices())}")
  print(f"  {'batch':>5} {'W':>3} {'draft init':>10} {'s/batch':>8} {'images/s':>9} {'passes/img':>10} "
        f"{'batch passes':>12} {'s/pass':>8}  acceptance by window position")
  inits = list(args.draft_inits) if name == "fashion" else ["random"]  # random weights: init is moot
  for batch in args.batches:
    labels = np.arange(batch) % cfg.num_classes
    runs = [(0, "-")] + [(w, init) for w in args.windows for init in inits]
    for window, init in runs:
      settings = dataclasses.replace(base, speculative_window=window, draft_init=init if window else "random")
      seconds, (_, stats) = timed(lambda: sampler.sample_with_stats(labels, jax.random.key(0), settings),
                                  args.repeats)
      if stats is None:
        passes = batch_passes = cfg.block_size
        acceptance = ""
      else:
        passes, batch_passes = float(np.mean(stats.passes)), int(np.max(stats.passes))
        rate = np.asarray(stats.accepted).sum(0) / np.maximum(np.asarray(stats.reached).sum(0), 1)
        acceptance = " ".join(f"{r:.2f}" for r in rate)
      print(f"  {batch:5d} {window:3d} {init:>10} {seconds:8.3f} {batch / seconds:9.2f} {passes:10.1f} "
            f"{batch_passes:12d} {seconds / batch_passes:8.4f}  {acceptance}", flush=True)


def quality_table(model, decode, args) -> None:
  from npp_jax.eval import fashion  # pylint: disable=g-import-not-at-top

  evaluator = fashion.Evaluator()
  sampler = decoding.Sampler(model, dtype="float32")
  n, batch = args.quality_samples, args.quality_batch
  labels = sample_cli.make_labels(n, model.cfg.num_classes, "balanced")
  print(f"\nquality: {n} samples (balanced labels), cfg_scale {args.cfg_scale}, shipped classifier; plain sampling "
        "at a second seed shows the seed-to-seed spread")
  for window, seed in [(0, 0), (0, 1)] + [(w, 0) for w in args.quality_windows]:
    key = generation.sample_key(seed)
    settings = decoding.SamplingSettings(cfg_scale=args.cfg_scale, speculative_window=window)
    images, passes, start = [], [], time.perf_counter()
    for offset in range(0, n, batch):
      tokens, stats = sampler.sample_with_stats(labels[offset:offset + batch], key, settings, sample_offset=offset)
      images.append(np.asarray(decode(tokens)))
      passes.append(np.asarray(stats.passes) if stats is not None else np.full(len(tokens), model.cfg.block_size))
    metrics = evaluator(np.concatenate(images), labels)
    print(f"  W {window:3d}, seed {seed}: agreement {metrics['agreement']:.3f}  fd {metrics['fd']:7.2f}  "
          f"passes/img {np.concatenate(passes).mean():6.1f}  ({time.perf_counter() - start:.0f} s incl. compile)",
          flush=True)


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # No config.
  flags.DEFINE_string("checkpoint", "", "Trained Fashion-MNIST trainer workdir (else random weights).", flag_values=fv)
  flags.DEFINE_list("models", ["fashion", "b_width"], "Models to measure.", flag_values=fv)
  flags.DEFINE_list("windows", ["4", "8", "16"], "Speculative windows to compare with plain sampling.", flag_values=fv)
  flags.DEFINE_list("draft_inits", list(decoding.DRAFT_INITS), "Draft initialisations (fashion model).",
                    flag_values=fv)
  flags.DEFINE_list("batches", ["1", "16"], "Batch sizes of the speed table (empty: none).", flag_values=fv)
  flags.DEFINE_integer("b_layers", 2, "Layers of the GPT-B-width model (GPT-B has 12).", flag_values=fv)
  flags.DEFINE_float("cfg_scale", 3.0, "Guidance scale (the Fashion-MNIST default's).", flag_values=fv)
  flags.DEFINE_integer("repeats", 2, "Timed calls per setting (the best counts).", flag_values=fv)
  flags.DEFINE_integer("quality_samples", 1000, "Images per quality figure (0: none).", flag_values=fv)
  flags.DEFINE_integer("quality_batch", 250, "Sampling batch of the quality figures.", flag_values=fv)
  flags.DEFINE_list("quality_windows", ["8"], "Speculative windows of the quality figures.", flag_values=fv)


def run(fv: flags.FlagValues) -> None:
  ints = lambda values: [int(v) for v in values]
  args = types.SimpleNamespace(
      checkpoint=fv.checkpoint, b_layers=fv.b_layers, cfg_scale=fv.cfg_scale, repeats=fv.repeats,
      quality_samples=fv.quality_samples, quality_batch=fv.quality_batch, draft_inits=fv.draft_inits,
      windows=ints(fv.windows), batches=ints(fv.batches), quality_windows=ints(fv.quality_windows))
  for name in fv.models:
    model, source, decode = make_model(name, args)
    speed_table(model, name, source, args)
    if name == "fashion" and decode is not None and args.quality_samples:
      quality_table(model, decode, args)


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages(this_program=True)
  sys.exit(main())
