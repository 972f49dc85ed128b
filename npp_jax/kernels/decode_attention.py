"""Attention of one new query per row over the sampler's bfloat16 KV cache chunks, as a CPU kernel.

XLA:CPU runs batched bfloat16 products in float32, so its decode-step attention converted each cache chunk it read
to float32 on every step: at GPT-B width most of a step's time once the products were packed. The kernel
(`decode_attention.cc`, built by `library.py`) reads each cached key and value once as bfloat16. Row b attends
slots 0..pos[b] of the chunks laid end to end; scores, softmax and the weighted sum are float32, the output is
rounded to bfloat16 once. A row's result depends only on its own query, cache and position, not on the other rows
or on how the cache is cut into chunks.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from npp_jax.kernels import library

MAX_CHUNKS = 16


def supports(head_dim: int, chunks: int) -> bool:
  """Whether the kernel takes this head size and chunk count (the CPU aside: `library.unavailable_reason`)."""
  return head_dim % 16 == 0 and head_dim <= 256 and 1 <= chunks <= MAX_CHUNKS


def attention(q: jnp.ndarray, pos: jnp.ndarray, k_chunks: Sequence[jnp.ndarray], v_chunks: Sequence[jnp.ndarray]
              ) -> jnp.ndarray:
  """q (B, N, H) bfloat16, pos (B,) int32, chunks (B, N, length, H) bfloat16 -> (B, N, H) bfloat16."""
  if q.dtype != jnp.bfloat16 or q.ndim != 3 or not supports(q.shape[-1], len(k_chunks)):
    raise ValueError(f"decode attention takes bfloat16 (B, N, H) queries with H a multiple of 16 up to 256 and 1-"
                     f"{MAX_CHUNKS} chunks, got {q.dtype} {q.shape} and {len(k_chunks)} chunks")
  library.register()
  # Under vmap, one call per element: the kernel takes these ranks only.
  call = jax.ffi.ffi_call("npp_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.bfloat16),
                          vmap_method="sequential")
  return call(q, pos.astype(jnp.int32), *k_chunks, *v_chunks)
