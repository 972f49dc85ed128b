// bfloat16 products with few rows, for XLA:CPU decode steps: out (M, N) float32 = x (M, K) bfloat16 times a weight
// (K, N) bfloat16 packed once for AVX-512 BF16 (see packed_matmul.py for the layout), through the XLA FFI.
//
// A decode step multiplies a few dozen rows by every weight of the model once, so its products stream weights from
// memory. XLA:CPU's library kernel re-lays out the weight on every call and reaches less than half the rate at
// which a layout made once can be read. Here each weight is read once, in order, and each 32-column strip of it
// is reused from the core's cache by every 12-row tile of x.

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;            // float32 lanes of a 512-bit register: the columns of one packed block
constexpr int64_t kStripBlocks = 2;       // blocks per strip, the unit of work
constexpr int kTileRows = 12;             // 12 rows x 2 blocks = 24 accumulators, plus 2 weight and 1 row register

// Rows [0, R) of x times one strip: blocks w0 and w1 of `pairs` (K / 2) packed rows each; writes out's columns
// [col, col + 32) that are below n.
template <int R>
void StripTile(const uint16_t* x, int64_t k, const uint16_t* w0, const uint16_t* w1, int64_t pairs, float* out,
               int64_t n, int64_t col) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + p * 2 * kLanes);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * 2 * kLanes);
    for (int r = 0; r < R; ++r) {
      int32_t pair;  // x[r, 2p] and x[r, 2p + 1], broadcast to every lane
      std::memcpy(&pair, x + r * k + 2 * p, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], a, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], a, b1);
    }
  }
  const int64_t left = n - col;  // > 0: a strip starts below n
  const __mmask16 m0 = left >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
  const __mmask16 m1 = left >= 2 * kLanes ? 0xFFFF
                       : left <= kLanes   ? 0
                                          : static_cast<__mmask16>((1u << (left - kLanes)) - 1);
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(out + r * n + col, m0, acc0[r]);
    _mm512_mask_storeu_ps(out + r * n + col + kLanes, m1, acc1[r]);
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, float*, int64_t, int64_t);

template <int... R>
constexpr auto MakeTiles(std::integer_sequence<int, R...>) {
  return std::array<TileFn, sizeof...(R)>{&StripTile<R + 1>...};
}
constexpr auto kTiles = MakeTiles(std::make_integer_sequence<int, kTileRows>{});

struct Product {
  const uint16_t* x;
  const uint16_t* packed;
  float* out;
  int64_t m, k, n;

  // Strip s: its weight blocks are read from memory once, then from cache by the remaining row tiles.
  void Strip(int64_t s) const {
    const int64_t pairs = k / 2, block = pairs * 2 * kLanes;
    const uint16_t* w0 = packed + s * kStripBlocks * block;
    for (int64_t row = 0; row < m; row += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, m - row);
      kTiles[rows - 1](x + row * k, k, w0, w0 + block, pairs, out + row * n, n, s * kStripBlocks * kLanes);
    }
  }
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> packed,
                        ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions(), w_dims = packed.dimensions(), out_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || out_dims.size() != 2) {
    return ffi::Error::InvalidArgument("packed_matmul takes x (M, K), packed (N/16, K/2, 32) and out (M, N)");
  }
  const Product product{reinterpret_cast<const uint16_t*>(x.typed_data()),
                        reinterpret_cast<const uint16_t*>(packed.typed_data()), out->typed_data(), x_dims[0],
                        x_dims[1], out_dims[1]};
  if (product.k % 2 || w_dims[1] * 2 != product.k || w_dims[2] != 2 * kLanes || w_dims[0] % kStripBlocks ||
      w_dims[0] * kLanes < product.n || out_dims[0] != product.m) {
    return ffi::Error::InvalidArgument("packed_matmul: the shapes of x, the packed weight and out do not agree");
  }
  const int64_t strips = w_dims[0] / kStripBlocks;
  if (product.m == 0 || strips == 0) return ffi::Error::Success();
  npp_jax::ParallelFor(pool, strips, [product](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) product.Strip(s);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NppPackedBf16Matmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x (M, K)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // packed weight (N_pad/16, K/2, 32)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out (M, N)
