"""LlamaGen's class-conditional GPT in Flax NNX, with the NPP training path and a KV-cache decode path.

Pre-norm Llama blocks (RMSNorm in float32, fused bias-free QKV, SwiGLU), 2D RoPE, a class table of num_classes + 1
rows (the last is the null class for guidance), an untied zero-initialised head. The layers' parameters are stacked
along a leading `layers` axis, so the same parameters run under `lax.scan` or an unrolled loop (config.scan_layers)
and checkpoints do not depend on that choice.

Shapes: B batch, S = block_size = G*G codes, T sequence length, D dim, N heads, H head_dim, F FFN hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from npp_jax import errors
from npp_jax import npp
from npp_jax import sharding
from npp_jax.kernels import decode_attention
from npp_jax.kernels import packed_matmul
from npp_jax.models import dropout
from npp_jax.models import rope

# Logical axis names of every parameter; sharding.py maps them to mesh axes.
EMBED, VOCAB, CLASSES, LAYERS, HEADS, HEAD_DIM, MLP, QKV = (
    "embed", "vocab", "classes", "layers", "heads", "head_dim", "mlp", "qkv")
# The residual stream between layers: split over the batch, whole along the sequence and the model dimension.
RESIDUAL_AXES = ("batch", None, None)


def find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - n % k


def ffn_hidden_dim(cfg: ml_collections.ConfigDict) -> int:
  """LlamaGen's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of `multiple_of`."""
  return find_multiple(int(2 * (4 * cfg.dim) / 3), cfg.multiple_of)


def grid_side(cfg: ml_collections.ConfigDict) -> int:
  grid = math.isqrt(cfg.block_size)
  if grid * grid != cfg.block_size:
    raise errors.InvalidInput(f"model.block_size={cfg.block_size} is not a square number of codes")
  return grid


def num_parameters(cfg: ml_collections.ConfigDict) -> int:
  """Exact parameter count, from the config alone (no allocation)."""
  d, f = cfg.dim, ffn_hidden_dim(cfg)
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  return 2 * cfg.vocab_size * d + (cfg.num_classes + 1) * d + cfg.n_layer * per_layer + d


def _param(init, key, shape, axes) -> nnx.Param:
  return nnx.Param(init(key, shape, jnp.float32), logical_axes=axes)


def _rms_normalise(x: jnp.ndarray, eps: float, weight: jnp.ndarray | None = None) -> jnp.ndarray:
  """x * rsqrt(mean(x^2) + eps) in float32, times the RMSNorm weight where it is not folded into the next product's
  kernel (`_fold_norms`), cast back."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y if weight is None else y * weight).astype(x.dtype)


# Each layer's RMSNorm weights and the kernels whose rows they scale.
_NORM_FEEDS = {"attention_norm": ("wqkv",), "ffn_norm": ("w1", "w3")}
_KERNELS = ("wqkv", "wo", "w1", "w3", "w2")


def _fold_pays(rows: int, columns: int) -> bool:
  """Whether folding an RMSNorm weight into the (K, columns) kernels it feeds costs a training step less than applying
  it to the (rows, K) activations. Folded, the step scales kernel-sized arrays (and reduces one for the weight's
  gradient); applied, it scales activation-sized ones and reduces over the batch's rows. GPT-B width at batch 2 (512
  rows; 2,304 and 4,096 columns) applies them: a 1.10x faster bfloat16 step, 1.01-1.03x in float32 (two rounds,
  interleaved). The tiny benchmark model's 2x2-patch step (1,024 rows; 768 and 1,536 columns) ran 1.1-1.5x slower with
  both applied; the default run (1,024 and 4,096 rows; 576 and 1,024 columns) folds them all."""
  return rows >= columns


def _folded_norms(cfg: ml_collections.ConfigDict, rows: int) -> frozenset[str]:
  """The layer norms worth folding for a training batch of `rows` positions (`_fold_pays`)."""
  columns = {"attention_norm": 3 * cfg.dim, "ffn_norm": 2 * ffn_hidden_dim(cfg)}
  return frozenset(norm for norm, n in columns.items() if _fold_pays(rows, n))


def _fold_norms(layer: dict[str, jnp.ndarray], folded: frozenset[str] = frozenset(_NORM_FEEDS)) -> dict[str, Any]:
  """One layer's kernels with the RMSNorm weights in `folded` (default: both) folded into the rows of the kernels
  they feed, (normalise(x) * g) @ W = normalise(x) @ (g[:, None] * W); the other norm weights stay in the dict, for
  `_rms_normalise`. The decode path folds both once, before its loop."""
  out = {name: layer[name] for name in _KERNELS}
  for norm, kernels in _NORM_FEEDS.items():
    if norm not in folded:
      out[norm] = layer[norm]
      continue
    for name in kernels:
      out[name] = _scale_rows(layer[norm], out[name])
  return out


def _scale_rows(g: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  return g.reshape(-1, *(1,) * (w.ndim - 1)) * w


class KVCache(NamedTuple):
  """Keys and values: for each layer, a tuple of chunk buffers (B, N, chunk_len, H) covering consecutive slots.

  Every buffer is its own array, so a decode loop that carries the cache writes the new slot of one chunk in place
  and reads whole chunks, never a slice: XLA copies a carried buffer on every step when it is both sliced and
  updated in one iteration, and a stacked cache riding through the layer scan as xs/ys is re-stacked every step.
  Chunks let a loop attend over the filled part of the cache only (see `decode`). Heads before positions makes
  each attention read a contiguous (chunk_len, H) block per head.
  """

  k: tuple[tuple[jnp.ndarray, ...], ...]
  v: tuple[tuple[jnp.ndarray, ...], ...]

  @property
  def chunk_lengths(self) -> tuple[int, ...]:
    return tuple(c.shape[2] for c in self.k[0])


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
  """[start, end) slots of `chunks` near-equal consecutive chunks of a `length`-slot cache."""
  edges = [round(length * i / chunks) for i in range(chunks + 1)]
  if len(set(edges)) != len(edges):
    raise ValueError(f"cannot split {length} cache slots into {chunks} non-empty chunks")
  return list(zip(edges[:-1], edges[1:]))


def init_cache(cfg: ml_collections.ConfigDict, batch: int, max_len: int, dtype: Any, chunks: int) -> KVCache:
  """Zeros for `batch` sequences of max_len slots, each layer's keys and values in `chunks` chunk buffers."""
  head_dim = cfg.dim // cfg.n_head
  shapes = [(batch, cfg.n_head, end - start, head_dim) for start, end in chunk_bounds(max_len, chunks)]
  empty = lambda: tuple(tuple(jnp.zeros(shape, dtype) for shape in shapes) for _ in range(cfg.n_layer))
  return KVCache(empty(), empty())


