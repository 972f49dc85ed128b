"""The CPU kernels of this folder (`*.cc`) as one shared library, built on first use and registered with XLA's FFI.

They need x86-64 with AVX-512 BF16 and a C++ compiler (`$CXX`, default g++). The library is compiled from every
source here against jaxlib's FFI headers into a cache directory (`$XDG_CACHE_HOME/npp_jax`, default
~/.cache/npp_jax), once per sources, jaxlib version and compiler, and written atomically, so concurrent processes
share it. `unavailable_reason()` says why the kernels cannot run on a backend (not a CPU, a CPU without the
instructions, no compiler, NPP_JAX_CPU_KERNELS=0); callers that can use them ask it first. A build that fails where
they should run raises with the compiler's message.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

OPT_OUT = "NPP_JAX_CPU_KERNELS"
SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cc")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
TARGETS = {"npp_packed_bf16_matmul": "NppPackedBf16Matmul", "npp_decode_attention": "NppDecodeAttention"}
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_bf16"})  # what the kernels need
_COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")


def unavailable_reason(backend: str | None = None) -> str | None:
  """None where the kernels can run on `backend` (default: JAX's default backend), else why not, in a few words."""
  if os.environ.get(OPT_OUT, "1") == "0":
    return f"{OPT_OUT}=0"
  if (backend or jax.default_backend()) != "cpu":
    return "not a CPU backend"
  missing = sorted(CPU_FLAGS - cpu_flags())
  if platform.machine() not in ("x86_64", "AMD64") or missing:
    return f"this CPU lacks {' and '.join(missing) or 'x86-64'}"
  if _compiler() is None:
    return "no C++ compiler (set CXX, or install g++)"
  return None


@functools.cache
def cpu_flags() -> frozenset[str]:
  """The CPU's feature flags as Linux lists them (empty elsewhere)."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  line = next((line for line in text.splitlines() if line.startswith("flags")), "")
  return frozenset(line.partition(":")[2].split())


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "g++"))


def library_path() -> Path:
  """Where the library for these sources, this jaxlib and this compiler lives (built on first use)."""
  import jaxlib
  digest = hashlib.sha256()
  for path in SOURCES + HEADERS:
    digest.update(path.name.encode() + path.read_bytes())
  digest.update(f"{jaxlib.__version__} {_compiler()} {' '.join(_COMPILE_FLAGS)}".encode())
  cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npp_jax"
  return cache / f"cpu_kernels-{digest.hexdigest()[:16]}.so"


def _build(path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    built = Path(tmp) / path.name
    command = [_compiler(), *_COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"building the CPU kernels failed ({' '.join(command)}):\n{result.stderr}")
    os.replace(built, path)  # atomic: a concurrent process sees no library or a whole one


@functools.cache
def register() -> None:
  """Builds the library if needed and registers its FFI targets (`TARGETS`), once per process."""
  reason = unavailable_reason("cpu")
  if reason is not None:
    raise RuntimeError(f"the CPU kernels cannot run here: {reason}")
  path = library_path()
  if not path.exists():
    _build(path)
  library = ctypes.CDLL(str(path))
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
