"""The model's dropout: Threefry-2x32 against its published answers, its bits against jax.random.bits and its masks
against jax.random.bernoulli, the dropout's rate and scale, and the compiled dropout as one fused pass (no loop over
the rounds)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax.models import dropout

# Known answers of Threefry-2x32 with 20 rounds (Random123's kat_vectors): key, counter, output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key, count, want", KNOWN_ANSWERS)
def test_threefry_gives_the_published_answers(key, count, want):
  words = lambda pair: tuple(jnp.asarray(v, jnp.uint32) for v in pair)
  got = jax.jit(dropout.threefry2x32)(words(key), words(count))
  assert tuple(int(v) for v in got) == want


@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 64, 96)])
@pytest.mark.parametrize("typed", [True, False])
def test_random_bits_are_jax_random_bits(shape, typed):
  for seed in (0, 1, 12345):
    key = jax.random.key(seed) if typed else jax.random.PRNGKey(seed)
    want = jax.random.bits(key, shape)
    np.testing.assert_array_equal(jax.jit(dropout.random_bits, static_argnums=1)(key, shape), want)


def test_random_bits_refuse_other_generators():
  with pytest.raises(ValueError, match="Threefry key"):
    dropout.random_bits(jax.random.key(0, impl="rbg"), (4,))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_zeroes_at_the_rate_and_scales_the_rest(impl, dtype):
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (64, 64, 64)), dtype)
  rate = 0.1
  out = np.asarray(jax.jit(dropout.dropout, static_argnums=1)(x, rate, jax.random.key(3, impl=impl)), np.float32)
  kept = out != 0
  n = kept.size
  # Binomial(n, 0.9): its standard deviation is 0.0012 of n here; 5 of them.
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  ulp = 2.0 ** -23 if dtype == jnp.float32 else 2.0 ** -7  # XLA may multiply by 1 / (1 - rate) instead
  np.testing.assert_allclose(out[kept], np.asarray(x, np.float32)[kept] / (1 - rate), rtol=2 * ulp)
  # A different key, a different mask; the same key, the same mask.
  other = np.asarray(dropout.dropout(x, rate, jax.random.key(4, impl=impl)), np.float32) != 0
  again = np.asarray(dropout.dropout(x, rate, jax.random.key(3, impl=impl)), np.float32) != 0
  assert (other != kept).mean() > 0.1 and (again == kept).all()


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.03])
def test_the_mask_is_jax_random_bernoullis(rate):
  x = jnp.ones((4, 33, 70))
  for seed in range(3):
    key = jax.random.key(seed)
    want = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    np.testing.assert_array_equal(np.asarray(dropout.dropout(x, rate, key)) != 0, want)


def test_no_key_or_no_rate_is_the_identity():
  x = jnp.arange(6.0)
  assert dropout.dropout(x, 0.1, None) is x
  assert dropout.dropout(x, 0.0, jax.random.key(0)) is x


def test_the_compiled_dropout_is_one_fused_pass():
  compiled = jax.jit(lambda key, x: dropout.dropout(x, 0.1, key)).lower(
      jax.random.key(0), jnp.ones((64, 64, 256))).compile().as_text()
  assert " while(" not in compiled
  assert compiled.count(" fusion(") == 1, compiled
