"""One compiled decode program over a batch of rows that each draw their own sample: per-row class, key, position
and sampling settings, so requests from different people, with any mix of settings, share it without recompiling.

  decoder = RowDecoder(sampler, rows=16)
  state = decoder.empty_state()
  settings = row_settings(labels, keys, cfg_scale=..., ...)  # numpy, one value per row
  state = decoder.advance(state, settings, positions, steps=8)  # every row below block_size decodes 8 tokens

A row holds one sample: its position is the index of the token it draws next (0: the class token's prefill;
block_size: finished or free). Rows advance together but start whenever the caller resets one to position 0, so a
free row can take a new sample between two calls while the others carry on (the KV cache is written per row at its
own position and attention is masked to each row's filled slots; `gpt.decode_token_rows` computes each row exactly
as the sampler's chunked loop does at that position, bit for bit in bfloat16 too).

The draws are the plain sampler's (`decoding`): token t of a row uses key fold_in(row key, t), guidance mixes the
raw logits of the row's (cond, null) pair while t <= cfg_interval + 1, then `filter_logits_by_row` and `draw`. With
row key fold_in(sample_key(seed), i), a row's tokens are sample i of `Sampler(...)(labels, sample_key(seed), ...)`
with the same settings. Every row runs guided (a (cond, null) pair); a row with cfg_scale 1 keeps its conditional
logits untouched.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npp_jax import errors
from npp_jax import sharding
from npp_jax.models import gpt
from npp_jax.sampling import decoding


class RowSettings(NamedTuple):
  """One value per row: what decides a row's tokens besides the weights."""

  labels: np.ndarray  # int32 class ids
  keys: np.ndarray  # uint32 (B, 2): jax.random.key_data of the row's sample key
  cfg_scale: np.ndarray  # float32, 1 = no guidance
  cfg_interval: np.ndarray  # int32, -1 = guide every token
  temperature: np.ndarray  # float32
  top_k: np.ndarray  # int32, 0 = off
  top_p: np.ndarray  # float32, 1 = off
  greedy: np.ndarray  # bool


ROW_SETTINGS_DTYPES = RowSettings(np.int32, np.uint32, np.float32, np.int32, np.float32, np.int32, np.float32,
                                  np.bool_)


def empty_row_settings(rows: int) -> RowSettings:
  """Settings of `rows` free rows (class 0, key 0, no guidance, no filters)."""
  settings = [np.zeros((rows, 2) if name == "keys" else (rows,), dtype)
              for name, dtype in zip(RowSettings._fields, ROW_SETTINGS_DTYPES)]
  settings = RowSettings(*settings)
  settings.cfg_scale[:] = settings.temperature[:] = settings.top_p[:] = 1.0
  settings.cfg_interval[:] = -1
  return settings


def set_row(settings: RowSettings, row: int, label: int, key_data: np.ndarray, sampling: decoding.SamplingSettings
            ) -> None:
  """Writes one row's class, key and sampling settings into the host arrays `settings` (in place)."""
  if sampling.speculative_window:
    raise errors.InvalidInput("the shared batch decodes one token per pass; speculative decoding is for `sample`")
  settings.labels[row], settings.keys[row] = label, key_data
  settings.cfg_scale[row], settings.cfg_interval[row] = sampling.cfg_scale, sampling.cfg_interval
  settings.temperature[row], settings.top_k[row] = sampling.temperature, sampling.top_k
  settings.top_p[row], settings.greedy[row] = sampling.top_p, sampling.greedy


def sample_key_data(key: jax.Array, first: int, count: int) -> np.ndarray:
  """uint32 (count, 2): the key data of fold_in(key, first + i), sample first + i's key under `key`."""
  ids = np.arange(first, first + count, dtype=np.uint32)
  return np.asarray(jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(key, ids)))


class RowState(NamedTuple):
  """What the device carries between calls: the KV cache of every row's (cond, null) pair and the rows' tokens."""

  cache: gpt.KVCache
  tokens: jax.Array  # (B, block_size) int32


