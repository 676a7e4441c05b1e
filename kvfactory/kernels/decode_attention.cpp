// Decode attention (one or a few new query tokens) over a quantized cache or a ragged cache, fp32 inside, CPU.
//
// Both ops cut every (batch, KV head)'s keys into chunks ("sources"), attend each chunk on its own with an online
// softmax (its max m, its sum of exp l, its unnormalized output acc: split-K, as flash-decoding does) and merge the
// chunks of a (batch, KV head) at the end. GQA is native: the g query heads of a KV head and the nq new tokens form
// the g*nq rows of one problem (row r = head-in-group * nq + token), so every key is read once for all of them.
//
// Quantized chunks read KIVI's packed codes (kvfactory.quant.groups / packing); no dequantized cache is
// materialised: each chunk (at most kChunk tokens) is dequantized a side at a time into one L2-sized tile, keys per
// channel (a group of G tokens shares scale s[c] and zero z[c]), values per token (a group of Gv channels shares
// s_t, z_t), k = z + s * code as kvfactory dequantizes, then attended with two BLAS calls as a dense chunk is.
// Codes of one byte are 8/b channels apart in the packed order (channel per_byte*j + slot at bit nbits*slot): the
// tile keeps the permuted "slot-major" order (the query permuted once per chunk, the output un-permuted once), so
// dequantizing is a contiguous shift-mask-multiply-add loop the compiler vectorizes. (An earlier version folded the
// scales into the query and multiplied raw codes per 128-token group and bit slot: 16 small BLAS calls per chunk
// instead of 2, slower at every context measured.)
// Registered as torch.ops.kvfactory.quantized_decode_attention and torch.ops.kvfactory.ragged_decode_attention.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kAllVisible = std::numeric_limits<int64_t>::max() / 4;

// fp16 or fp32 scales / zero-points (kvfactory keeps them fp16 unless a range overflows fp16).
struct Side {
  const void* data = nullptr;
  bool half = true;
  float operator[](int64_t i) const {
    return half ? static_cast<float>(static_cast<const c10::Half*>(data)[i]) : static_cast<const float*>(data)[i];
  }
};

// One chunk of one (batch, KV head)'s keys and values.
struct Source {
  int64_t batch = 0, head = 0, count = 0;
  // which rows see which tokens: token t (index within the chunk's whole source) is visible to new token i iff
  // t + first <= causal_base + i; valid (nullable) marks real tokens (stride valid_stride)
  int64_t first = 0, causal_base = kAllVisible;
  const bool* valid = nullptr;
  int64_t valid_stride = 1;
  // dense rows (fp32): row t of keys at k + t * row_stride
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t row_stride = 0;
  // quantized rows: codes (count, packed_width) from the first token of the chunk, the chunk starts a key group
  bool quantized = false;
  const uint8_t* key_codes = nullptr;
  const uint8_t* value_codes = nullptr;
  Side key_scale, key_zero;      // (groups, d) from the chunk's first group
  Side value_scale, value_zero;  // (count, d / value_group) from the chunk's first token
};

struct Shape {
  int64_t groups, nq, rows, head_dim;
  int64_t nbits, key_group, value_group;
  float scale;                     // 1 / sqrt(head_dim), applied to the logits (folded into the query or the BLAS call)
  const int64_t* channel = nullptr;  // quantized: channel of each slot-major index (see channel_of), d entries
};

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

float row_max(const float* row, int64_t length) {
  Vec best(kNegInf);
  int64_t j = 0;
  for (; j + kLanes <= length; j += kLanes) best = at::vec::maximum(best, Vec::loadu(row + j));
  float result = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, best);
  for (; j < length; ++j) result = std::max(result, row[j]);
  return result;
}

