"""Learning-rate schedules against a direct re-implementation of NPP's lr_lambda, the weight-decay mask, AdamW."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from npp_jax import config as config_lib
from npp_jax import npp
from npp_jax.models import gpt
from npp_jax.trainers import optim


def optim_config(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.base_config().optim
  c.update({"lr": 1e-4, "end_lr": 1e-5, "decay_fraction": 0.2, "schedule": "stagewise", **overrides})
  return c


def reference_lr(step: int, ends: list[int], warmup: int, decay_ratio: float, base: float, end: float) -> float:
  """NPP's create_scheduler (train_c2i.py), in steps: per segment, warmup from 0, constant, linear decay to end."""
  starts = [0] + ends[:-1]
  seg_start, seg_end = starts[-1], ends[-1]
  for s, e in zip(starts, ends):
    if step < e:
      seg_start, seg_end = s, e
      break
  length = seg_end - seg_start
  n_decay = length * decay_ratio
  n_constant = length - warmup - n_decay
  if step < seg_start + warmup:
    return base * (step - seg_start) / max(1, warmup)
  if step < seg_start + warmup + n_constant:
    return base
  progress = (step - (seg_start + warmup + n_constant)) / n_decay
  return end + (base - end) * max(0.0, 1.0 - progress)


def spans(stages) -> list[tuple[int, int]]:
  return [(s.start, s.end) for s in stages]


@pytest.mark.parametrize("stage_list", [[(2, 0.5), (1, 0.5)], [(4, 0.25), (2, 0.25), (1, 0.5)], [(1, 1.0)]])
def test_stagewise_schedule_matches_the_reference(stage_list):
  total, warmup = 1000, 30
  stages = npp.make_stages(stage_list, total, 16)
  schedule = optim.learning_rate_schedule(optim_config(), spans(stages), warmup)
  got = np.asarray(schedule(jnp.arange(total)))
  expected = np.array([reference_lr(t, [s.end for s in stages], warmup, 0.2, 1e-4, 1e-5) for t in range(total)])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
  # The warmup restarts at every stage: the rate is 0 at each stage's first step, the full rate after warmup.
  for s in stages:
    assert float(schedule(s.start)) == 0.0
    assert float(schedule(s.start + warmup)) == pytest.approx(1e-4)
    assert float(schedule(s.end - 1)) == pytest.approx(1e-5 + (1e-4 - 1e-5) / (0.2 * s.steps), rel=1e-4)


def test_stagewise_schedule_at_chosen_steps():
  stages = npp.make_stages([(2, 0.5), (1, 0.5)], 1000, 16)
  schedule = optim.learning_rate_schedule(optim_config(), spans(stages), 10)
  # warmup 0..10, constant to 400, decay 400..500 to 1e-5; the same again from 500.
  for step, lr in [(0, 0.0), (5, 5e-5), (10, 1e-4), (399, 1e-4), (400, 1e-4), (450, 5.5e-5), (500, 0.0),
                   (505, 5e-5), (899, 1e-4), (950, 5.5e-5), (999, 1e-4 - 9e-5 * 99 / 100)]:
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-12), step


def test_constant_schedule():
  stages = npp.make_stages([(2, 0.5), (1, 0.5)], 1000, 16)
  schedule = optim.learning_rate_schedule(optim_config(schedule="constant"), spans(stages), 10)
  assert [float(schedule(s)) for s in (0, 499, 500, 999)] == pytest.approx([1e-4] * 4)


@pytest.mark.parametrize("scales", [(), (0.5, 2.0)])
def test_warmup_constant_warms_up_once_and_holds_through_stage_switches(scales):
  stages = npp.make_stages([(2, 0.5), (1, 0.5)], 1000, 16)
  schedule = optim.learning_rate_schedule(optim_config(schedule="warmup_constant", stage_lr_scales=scales),
                                          spans(stages), 10)
  first, second = (1e-4 * s for s in (scales or (1.0, 1.0)))
  expected = {0: 0.0, 5: first / 2, 10: first, 499: first, 500: second, 501: second, 999: second}
  assert {s: float(schedule(s)) for s in expected} == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_stage_lr_scales_scale_each_stage_peak():
  stages = npp.make_stages([(2, 0.5), (1, 0.5)], 1000, 16)
  plain = optim.learning_rate_schedule(optim_config(), spans(stages), 10)
  scaled = optim.learning_rate_schedule(optim_config(stage_lr_scales=(3.0, 1.0)), spans(stages), 10)
  steps = jnp.arange(1000)
  got, base = np.asarray(scaled(steps)), np.asarray(plain(steps))
  # The first stage: warmup and hold at 3x, then the decay from 3e-4 to end_lr; the second stage unchanged.
  np.testing.assert_allclose(got[:400], 3 * base[:400], rtol=1e-6)
  assert float(scaled(450)) == pytest.approx(3e-4 + (1e-5 - 3e-4) * 0.5, rel=1e-5)
  assert float(scaled(499)) == pytest.approx(3e-4 + (1e-5 - 3e-4) * 0.99, rel=1e-5)
  np.testing.assert_allclose(got[500:], base[500:], rtol=1e-6)
  constant = optim.learning_rate_schedule(optim_config(schedule="constant", stage_lr_scales=(0.5, 2.0)),
                                          spans(stages), 10)
  assert [float(constant(s)) for s in (0, 499, 500, 999)] == pytest.approx([5e-5, 5e-5, 2e-4, 2e-4])
  uniform = optim.learning_rate_schedule(optim_config(schedule="constant", stage_lr_scales=(2.0, 2.0)),
                                         spans(stages), 10)
  assert [float(uniform(s)) for s in (0, 999)] == pytest.approx([2e-4, 2e-4])
  for bad in ((1.0,), (1.0, 0.0)):
    with pytest.raises(ValueError, match="one positive number per stage"):
      optim.learning_rate_schedule(optim_config(stage_lr_scales=bad), spans(stages), 10)


