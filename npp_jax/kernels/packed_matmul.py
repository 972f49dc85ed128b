"""bfloat16 products for decode steps on CPUs with AVX-512 BF16: weights packed once, a kernel called through the FFI.

A decode step multiplies a few dozen rows (the batch, twice over with guidance) by every weight of the model, so it
reads every weight for a few FLOPs per byte. XLA:CPU's bfloat16 library kernel lays each weight out afresh on every
call and, at 32 rows, reads weights at about 4.5 GB/s (0.70 ms for a 768 x 2048 GPT-B product). Packed once before
the decode loop into the layout the AVX-512 BF16 dot-product instruction reads (`pack`), the same product takes
0.30 ms (`packed_matmul.cc`); `bench/vs_reference.py` prints both rates.

The packed layout of a (K, N) weight is (ceil(N / 32) * 2, K / 2, 32) bfloat16: block b holds columns
16b..16b+15, and its row p holds rows 2p and 2p + 1 of those columns interleaved, [w[2p, 16b], w[2p + 1, 16b],
w[2p, 16b + 1], ...]. Columns past N are zeros and never written out. K must be even.

The kernel is compiled from its source on first use, with the system's C++ compiler, into a cache directory
(`$XDG_CACHE_HOME/npp_jax`, default ~/.cache/npp_jax), once per source and jaxlib version. `unavailable_reason()`
says why it cannot be used here (no AVX-512 BF16, no compiler, not a CPU backend, NPP_JAX_PACKED_MATMUL=0); a
failing build raises. The products are float32 sums of exact bfloat16 products, like XLA's, in another order; each
output element is summed in the same order whatever the number of rows, so a row's result does not depend on the
other rows of the batch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

OPT_OUT = "NPP_JAX_PACKED_MATMUL"
SOURCE = Path(__file__).with_name("packed_matmul.cc")
_TARGET = "npp_packed_bf16_matmul"
_SYMBOL = "NppPackedBf16Matmul"
_BLOCK = 16  # columns per packed block
_STRIP = 32  # columns per unit of the kernel's work (two blocks); N is padded to a multiple of it
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
_COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")


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
  _register()
  # Under vmap, one call per element: the kernel takes 2-D operands only.
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method="sequential")
  return call(x, w.packed)


def unavailable_reason(backend: str | None = None) -> str | None:
  """None where the kernel can run on `backend` (default: JAX's default backend), else why not, in a few words."""
  if os.environ.get(OPT_OUT, "1") == "0":
    return f"{OPT_OUT}=0"
  if (backend or jax.default_backend()) != "cpu":
    return "not a CPU backend"
  missing = [flag for flag in _CPU_FLAGS if flag not in _cpu_flags()]
  if platform.machine() not in ("x86_64", "AMD64") or missing:
    return f"this CPU lacks {' and '.join(missing) or 'x86-64'}"
  if _compiler() is None:
    return "no C++ compiler (set CXX, or install g++)"
  return None


@functools.cache
def _cpu_flags() -> frozenset[str]:
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  line = next((line for line in text.splitlines() if line.startswith("flags")), "")
  return frozenset(line.partition(":")[2].split())


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "g++"))


def library_path() -> Path:
  """Where the compiled kernel for this source, jaxlib and compiler lives (built on first use)."""
  import jaxlib
  digest = hashlib.sha256(SOURCE.read_bytes())
  digest.update(f"{jaxlib.__version__} {_compiler()} {' '.join(_COMPILE_FLAGS)}".encode())
  cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npp_jax"
  return cache / f"packed_matmul-{digest.hexdigest()[:16]}.so"


def _build(path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    built = Path(tmp) / path.name
    command = [_compiler(), *_COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"building the packed matmul kernel failed ({' '.join(command)}):\n{result.stderr}")
    os.replace(built, path)  # atomic: a concurrent process sees no library or a whole one


@functools.cache
def _register() -> None:
  reason = unavailable_reason("cpu")
  if reason is not None:
    raise RuntimeError(f"the packed matmul kernel cannot run here: {reason}")
  path = library_path()
  if not path.exists():
    _build(path)
  library = ctypes.CDLL(str(path))
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(library, _SYMBOL)), platform="cpu")