// row[j] = exp(row[j] - shift) (exp(-inf) = 0); returns their sum.
float exp_in_place(float* row, int64_t length, float shift) {
  const Vec vshift(shift);
  Vec sum(0.f);
  int64_t j = 0;
  for (; j + kLanes <= length; j += kLanes) {
    const Vec x = (Vec::loadu(row + j) - vshift).exp_u20();
    x.store(row + j);
    sum = sum + x;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
  for (; j < length; ++j) {
    row[j] = std::exp(row[j] - shift);
    total += row[j];
  }
  return total;
}

inline void axpy(float* y, const float* x, float w, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// The Fortran BLAS sgemm PyTorch links in (as causal_attention_column_sums.cpp): column-major
// C (m x n) = alpha * op(A) * op(B) + beta * C.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  sgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

// channel of slot-major index i (tabulated once per call in Shape::channel rather than computed per lookup: two
// 64-bit divisions each, 640 lookups per 512-token chunk)
inline int64_t channel_of(int64_t i, int64_t per_byte, int64_t width) { return (i % width) * per_byte + i / width; }

// Dequantizes one token's packed codes (`width` bytes, j = 0..width-1) into its per_byte slot runs:
// out[slot * out_stride + j] = z + s * ((in[j] >> (slot * nbits)) & mask), where s, z are scale[slot * width + j],
// zero[...] (keys: one per channel, slot-major) or, kBroadcast, scale[0], zero[0] (values: one per group). Each
// 16 codes (AVX-512, a masked tail) or 8 (AVX2) are widened once and shifted per slot; compilers left the plain
// loop scalar for the short runs of 2-bit codes (16 bytes per 64 channels).
template <bool kBroadcast>
inline void dequantize_slots(const uint8_t* in, int64_t width, int64_t per_byte, int64_t nbits, const float* scale,
                             const float* zero, float* out, int64_t out_stride) {
  const unsigned mask = (1u << nbits) - 1u;
  int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const __m512i vmask = _mm512_set1_epi32(static_cast<int>(mask));
  for (; j < width; j += 16) {
    const __mmask16 live = width - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (width - j)) - 1u);
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, in + j));
    for (int64_t slot = 0; slot < per_byte; ++slot) {
      const __m512i shifted = _mm512_srl_epi32(codes, _mm_cvtsi32_si128(static_cast<int>(slot * nbits)));
      const __m512 x = _mm512_cvtepi32_ps(_mm512_and_si512(shifted, vmask));
      const __m512 sc = kBroadcast ? _mm512_set1_ps(scale[0]) : _mm512_maskz_loadu_ps(live, scale + slot * width + j);
      const __m512 ze = kBroadcast ? _mm512_set1_ps(zero[0]) : _mm512_maskz_loadu_ps(live, zero + slot * width + j);
      _mm512_mask_storeu_ps(out + slot * out_stride + j, live, _mm512_fmadd_ps(x, sc, ze));
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256i vmask = _mm256_set1_epi32(static_cast<int>(mask));
  for (; j + 8 <= width; j += 8) {
    const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + j)));
    for (int64_t slot = 0; slot < per_byte; ++slot) {
      const __m256i shifted = _mm256_srl_epi32(codes, _mm_cvtsi32_si128(static_cast<int>(slot * nbits)));
      const __m256 x = _mm256_cvtepi32_ps(_mm256_and_si256(shifted, vmask));
      const __m256 sc = kBroadcast ? _mm256_set1_ps(scale[0]) : _mm256_loadu_ps(scale + slot * width + j);
      const __m256 ze = kBroadcast ? _mm256_set1_ps(zero[0]) : _mm256_loadu_ps(zero + slot * width + j);
      _mm256_storeu_ps(out + slot * out_stride + j, _mm256_fmadd_ps(x, sc, ze));
    }
  }
#endif
  for (; j < width; ++j) {
    for (int64_t slot = 0; slot < per_byte; ++slot) {
      const float x = static_cast<float>((in[j] >> (slot * nbits)) & mask);
      const int64_t side = kBroadcast ? 0 : slot * width + j;
      out[slot * out_stride + j] = std::fma(x, scale[side], zero[side]);
    }
  }
}

// Dequantizes a chunk's keys into tile (count x d floats, each row in slot-major order): per key group of G tokens
// the channels' scales and zero-points are permuted once, then each token is dequantized (k = z + s * code, as
// kvfactory.quant.groups dequantizes).
void dequantize_keys(const Shape& s, const Source& src, float* tile, float* scale, float* zero) {
  const int64_t d = s.head_dim, per_byte = 8 / s.nbits, width = d / per_byte;
  for (int64_t start = 0; start < src.count; start += s.key_group) {
    const int64_t group = start / s.key_group, end = std::min(src.count, start + s.key_group);
    for (const auto i : c10::irange(d)) {
      const int64_t c = s.channel[i];
      scale[i] = src.key_scale[group * d + c];
      zero[i] = src.key_zero[group * d + c];
    }
    for (int64_t t = start; t < end; ++t) {
      dequantize_slots<false>(src.key_codes + t * width, width, per_byte, s.nbits, scale, zero, tile + t * d, width);
    }
  }
}

