"""Speculative Jacobi decoding: the plain sampler's greedy tokens, the model's exact distribution, invariances."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from npp_jax import config as config_lib
from npp_jax.models import gpt
from npp_jax.sampling import decoding
from test_sampling import _numpy_filter, loops_touching, reference, sampler  # noqa: F401 (fixtures)


def _settings(**kwargs):
  return decoding.SamplingSettings(**{"cfg_scale": 2.0, **kwargs})


# -- greedy: the Jacobi fixed point -------------------------------------------------------------------------------


@pytest.mark.parametrize("window, draft_init, cfg_scale, cfg_interval", [
    (1, "random", 4.0, -1), (5, "previous", 1.0, -1), (64, "random", 4.0, 3)])
def test_greedy_with_a_window_gives_the_plain_greedy_tokens(sampler, reference, window, draft_init,  # noqa: F811
                                                            cfg_scale, cfg_interval):
  _, gen = reference
  plain = _settings(cfg_scale=cfg_scale, cfg_interval=cfg_interval, greedy=True)
  spec = _settings(cfg_scale=cfg_scale, cfg_interval=cfg_interval, greedy=True, speculative_window=window,
                   draft_init=draft_init)
  expected = np.asarray(sampler(gen["labels"], jax.random.key(0), plain))
  tokens, stats = sampler.sample_with_stats(gen["labels"], jax.random.key(0), spec)
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  passes = np.asarray(stats.passes)
  # One pass keeps at least one token, and a window of one is plain decoding.
  assert (passes <= 64).all() and ((passes == 64).all() if window == 1 else (passes < 64).all())


# -- the exact distribution on an enumerable model ----------------------------------------------------------------

_VOCAB, _GRID = 4, 2


@pytest.fixture(scope="module")
def enumerable():
  """A GPT over 2x2 grids of 4 codes (256 sequences) with random O(1) weights, so every conditional differs."""
  cfg = config_lib.model_config("B")
  cfg.update(dim=16, n_layer=2, n_head=2, vocab_size=_VOCAB, num_classes=2, block_size=_GRID * _GRID, dtype="float32")
  model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [jax.random.normal(k, leaf.shape) * (0.35 if leaf.ndim > 1 else 1.0) for k, leaf in zip(keys, leaves)]
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
  return decoding.Sampler(model, dtype="float32", devices=jax.devices()[:1])


def _exact_distribution(model, label, settings):
  """P(sequence) for all V^S sequences in lexicographic order, from teacher-forced logits and numpy filters."""
  sequences = np.array(list(itertools.product(range(_VOCAB), repeat=_GRID * _GRID)), np.int32)
  logits = np.asarray(model.teacher_forced_logits(np.full(len(sequences), label), sequences,
                                                    cfg_scale=settings.cfg_scale, cfg_interval=settings.cfg_interval))
  filtered = _numpy_filter(logits.reshape(-1, _VOCAB).astype(np.float64), settings.temperature, settings.top_k,
                           settings.top_p)
  log_p = filtered - scipy.special.logsumexp(filtered, axis=-1, keepdims=True)
  chosen = np.take_along_axis(log_p.reshape(logits.shape), sequences[..., None], axis=-1)[..., 0]
  probs = np.exp(chosen.sum(axis=1))
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
  return probs / probs.sum()


def _chi_square_p_value(counts, probs):
  """Pearson's test of counts against probs, cells with expected count < 5 pooled into one."""
  expected = counts.sum() * probs
  small = expected < 5
  observed = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  keep = expected > 0
  return scipy.stats.chisquare(observed[keep], expected[keep]).pvalue


_FALSE_ALARM = 1e-3  # per case: a correct sampler fails one case with probability 1e-3 for an arbitrary key


