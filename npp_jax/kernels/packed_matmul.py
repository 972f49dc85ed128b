"""bfloat16 products for decode steps on CPUs with AVX-512 BF16: weights packed once, a kernel called through the FFI.

A decode step multiplies a few dozen rows (the batch, twice over with guidance) by every weight of the model, so it
reads every weight for a few FLOPs per byte. XLA:CPU's bfloat16 library kernel lays each weight out afresh on every
call and, at 32 rows, reads weights at about 4.5 GB/s (0.70 ms for a 768 x 2048 GPT-B product). Packed once before
the decode loop into the layout the AVX-512 BF16 dot-product instruction reads (`pack`), the same product takes
0.30 ms (`packed_matmul.cc`); `bench/vs_reference.py` prints both rates.

The packed layout of a (K, N) weight is (ceil(N / 32) * 2, K / 2, 32) bfloat16: block b holds columns
16b..16b+15, and its row p holds rows 2p and 2p + 1 of those columns interleaved, [w[2p, 16b], w[2p + 1, 16b],
w[2p, 16b + 1], ...]. Columns past N are zeros and never written out. K must be even.

The kernel is built on first use (`library.py`, which also says where it cannot run). The products are float32
sums of exact bfloat16 products, like XLA's, in another order; each output element is summed in the same order
whatever the number of rows, so a row's result does not depend on the other rows of the batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from npp_jax.kernels import library

_BLOCK = 16  # columns per packed block
_STRIP = 32  # columns per unit of the kernel's work (two blocks); N is padded to a multiple of it


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed"], meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class PackedKernel:
  """A bfloat16 weight of logical `shape` (K, ...), multiplied as a (K, N) matrix, N the product of the rest, and
  held packed (`pack`). `reshape` changes the logical shape as long as it keeps that (K, N) split."""
  packed: jnp.ndarray
  shape: tuple[int, ...]

  @property
  def dtype(self) -> np.dtype:
    return self.packed.dtype

  def reshape(self, *shape: int) -> "PackedKernel":
    shape = tuple(int(d) for d in np.empty(self.shape, dtype=np.bool_).reshape(*shape).shape)
    if _matrix_shape(shape) != _matrix_shape(self.shape):
      raise ValueError(f"a weight packed as {_matrix_shape(self.shape)} cannot be read as {shape}")
    return PackedKernel(self.packed, shape)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  return shape[0], int(np.prod(shape[1:], dtype=np.int64))


def pack(w: jnp.ndarray, rows: int = 1) -> PackedKernel:
  """w, its first `rows` axes the contracted ones (K), the rest the output columns (N), as a `PackedKernel`."""
  shape = (int(np.prod(w.shape[:rows], dtype=np.int64)), *w.shape[rows:])
  k, n = _matrix_shape(shape)
  if k % 2:
    raise ValueError(f"packing needs an even number of rows, got a ({k}, {n}) weight")
  padded = -(-n // _STRIP) * _STRIP
  matrix = jnp.pad(w.reshape(k, n).astype(jnp.bfloat16), ((0, 0), (0, padded - n)))
  blocks = matrix.reshape(k // 2, 2, padded // _BLOCK, _BLOCK).transpose(2, 0, 3, 1)  # (blocks, pairs, lane, 2)
  return PackedKernel(blocks.reshape(padded // _BLOCK, k // 2, 2 * _BLOCK), shape)


def matmul(x: jnp.ndarray, w: PackedKernel) -> jnp.ndarray:
  """x (M, K) bfloat16 times the packed (K, N) weight -> float32 (M, N)."""
  k, n = _matrix_shape(w.shape)
  if x.ndim != 2 or x.shape[1] != k or x.dtype != jnp.bfloat16:
    raise ValueError(f"a packed ({k}, {n}) weight multiplies bfloat16 (M, {k}) rows, got {x.dtype} {x.shape}")
  library.register()
  # Under vmap, one call per element: the kernel takes 2-D operands only.
  call = jax.ffi.ffi_call("npp_packed_bf16_matmul", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x, w.packed)