// Dequantizes a chunk's values into tile (count x d, slot-major rows): per token, each group of Gv channels shares
// a scale and zero-point; in slot-major order a group is the same j-range [g * Gv / per_byte, ...) of every slot.
void dequantize_values(const Shape& s, const Source& src, float* tile) {
  const int64_t d = s.head_dim, per_byte = 8 / s.nbits, width = d / per_byte;
  const int64_t vgroups = d / s.value_group, group_width = s.value_group / per_byte;
  for (const auto t : c10::irange(src.count)) {
    for (const auto g : c10::irange(vgroups)) {
      const float sc = src.value_scale[t * vgroups + g], ze = src.value_zero[t * vgroups + g];
      dequantize_slots<true>(src.value_codes + t * width + g * group_width, group_width, per_byte, s.nbits, &sc, &ze,
                             tile + t * d + g * group_width, width);
    }
  }
}

// Masks the logits (rows x count) of tokens a row must not see: invalid ones, and causality among the new tokens.
void mask_logits(const Shape& s, const Source& src, float* logits) {
  const int64_t count = src.count;
  for (const auto t : c10::irange(count)) {
    const bool invalid = src.valid && !src.valid[t * src.valid_stride];
    if (!invalid && src.first + t <= src.causal_base) continue;  // visible to every new token
    for (const auto r : c10::irange(s.rows)) {
      if (invalid || src.first + t > src.causal_base + r % s.nq) logits[r * count + t] = kNegInf;
    }
  }
}

// Attends one chunk: writes m (rows), l (rows) and acc (rows x d, natural channel order). A quantized chunk is
// dequantized a side at a time into one L2-sized tile (count x d; never the whole cache) in the packed slot-major
// channel order, attended with the query permuted to that order, and its output un-permuted: two BLAS calls per
// chunk, as for a dense chunk (many small per-group calls cost more than the multiplications themselves).
void attend_chunk(const Shape& s, const Source& src, const float* q, float* m, float* l, float* acc,
                  std::vector<float>& logits, std::vector<float>& scratch) {
  const int64_t rows = s.rows, d = s.head_dim, count = src.count;
  logits.resize(rows * count);
  float* P = logits.data();  // rows x count, row-major (column-major count x rows, ld count)
  const float* keys = src.k;
  const float* query = q;
  int64_t stride = src.row_stride;
  float *tile = nullptr, *permuted = nullptr;
  float alpha = s.scale;  // the query is scaled in the logits product (or in its permuted copy)
  if (src.quantized) {
    scratch.resize(count * d + 2 * rows * d + 2 * d);
    tile = scratch.data();
    permuted = tile + count * d;  // rows x d: the query, then the output, in slot-major order
    float* sides = permuted + rows * d;
    dequantize_keys(s, src, tile, sides, sides + d);
    for (const auto r : c10::irange(rows)) {
      for (const auto i : c10::irange(d)) permuted[r * d + i] = s.scale * q[r * d + s.channel[i]];
    }
    keys = tile, query = permuted, stride = d, alpha = 1.f;
  }
  // -- logits
  gemm('T', 'N', count, rows, d, alpha, keys, stride, query, d, 0.f, P, count);
  mask_logits(s, src, P);
  // -- softmax statistics of the chunk
  for (const auto r : c10::irange(rows)) {
    float* row = P + r * count;
    const float best = row_max(row, count);
    m[r] = best;
    if (best != kNegInf) {
      l[r] = exp_in_place(row, count, best);
    } else {
      std::fill(row, row + count, 0.f);
      l[r] = 0.f;
    }
  }
  // -- weighted values
  if (!src.quantized) {
    gemm('N', 'N', d, rows, count, 1.f, src.v, src.row_stride, P, count, 0.f, acc, d);
    return;
  }
  dequantize_values(s, src, tile);
  gemm('N', 'N', d, rows, count, 1.f, tile, d, P, count, 0.f, permuted, d);
  for (const auto r : c10::irange(rows)) {
    for (const auto i : c10::irange(d)) acc[r * d + s.channel[i]] = permuted[r * d + i];
  }
}

