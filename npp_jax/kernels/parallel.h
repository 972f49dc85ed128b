// Work split over XLA's intra-op threads, for the kernels of this folder.
//
// Units of work are claimed from a shared counter by the calling thread and by helpers scheduled on the pool; the
// caller returns once every unit is done. A helper that starts after the last unit was claimed does nothing, so the
// caller never waits on a helper that has not started (the pool may be busy with the caller itself).

#ifndef NPP_JAX_KERNELS_PARALLEL_H_
#define NPP_JAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace npp_jax {

// Calls work(first, last) over consecutive ranges covering [0, units), on up to the pool's thread count.
template <typename Work>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units, const Work& work) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  if (units <= 0) return;
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, units);
  const int64_t grain = std::max<int64_t>(1, units / (4 * threads));
  auto progress = std::make_shared<Progress>();
  auto claim = [units, grain, progress, work] {
    for (int64_t first; (first = progress->next.fetch_add(grain)) < units;) {
      const int64_t last = std::min(first + grain, units);
      work(first, last);
      progress->done.fetch_add(last - first, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(claim)(claim));  // each helper owns a copy
  claim();
  while (progress->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace npp_jax

#endif  // NPP_JAX_KERNELS_PARALLEL_H_
