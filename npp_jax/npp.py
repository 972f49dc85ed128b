"""Next Patch Prediction: patch grouping, the patch loss and the coarse-to-fine stage schedule.

A k x k patch of the G x G code grid becomes one input token (the mean of its k^2 token embeddings) and one output
distribution, scored against all k^2 tokens of the patch. k = 1 is plain next-token prediction. A schedule trains
coarse to fine, e.g. 2x2 patches for the first half of the steps, then single tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from npp_jax import errors


def coarse_grid(grid: int, patch_side: int) -> int:
  """Side of the patch grid; the patch side must divide the code grid."""
  if patch_side < 1 or grid % patch_side:
    raise errors.InvalidInput(f"patch side {patch_side} does not divide the {grid}x{grid} code grid")
  return grid // patch_side


def group_patches(x: jnp.ndarray, patch_side: int) -> jnp.ndarray:
  """Groups a raster sequence (B, G*G, ...) into k x k blocks: (B, (G/k)^2, k*k, ...), blocks in raster order.

  Within a block the k*k entries are in raster order too, like the reference's F.unfold.
  """
  batch, seq = x.shape[:2]
  grid = math.isqrt(seq)
  if grid * grid != seq:
    raise errors.InvalidInput(f"sequence length {seq} is not a square grid")
  g = coarse_grid(grid, patch_side)
  k = patch_side
  rest = x.shape[2:]
  x = x.reshape(batch, g, k, g, k, *rest)
  x = jnp.moveaxis(x, 3, 2)  # (B, g, g, k, k, ...)
  return x.reshape(batch, g * g, k * k, *rest)


def patch_embeddings(embeddings: jnp.ndarray, patch_side: int) -> jnp.ndarray:
  """Mean of the token embeddings (B, G*G, D) over each k x k block of the grid: (B, (G/k)^2, D)."""
  if patch_side == 1:
    return embeddings
  grouped = group_patches(embeddings, patch_side)
  return grouped.astype(jnp.float32).mean(axis=2).astype(embeddings.dtype)


def patch_loss(logits: jnp.ndarray, tokens: jnp.ndarray, patch_side: int) -> jnp.ndarray:
  """Mean over all B*G*G (patch, token) pairs of -log softmax(logits[b, j])[t], t in patch j.

  logits: (B, (G/k)^2, V) float32, position j predicts patch j; tokens: (B, G*G) int code grid.
  The k^2 targets of a patch index one log-softmax row: the k^2 copies of the logits are never built.
  """
  targets = group_patches(tokens, patch_side)  # (B, L, k*k)
  if targets.shape[1] != logits.shape[1]:
    raise errors.InvalidInput(f"{logits.shape[1]} logit positions for {targets.shape[1]} patches of side {patch_side}")
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # (B, L, 1)
  target_logits = jnp.take_along_axis(logits, targets, axis=-1)  # (B, L, k*k)
  return jnp.mean(log_z - target_logits)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the schedule: steps [start, end) train with patches of side `patch_side`."""

  index: int
  patch_side: int
  start: int
  end: int

  @property
  def steps(self) -> int:
    return self.end - self.start


def make_stages(stages: Sequence[Sequence[float]], total_steps: int, grid: int) -> list[Stage]:
  """Turns [(patch_side, fraction), ...] into exact step ranges covering [0, total_steps).

  Boundaries are rounded from cumulative fractions, so they do not drift with many stages; the last stage ends at
  total_steps exactly. Patch sides must divide the grid and fractions must be positive and sum to 1.
  """
  if not stages:
    raise errors.InvalidInput("npp.stages is empty: give at least one (patch_side, fraction) pair, e.g. ((1, 1.0),)")
  sides, fractions = [], []
  for stage in stages:
    if len(stage) != 2:
      raise errors.InvalidInput(f"each NPP stage is (patch_side, fraction of steps), got {tuple(stage)}")
    side, fraction = int(stage[0]), float(stage[1])
    coarse_grid(grid, side)
    if fraction <= 0:
      raise errors.InvalidInput(f"stage fraction must be positive, got {fraction} for patch side {side}")
    sides.append(side)
    fractions.append(fraction)
  if abs(sum(fractions) - 1.0) > 1e-6:
    raise errors.InvalidInput(f"NPP stage fractions must sum to 1, got {sum(fractions):.6g} from {fractions}")
  result, start, cumulative = [], 0, 0.0
  for i, (side, fraction) in enumerate(zip(sides, fractions)):
    cumulative += fraction
    end = total_steps if i == len(sides) - 1 else int(round(cumulative * total_steps))
    if end <= start:
      raise errors.InvalidInput(f"stage {i} (patch side {side}) gets no steps out of {total_steps}")
    result.append(Stage(i, side, start, end))
    start = end
  return result


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
  """The stage that trains step `step` (the last stage for step >= total)."""
  for stage in stages:
    if step < stage.end:
      return stage
  return stages[-1]


def tokens_per_step_fraction(stages: Sequence[Stage]) -> float:
  """Input tokens of the whole schedule relative to next-token prediction over the same steps (the cost ratio)."""
  total = stages[-1].end
  return sum(s.steps / (s.patch_side**2) for s in stages) / total