// Below this many (row, token) logits a call runs on one thread (C=128 tokens per head, 3 KV heads: 1.2k logits,
// serial; C=1024: 9k logits, on every thread as the dense store's sdpa is).
constexpr int64_t kSerialWork = 1 << 13;
constexpr int64_t kQuantizedWeight = 4;

// Below this many merged output values (sources x rows x d) the merge runs on the calling thread: it is a few
// thousand multiply-adds, less than waking the pool a second time costs.
constexpr int64_t kSerialMerge = 1 << 18;

// Runs every source and merges the chunks of each (batch, KV head). query (B, Hq, nq, d) fp32 contiguous.
at::Tensor run_sources(const at::Tensor& query, const Shape& s, int64_t num_kv_heads,
                       const std::vector<Source>& sources) {
  const int64_t batch = query.size(0), rows = s.rows, d = s.head_dim;
  // the rows of (b, kv head) are contiguous in (B, Hq, nq, d): head-in-group then token
  const float* q = query.data_ptr<float>();
  const int64_t items = static_cast<int64_t>(sources.size());
  std::vector<float> partial(items * rows * (d + 2));
  // a small cache is attended on the calling thread: waking the pool would cost more than the work
  int64_t work = 0;
  // a quantized token costs its dequantization besides its logits: weighted so that a 2k-token KIVI layer of
  // SmolLM2 (18k logits, 0.4-0.5 ms on one thread) runs on every thread, as sdpa's fullkv step does
  std::vector<int64_t> cost(items), order(items);
  for (const auto item : c10::irange(items)) {
    const Source& src = sources[item];
    cost[item] = src.count * rows * (src.quantized ? kQuantizedWeight : 1);
    work += cost[item];
    order[item] = item;
  }
  // the threads take the sources dynamically, the costliest first (longest processing time first): a static split
  // of the list gave one thread 2237 of a ragged layer's 3075 tokens (heads of 1216, 1020 and 836 tokens) and one
  // thread 7 of a 2k KIVI layer's 12 quantized chunks
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  const auto run = [&](int64_t, int64_t) {
    // kept per thread between calls: a tile of 512 tokens is over malloc's mmap threshold, and mapping it afresh
    // every call (page faults on every first touch) cost as much as attending it
    thread_local std::vector<float> logits, scratch;
    for (int64_t taken = next.fetch_add(1); taken < items; taken = next.fetch_add(1)) {
      const int64_t item = order[taken];
      const Source& src = sources[item];
      float* base = partial.data() + item * rows * (d + 2);
      attend_chunk(s, src, q + (src.batch * num_kv_heads + src.head) * rows * d, base, base + rows,
                   base + 2 * rows, logits, scratch);
    }
  };
  const int64_t threads = work < kSerialWork ? 1 : std::min<int64_t>(at::get_num_threads(), items);
  if (threads <= 1) {
    run(0, 1);
  } else {
    at::parallel_for(0, threads, 1, run);
  }
  at::Tensor out = at::empty({batch, num_kv_heads * s.groups, s.nq, d}, query.options());
  float* o = out.data_ptr<float>();
  // sources are listed (b, head)-major: find each problem's range
  std::vector<int64_t> first(batch * num_kv_heads + 1, items);
  for (int64_t item = items - 1; item >= 0; --item) first[sources[item].batch * num_kv_heads + sources[item].head] = item;
  for (int64_t p = batch * num_kv_heads - 1; p >= 0; --p) first[p] = std::min(first[p], first[p + 1]);
  const int64_t problems = batch * num_kv_heads;
  at::parallel_for(0, problems, items * rows * d < kSerialMerge ? problems : 1, [&](int64_t begin, int64_t end) {
    for (int64_t problem = begin; problem < end; ++problem) {
      float* dst = o + problem * rows * d;
      for (const auto r : c10::irange(rows)) {
        float best = kNegInf;
        for (int64_t item = first[problem]; item < first[problem + 1]; ++item)
          best = std::max(best, partial[item * rows * (d + 2) + r]);
        float total = 0.f;
        float* row = dst + r * d;
        std::fill(row, row + d, 0.f);
        for (int64_t item = first[problem]; item < first[problem + 1]; ++item) {
          const float* base = partial.data() + item * rows * (d + 2);
          if (base[r] == kNegInf) continue;
          const float w = std::exp(base[r] - best);
          total += w * base[rows + r];
          axpy(row, base + 2 * rows + r * d, w, d);
        }
        const float inverse = 1.f / total;  // a row that sees nothing gives NaN, as sdpa does
        for (const auto c : c10::irange(d)) row[c] *= inverse;
      }
    }
  });
  return out;
}

