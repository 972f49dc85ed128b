"""host_memory: the trainer hands freed heap back to the system after compiling and initialising."""

import platform

import pytest

from npp_jax.trainers import host_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_heap_is_trimmed_after_freeing_small_allocations():
  """On glibc the trim is found and releases the pages of freed small allocations (which glibc keeps)."""
  assert host_memory._malloc_trim() is not None
  blocks = [bytearray(4096) for _ in range(20_000)]  # 80 MB of small allocations, from the heap rather than mmap
  del blocks
  assert host_memory.release_freed()