class Blocks(nnx.Module):
  """The n_layer transformer blocks, parameters stacked along a leading layer axis."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    n, d, h, f = cfg.n_layer, cfg.dim, cfg.dim // cfg.n_head, ffn_hidden_dim(cfg)
    normal = jax.nn.initializers.normal(cfg.initializer_range)
    ones = jax.nn.initializers.ones
    self.attention_norm = _param(ones, rngs.params(), (n, d), (LAYERS, EMBED))
    # q, k, v in one kernel like the reference's fused wqkv; heads on their own axis for tensor parallelism.
    self.wqkv = _param(normal, rngs.params(), (n, d, 3, cfg.n_head, h), (LAYERS, EMBED, QKV, HEADS, HEAD_DIM))
    self.wo = _param(normal, rngs.params(), (n, cfg.n_head, h, d), (LAYERS, HEADS, HEAD_DIM, EMBED))
    self.ffn_norm = _param(ones, rngs.params(), (n, d), (LAYERS, EMBED))
    self.w1 = _param(normal, rngs.params(), (n, d, f), (LAYERS, EMBED, MLP))
    self.w3 = _param(normal, rngs.params(), (n, d, f), (LAYERS, EMBED, MLP))
    self.w2 = _param(normal, rngs.params(), (n, f, d), (LAYERS, MLP, EMBED))

  def stacked(self) -> dict[str, jnp.ndarray]:
    return {name: getattr(self, name)[...] for name in
            ("attention_norm", "wqkv", "wo", "ffn_norm", "w1", "w3", "w2")}


class GPT(nnx.Module):
  """LlamaGen class-to-image transformer (c2i). See the module docstring."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if cfg.dim % cfg.n_head:
      raise errors.InvalidInput(f"model.dim={cfg.dim} is not divisible by model.n_head={cfg.n_head}")
    if cfg.cls_token_num != 1:
      raise errors.InvalidInput("class-conditional models use one class token; got "
                                f"model.cls_token_num={cfg.cls_token_num}")
    self.cfg = ml_collections.FrozenConfigDict(cfg)  # static and hashable inside the graph definition
    self.grid = grid_side(cfg)
    normal = jax.nn.initializers.normal(cfg.initializer_range)
    self.tok_embeddings = _param(normal, rngs.params(), (cfg.vocab_size, cfg.dim), (VOCAB, EMBED))
    self.cls_embedding = _param(normal, rngs.params(), (cfg.num_classes + 1, cfg.dim), (CLASSES, EMBED))
    self.layers = Blocks(cfg, rngs=rngs)
    self.norm = _param(jax.nn.initializers.ones, rngs.params(), (cfg.dim,), (EMBED,))
    self.output = _param(jax.nn.initializers.zeros, rngs.params(), (cfg.dim, cfg.vocab_size), (EMBED, VOCAB))

  @property
  def null_class(self) -> int:
    return self.cfg.num_classes

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.cfg.dtype)

  # -- inputs -------------------------------------------------------------------------------------------------

  def class_embedding(self, labels: jnp.ndarray, drop_key: jax.Array | None = None) -> jnp.ndarray:
    """(B,) labels -> (B, 1, D); with a key, each label becomes the null class with class_dropout_prob."""
    if drop_key is not None and self.cfg.class_dropout_prob > 0:
      drop = jax.random.uniform(drop_key, labels.shape) < self.cfg.class_dropout_prob
      labels = jnp.where(drop, self.null_class, labels)
    return self.cls_embedding[...][labels][:, None, :].astype(self.compute_dtype)

  def token_embedding(self, tokens: jnp.ndarray) -> jnp.ndarray:
    return self.tok_embeddings[...][tokens].astype(self.compute_dtype)

  # -- training path ------------------------------------------------------------------------------------------

  def __call__(self, tokens: jnp.ndarray, labels: jnp.ndarray, *, patch_side: int = 1, deterministic: bool = True,
               dropout_rng: jax.Array | None = None) -> jnp.ndarray:
    """Training-path logits (B, (G/k)^2, V) float32; position j predicts patch j, position 0 is the class token.

    tokens: the full code grid (B, block_size) in raster order; labels: (B,) class ids (num_classes = null class).
    With deterministic=False, `dropout_rng` drives token, residual, FFN and label dropout.
    """
    if not deterministic and dropout_rng is None:
      raise ValueError("training mode (deterministic=False) needs a dropout_rng")
    keys = dict(zip(("label", "token", "layers"), jax.random.split(dropout_rng, 3))) if not deterministic else {}
    cfg = self.cfg
    coarse = npp.coarse_grid(self.grid, patch_side)
    patches = npp.patch_embeddings(self.token_embedding(tokens), patch_side)[:, :-1]
    x = jnp.concatenate([self.class_embedding(labels, keys.get("label")), patches], axis=1)
    x = dropout.dropout(x, cfg.token_dropout_p, keys.get("token"))
    cos, sin = rope.rope_table(coarse, cfg.dim // cfg.n_head, float(cfg.rope_base), cfg.cls_token_num)
    seq = x.shape[1]  # class token + all patches but the last
    rotary = (jnp.asarray(cos[:seq])[None], jnp.asarray(sin[:seq])[None])
    x = self._blocks(x, rotary, layer_keys=keys.get("layers"))
    norm, output = self.norm[...], self.output[...]
    if _fold_pays(x.shape[0] * x.shape[1], cfg.vocab_size):
      norm, output = None, _scale_rows(norm, output)
    return _head(x, output, cfg.norm_eps, norm)

  # -- decode path --------------------------------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> KVCache:
    """An empty one-chunk KV cache for `batch` sequences of up to max_len positions (default: class token +
    block_size); the sampler's chunked caches come from the module-level `init_cache`."""
    return init_cache(self.cfg, batch, max_len or self.cfg.cls_token_num + self.cfg.block_size,
                      dtype or self.compute_dtype, 1)

  def decode_params(self, dtype: Any = None) -> dict[str, Any]:
    """The parameters as `decode` reads them: the layers unstacked into one dict per layer, the RMSNorm weights
    folded into the kernels they feed (`_fold_norms`), in `dtype` (default: the compute dtype), which is also the
    dtype `decode` computes in.

    Unstacking once, outside the decode loop, gives every layer its own weight buffers; slicing the stacked arrays
    inside the loop would copy every layer's weights on every step.
    """
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype or self.compute_dtype), tree)
    stacked = self.layers.stacked()
    return cast({
        "tok_embeddings": self.tok_embeddings[...],
        "cls_embedding": self.cls_embedding[...],
        "layers": tuple(_fold_norms({name: a[i] for name, a in stacked.items()}) for i in range(self.cfg.n_layer)),
        "output": _scale_rows(self.norm[...], self.output[...]),
    })

  def decode(self, x: jnp.ndarray, cache: KVCache, pos: jnp.ndarray) -> tuple[jnp.ndarray, KVCache]:
    """Runs embeddings x (B, T, D) at sequence positions pos..pos+T-1 against the cache; returns (logits, cache).

    Position 0 is the class token. Queries attend to every cache slot up to their own position. For many steps,
    take `decode_params()` once and call the module-level `decode` (this method unstacks the layers every call).
    """
    return decode(self.decode_params(), self.cfg, x, cache, pos)

  # -- shared trunk -------------------------------------------------------------------------------------------

  def _blocks(self, x, rotary, *, layer_keys=None):
    cfg = self.cfg
    params = self.layers.stacked()

    def layer(x, inputs):
      p, key = inputs  # the layer's kernels (float32; each product casts its own), norms folded in or beside them
      x = sharding.constrain(x, RESIDUAL_AXES)
      keys = jax.random.split(key, 2) if key is not None else (None, None)
      q, k, v = _qkv(_rms_normalise(x, cfg.norm_eps, p.get("attention_norm")), p["wqkv"], rotary)
      h = _attention_output(_training_attention(q, k, v, cfg.attention_impl), p["wo"])
      x = x + dropout.dropout(h, cfg.resid_dropout_p, keys[0])
      x = x + dropout.dropout(_feed_forward(x, p, cfg.norm_eps), cfg.ffn_dropout_p, keys[1])
      return x, None

    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat]())
    keys = jax.random.split(layer_keys, cfg.n_layer) if layer_keys is not None else None
    folded = _folded_norms(cfg, x.shape[0] * x.shape[1])
    if cfg.scan_layers:
      x, _ = jax.lax.scan(lambda x, inputs: layer(x, (_fold_norms(inputs[0], folded), inputs[1])), x, (params, keys))
    else:
      for i in range(cfg.n_layer):
        x, _ = layer(x, (_stacked_kernels(params, i, folded), None if keys is None else keys[i]))
    return x


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stack", "row_scale"], meta_fields=["index"])
@dataclasses.dataclass(frozen=True)
class _StackedKernel:
  """Layer `index`'s kernel, read from the layers' stack (L, K, ...) with an RMSNorm weight (L, K) folded into its
  rows (row_scale; None for none), as the unrolled training path hands it to `_dense`.

  Its product (`_stacked_matmul`) keeps the stack, which lives anyway, for the backward pass and recomputes the
  layer's kernel there. Slicing and folding outside the product kept a float32 and a bfloat16 copy of every layer's
  kernels from the forward pass to the backward (450 MiB at GPT-B width), and that was the step's peak.
  """
  stack: jnp.ndarray
  row_scale: jnp.ndarray | None
  index: int

  @property
  def shape(self) -> tuple[int, ...]:
    return self.stack.shape[1:]

  def reshape(self, *shape: int) -> "_StackedKernel":
    return _StackedKernel(self.stack.reshape(self.stack.shape[0], *shape), self.row_scale, self.index)


