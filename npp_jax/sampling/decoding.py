"""Class-conditional sampling: one jitted decode loop over a static KV cache, with classifier-free guidance.

The loop carries the cache and writes each step's keys and values in place: every layer's cache is a few chunk
buffers (see `gpt.KVCache`), the positions of chunk c are decoded by one `lax.scan` whose attention reads chunks
0..c only, and the layers' weights are unstacked once before the loop. tests/test_sampling.py checks the compiled
loop for copies of the cache or the weights.

Semantics follow LlamaGen's `autoregressive/models/generate.py` (the sampler NPP uses):

- Token 0 comes from the prefill (the class embedding at sequence position 0); token t >= 1 from feeding token t-1 at
  position t. A sample is block_size tokens in raster order.
- Guidance (cfg_scale > 1) runs the conditional and the unconditional (null class) rows in one batched pass and mixes
  the raw logits, `uncond + cfg_scale * (cond - uncond)`, before temperature. The sampled token is fed to both rows.
  With cfg_interval = k >= 0, token t is guided only while t <= k + 1 (the reference's decode counter i = t - 1 stops
  guiding once i > k; the prefill is always guided); later tokens use the conditional logits alone.
- Then: divide by max(temperature, 1e-5); top-k keeps logits >= the k-th largest; top-p is Hugging Face's nucleus
  filter as the reference uses it (sort descending, drop a token when the cumulative probability of the tokens
  before it exceeds top_p, so the first token that crosses the threshold is kept); draw from the softmax (by
  inverting its CDF at one uniform number per sample), or take the argmax when greedy.

Randomness is per sample: sample i of a call draws its step-t token with
`fold_in(fold_in(key, sample_offset + i), t)`. A sample therefore depends only on (key, its global index, its label,
the settings), never on the batch size, on the other samples, or on how the batch is split over devices.

With speculative_window = W > 0 the same distribution comes from speculative Jacobi decoding (SJD, arXiv
2410.01699): each forward pass scores W draft tokens per sample and keeps the accepted prefix plus one token, so an
image takes fewer passes (see `_speculative_loop`). Pass j of sample i draws from
`fold_in(fold_in(key, sample_offset + i), j + 1)`, so the batch-size and device-count invariance still hold, but the
tokens differ from the plain sampler's for the same key (same distribution, different draws; greedy agrees).

The batch is sharded over a 1-D mesh of the given devices (padded to a multiple of their count); the parameters are
replicated and cast once to the compute dtype, and in bfloat16 on one CPU device with AVX-512 BF16 also packed for
the CPU kernels (`kernels/`: the products and the attention of a decode step; about 1.9x faster sampling at GPT-B
width). Logits stay float32; the KV cache uses the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npp_jax import errors
from npp_jax import sharding
from npp_jax.kernels import library
from npp_jax.models import gpt

COMPUTE_DTYPES = ("float32", "bfloat16")
_MIN_TEMPERATURE = 1e-5  # the reference's floor on the divisor
_CACHE_CHUNKS = 4  # decode scans, one per cache chunk; each attends over the chunks filled so far
DRAFT_INITS = ("random", "previous")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """What decides the sampled tokens (besides weights, labels and key).

  cfg_scale: 1.0 means no guidance, > 1 guides. Values below 1 are refused: the reference silently treats every
    value <= 1 as "no guidance" while the formula would mean something else (0 = unconditional), so neither reading
    is safe to assume.
  cfg_interval: -1 guides every token; k >= 0 guides tokens 0..k+1 only (the reference's rule).
  temperature: > 0; 0 is refused unless greedy (use greedy=True for argmax decoding).
  top_k: 0 keeps every token; otherwise 1..vocab_size.
  top_p: in (0, 1]; 1 keeps every token.
  greedy: argmax instead of drawing (temperature, top-k and top-p then do not matter).
  speculative_window: 0 decodes one token per forward pass; W >= 1 runs speculative Jacobi decoding with W draft
    positions per pass (same output distribution, fewer passes; see `_speculative_loop`).
  draft_init: how a draft position entering the window is first drawn: "random" (uniform tokens) or "previous"
    (from the target distribution of the window's last position in the pass that just ran; the default: on the
    trained Fashion-MNIST model it takes 1-2% fewer passes per image at every W, bench/speculative.py).
  """

  cfg_scale: float = 1.0
  cfg_interval: int = -1
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  speculative_window: int = 0
  draft_init: str = "previous"

  @classmethod
  def from_config(cls, sample: Any = None, **overrides: Any) -> "SamplingSettings":
    """The one way a config becomes settings: the fields of a run config's `sample` section (those it lacks keep
    the defaults above), then `overrides` that are not None (the flags a user gave, say); validated."""
    sample = sample or {}
    values = {f.name: sample[f.name] for f in dataclasses.fields(cls) if f.name in sample}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values).validate()

  @property
  def guided(self) -> bool:
    return self.cfg_scale > 1.0

  def validate(self, vocab_size: int | None = None) -> "SamplingSettings":
    """Raises ValueError with one sentence on the first invalid setting; returns self."""
    if not np.isfinite(self.cfg_scale) or self.cfg_scale < 0:
      raise errors.InvalidInput(f"cfg_scale must be a finite number >= 1 (1 = no guidance), got {self.cfg_scale}")
    if self.cfg_scale < 1:
      raise errors.InvalidInput(f"cfg_scale {self.cfg_scale} is below 1: the reference treats any value <= 1 as no "
                                "guidance, so use 1.0 for no guidance or a value > 1 to guide")
    if int(self.cfg_interval) != self.cfg_interval or self.cfg_interval < -1:
      raise errors.InvalidInput("cfg_interval must be -1 (guide every token) or an integer >= 0, got "
                                f"{self.cfg_interval}")
    if not np.isfinite(self.temperature) or self.temperature < 0:
      raise errors.InvalidInput(f"temperature must be a finite number > 0, got {self.temperature}")
    if self.temperature == 0 and not self.greedy:
      raise errors.InvalidInput("temperature 0 would divide the logits by zero; use greedy decoding (--greedy) for "
                                "argmax")
    if int(self.top_k) != self.top_k or self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
      limit = f"between 0 and the vocabulary size {vocab_size}" if vocab_size is not None else ">= 0"
      raise errors.InvalidInput(f"top_k must be an integer {limit} (0 keeps every token), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise errors.InvalidInput(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
    if int(self.speculative_window) != self.speculative_window or self.speculative_window < 0:
      raise errors.InvalidInput(f"speculative_window must be an integer >= 0 (0 = off), got {self.speculative_window}")
    if self.draft_init not in DRAFT_INITS:
      raise errors.InvalidInput(f"draft_init must be one of {DRAFT_INITS}, got {self.draft_init!r}")
    return self


def check_labels(labels: Any, num_classes: int) -> np.ndarray:
  """The labels as a 1-D int32 array, or a ValueError if any lies outside [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise errors.InvalidInput(f"labels must be a non-empty 1-D list of integer class ids, got shape {labels.shape} "
                              f"and dtype {labels.dtype}")
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise errors.InvalidInput(f"label {int(bad[0])} is not a class id in [0, {num_classes}) (the null class "
                              f"{num_classes} is used by guidance and cannot be requested)")
  return labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Logit processing (pure, jittable).


def guide(logits: jax.Array, cfg_scale: jax.Array, use_guidance: jax.Array) -> jax.Array:
  """Interleaved rows (2B, V) = [cond_0, uncond_0, cond_1, ...] -> (B, V) guided (or conditional) logits."""
  pairs = logits.reshape(-1, 2, logits.shape[-1])
  cond, uncond = pairs[:, 0], pairs[:, 1]
  return jnp.where(use_guidance, uncond + (cond - uncond) * cfg_scale, cond)


def filter_logits(logits: jax.Array, temperature: jax.Array | float, top_k: int = 0,
                  top_p: jax.Array | float | None = None) -> jax.Array:
  """Temperature, then top-k, then top-p on (B, V) float32 logits; removed tokens get -inf.

  top_k is static (0 = off). top_p=None skips the nucleus filter (the caller knows top_p == 1 statically).
  Both filters cut at a logit value, so tokens tied with the last kept one are kept too (the reference keeps such
  ties for top-k; for top-p its choice among ties depends on torch.sort's unspecified order).
  """
  logits = logits / jnp.maximum(temperature, _MIN_TEMPERATURE)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    ordered = -jnp.sort(-logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    # Kept tokens form a prefix of the sorted order: the first one, and each one whose predecessors sum to <= top_p.
    kept = 1 + jnp.sum(cumulative[:, :-1] <= top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def filter_logits_by_row(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
                         ) -> jax.Array:
  """`filter_logits` with a setting per row of (B, V) logits: temperature (B,), top_k (B,) (0 = off), top_p (B,)
  (1 = off), so rows with different settings share one compiled program.

  Each row gets exactly the values `filter_logits` gives it with its settings as static ones: a filter that is off
  for a row leaves its logits untouched (not merely equivalent), and the cuts are the same logit values. When no
  row filters, the sort is skipped.
  """
  logits = logits / jnp.maximum(temperature, _MIN_TEMPERATURE)[:, None]

  def cut(logits):
    ordered = -jnp.sort(-logits, axis=-1)
    use_top_k = (top_k > 0)[:, None]
    kth = jnp.take_along_axis(ordered, jnp.maximum(top_k - 1, 0)[:, None], axis=-1)
    logits = jnp.where(use_top_k & (logits < kth), -jnp.inf, logits)
    ordered = jnp.where(use_top_k & (ordered < kth), -jnp.inf, ordered)  # still the sorted row, as top-p sees it
    cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    kept = 1 + jnp.sum(cumulative[:, :-1] <= top_p[:, None], axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where((top_p < 1)[:, None] & (logits < cutoff), -jnp.inf, logits)

  return jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), cut, lambda logits: logits, logits)


def draw(keys: jax.Array, logits: jax.Array) -> jax.Array:
  """One token per row of (B, V) logits from softmax(logits), by inverting the CDF at one uniform per row.

  One random number per row instead of the V Gumbel draws of `jax.random.categorical`: at vocabulary 16384 those
  cost more than a decode step's attention. u lies in (0, 1], so a token of probability 0 (-inf) is never chosen.
  """
  cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
  u = 1.0 - jax.vmap(jax.random.uniform)(keys)
  return jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------------
# The decode loop.


class _Static(NamedTuple):
  """Settings that change the compiled program."""

  cfg: ml_collections.FrozenConfigDict
  guided: bool
  top_k: int
  use_top_p: bool
  greedy: bool
  mesh: Mesh
  window: int = 0  # speculative window; 0 = plain decoding
  draft_init: str = "previous"


def _constrain(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def cache_chunks(seq_len: int) -> int:
  """How many chunks the sampler's KV cache of seq_len slots has (what `gpt.decode_token_rows` must match)."""
  return min(_CACHE_CHUNKS, seq_len)


def _decode_loop(params, cfg, labels, choose, *, guided, cfg_scale, cfg_interval, mesh, keep_logits=False):
  """Runs prefill + block_size - 1 cached decode steps; `choose(logits (B, V), t) -> tokens (B,)` picks token t.

  params: `GPT.decode_params()`. Returns (tokens (B, S) int32, logits (B, S, V) float32 or None).
  """
  seq_len = cfg.block_size
  # Guidance rows are interleaved (cond, null) per sample, so a device's shard of the batch holds whole pairs.
  rows = jnp.stack([labels, jnp.full_like(labels, cfg.num_classes)], axis=1).reshape(-1) if guided else labels
  # Slots 0..S-1 (the last token is never fed back), in chunks: the positions of chunk c are decoded by one scan
  # whose attention reads chunks 0..c only.
  chunks = gpt.chunk_bounds(seq_len, cache_chunks(seq_len))
  cache = gpt.init_cache(cfg, rows.shape[0], seq_len, params["output"].dtype, len(chunks))
  cache = jax.tree.map(lambda c: _constrain(c, mesh, P(sharding.ONE_AXIS)), cache)

  def step_logits(logits, t):
    logits = logits[:, -1]
    if guided:
      # The reference stops guiding once its decode counter (t - 1) exceeds cfg_interval.
      logits = guide(logits, cfg_scale, (cfg_interval < 0) | (t <= cfg_interval + 1))
    return logits

  class_tokens = params["cls_embedding"][rows][:, None]
  logits, cache = gpt.decode(params, cfg, class_tokens, cache, 0)
  first_logits = step_logits(logits, 0)
  first = choose(first_logits, 0)

  def body(chunk, carry, t):
    cache, previous = carry
    x = params["tok_embeddings"][previous]
    if guided:
      x = jnp.repeat(x, 2, axis=0)  # the chosen token goes to both rows of its pair
    logits, cache = gpt.decode(params, cfg, x[:, None], cache, t, chunk=chunk)
    logits = step_logits(logits, t)
    token = choose(logits, t)
    return (cache, token), (token, logits if keep_logits else None)

  carry, tokens, all_logits = (cache, first), [first[:, None]], [first_logits[:, None]]
  for chunk, (start, end) in enumerate(chunks):
    positions = jnp.arange(max(start, 1), end, dtype=jnp.int32)  # position 0, the class token, was the prefill
    carry, (rest, rest_logits) = jax.lax.scan(functools.partial(body, chunk), carry, positions)
    tokens.append(rest.T)
    all_logits.append(jnp.swapaxes(rest_logits, 0, 1) if keep_logits else None)
  tokens = jnp.concatenate(tokens, axis=1).astype(jnp.int32)
  return tokens, (jnp.concatenate(all_logits, axis=1) if keep_logits else None)


class SpeculativeStats(NamedTuple):
  """Per sample: forward passes until it held block_size tokens, and per window index i how often draft i was
  scored with every draft before it accepted (`reached`) and how often it was accepted (`accepted`)."""

  passes: jax.Array  # (B,) int32
  reached: jax.Array  # (B, W) int32
  accepted: jax.Array  # (B, W) int32


def _rows_at(x: jax.Array, start: jax.Array, width: int) -> jax.Array:
  """x[b, start[b]:start[b] + width] for every row b (x (B, L, ...))."""
  return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, width, 0))(x, start)


def _speculative_loop(params, cfg, labels, sample_keys, target, *, window, guided, cfg_scale, cfg_interval, greedy,
                      draft_init, mesh):
  """Speculative Jacobi decoding: each pass scores a window of W drafts per sample in one decode call.

  Sample b holds n[b] accepted tokens and drafts d_0..d_{W-1} for tokens n..n+W-1, each drawn from a known q_i.
  One pass feeds [token n-1 (the class token when n = 0), d_0..d_{W-2}] at positions n..n+W-1 and gets the target
  p_i of token n+i given the tokens before it, drafts included. Draft i is accepted with probability
  min(1, p_i(d_i) / q_i(d_i)) while every draft before it was; the first rejected one is replaced by a draw from
  norm(max(0, p_i - q_i)) (the speculative-sampling rule, so every kept token follows the model exactly), and the
  drafts after it are redrawn from this pass's p_i (the Jacobi update). The window then slides past the kept
  tokens; its cache slots beyond them are stale but masked by position and overwritten by the next pass.
  Greedy decoding accepts a draft iff it is the argmax of p_i, which reaches the plain greedy tokens.

  target(logits (R, V)) -> filtered logits (R, V): the distribution p is drawn from. Randomness: pass j of sample b
  uses fold_in(sample_keys[b], j + 1) (and fold_in(·, 0) for its first drafts), so rows never share draws and a
  sample does not depend on the others. Returns (tokens (B, S), SpeculativeStats).
  """
  seq_len, vocab, batch = cfg.block_size, cfg.vocab_size, labels.shape[0]
  offsets = jnp.arange(window)
  model_rows = jnp.stack([labels, jnp.full_like(labels, cfg.num_classes)], axis=1).reshape(-1) if guided else labels
  pair = (lambda a: jnp.repeat(a, 2, axis=0)) if guided else (lambda a: a)
  # Slots 0..S-1 hold the sample; a pass writes W slots from n, and finished rows (n = S) keep running, so S + W.
  cache = gpt.init_cache(cfg, model_rows.shape[0], seq_len + window, params["output"].dtype, 1)
  cache = jax.tree.map(lambda c: _constrain(c, mesh, P(sharding.ONE_AXIS)), cache)
  class_tokens = params["cls_embedding"][model_rows][:, None]

  def pass_keys(j):
    keys = jax.vmap(jax.random.fold_in, (0, None))(sample_keys, j)
    return jax.vmap(lambda k: jax.random.split(k, 4))(keys).swapaxes(0, 1)  # (4, B) keys

  def draws(keys, logits):
    """(B,) keys, (B, W, V) logits -> (B, W) tokens, one independent draw per window position."""
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(lambda k: jax.random.split(k, window))(keys).reshape(-1)
    return draw(keys, logits.reshape(-1, vocab)).reshape(batch, window)

  def fresh_drafts(keys, last_logits):
    """Drafts for positions entering the window and the log-distribution they come from (B, W), (B, W, V)."""
    if draft_init == "random" or last_logits is None:
      tokens = jax.vmap(lambda k: jax.random.randint(k, (window,), 0, vocab, jnp.int32))(keys)
      return tokens, jnp.full((batch, window, vocab), -jnp.log(jnp.float32(vocab)))
    log_q = jnp.broadcast_to(jax.nn.log_softmax(last_logits, axis=-1)[:, None], (batch, window, vocab))
    return draws(keys, log_q), log_q

  def target_logits(cache, tokens, drafts, n):
    """Runs the window; returns (p's filtered logits (B, W, V) for tokens n..n+W-1, cache)."""
    previous = jnp.take_along_axis(tokens, jnp.maximum(n - 1, 0)[:, None], axis=1)
    x = pair(params["tok_embeddings"][jnp.concatenate([previous, drafts[:, :-1]], axis=1)])
    x = jnp.where(((pair(n) == 0)[:, None] & (offsets == 0))[..., None], class_tokens, x)
    logits, cache = gpt.decode_rows(params, cfg, x, cache, pair(n))
    t = n[:, None] + offsets  # the token index each position predicts
    if guided:
      # Rows are (cond, null) pairs; line each position's pair up as consecutive rows for `guide`.
      pairs = logits.reshape(batch, 2, window, vocab).swapaxes(1, 2).reshape(-1, vocab)
      use = ((cfg_interval < 0) | (t <= cfg_interval + 1)).reshape(-1, 1)
      logits = guide(pairs, cfg_scale, use)
    return target(logits.reshape(-1, vocab)).reshape(batch, window, vocab), cache

  def body(state):
    j, cache, tokens, drafts, log_q, n, stats = state
    accept_keys, residual_keys, redraw_keys, fresh_keys = pass_keys(j + 1)
    logits, cache = target_logits(cache, tokens, drafts, n)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    inside = offsets < seq_len - n[:, None]  # window positions that are tokens of the image
    if greedy:
      ok = drafts == jnp.argmax(logits, axis=-1)
    else:
      at = lambda a: jnp.take_along_axis(a, drafts[..., None], axis=-1)[..., 0]
      u = jax.vmap(lambda k: jax.random.uniform(k, (window,)))(accept_keys)  # [0, 1)
      ok = jnp.log(u) + at(log_q) < at(log_p)  # u < p/q
    kept = jnp.sum(jnp.cumprod(ok & inside, axis=1), axis=1)  # accepted prefix
    first = jnp.minimum(kept, window - 1)[:, None]  # the rejected position (when kept < W)
    p_first = jnp.take_along_axis(log_p, first[..., None], axis=1)[:, 0]
    if greedy:
      replacement = jnp.argmax(p_first, axis=-1).astype(jnp.int32)
    else:
      q_first = jnp.take_along_axis(log_q, first[..., None], axis=1)[:, 0]
      residual = jnp.maximum(jnp.exp(p_first) - jnp.exp(q_first), 0.0)
      # p == q leaves nothing, but then a rejection has probability 0 (it can only come from rounding).
      residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, jnp.log(residual), p_first)
      replacement = draw(residual_keys, residual)
    final = jnp.where(offsets < kept[:, None], drafts, replacement[:, None])
    tokens = jax.vmap(lambda row, new, s: jax.lax.dynamic_update_slice_in_dim(row, new, s, 0))(tokens, final, n)
    advance = jnp.minimum(jnp.minimum(kept + 1, window), seq_len - n)
    # Next window: this pass's redraws for the positions past the rejection, fresh drafts beyond this window.
    new, new_log_q = fresh_drafts(fresh_keys, logits[:, -1])
    candidates = jnp.concatenate([draws(redraw_keys, logits), new], axis=1)
    candidate_log_q = jnp.concatenate([log_p, new_log_q], axis=1)
    drafts = _rows_at(candidates, advance, window)
    log_q = _rows_at(candidate_log_q, advance, window)
    active = (n < seq_len)[:, None]
    passes, reached, accepted = stats
    stats = SpeculativeStats(passes + active[:, 0], reached + (active & inside & (offsets <= kept[:, None])),
                             accepted + (active & (offsets < kept[:, None])))
    return j + 1, cache, tokens, drafts, log_q, n + advance, stats

  drafts, log_q = fresh_drafts(pass_keys(0)[0], None)
  tokens = jnp.zeros((batch, seq_len + window), jnp.int32)
  zeros = jnp.zeros((batch, window), jnp.int32)
  stats = SpeculativeStats(jnp.zeros((batch,), jnp.int32), zeros, zeros)
  state = (jnp.int32(0), cache, tokens, drafts, log_q, jnp.zeros((batch,), jnp.int32), stats)
  state = jax.lax.while_loop(lambda state: jnp.any(state[5] < seq_len), body, state)
  return state[2][:, :seq_len], state[6]


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype"))
def _decode_params(graphdef, state, dtype: str) -> dict:
  return nnx.merge(graphdef, state).decode_params(dtype)


