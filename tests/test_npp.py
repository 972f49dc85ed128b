"""NPP's pure parts against direct numpy loops: patch grouping, the patch loss, the stage schedule."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax import npp


def blocks_of(grid_values: np.ndarray, k: int) -> list[np.ndarray]:
  """The k x k blocks of a (G, G, ...) grid, blocks in raster order, each flattened in raster order: (k*k, ...)."""
  g = grid_values.shape[0] // k
  return [grid_values[i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(k * k, *grid_values.shape[2:])
          for i in range(g) for j in range(g)]


# -- grouping -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_patch_embeddings_average_each_block(k):
  b, grid, d = 2, 8, 5
  emb = np.random.default_rng(k).normal(size=(b, grid * grid, d)).astype(np.float32)
  got = np.asarray(npp.patch_embeddings(jnp.asarray(emb), k))
  expected = np.stack([[block.mean(axis=0) for block in blocks_of(e.reshape(grid, grid, d), k)] for e in emb])
  assert got.shape == (b, (grid // k) ** 2, d)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_group_patches_orders_ids_block_major_raster_inside():
  ids = jnp.arange(16)[None]  # a 4x4 grid, raster order
  np.testing.assert_array_equal(np.asarray(npp.group_patches(ids, 2))[0],
                                [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
  np.testing.assert_array_equal(np.asarray(npp.group_patches(ids, 4))[0], [list(range(16))])
  np.testing.assert_array_equal(np.asarray(npp.group_patches(ids, 1))[0], np.arange(16)[:, None])


@pytest.mark.parametrize("k", [2, 4])
def test_group_patches_keeps_trailing_axes(k):
  grid = 8
  x = np.random.default_rng(0).normal(size=(3, grid * grid, 2, 3)).astype(np.float32)
  got = np.asarray(npp.group_patches(jnp.asarray(x), k))
  expected = np.stack([blocks_of(e.reshape(grid, grid, 2, 3), k) for e in x])
  np.testing.assert_array_equal(got, expected)


def test_grouping_refuses_bad_shapes():
  with pytest.raises(ValueError, match="does not divide the 8x8"):
    npp.group_patches(jnp.zeros((1, 64), jnp.int32), 3)
  with pytest.raises(ValueError, match="not a square"):
    npp.group_patches(jnp.zeros((1, 60), jnp.int32), 2)


# -- patch loss -----------------------------------------------------------------------------------------------


def reference_patch_loss(logits: np.ndarray, tokens: np.ndarray, k: int) -> float:
  """The reference's loss: logits repeated k^2 times per patch, then mean cross-entropy over (B*L*k^2) rows."""
  b, length, v = logits.shape
  grid = math.isqrt(tokens.shape[1])
  repeated = np.repeat(logits.reshape(b * length, 1, v), k * k, axis=1).astype(np.float64)  # (B*L, k^2, V)
  targets = np.stack([np.stack(blocks_of(t.reshape(grid, grid), k)) for t in tokens]).reshape(b * length, k * k)
  m = repeated.max(axis=-1, keepdims=True)
  log_probs = repeated - m - np.log(np.exp(repeated - m).sum(axis=-1, keepdims=True))
  picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)
  return float(-picked.mean())


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_patch_loss_equals_cross_entropy_over_repeated_logits(k):
  rng = np.random.default_rng(k)
  b, grid, v = 3, 8, 37
  tokens = rng.integers(0, v, size=(b, grid * grid)).astype(np.int32)
  logits = (3 * rng.normal(size=(b, (grid // k) ** 2, v))).astype(np.float32)
  got = float(npp.patch_loss(jnp.asarray(logits), jnp.asarray(tokens), k))
  np.testing.assert_allclose(got, reference_patch_loss(logits, tokens, k), rtol=1e-6, atol=1e-5)


def test_patch_loss_of_the_reference_logits(fixtures_dir):
  """The fixtures' logits and losses come from the reference forward: the loss alone must reproduce them."""
  io = np.load(fixtures_dir / "llamagen_tiny" / "gpt_io.npz")
  for k, suffix in ((1, "p1"), (2, "p4"), (4, "p16"), (8, "p64")):
    logits = io["logits" if k == 1 else f"logits_{suffix}"]
    got = float(npp.patch_loss(jnp.asarray(logits), jnp.asarray(io["tokens"]), k))
    np.testing.assert_allclose(got, float(io[f"loss_{suffix}"]), rtol=0, atol=1e-5)


def test_patch_loss_refuses_mismatched_positions():
  with pytest.raises(ValueError, match="logit positions"):
    npp.patch_loss(jnp.zeros((1, 15, 4)), jnp.zeros((1, 64), jnp.int32), 2)


# -- stages ---------------------------------------------------------------------------------------------------


def _ranges(stages):
  return [(s.index, s.patch_side, s.start, s.end) for s in stages]


def test_two_stage_schedule_boundaries():
  stages = npp.make_stages([(2, 0.5), (1, 0.5)], 1000, 16)
  assert _ranges(stages) == [(0, 2, 0, 500), (1, 1, 500, 1000)]
  assert [s.steps for s in stages] == [500, 500]


def test_three_stage_schedule_boundaries():
  stages = npp.make_stages([(4, 0.25), (2, 0.25), (1, 0.5)], 1000, 16)
  assert _ranges(stages) == [(0, 4, 0, 250), (1, 2, 250, 500), (2, 1, 500, 1000)]
  assert npp.tokens_per_step_fraction(stages) == pytest.approx(0.25 / 16 + 0.25 / 4 + 0.5)


@pytest.mark.parametrize("total", [7, 999, 1001, 123457])
def test_stages_cover_every_step_exactly(total):
  fractions = [(8, 0.1), (4, 0.2), (2, 0.3), (1, 0.4)]
  stages = npp.make_stages(fractions, total, 16)
  assert stages[0].start == 0 and stages[-1].end == total
  assert all(a.end == b.start for a, b in zip(stages, stages[1:]))
  # Each boundary is the rounded cumulative fraction (no drift from rounding stage by stage).
  cumulative = np.cumsum([f for _, f in fractions])
  assert [s.end for s in stages[:-1]] == [int(round(c * total)) for c in cumulative[:-1]]


def test_stage_at_finds_the_stage_of_each_step():
  stages = npp.make_stages([(4, 0.25), (2, 0.25), (1, 0.5)], 1000, 16)
  sides = {step: npp.stage_at(stages, step).patch_side for step in (0, 249, 250, 499, 500, 999, 1000, 5000)}
  assert sides == {0: 4, 249: 4, 250: 2, 499: 2, 500: 1, 999: 1, 1000: 1, 5000: 1}


@pytest.mark.parametrize("stages, total, message", [
    ([(2, 0.5), (1, 0.4)], 1000, "sum to 1"),
    ([(2, 0.6), (1, 0.6)], 1000, "sum to 1"),
    ([(3, 0.5), (1, 0.5)], 1000, "patch side 3 does not divide the 16x16"),
    ([], 1000, "empty"),
    ([(2, 0.0), (1, 1.0)], 1000, "positive"),
    ([(2, 0.5, 1)], 1000, "patch_side, fraction"),
    ([(4, 0.001), (1, 0.999)], 100, "no steps"),
])
def test_bad_stage_lists_are_refused(stages, total, message):
  with pytest.raises(ValueError, match=message):
    npp.make_stages(stages, total, 16)