def _stacked_kernels(stacked: dict[str, jnp.ndarray], i: int, folded: frozenset[str]) -> dict[str, Any]:
  """Layer i's kernels as `_fold_norms` gives them, unsliced (`_StackedKernel`), and its unfolded norm weights."""
  scales = {name: stacked[norm] for norm, names in _NORM_FEEDS.items() if norm in folded for name in names}
  out: dict[str, Any] = {name: _StackedKernel(stacked[name], scales.get(name), i) for name in _KERNELS}
  out.update({norm: stacked[norm][i] for norm in _NORM_FEEDS if norm not in folded})
  return out


def _dense(x, w, out_dtype: Any = jnp.float32):
  """x (..., K) times a (K, ...) weight as one 2-D (rows, K) x (K, N) matmul in x's dtype, reshaped back, returned in
  out_dtype. It accumulates in float32 whatever the operands: what TPU and GPU matrix units do, and the only bfloat16
  form XLA:CPU runs on its bfloat16 units.

  The cast to out_dtype is part of the product, so that the backward pass receives the cotangent in out_dtype: a
  float32 result cast by the caller would send a float32 cotangent back through everything between the cast and the
  product (the attention's q, k and v concatenated in float32, then cast again for the product's gradients).

  Flat rows matter on XLA:CPU: with (B, T) leading axes the weight gradient contracts two axes, and XLA then
  materialises a transposed copy of the activations on every step; a 2-D contraction over rows needs none.
  """
  flat_x, flat_w = x.reshape(-1, x.shape[-1]), w.reshape(w.shape[0], -1)
  out_dtype = jnp.dtype(out_dtype)
  if isinstance(flat_w, _StackedKernel):
    out = _stacked_matmul(flat_x, flat_w.stack, flat_w.row_scale, flat_w.index, out_dtype)
  elif isinstance(flat_w, packed_matmul.PackedKernel):
    out = packed_matmul.matmul(flat_x, flat_w).astype(out_dtype)
  elif x.dtype == jnp.float32:
    out = jnp.dot(flat_x, flat_w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)
  else:
    out = _low_precision_matmul(flat_x, flat_w, flat_w.dtype, out_dtype)
  return out.reshape(*x.shape[:-1], *w.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_matmul(x: jnp.ndarray, w: jnp.ndarray, w_dtype: Any, out_dtype: Any) -> jnp.ndarray:
  """(M, K) x (K, N) -> (M, N) in out_dtype, computed in x's narrow dtype (bfloat16): w, of dtype `w_dtype` (the float32
  master weights in training), is cast to it. The backward pass's two products also take narrow operands and
  accumulate in float32, and the weight's gradient comes back in `w_dtype` straight from the float32 accumulator.

  Plain autodiff would feed the float32 cotangent to both backward products and so run them in float32. Here the
  cotangent is cast to the operands' dtype first (the usual mixed-precision rule), and each product is laid out in
  a form XLA:CPU sends to its bfloat16 library kernels: `g wᵀ` contracts the last axes of both (row-major, fast as
  is), and `xᵀ g` takes a materialised transpose of x (a product that contracts the first axes of both is
  converted to float32 by XLA:CPU and runs at float32 speed).
  """
  del w_dtype
  return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _low_precision_matmul_fwd(x, w, w_dtype, out_dtype):
  narrow_w = w.astype(x.dtype)
  return _low_precision_matmul(x, narrow_w, w_dtype, out_dtype), (x, narrow_w)


def _low_precision_matmul_bwd(w_dtype, out_dtype, residuals, g):
  del out_dtype
  x, w = residuals
  dx, dw = _matmul_grads(x, w, g)
  return dx, dw.astype(w_dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _matmul_grads(x: jnp.ndarray, w: jnp.ndarray, g: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(dx in x's dtype, dw float32) of x @ w for the cotangent g: both products take operands in x's dtype,
  accumulate in float32, and are laid out as XLA:CPU's fast kernels want them (see `_low_precision_matmul`)."""
  g, w = g.astype(x.dtype), w.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  x_t = x.T if x.dtype == jnp.float32 else _materialised_transpose(x)
  return dx.astype(x.dtype), jnp.dot(x_t, g, preferred_element_type=jnp.float32)


def _layer_kernel(stack: jnp.ndarray, row_scale: jnp.ndarray | None, index) -> jnp.ndarray:
  w = jax.lax.dynamic_index_in_dim(stack, index, keepdims=False)
  return w if row_scale is None else _scale_rows(jax.lax.dynamic_index_in_dim(row_scale, index, keepdims=False), w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _stacked_matmul(x: jnp.ndarray, stack: jnp.ndarray, row_scale: jnp.ndarray | None, index: int,
                    out_dtype: Any) -> jnp.ndarray:
  """(M, K) x layer `index`'s (K, N) kernel of `stack` (L, K, N), rows scaled by row_scale[index] -> (M, N) in
  out_dtype, computed in x's dtype (see `_StackedKernel`). Only x and the stack's arrays are kept for the backward
  pass."""
  w = _layer_kernel(stack, row_scale, index).astype(x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _stacked_matmul_fwd(x, stack, row_scale, index, out_dtype):
  return _stacked_matmul(x, stack, row_scale, index, out_dtype), (x, stack, row_scale)


def _stacked_matmul_bwd(index, out_dtype, residuals, g):
  del out_dtype
  x, stack, row_scale = residuals
  # The kernel is recomputed at an index that depends on g's data (it is `index` for any finite g), so that XLA can
  # neither merge it with the forward pass's kernel (keeping that alive until here) nor compute it before the
  # backward pass reaches this layer. XLA:CPU drops optimisation barriers, so a barrier does not do this.
  late_index = index + (g[0, 0] * 0).astype(jnp.int32)
  w = _layer_kernel(stack, row_scale, late_index)
  dx, dw = _matmul_grads(x, w, g)
  # Layer `index`'s slots of the stacks' gradients (autodiff's own rule for a slice: XLA sums the layers' pads).
  d_stack = jnp.zeros_like(stack).at[index].set(dw if row_scale is None else _scale_rows(row_scale[index], dw))
  if row_scale is None:
    return dx, d_stack, None
  raw_w = jax.lax.dynamic_index_in_dim(stack, late_index, keepdims=False)
  return dx, d_stack, jnp.zeros_like(row_scale).at[index].set(jnp.sum(dw * raw_w, axis=1))


_stacked_matmul.defvjp(_stacked_matmul_fwd, _stacked_matmul_bwd)


def _materialised_transpose(x: jnp.ndarray) -> jnp.ndarray:
  """x (M, K) -> (K, M) as a row-major copy. Written through a unit axis because XLA folds a plain transpose back
  into the product's dimension numbers (or its layout), which is the slow form this copy exists to avoid."""
  m, k = x.shape
  return jnp.swapaxes(x.reshape(m, k, 1), 0, 1).reshape(k, m)


# From this many positions 'auto' recomputes the attention on a CPU: at GPT-B width and 256 positions that took the
# step's peak down 190 MiB at 0.96-1.09x its time (two rounds at each precision). Below it 'auto' keeps the
# probabilities, in place of XLA's fused attention, whose backward pass spent 18 of the default run's 280 ms step in
# one reduction: the tiny benchmark model's 64-position bf16 step 1.11x faster (two interleaved pairs), the default
# run's 1.04x (median of four).
RECOMPUTE_ATTENTION_FROM = 256


def _training_attention(q, k, v, impl: str) -> jnp.ndarray:
  """Causal attention of the training path: 'recompute' and 'keep' are `_causal_attention` recomputing or keeping the
  probabilities for the backward pass; 'auto' is one of those on a CPU (recompute from RECOMPUTE_ATTENTION_FROM
  positions on), jax's choice elsewhere (cuDNN where it can); 'xla' and 'cudnn' are `jax.nn.dot_product_attention`'s
  implementations."""
  if impl == "auto" and jax.default_backend() == "cpu":
    impl = "recompute" if q.shape[1] >= RECOMPUTE_ATTENTION_FROM else "keep"
  if impl in ("recompute", "keep"):
    return _causal_attention(q, k, v, impl == "recompute")
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=None if impl == "auto" else impl)


def _attention_probabilities(q, k, lse=None):
  """(float32 causal logits (B, N, T, S) scaled by 1/sqrt(H), their log-sum-exp (B, N, T, 1)); with `lse` given, the
  probabilities exp(logits - lse) instead of the logits."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
  if lse is None:
    return logits, jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return jnp.exp(logits - lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, recompute: bool = True) -> jnp.ndarray:
  """Causal softmax attention, q, k, v (B, T, N, H) -> (B, T, N, H), computed as `jax.nn.dot_product_attention`'s
  XLA path does (logits and softmax in float32, probabilities in the inputs' dtype for the product with v).

  With `recompute`, the backward pass gets the inputs and a float32 log-sum-exp per row and recomputes the
  probabilities: XLA's path keeps several float32 copies of every layer's (B, N, T, T) softmax instead (about
  300 MiB at GPT-B width and batch 2), torch's CPU attention a log-sum-exp like this one. Without, it gets the
  float32 probabilities themselves, one copy, which for short sequences is cheaper than recomputing them.
  """
  return _causal_attention_fwd(q, k, v, recompute)[0]


def _causal_attention_fwd(q, k, v, recompute):
  logits, lse = _attention_probabilities(q, k)
  p = jnp.exp(logits - lse)
  out = jnp.einsum("bnts,bsnh->btnh", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)
  return out, (q, k, v, lse if recompute else p)


def _causal_attention_bwd(recompute, residuals, g):
  q, k, v, saved = residuals
  if recompute:
    # q made to depend on g's data, elementwise (so with g's sharding and no communication; it is q for any finite
    # g): otherwise XLA merges the recomputed logits with the forward pass's and keeps those alive until here
    # (XLA:CPU drops optimisation barriers).
    p = _attention_probabilities(q + g * 0, k, saved)
  else:
    p = saved
  dv = jnp.einsum("bnts,btnh->bsnh", p.astype(v.dtype), g, preferred_element_type=jnp.float32).astype(v.dtype)
  dp = jnp.einsum("btnh,bsnh->bnts", g, v, preferred_element_type=jnp.float32)
  ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * (q.shape[-1] ** -0.5)).astype(q.dtype)
  dq = jnp.einsum("bnts,bsnh->btnh", ds, k, preferred_element_type=jnp.float32).astype(q.dtype)
  dk = jnp.einsum("bnts,btnh->bsnh", ds, q, preferred_element_type=jnp.float32).astype(k.dtype)
  return dq, dk, dv


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def _qkv(h, wqkv, rotary):
  """(B, T, D) normed activations -> q, k, v (B, T, N, H), q and k rotated."""
  qkv = _dense(h, wqkv, h.dtype)  # (B, T, 3, N, H): one matmul for the three, like the reference's fused wqkv
  # A split, not three slices: its transpose is one concatenation, where slices' are pads and adds.
  q, k, v = (jnp.squeeze(a, 2) for a in jnp.split(qkv, 3, axis=2))
  return rope.apply_rope(q, *rotary), rope.apply_rope(k, *rotary), v


def _attention_output(out, wo):
  """Attention output (B, T, N, H) through wo (N, H, D)."""
  return _dense(out.reshape(*out.shape[:2], -1), wo.reshape(-1, wo.shape[-1]), out.dtype)


def _feed_forward(x, p, eps):
  h = _rms_normalise(x, eps, p.get("ffn_norm"))
  return _dense(_swiglu(_dense(h, p["w1"], h.dtype), _dense(h, p["w3"], h.dtype)), p["w2"], h.dtype)


@jax.custom_vjp
def _swiglu(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """silu(a) * b, computed in float32 and returned in a's dtype. The backward pass recomputes the sigmoid from a and
  b, kept in their own dtype: autodiff would keep a float32 sigmoid of every layer and write the gate in three
  passes (sigmoid, product, cast) where this one writes it in one."""
  return _swiglu_fwd(a, b)[0]


def _swiglu_fwd(a, b):
  a32 = a.astype(jnp.float32)
  return (a32 * jax.nn.sigmoid(a32) * b.astype(jnp.float32)).astype(a.dtype), (a, b)


def _swiglu_bwd(residuals, g):
  a, b = residuals
  a32, g32 = a.astype(jnp.float32), g.astype(jnp.float32)
  sigmoid = jax.nn.sigmoid(a32)
  d_silu = sigmoid * (1 + a32 * (1 - sigmoid))
  return (g32 * b.astype(jnp.float32) * d_silu).astype(a.dtype), (g32 * a32 * sigmoid).astype(b.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _head(x, output, eps, norm=None):
  """Logits from the final RMSNorm (its weight `norm`, or folded into `output`) and the output projection."""
  return _dense(_rms_normalise(x, eps, norm), output)  # float32 whatever the compute dtype (the reference's `.float()`)


def pack_decode_params(params: dict[str, Any]) -> dict[str, Any]:
  """bfloat16 `GPT.decode_params()` with every kernel packed for `packed_matmul` (the embeddings stay as they are):
  the sampler's form on CPUs that run the kernels of `npp_jax/kernels`. The decode functions multiply such weights
  with that kernel, and their one-query-per-row steps attend with `decode_attention`."""
  pack = lambda name, w: packed_matmul.pack(w, rows=w.ndim - 1 if name == "wo" else 1)  # wo contracts (N, H)
  return {**params, "layers": tuple({name: pack(name, w) for name, w in p.items()} for p in params["layers"]),
          "output": pack("output", params["output"])}


def decode(params: dict[str, Any], cfg: ml_collections.ConfigDict, x: jnp.ndarray, cache: KVCache, pos: jnp.ndarray,
           *, chunk: int = 0) -> tuple[jnp.ndarray, KVCache]:
  """The decode path on `GPT.decode_params()`: x (B, T, D) at positions pos..pos+T-1 -> (logits, cache).

  Positions pos..pos+T-1 must lie in cache chunk `chunk` (static). Each layer writes its new keys and values there
  and attends over chunks 0..chunk, masked to the slots up to each query's position; later chunks are not read,
  so a loop over the positions of one chunk at a time does attention work in proportion to the filled cache.
  """
  t = x.shape[1]
  cos, sin = rope.rope_table(grid_side(cfg), cfg.dim // cfg.n_head, float(cfg.rope_base), cfg.cls_token_num)
  rows = pos + jnp.arange(t)
  rotary = (jnp.asarray(cos)[rows][None], jnp.asarray(sin)[rows][None])
  starts = [0]
  for length in cache.chunk_lengths[:chunk]:
    starts.append(starts[-1] + length)

  def write(chunks, new):
    buf = jax.lax.dynamic_update_slice_in_dim(chunks[chunk], jnp.swapaxes(new, 1, 2).astype(chunks[chunk].dtype),
                                              pos - starts[-1], 2)
    return chunks[:chunk] + (buf,) + chunks[chunk + 1:]

  if t == 1 and _attention_kernel_applies(params, cfg, chunk + 1):
    attend = lambda q, k_chunks, v_chunks: decode_attention.attention(
        q[:, 0], jnp.broadcast_to(pos, q.shape[:1]), k_chunks[:chunk + 1], v_chunks[:chunk + 1])[:, None]
  else:
    attend = lambda q, k_chunks, v_chunks: _cached_attention(q, k_chunks[:chunk + 1], v_chunks[:chunk + 1], starts,
                                                             pos)
  return _decode_layers(params, cfg, x, rotary, cache, write, attend)


def _attention_kernel_applies(params: dict[str, Any], cfg: ml_collections.ConfigDict, chunks: int) -> bool:
  """Decode steps whose weights the sampler packed for the CPU kernels (`pack_decode_params`) also attend with the
  CPU attention kernel, where it takes the head size."""
  return (isinstance(params["output"], packed_matmul.PackedKernel)
          and decode_attention.supports(cfg.dim // cfg.n_head, chunks))


def decode_rows(params: dict[str, Any], cfg: ml_collections.ConfigDict, x: jnp.ndarray, cache: KVCache,
                pos: jnp.ndarray) -> tuple[jnp.ndarray, KVCache]:
  """`decode` with a position per row: x (B, T, D) at positions pos[b]..pos[b]+T-1 of row b -> (logits, cache).

  For loops whose rows advance at different speeds (speculative decoding). The cache must be one chunk with room
  for every pos[b] + T slots; each row writes its T slots (a scatter, in place in a loop) and its queries attend
  over the whole buffer, masked to the slots up to their own position, so slots past it may hold anything.
  Positions past the model's last one reuse the last rotary angle (their outputs are for the caller to ignore).
  """
  if len(cache.chunk_lengths) != 1:
    raise ValueError(f"decode_rows needs a one-chunk cache, got {len(cache.chunk_lengths)} chunks")
  t = x.shape[1]
  cos, sin = rope.rope_table(grid_side(cfg), cfg.dim // cfg.n_head, float(cfg.rope_base), cfg.cls_token_num)
  rows = jnp.minimum(pos[:, None] + jnp.arange(t), cos.shape[0] - 1)
  rotary = (jnp.asarray(cos)[rows], jnp.asarray(sin)[rows])
  row_write = jax.vmap(lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, 1))
  write = lambda chunks, new: (row_write(chunks[0], jnp.swapaxes(new, 1, 2).astype(chunks[0].dtype), pos),)
  attend = lambda q, k_chunks, v_chunks: _cached_attention(q, k_chunks, v_chunks, [0], pos)
  return _decode_layers(params, cfg, x, rotary, cache, write, attend)


def decode_token_rows(params: dict[str, Any], cfg: ml_collections.ConfigDict, x: jnp.ndarray, cache: KVCache,
                      pos: jnp.ndarray) -> tuple[jnp.ndarray, KVCache]:
  """One token per row at its own position over the sampler's chunked cache: x (B, 1, D) at pos[b] -> (logits, cache).

  For loops whose rows start at different times and must reproduce the sampler's numbers (the serving engine): row b
  is computed as `decode(..., pos[b], chunk=c)` computes it, c the chunk holding pos[b]. It writes into chunk c and
  attends over chunks 0..c, so its softmax spans the same slots and its values are summed chunk by chunk in the
  same order (which matters in bfloat16); rows of other chunks take their own result. The attention runs once per
  chunk count and each row keeps its own: attention is a small part of a decode step.
  """
  if x.shape[1] != 1:
    raise ValueError(f"decode_token_rows takes one token per row, got {x.shape[1]}")
  cos, sin = rope.rope_table(grid_side(cfg), cfg.dim // cfg.n_head, float(cfg.rope_base), cfg.cls_token_num)
  rows = jnp.minimum(pos, cos.shape[0] - 1)[:, None]
  rotary = (jnp.asarray(cos)[rows], jnp.asarray(sin)[rows])
  lengths = cache.chunk_lengths
  starts = [sum(lengths[:j]) for j in range(len(lengths))]
  chunk = sum((pos >= start).astype(jnp.int32) for start in starts[1:])
  batch = jnp.arange(x.shape[0])

  def write(chunks, new):
    new = new[:, 0].astype(chunks[0].dtype)  # (B, N, H)
    # Each row writes its slot in its own chunk; the other chunks get an out-of-range index, which is dropped.
    return tuple(buf.at[batch, :, jnp.where(chunk == j, pos - start, length)].set(new, mode="drop")
                 for j, (buf, start, length) in enumerate(zip(chunks, starts, lengths)))

  def attend(q, k_chunks, v_chunks):
    if _attention_kernel_applies(params, cfg, len(lengths)):  # reads each row's slots 0..pos[b] whatever its chunk
      return decode_attention.attention(q[:, 0], pos, k_chunks, v_chunks)[:, None]
    out = None
    for c in range(len(lengths)):
      upto = _cached_attention(q, k_chunks[:c + 1], v_chunks[:c + 1], starts[:c + 1], pos)
      out = upto if out is None else jnp.where((chunk == c)[:, None, None, None], upto, out)
    return out

  return _decode_layers(params, cfg, x, rotary, cache, write, attend)


def _decode_layers(params, cfg, x, rotary, cache, write, attend):
  """The blocks and head of the decode path; `write(chunks, new (B, T, N, H))` stores new keys or values in a
  layer's cache chunks and `attend(q, k_chunks, v_chunks)` reads them."""
  x = x.astype(params["output"].dtype)
  keys, values = [], []
  for p, k_chunks, v_chunks in zip(params["layers"], cache.k, cache.v):
    q, k, v = _qkv(_rms_normalise(x, cfg.norm_eps), p["wqkv"], rotary)
    k_chunks, v_chunks = write(k_chunks, k), write(v_chunks, v)
    out = attend(q, k_chunks, v_chunks)
    x = x + _attention_output(out, p["wo"])
    x = x + _feed_forward(x, p, cfg.norm_eps)
    keys.append(k_chunks)
    values.append(v_chunks)
  return _head(x, params["output"], cfg.norm_eps), KVCache(tuple(keys), tuple(values))


def _cached_attention(q, k_chunks, v_chunks, starts, pos):
  """q (B, T, N, H) at positions pos..pos+T-1 over cache chunks (B, N, len, H) that start at slots `starts`.

  pos is a scalar, or one position per row (B,)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  query_pos = jnp.asarray(pos)[..., None] + jnp.arange(q.shape[1])  # (T,) or (B, T)
  scores = []
  for k, start in zip(k_chunks, starts):
    s = jnp.einsum("btnh,bnsh->bnts", q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    visible = start + jnp.arange(k.shape[2]) <= query_pos[..., None]
    visible = visible[:, None] if visible.ndim == 3 else visible  # per-row masks broadcast over heads
    scores.append(jnp.where(visible, s, -jnp.inf))
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q.dtype)
  out, offset = 0, 0
  for v in v_chunks:
    out = out + jnp.einsum("bnts,bnsh->btnh", probs[..., offset:offset + v.shape[2]], v.astype(q.dtype))
    offset += v.shape[2]
  return out


# "full" recomputes everything in the backward pass; "dots" keeps the weight matmuls' outputs.
_REMAT_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