_packed = jax.jit(gpt.pack_decode_params)


def _why_not_packed(dtype: str, devices: Sequence[jax.Device]) -> str | None:
  """None where the sampler can run on the CPU kernels, else why not."""
  if dtype != "bfloat16":
    return f"it computes in bfloat16, not {dtype}"
  if len(devices) != 1:
    return f"it runs on one device, not {len(devices)}"
  return library.unavailable_reason(devices[0].platform)


@functools.partial(jax.jit, static_argnames=("static",))
def _generate(params, labels, sample_ids, key, cfg_scale, cfg_interval, temperature, top_p, *, static: _Static):
  """(tokens (B, S) int32, SpeculativeStats or None for plain decoding)."""
  sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, sample_ids)
  if static.greedy:
    target = lambda logits: logits
  else:
    target = lambda logits: filter_logits(logits, temperature, static.top_k, top_p if static.use_top_p else None)
  if static.window:
    return _speculative_loop(params, static.cfg, labels, sample_keys, target, window=static.window,
                             guided=static.guided, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                             greedy=static.greedy, draft_init=static.draft_init, mesh=static.mesh)

  def choose(logits, t):
    if static.greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(sample_keys, t)
    return draw(step_keys, target(logits))

  tokens, _ = _decode_loop(params, static.cfg, labels, choose, guided=static.guided, cfg_scale=cfg_scale,
                           cfg_interval=cfg_interval, mesh=static.mesh)
  return tokens, None


