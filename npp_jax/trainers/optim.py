"""AdamW with the reference's weight-decay rule, global-norm clipping, and the per-stage learning-rate schedule.

The schedule is built from spans of steps (an NPP stage's [start, end), or one span for a whole run), and the
optimizer takes the schedule, so any trainer uses it without knowing NPP's stages.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from npp_jax import errors


Span = tuple[int, int]  # [start, end) in steps
SCHEDULES = ("constant", "warmup_constant", "stagewise")


def learning_rate_schedule(optim: ml_collections.ConfigDict, spans: Sequence[Span], warmup_steps: int
                           ) -> optax.Schedule:
  """'constant' (LlamaGen), 'warmup_constant' or 'stagewise' (NPP's --scheduler) over consecutive spans (the NPP
  stages).

  Constant: the peak rate from the first step, as LlamaGen's train_c2i.py without --scheduler. Warmup_constant: one
  linear warmup from 0 over `warmup_steps` at the start of the run, then the peak rate to the end (not restarted at
  stage switches): LlamaGen's baseline for rates too high to start at.

  Stagewise: inside each span [start, end), a linear warmup from 0 over `warmup_steps`, the constant rate, then a
  linear decay to end_lr over the last decay_fraction of the stage. The warmup restarts at every stage switch, as in
  the reference (the rate is 0 at the first step of each stage).

  `optim.stage_lr_scales` (empty: all 1) multiplies the peak rate of each stage, e.g. (2.0, 1.0) trains the patch
  stage at twice the rate; under 'constant' the rate is then constant within each stage.
  """
  peaks = stage_peak_rates(optim, len(spans))
  if optim.schedule not in SCHEDULES:
    raise errors.InvalidInput(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {optim.schedule!r}")
  if optim.schedule == "constant" and len(set(peaks)) == 1:
    return optax.constant_schedule(peaks[0])
  if optim.schedule == "warmup_constant" and len(set(peaks)) == 1:
    return optax.linear_schedule(0.0, peaks[0], max(1, warmup_steps))
  starts = jnp.asarray([start for start, _ in spans])
  ends = jnp.asarray([end for _, end in spans])
  peak = jnp.asarray(peaks, jnp.float32)
  warmups = jnp.asarray([max(1, min(warmup_steps, end - start)) for start, end in spans])
  decays = jnp.asarray([round(optim.decay_fraction * (end - start)) for start, end in spans])

  def schedule(step):
    i = jnp.clip(jnp.searchsorted(ends, step, side="right"), 0, len(spans) - 1)
    if optim.schedule == "constant":
      return peak[i]
    if optim.schedule == "warmup_constant":
      return peak[i] * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(1, warmup_steps))
    t = (step - starts[i]).astype(jnp.float32)
    warm = peak[i] * t / warmups[i]
    decay_start = (ends[i] - decays[i] - starts[i]).astype(jnp.float32)
    frac = (t - decay_start) / jnp.maximum(decays[i], 1)
    decayed = peak[i] + (optim.end_lr - peak[i]) * jnp.clip(frac, 0.0, 1.0)
    return jnp.where(t < warmups[i], warm, jnp.where(t < decay_start, peak[i], decayed))

  return schedule


def stage_peak_rates(optim: ml_collections.ConfigDict, num_stages: int) -> list[float]:
  """optim.lr times each stage's entry of optim.stage_lr_scales (one positive number per stage, or none)."""
  scales = tuple(optim.get("stage_lr_scales", ()) or ())
  if not scales:
    return [float(optim.lr)] * num_stages
  if len(scales) != num_stages or any(float(x) <= 0 for x in scales):
    raise errors.InvalidInput(f"optim.stage_lr_scales must hold one positive number per stage ({num_stages} stages), "
                              f"got {scales}")
  return [float(optim.lr) * float(x) for x in scales]


def decay_mask(params: dict, rule: str) -> dict:
  """Which parameters get weight decay. Stacked layer parameters count their per-layer rank.

  ndim>=2: every matrix and both embedding tables (the reference's DDP trainer); no_norm: everything whose name
  lacks 'norm' (its FSDP trainer); all; none.
  """
  def decide(path, p):
    names = [str(getattr(k, "key", k)) for k in path]
    rank = p.ndim - (1 if "layers" in names else 0)
    if rule == "ndim>=2":
      return rank >= 2
    if rule == "no_norm":
      return "norm" not in names[-1]
    if rule in ("all", "none"):
      return rule == "all"
    raise errors.InvalidInput(f"optim.decay must be one of ndim>=2, no_norm, all, none; got {rule!r}")
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule, params: dict
                   ) -> optax.GradientTransformation:
  """Clipping (if optim.grad_clip > 0), then AdamW at `schedule`'s rate with decay on `optim.decay`'s parameters."""
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                      mask=decay_mask(params, optim.decay), mu_dtype=jnp.dtype(optim.mu_dtype))
  parts = [clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  return optax.chain(*parts, adamw)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales every gradient by min(1, max_norm / (global norm + 1e-6)): torch's `clip_grad_norm_`, the reference's.

  One scalar multiplies each gradient where optax's version divides elementwise and selects: XLA copies a product
  by a scalar into each of its consumers (the two Adam moments' updates), but keeps an elementwise divide as its own
  loop, so optax's clipping wrote a clipped copy of every gradient beside the gradients (423 MiB at GPT-B width;
  not the step's peak, which comes earlier, at the turn from the forward to the backward pass).
  """
  def update_fn(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def ema_update(ema: dict, params: dict, decay: float) -> dict:
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)