Shape check_query(const at::Tensor& query, int64_t num_kv_heads) {
  TORCH_CHECK(query.dim() == 4 && query.scalar_type() == at::kFloat && query.device().is_cpu(),
              "query must be a (B, Hq, nq, d) float32 CPU tensor");
  TORCH_CHECK(num_kv_heads > 0 && query.size(1) % num_kv_heads == 0, "query heads must be a multiple of KV heads");
  const int64_t groups = query.size(1) / num_kv_heads;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(query.size(3))));
  return Shape{groups, query.size(2), groups * query.size(2), query.size(3), 0, 0, 0, scale};
}

// Chunks of about this many tokens (a multiple of the key group): enough work items for every thread.
constexpr int64_t kChunk = 512;

at::Tensor quantized_decode_attention(const at::Tensor& query, at::TensorList key_codes, at::TensorList key_scales,
                                      at::TensorList key_zeros, at::TensorList value_codes,
                                      at::TensorList value_scales, at::TensorList value_zeros,
                                      at::TensorList block_valid, const at::Tensor& residual_keys,
                                      const at::Tensor& residual_values, const at::Tensor& residual_valid,
                                      int64_t nbits, int64_t key_group, int64_t value_group) {
  const int64_t num_kv_heads = residual_keys.size(1);
  Shape s = check_query(query, num_kv_heads);
  s.nbits = nbits;
  s.key_group = key_group;
  s.value_group = value_group;
  const int64_t batch = query.size(0), d = s.head_dim, blocks = static_cast<int64_t>(key_codes.size());
  TORCH_CHECK(nbits == 2 || nbits == 4 || nbits == 8, "nbits must be 2, 4 or 8");
  TORCH_CHECK(d % (8 / nbits) == 0 && d % value_group == 0 && value_group % (8 / nbits) == 0,
              "head_dim and the value group must be multiples of the codes per byte");
  // the residual may be a view of a store's buffer with headroom: rows contiguous, any batch and head strides
  const auto rows_contiguous = [d](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.dim() == 4 && t.size(3) == d && t.stride(3) == 1 &&
           (t.stride(2) == d || t.size(2) <= 1);
  };
  TORCH_CHECK(rows_contiguous(residual_keys) && rows_contiguous(residual_values) &&
                  residual_values.sizes() == residual_keys.sizes(),
              "residual keys/values must be float32 (B, Hkv, R, d) with contiguous rows");
  std::vector<int64_t> channel(d);
  for (const auto i : c10::irange(d)) channel[i] = channel_of(i, 8 / nbits, d / (8 / nbits));
  s.channel = channel.data();
  const int64_t residual = residual_keys.size(2);
  TORCH_CHECK(residual == 0 || residual >= s.nq, "the new tokens must be in the residual (or no residual)");
  std::vector<Source> sources;
  for (const auto b : c10::irange(batch)) {
    for (const auto h : c10::irange(num_kv_heads)) {
      for (const auto i : c10::irange(blocks)) {
        const at::Tensor& codes = key_codes[i];
        const int64_t n = codes.size(2), problem = b * num_kv_heads + h;
        TORCH_CHECK(codes.is_contiguous() && value_codes[i].is_contiguous() && n % key_group == 0,
                    "block codes must be contiguous, whole key groups");
        const int64_t packed_width = codes.size(3), vgroups = d / value_group;
        const int64_t chunk = std::max<int64_t>(1, kChunk / key_group) * key_group;
        for (int64_t start = 0; start < n; start += chunk) {
          Source src;
          src.batch = b, src.head = h, src.count = std::min(chunk, n - start), src.quantized = true;
          src.key_codes = codes.data_ptr<uint8_t>() + (problem * n + start) * packed_width;
          src.value_codes = value_codes[i].data_ptr<uint8_t>() + (problem * n + start) * packed_width;
          const int64_t first_group = (problem * n + start) / key_group;
          const auto side = [](const at::Tensor& t, int64_t offset) {
            TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kFloat),
                        "scales and zero-points must be contiguous float16 or float32");
            const bool half = t.scalar_type() == at::kHalf;
            return Side{static_cast<const char*>(t.data_ptr()) + offset * (half ? 2 : 4), half};
          };
          src.key_scale = side(key_scales[i], first_group * d);
          src.key_zero = side(key_zeros[i], first_group * d);
          src.value_scale = side(value_scales[i], (problem * n + start) * vgroups);
          src.value_zero = side(value_zeros[i], (problem * n + start) * vgroups);
          if (block_valid[i].numel()) {
            src.valid = block_valid[i].data_ptr<bool>() + b * n + start;
          }
          sources.push_back(src);
        }
      }
      if (residual) {
        Source src;
        src.batch = b, src.head = h, src.count = residual, src.causal_base = residual - s.nq;
        src.k = residual_keys.data_ptr<float>() + b * residual_keys.stride(0) + h * residual_keys.stride(1);
        src.v = residual_values.data_ptr<float>() + b * residual_values.stride(0) + h * residual_values.stride(1);
        src.row_stride = d;
        if (residual_valid.numel()) src.valid = residual_valid.data_ptr<bool>() + b * residual;
        sources.push_back(src);
      }
    }
  }
  return run_sources(query.contiguous(), s, num_kv_heads, sources);
}