@functools.partial(jax.jit, static_argnames=("cfg", "guided", "mesh"))
def _teacher_forced(params, labels, tokens, cfg_scale, cfg_interval, *, cfg, guided: bool, mesh: Mesh):
  choose = lambda logits, t: jax.lax.dynamic_index_in_dim(tokens, t, axis=1, keepdims=False)
  _, logits = _decode_loop(params, cfg, labels, choose, guided=guided, cfg_scale=cfg_scale,
                           cfg_interval=cfg_interval, mesh=mesh, keep_logits=True)
  return logits


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points.


class Sampler:
  """A GPT prepared for sampling: split once, parameters cast to the compute dtype and replicated over `devices`.

  Call it once per batch; compiled programs are cached per batch shape and static settings (guidance on/off, top_k,
  top-p on/off, greedy), so a sweep over cfg_scale, temperature, top_p or cfg_interval does not recompile.
  """

  def __init__(self, model: nnx.Module, *, dtype: str | None = None, devices: Sequence[jax.Device] | None = None,
               packed: bool | None = None):
    """packed: pack the weights for the CPU kernels (`kernels/`), which then run a decode step's products and
    attention, about twice as fast as XLA:CPU's bfloat16 for a decode step's few rows. None (the default) uses them
    where they apply: bfloat16 compute on one CPU device with AVX-512 BF16 and a C++ compiler; True requires them;
    False keeps XLA's products and attention."""
    dtype = str(dtype or model.cfg.dtype)
    if dtype not in COMPUTE_DTYPES:
      raise errors.InvalidInput(f"sampling dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    self.cfg = model.cfg
    self.dtype = dtype
    devices = list(devices) if devices is not None else jax.local_devices()
    self.mesh = sharding.one_axis_mesh(devices)
    why_not = _why_not_packed(dtype, devices)
    if packed and why_not:
      raise errors.InvalidInput(f"the CPU kernels cannot sample here: {why_not}")
    self.packed = why_not is None if packed is None else packed
    params = _decode_params(*nnx.split(model), dtype)
    if self.packed:
      params = _packed(params)
    self._params = jax.device_put(params, NamedSharding(self.mesh, P()))

  @property
  def params(self) -> dict:
    """The decode parameters (`GPT.decode_params()`), in the compute dtype, replicated over the mesh."""
    return self._params

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def __call__(self, labels: Any, key: jax.Array, settings: SamplingSettings, *, sample_offset: int = 0) -> jax.Array:
    """int32 tokens (B, block_size) for labels (B,); sample i uses key fold_in(key, sample_offset + i)."""
    return self.sample_with_stats(labels, key, settings, sample_offset=sample_offset)[0]

  def sample_with_stats(self, labels: Any, key: jax.Array, settings: SamplingSettings, *, sample_offset: int = 0
                        ) -> tuple[jax.Array, SpeculativeStats | None]:
    """(tokens as from calling the sampler, SpeculativeStats of the rows, or None without speculative decoding)."""
    settings.validate(self.cfg.vocab_size)
    labels = check_labels(labels, self.cfg.num_classes)
    ids = sample_offset + np.arange(labels.shape[0], dtype=np.int64)
    if sample_offset < 0 or ids[-1] > np.iinfo(np.uint32).max:
      raise errors.InvalidInput(f"sample_offset must keep sample indices in [0, 2**32), got offset {sample_offset}")
    static = _Static(cfg=self.cfg, guided=settings.guided, top_k=int(settings.top_k), use_top_p=settings.top_p < 1,
                     greedy=bool(settings.greedy), mesh=self.mesh, window=int(settings.speculative_window),
                     draft_init=settings.draft_init if settings.speculative_window else "previous")
    generate_rows = lambda labels, ids: _generate(
        self._params, labels, ids, key, jnp.float32(settings.cfg_scale), jnp.int32(settings.cfg_interval),
        jnp.float32(settings.temperature), jnp.float32(settings.top_p), static=static)
    return sharding.pad_shard_unpad(generate_rows, self.mesh)(labels, ids.astype(np.uint32))

  def teacher_forced_logits(self, labels: Any, tokens: Any, *, cfg_scale: float, cfg_interval: int = -1) -> jax.Array:
    """float32 (B, block_size, V): the logits the sampler would see at each step if it had chosen `tokens`."""
    settings = SamplingSettings(cfg_scale=cfg_scale, cfg_interval=cfg_interval).validate()
    labels = check_labels(labels, self.cfg.num_classes)
    tokens = np.asarray(tokens, np.int32)
    if tokens.shape != (labels.shape[0], self.cfg.block_size):
      raise errors.InvalidInput(f"tokens must have shape {(labels.shape[0], self.cfg.block_size)}, got {tokens.shape}")
    logits_of = lambda labels, tokens: _teacher_forced(self._params, labels, tokens, jnp.float32(cfg_scale),
                                                       jnp.int32(cfg_interval), cfg=self.cfg, guided=settings.guided,
                                                       mesh=self.mesh)
    return sharding.pad_shard_unpad(logits_of, self.mesh)(labels, tokens)


def generate(model: nnx.Module, labels: Any, key: jax.Array, *, cfg_scale: float, cfg_interval: int = -1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             speculative_window: int = 0, draft_init: str = "previous", sample_offset: int = 0,
             dtype: str | None = None, devices: Sequence[jax.Device] | None = None) -> jax.Array:
  """int32 tokens (B, block_size) for class labels (B,); see the module docstring for the semantics.

  dtype: 'float32' or 'bfloat16' compute (default: the model config's); devices: the batch is sharded over them
  (default: all local devices). For many batches build a `Sampler` once instead (it casts the parameters once).
  """
  settings = SamplingSettings(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k,
                              top_p=top_p, greedy=greedy, speculative_window=speculative_window, draft_init=draft_init)
  return Sampler(model, dtype=dtype, devices=devices)(labels, key, settings, sample_offset=sample_offset)
