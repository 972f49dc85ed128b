"""The CPU decode-attention kernel against a float64 softmax attention, its invariances, and the decode paths that
use it (the sampler's and the serving engine's must give a row the same numbers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax.kernels import decode_attention
from npp_jax.kernels import library
from npp_jax.models import gpt

pytestmark = pytest.mark.skipif(not library.CPU_FLAGS <= library.cpu_flags(),
                                reason="the kernel needs AVX-512 BF16; this CPU lacks it")


def _cache(rng, batch, heads, lengths, head_dim):
  make = lambda: [jnp.asarray(rng.normal(size=(batch, heads, n, head_dim)), jnp.bfloat16) for n in lengths]
  return make(), make()


def _float64_attention(q, pos, k_chunks, v_chunks):
  k = np.concatenate([np.asarray(c, np.float64) for c in k_chunks], 2)
  v = np.concatenate([np.asarray(c, np.float64) for c in v_chunks], 2)
  q = np.asarray(q, np.float64)
  out = np.zeros(q.shape)
  for b, last in enumerate(np.asarray(pos)):
    scores = np.einsum("nh,nsh->ns", q[b], k[b, :, :last + 1]) / np.sqrt(q.shape[-1])
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out[b] = np.einsum("ns,nsh->nh", p / p.sum(-1, keepdims=True), v[b, :, :last + 1])
  return out


@pytest.mark.parametrize("head_dim, lengths", [(32, [4, 4, 3]), (64, [17]), (16, [1, 40, 9, 2])])
def test_matches_float64_attention_over_each_rows_visible_slots(head_dim, lengths):
  rng = np.random.default_rng(head_dim)
  k_chunks, v_chunks = _cache(rng, 5, 3, lengths, head_dim)
  q = jnp.asarray(rng.normal(size=(5, 3, head_dim)) * 2, jnp.bfloat16)
  pos = jnp.asarray(np.linspace(0, sum(lengths) - 1, 5).astype(np.int32))
  got = np.asarray(jax.jit(decode_attention.attention)(q, pos, k_chunks, v_chunks), np.float64)
  want = _float64_attention(q, pos, k_chunks, v_chunks)
  np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=2 ** -8 * np.abs(want).max())  # one bf16 rounding


def test_a_row_depends_on_its_own_slots_only_not_on_other_rows_or_chunk_cuts():
  rng = np.random.default_rng(1)
  k_chunks, v_chunks = _cache(rng, 4, 2, [6, 6], 32)
  q = jnp.asarray(rng.normal(size=(4, 2, 32)), jnp.bfloat16)
  pos = jnp.array([2, 5, 7, 11], jnp.int32)
  out = np.asarray(decode_attention.attention(q, pos, k_chunks, v_chunks))
  one_chunk = [jnp.concatenate(k_chunks, 2)], [jnp.concatenate(v_chunks, 2)]
  np.testing.assert_array_equal(np.asarray(decode_attention.attention(q, pos, *one_chunk)), out)
  # Row 0 attends slots 0..2: what lies past them is never read.
  garbage = [c[:1].at[:, :, 3:].set(1e4) for c in one_chunk[0]], [c[:1].at[:, :, 3:].set(-1e4) for c in one_chunk[1]]
  np.testing.assert_array_equal(np.asarray(decode_attention.attention(q[:1], pos[:1], *garbage)), out[:1])
  rows = [c[2:3] for c in k_chunks], [c[2:3] for c in v_chunks]
  np.testing.assert_array_equal(np.asarray(decode_attention.attention(q[2:3], pos[2:3], *rows)), out[2:3])


def test_unsupported_shapes_are_refused():
  q = jnp.zeros((1, 1, 24), jnp.bfloat16)
  assert not decode_attention.supports(24, 1) and decode_attention.supports(64, 4)
  with pytest.raises(ValueError, match="multiple of 16"):
    decode_attention.attention(q, jnp.zeros((1,), jnp.int32), [jnp.zeros((1, 1, 2, 24), jnp.bfloat16)],
                               [jnp.zeros((1, 1, 2, 24), jnp.bfloat16)])


def test_the_samplers_and_the_serving_engines_decode_steps_agree_bit_for_bit():
  """decode (one position for all rows, chunk by chunk) and decode_token_rows (a position per row) on packed
  weights: the same logits and cache for each row, as the serving engine's promise needs."""
  from flax import nnx

  from npp_jax import config as config_lib
  cfg = config_lib.model_config("B")
  cfg.update(dim=64, n_layer=2, n_head=2, vocab_size=96, num_classes=5, block_size=16, dtype="bfloat16")
  model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
  params = jax.jit(gpt.pack_decode_params)(model.decode_params("bfloat16"))
  rng = np.random.default_rng(2)
  cache = gpt.init_cache(cfg, 3, 17, jnp.bfloat16, 4)
  for t in range(11):  # fill the cache through three chunks, the sampler's way
    x = jnp.asarray(rng.normal(size=(3, 1, 64)), jnp.bfloat16)
    chunk = max(c for c, start in enumerate(np.cumsum([0, *cache.chunk_lengths[:-1]])) if start <= t)
    _, cache = gpt.decode(params, cfg, x, cache, jnp.int32(t), chunk=chunk)
  x = jnp.asarray(rng.normal(size=(3, 1, 64)), jnp.bfloat16)
  want, want_cache = gpt.decode(params, cfg, x, cache, jnp.int32(11), chunk=2)
  got, got_cache = gpt.decode_token_rows(params, cfg, x, cache, jnp.full((3,), 11, jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