// Ragged (kvfactory.storage.ragged) decode attention: each (sample, KV head) attends to its own prefix segment
// (rows [start, start + length) of the flat buffers) and to its tail tokens (row prefix_rows +
// (b * capacity + t) * Hkv + h, t < tail_length), never to the other heads' slots.
at::Tensor ragged_decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                   const at::Tensor& lengths, int64_t prefix_rows, int64_t tail_capacity,
                                   int64_t tail_length, const at::Tensor& tail_valid) {
  const int64_t batch = lengths.size(0), num_kv_heads = lengths.size(1);
  const Shape s = check_query(query, num_kv_heads);
  const int64_t d = s.head_dim;
  TORCH_CHECK(keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat && keys.is_contiguous() &&
                  values.is_contiguous() && keys.size(1) == d,
              "keys/values must be contiguous float32 (rows, d)");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous(), "lengths must be int64 (B, Hkv)");
  TORCH_CHECK(tail_length >= s.nq, "the new tokens must be in the tail");
  const int64_t* length = lengths.data_ptr<int64_t>();
  std::vector<Source> sources;
  int64_t start = 0;
  for (const auto b : c10::irange(batch)) {
    for (const auto h : c10::irange(num_kv_heads)) {
      const int64_t n = length[b * num_kv_heads + h];
      for (int64_t offset = 0; offset < n; offset += kChunk) {
        Source src;
        src.batch = b, src.head = h, src.count = std::min(kChunk, n - offset);
        src.k = keys.data_ptr<float>() + (start + offset) * d;
        src.v = values.data_ptr<float>() + (start + offset) * d;
        src.row_stride = d;
        sources.push_back(src);
      }
      start += n;
      Source src;
      src.batch = b, src.head = h, src.count = tail_length, src.causal_base = tail_length - s.nq;
      const int64_t row = prefix_rows + b * tail_capacity * num_kv_heads + h;
      src.k = keys.data_ptr<float>() + row * d;
      src.v = values.data_ptr<float>() + row * d;
      src.row_stride = num_kv_heads * d;
      if (tail_valid.numel()) src.valid = tail_valid.data_ptr<bool>() + b * tail_valid.size(1);
      sources.push_back(src);
    }
  }
  TORCH_CHECK(start <= prefix_rows, "lengths exceed the prefix");
  return run_sources(query.contiguous(), s, num_kv_heads, sources);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvfactory, m) {
  m.def("quantized_decode_attention(Tensor query, Tensor[] key_codes, Tensor[] key_scales, Tensor[] key_zeros, "
        "Tensor[] value_codes, Tensor[] value_scales, Tensor[] value_zeros, Tensor[] block_valid, "
        "Tensor residual_keys, Tensor residual_values, Tensor residual_valid, int nbits, int key_group, "
        "int value_group) -> Tensor",
        &quantized_decode_attention);
  m.def("ragged_decode_attention(Tensor query, Tensor keys, Tensor values, Tensor lengths, int prefix_rows, "
        "int tail_capacity, int tail_length, Tensor tail_valid) -> Tensor",
        &ragged_decode_attention);
}
