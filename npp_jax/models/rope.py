"""LlamaGen's 2D rotary position embedding.

Each attention head's `head_dim` features form head_dim/2 interleaved pairs (2j, 2j+1). The first half of the pairs
rotates with the token's grid row, the second half with its column, at frequencies
w_i = base^(-2i / (head_dim/2)), i < head_dim/4. The class-token rows of the table are all zeros (cos = sin = 0),
which zeroes the class token's queries and keys in every layer: released checkpoints depend on it, so it is
reproduced rather than replaced by an identity rotation.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from npp_jax import errors


@functools.lru_cache(maxsize=64)
def rope_table(grid: int, head_dim: int, base: float = 10000.0,
               cls_token_num: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Returns (cos, sin), each (cls_token_num + grid*grid, head_dim // 2) float32, rows in sequence order.

  Row s is the angle table of sequence position s: the class token(s) first, then grid cells in raster order.
  NPP passes the coarse grid (grid // patch_side), so a patch gets the integer position of its block.
  """
  if head_dim % 4:
    raise errors.InvalidInput(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
  half = head_dim // 2
  freqs = 1.0 / (base ** (np.arange(0, half, 2)[: half // 2].astype(np.float32) / half))
  pos = np.arange(grid, dtype=np.float32)
  rows = np.broadcast_to(np.outer(pos, freqs)[:, None, :], (grid, grid, freqs.size))
  cols = np.broadcast_to(np.outer(pos, freqs)[None, :, :], (grid, grid, freqs.size))
  angles = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, half)
  cos = np.concatenate([np.zeros((cls_token_num, half), np.float32), np.cos(angles)], axis=0)
  sin = np.concatenate([np.zeros((cls_token_num, half), np.float32), np.sin(angles)], axis=0)
  cos.flags.writeable = sin.flags.writeable = False
  return cos, sin


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates interleaved pairs of x (B, T, N, D) by per-position angles cos/sin (B or 1, T, D/2), in float32.

  Written as x * cos' + swap_pairs(x) * sin' over the full feature axis (cos' repeats each angle's cosine for both
  members of its pair, sin' is (-sin, sin) per pair): the same products and sums as rotating each pair, with no
  slicing or stacking, whose transposes (pads and adds) XLA fuses into slow loops in the backward pass.
  """
  dtype = x.dtype
  x = x.astype(jnp.float32)
  cos_pairs = jnp.repeat(cos, 2, axis=-1)[:, :, None, :]
  sin_pairs = jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], -1)[:, :, None, :]
  swapped = jnp.flip(x.reshape(*x.shape[:-1], -1, 2), axis=-1).reshape(x.shape)
  return (x * cos_pairs + swapped * sin_pairs).astype(dtype)