def _step(params, cfg: ml_collections.FrozenConfigDict, state: RowState, settings: RowSettings, positions):
  """Every row below block_size draws the token at its position; returns (state, positions + 1 for those rows)."""
  seq_len, batch = cfg.block_size, positions.shape[0]
  active = positions < seq_len
  t = jnp.minimum(positions, seq_len - 1)  # a finished row recomputes its last slot; its output is dropped
  pair = lambda a: jnp.repeat(a, 2, axis=0)  # rows (cond_b, null_b), as the sampler interleaves them
  pair_labels = jnp.stack([settings.labels, jnp.full_like(settings.labels, cfg.num_classes)], axis=1).reshape(-1)
  previous = jnp.take_along_axis(state.tokens, jnp.maximum(t - 1, 0)[:, None], axis=1)[:, 0]
  x = jnp.where((pair(t) == 0)[:, None], params["cls_embedding"][pair_labels], pair(params["tok_embeddings"][previous]))
  logits, cache = gpt.decode_token_rows(params, cfg, x[:, None], state.cache, pair(t))
  guided = (settings.cfg_scale > 1) & ((settings.cfg_interval < 0) | (t <= settings.cfg_interval + 1))
  logits = decoding.guide(logits[:, -1], settings.cfg_scale[:, None], guided[:, None])
  step_keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(settings.keys), t)
  drawn = decoding.draw(step_keys, decoding.filter_logits_by_row(logits, settings.temperature, settings.top_k,
                                                                 settings.top_p))
  token = jnp.where(settings.greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)
  at = jnp.arange(batch)
  tokens = state.tokens.at[at, t].set(jnp.where(active, token, state.tokens[at, t]))
  return RowState(cache, tokens), positions + active


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "steps"), donate_argnames=("state",))
def _advance(params, state: RowState, settings: RowSettings, positions, *, cfg, mesh: Mesh, steps: int) -> RowState:
  rows = lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(sharding.ONE_AXIS)))

  def body(_, carry):
    state, positions = carry
    return _step(params, cfg, state, settings, positions)

  state, _ = jax.lax.fori_loop(0, steps, body, (jax.tree.map(rows, state), positions))
  return jax.tree.map(rows, state)


class RowDecoder:
  """A `decoding.Sampler`'s parameters driven row by row: `rows` samples in flight, each at its own position."""

  def __init__(self, sampler: decoding.Sampler, rows: int):
    if rows < 1 or rows % sampler.num_devices:
      raise errors.InvalidInput(f"the shared batch needs a positive multiple of the {sampler.num_devices} devices' "
                                f"count of rows, got {rows}")
    self.sampler, self.rows = sampler, rows
    self.cfg = sampler.cfg
    self._rows_sharding = NamedSharding(sampler.mesh, P(sharding.ONE_AXIS))

  @property
  def block_size(self) -> int:
    return self.cfg.block_size

  def empty_state(self) -> RowState:
    seq_len = self.cfg.block_size
    cache = gpt.init_cache(self.cfg, 2 * self.rows, seq_len, self.sampler.params["output"].dtype,
                           decoding.cache_chunks(seq_len))
    tokens = jnp.zeros((self.rows, self.cfg.block_size), jnp.int32)
    return jax.device_put(RowState(cache, tokens), self._rows_sharding)

  def advance(self, state: RowState, settings: RowSettings, positions: np.ndarray, steps: int) -> RowState:
    """`steps` decode steps of every row (those at block_size stay as they are); `state` is consumed. Not waited
    for. The rows' positions after the call are min(positions + steps, block_size)."""
    settings, positions = jax.device_put((settings, np.asarray(positions, np.int32)), self._rows_sharding)
    return _advance(self.sampler.params, state, settings, positions, cfg=self.cfg, mesh=self.sampler.mesh,
                    steps=steps)
