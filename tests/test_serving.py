"""The shared batch behind the page and the HTTP API: per-row filters, rows decoding at their own positions, the
engine's schedules, queue bound and cancellation, the JSON API over loopback, and a small load test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax.sampling import decoding
from npp_jax.sampling import generation
from npp_jax.serving import row_decoding
from test_sample_cli import CLASSES, VOCAB, fake_decode, tiny_gpt  # noqa: F401 (a fixture)

# Settings that differ in every per-row field; A and C share the plain sampler's compiled program (static: guided,
# top-k 5, top-p on), B and D have their own.
MIXED = {
    "A": decoding.SamplingSettings(cfg_scale=2.0, temperature=0.9, top_k=5, top_p=0.8),
    "B": decoding.SamplingSettings(cfg_scale=1.0, temperature=1.3),
    "C": decoding.SamplingSettings(cfg_scale=3.0, cfg_interval=3, temperature=1.0, top_k=5, top_p=0.95),
    "D": decoding.SamplingSettings(cfg_scale=2.0, greedy=True),
}


def test_per_row_filters_are_the_static_filters_row_by_row():
  logits = jax.random.normal(jax.random.key(0), (6, VOCAB)) * 3
  rows = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.2, 0, 0.6), (0.9, 3, 0.9), (1.0, VOCAB, 0.99), (2.0, 1, 0.1)]
  temperature, top_k, top_p = (np.asarray(column) for column in zip(*rows))
  by_row = decoding.filter_logits_by_row(logits, temperature.astype(np.float32), top_k.astype(np.int32),
                                         top_p.astype(np.float32))
  for i, (t, k, p) in enumerate(rows):
    alone = decoding.filter_logits(logits[i:i + 1], t, k, p if p < 1 else None)
    np.testing.assert_array_equal(by_row[i:i + 1], alone)
  # No row filtering: temperature only, bit for bit.
  plain = decoding.filter_logits_by_row(logits, jnp.full(6, 0.8), jnp.zeros(6, jnp.int32), jnp.ones(6))
  np.testing.assert_array_equal(plain, decoding.filter_logits(logits, 0.8))


def expected_tokens(model, label: int, seed: int, index: int, settings) -> np.ndarray:
  """Sample `index` of `sample --labels ... --seed seed`: the plain sampler, alone, at that sample offset."""
  return np.asarray(decoding.Sampler(model, dtype="float32")([label], generation.sample_key(seed), settings,
                                                             sample_offset=index))[0]


def test_rows_at_different_positions_draw_the_plain_samplers_tokens(tiny_gpt):  # noqa: F811
  sampler = decoding.Sampler(tiny_gpt, dtype="float32")
  decoder = row_decoding.RowDecoder(sampler, rows=8)
  seq_len = decoder.block_size
  # (label, seed, sample index, settings) per row; rows 4-7 join after 5 steps, with rows 0-3 mid-sample.
  plan = [(0, 1, 0, "A"), (1, 1, 1, "B"), (2, 7, 3, "C"), (1, 2**32 - 1, 0, "D"),
          (2, 1, 0, "B"), (0, 5, 2, "A"), (0, 9, 0, "D"), (2, 7, 3, "C")]
  settings = row_decoding.empty_row_settings(8)
  positions = np.full(8, seq_len, np.int32)
  for row, (label, seed, index, name) in enumerate(plan):
    row_decoding.set_row(settings, row, label, row_decoding.sample_key_data(generation.sample_key(seed), index, 1)[0],
                         MIXED[name])
  state = decoder.empty_state()
  positions[:4] = 0
  state = decoder.advance(state, settings, positions, steps=5)
  positions = np.minimum(positions + 5, seq_len)
  positions[4:] = 0
  while (positions < seq_len).any():
    state = decoder.advance(state, settings, positions, steps=4)
    positions = np.minimum(positions + 4, seq_len)
  tokens = np.asarray(state.tokens)
  for row, (label, seed, index, name) in enumerate(plan):
    np.testing.assert_array_equal(tokens[row], expected_tokens(tiny_gpt, label, seed, index, MIXED[name]), str(row))
  np.testing.assert_array_equal(tokens[2], tokens[7])  # the same sample in two rows, started 5 steps apart
  assert len(np.unique(tokens, axis=0)) == 7


def test_speculative_settings_are_refused_by_the_shared_batch():
  settings = row_decoding.empty_row_settings(1)
  with pytest.raises(ValueError, match="speculative decoding is for `sample`"):
    row_decoding.set_row(settings, 0, 0, np.zeros(2, np.uint32), decoding.SamplingSettings(speculative_window=2))
