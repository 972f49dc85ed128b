// One new query per row against a bfloat16 KV cache held in chunks, for XLA:CPU decode steps, through the XLA FFI.
//
// XLA:CPU runs a batched bfloat16 product as a float32 one, so its attention over the cache converted every chunk it
// read to float32 on every step; here each cached key and value is read once, as bfloat16. Row b's query attends
// slots 0..pos[b] of the cache (the chunks laid end to end); slots past it are not read. Scores and the softmax are
// float32, the probabilities stay float32, and the output is rounded to bfloat16 once. Each (row, head) is computed
// alone and in slot order, so its result does not depend on the other rows or on how the cache is cut into chunks.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxChunks = 16;
constexpr int64_t kMaxHeadVectors = 16;  // head_dim up to 256

inline __m512 LoadBf16(const uint16_t* p) {  // 16 bfloat16 -> 16 float32, exactly
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// exp(x) for x <= 0 to about 2 ulp: x = k ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to degree 7.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // below, exp is 0 in float32 anyway
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860682030941723e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, k);
}

struct Cache {
  const uint16_t* k[kMaxChunks];
  const uint16_t* v[kMaxChunks];
  int64_t length[kMaxChunks];
  int64_t chunks, slots, heads, head_dim;
};

void AttendOne(const Cache& cache, const uint16_t* q, int64_t pos, int64_t b, int64_t n, float scale,
               std::vector<float>& scores, uint16_t* out) {
  const int64_t h_vectors = cache.head_dim / kLanes, last = std::min(pos, cache.slots - 1);
  __m512 query[kMaxHeadVectors], acc[kMaxHeadVectors];
  for (int64_t h = 0; h < h_vectors; ++h) {
    query[h] = LoadBf16(q + h * kLanes);
    acc[h] = _mm512_setzero_ps();
  }
  if (last < 0) {  // nothing visible: zeros (a row the caller ignores)
    for (int64_t h = 0; h < h_vectors; ++h) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * kLanes),
                                                                 _mm256_setzero_si256());
    return;
  }
  scores.resize(last + 1 + kLanes);
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0, t = 0; c < cache.chunks && t <= last; ++c) {
    const uint16_t* keys = cache.k[c] + (b * cache.heads + n) * cache.length[c] * cache.head_dim;
    for (int64_t i = 0; i < cache.length[c] && t <= last; ++i, ++t) {
      __m512 dot = _mm512_setzero_ps();
      const uint16_t* key = keys + i * cache.head_dim;
      for (int64_t h = 0; h < h_vectors; ++h) dot = _mm512_fmadd_ps(query[h], LoadBf16(key + h * kLanes), dot);
      scores[t] = _mm512_reduce_add_ps(dot) * scale;
      best = std::max(best, scores[t]);
    }
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t <= last; t += kLanes) {
    const __mmask16 live = last + 1 - t >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << (last + 1 - t)) - 1);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores.data() + t), _mm512_set1_ps(best)));
    _mm512_mask_storeu_ps(scores.data() + t, live, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
  }
  for (int64_t c = 0, t = 0; c < cache.chunks && t <= last; ++c) {
    const uint16_t* values = cache.v[c] + (b * cache.heads + n) * cache.length[c] * cache.head_dim;
    for (int64_t i = 0; i < cache.length[c] && t <= last; ++i, ++t) {
      const __m512 p = _mm512_set1_ps(scores[t]);
      const uint16_t* value = values + i * cache.head_dim;
      for (int64_t h = 0; h < h_vectors; ++h) acc[h] = _mm512_fmadd_ps(p, LoadBf16(value + h * kLanes), acc[h]);
    }
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t h = 0; h < h_vectors; ++h) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[h], inverse));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * kLanes), reinterpret_cast<const __m256i&>(rounded));
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::S32> pos,
                           ffi::RemainingArgs chunks, ffi::ResultBuffer<ffi::BF16> out) {
  const auto q_dims = q.dimensions();
  if (q_dims.size() != 3 || pos.dimensions().size() != 1 || pos.dimensions()[0] != q_dims[0]) {
    return ffi::Error::InvalidArgument("decode_attention takes q (B, N, H) and pos (B,)");
  }
  Cache cache{};
  cache.heads = q_dims[1];
  cache.head_dim = q_dims[2];
  cache.chunks = static_cast<int64_t>(chunks.size()) / 2;
  if (chunks.size() % 2 || cache.chunks == 0 || cache.chunks > kMaxChunks || cache.head_dim % kLanes ||
      cache.head_dim > kLanes * kMaxHeadVectors) {
    return ffi::Error::InvalidArgument("decode_attention takes 1-16 key chunks then as many value chunks, and a "
                                       "head size that is a multiple of 16 up to 256");
  }
  for (int64_t c = 0; c < 2 * cache.chunks; ++c) {
    auto chunk = chunks.get<ffi::Buffer<ffi::BF16>>(c);
    if (!chunk.has_value()) return chunk.error();
    const auto dims = chunk->dimensions();
    if (dims.size() != 4 || dims[0] != q_dims[0] || dims[1] != cache.heads || dims[3] != cache.head_dim ||
        (c >= cache.chunks && dims[2] != cache.length[c - cache.chunks])) {
      return ffi::Error::InvalidArgument("decode_attention: a cache chunk is not (B, N, length, H) like q");
    }
    const auto* data = reinterpret_cast<const uint16_t*>(chunk->typed_data());
    if (c < cache.chunks) {
      cache.k[c] = data;
      cache.length[c] = dims[2];
      cache.slots += dims[2];
    } else {
      cache.v[c - cache.chunks] = data;
    }
  }
  const auto* queries = reinterpret_cast<const uint16_t*>(q.typed_data());
  const int32_t* positions = pos.typed_data();
  auto* outputs = reinterpret_cast<uint16_t*>(out->typed_data());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(cache.head_dim)));
  const int64_t heads = cache.heads, head_dim = cache.head_dim;
  npp_jax::ParallelFor(pool, q_dims[0] * heads, [&cache, queries, positions, outputs, scale, heads, head_dim](
                                                    int64_t first, int64_t last) {
    std::vector<float> scores;
    for (int64_t u = first; u < last; ++u) {
      const int64_t b = u / heads, n = u % heads;
      AttendOne(cache, queries + u * head_dim, positions[b], b, n, scale, scores, outputs + u * head_dim);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NppDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q (B, N, H)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos (B,): row b attends slots 0..pos[b]
                                  .RemainingArgs()                // key chunks, then value chunks (B, N, len, H)
                                  .Ret<ffi::Buffer<ffi::BF16>>()); // out (B, N, H)