def test_unknown_schedule_is_refused():
  stages = npp.make_stages([(1, 1.0)], 10, 4)
  with pytest.raises(ValueError, match="schedule"):
    optim.learning_rate_schedule(optim_config(schedule="cosine"), spans(stages), 1)


@pytest.fixture(scope="module")
def tiny_params() -> dict:
  cfg = config_lib.model_config("B")
  cfg.update(dim=32, n_layer=2, n_head=2, vocab_size=16, num_classes=3, block_size=16)
  return jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype),
                      nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)))


DECAYED = {"tok_embeddings", "cls_embedding", "output", "wqkv", "wo", "w1", "w2", "w3"}
NORMS = {"norm", "attention_norm", "ffn_norm"}


def _by_name(mask: dict) -> dict[str, bool]:
  flat = {}
  for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]:
    flat[str(path[-1].key)] = value
  return flat


def test_decay_mask_ndim2_decays_matrices_and_embeddings_not_norms(tiny_params):
  mask = _by_name(optim.decay_mask(tiny_params, "ndim>=2"))
  assert set(mask) == DECAYED | NORMS
  # The stacked layer norms are (layers, dim) arrays but vectors per layer: not decayed.
  assert {k for k, v in mask.items() if v} == DECAYED


@pytest.mark.parametrize("rule, decayed", [("no_norm", DECAYED), ("all", DECAYED | NORMS), ("none", set())])
def test_other_decay_rules(tiny_params, rule, decayed):
  mask = _by_name(optim.decay_mask(tiny_params, rule))
  assert {k for k, v in mask.items() if v} == decayed


def test_unknown_decay_rule_is_refused(tiny_params):
  with pytest.raises(ValueError, match="optim.decay"):
    optim.decay_mask(tiny_params, "matrices")


@pytest.fixture(scope="module")
def adamw(tiny_params):
  """(jitted init, jitted update) of the configured optimizer: lr 0.1 constant, weight decay 0.5, clip 1.0.

  Under jit because eager optax dispatches every small op separately, which is slow; one compilation serves both
  tests below.
  """
  c = optim_config(schedule="constant", lr=0.1, weight_decay=0.5, grad_clip=1.0)
  tx = optim.make_optimizer(c, optim.learning_rate_schedule(c, [(0, 10)], 0), tiny_params)
  return jax.jit(tx.init), jax.jit(tx.update)


def test_adamw_decays_only_the_masked_parameters(tiny_params, adamw):
  """With zero gradients Adam's step is 0, so the update is exactly -lr * weight_decay * p where decayed."""
  init, update = adamw
  params = jax.tree.map(lambda p: p * 2.0, tiny_params)
  updates, _ = update(jax.tree.map(jnp.zeros_like, params), init(params), params)
  for name, value in _by_name(updates).items():
    expected = -0.1 * 0.5 * 2.0 if name in DECAYED else 0.0
    np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-6, err_msg=name)


def test_gradient_clipping_bounds_the_global_norm(tiny_params, adamw):
  """Adam's first moment after one step is (1 - b1) times the gradient it saw: the clipped one, of norm 1."""
  init, update = adamw
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 100.0), tiny_params)
  _, state = update(grads, init(tiny_params), tiny_params)
  mu = jax.tree.leaves(state[1][0].mu)  # chain(clip, adamw): adamw's ScaleByAdamState
  norm = float(jnp.sqrt(sum(jnp.sum(m * m) for m in mu)))
  assert norm == pytest.approx(1.0 - 0.9, rel=1e-5)


def test_clipping_scales_by_torch_rule():
  """torch's clip_grad_norm_ (the reference's): every gradient times min(1, max_norm / (norm + 1e-6))."""
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # global norm 13
  clipped, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(np.asarray(clipped["a"]), np.array([3.0, 4.0]) / (13.0 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["b"]), [[12.0 / (13.0 + 1e-6)]], rtol=1e-6)
  small = {"a": jnp.array([0.3, 0.4])}  # norm 0.5: the coefficient clamps at 1
  kept, _ = optim.clip_by_global_norm(1.0).update(small, optax.EmptyState())
  np.testing.assert_array_equal(np.asarray(kept["a"]), np.asarray(small["a"]))


def test_ema_update():
  ema = {"a": jnp.array([0.0, 1.0])}
  new = optim.ema_update(ema, {"a": jnp.array([1.0, 3.0])}, 0.9)
  np.testing.assert_allclose(np.asarray(new["a"]), [0.1, 1.2], rtol=1e-6)