@pytest.mark.parametrize("kwargs, window, draft_init", [
    (dict(cfg_scale=1.0), 2, "random"),
    (dict(cfg_scale=3.0), 3, "previous"),
    (dict(cfg_scale=2.0, cfg_interval=0, top_k=2), 4, "random"),
    (dict(cfg_scale=2.0, temperature=0.8, top_p=0.7), 3, "previous"),
])
def test_speculative_samples_follow_the_exact_model_distribution(enumerable, kwargs, window, draft_init):
  n, label = 20_000, 1
  settings = decoding.SamplingSettings(**kwargs, speculative_window=window, draft_init=draft_init)
  probs = _exact_distribution(enumerable, label, settings)
  tokens, stats = enumerable.sample_with_stats(np.full(n, label), jax.random.key(3), settings)
  index = np.asarray(tokens) @ (_VOCAB ** np.arange(_GRID * _GRID)[::-1])  # lexicographic, as enumerated
  counts = np.bincount(index, minlength=probs.size)
  assert counts[probs == 0].sum() == 0  # filtered-out sequences never come
  assert _chi_square_p_value(counts, probs) > _FALSE_ALARM
  # The test can tell distributions apart: the same counts against a nearby wrong target are rejected.
  wrong = _exact_distribution(enumerable, label, decoding.SamplingSettings(
      **{**kwargs, "temperature": kwargs.get("temperature", 1.0) * 1.25}))
  assert _chi_square_p_value(counts, np.where(probs > 0, wrong, 0) / wrong[probs > 0].sum()) < 1e-6
  # Drafts do get accepted (not a one-token-per-pass sampler in disguise).
  assert np.asarray(stats.passes).mean() < _GRID * _GRID


# -- invariances and the compiled loop ----------------------------------------------------------------------------


def test_speculative_samples_do_not_depend_on_batch_size_or_devices(reference):  # noqa: F811
  model, _ = reference
  labels = np.array([3, 1, 4, 1, 5, 9, 2, 6])
  settings = _settings(temperature=1.3, top_k=200, top_p=0.95, speculative_window=4)
  key = jax.random.key(42)
  all_devices = decoding.Sampler(model, dtype="float32")
  one_device = decoding.Sampler(model, dtype="float32", devices=jax.devices()[:1])
  reference_run, stats = all_devices.sample_with_stats(labels, key, settings)
  reference_run = np.asarray(reference_run)
  assert len(np.unique(reference_run)) > 100  # really sampled
  assert len(set(np.asarray(stats.passes))) > 1  # rows progress at different speeds in one batch
  np.testing.assert_array_equal(np.asarray(one_device(labels, key, settings)), reference_run)
  pairs = [np.asarray(one_device(labels[i:i + 2], key, settings, sample_offset=i)) for i in range(0, 8, 2)]
  np.testing.assert_array_equal(np.concatenate(pairs), reference_run)
  np.testing.assert_array_equal(np.asarray(all_devices(labels[2:5], key, settings, sample_offset=2)),
                                reference_run[2:5])


def test_speculative_loop_writes_the_cache_in_place_and_never_copies_weights(reference):  # noqa: F811
  """As for the plain loop: the loop body reads the one-chunk cache whole and scatters each row's W new slots in
  place; no cache buffer and no weight matrix is copied per pass."""
  one_device = decoding.Sampler(reference[0], dtype="float32", devices=jax.devices()[:1])
  cfg, window = one_device.cfg, 8
  labels = np.arange(3, dtype=np.int32)
  static = decoding._Static(cfg=cfg, guided=True, top_k=0, use_top_p=False, greedy=False, mesh=one_device.mesh,
                            window=window)
  hlo = decoding._generate.lower(one_device._params, labels, labels.astype(np.uint32), jax.random.key(0),
                                 jnp.float32(2.0), jnp.int32(-1), jnp.float32(1.0), jnp.float32(1.0),
                                 static=static).compile().as_text()
  cache = f"f32[6,{cfg.n_head},{cfg.block_size + window},{cfg.dim // cfg.n_head}]"  # 3 x (cond, null), one chunk
  weights = {f"f32[{a},{b}]" for a, b in [(cfg.dim, 3 * cfg.dim), (cfg.dim, cfg.dim), (cfg.dim, cfg.vocab_size)]}
  assert loops_touching(hlo, cache, weights, writes=("scatter", "dynamic-update-slice")) == 1  # one while loop


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative_window=-1), "speculative_window must be"),
    (dict(speculative_window=2.5), "speculative_window must be"),
    (dict(speculative_window=4, draft_init="zeros"), "draft_init must be one of"),
])
def test_invalid_speculative_settings_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _settings(**kwargs).validate()
