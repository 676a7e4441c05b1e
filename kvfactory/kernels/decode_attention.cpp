// Decode attention (one or a few new query tokens) over a quantized cache or a ragged cache, fp32 inside, CPU.
//
// Both ops cut every (batch, KV head)'s keys into chunks ("sources"), attend each chunk on its own with an online
// softmax (its max m, its sum of exp l, its unnormalized output acc: split-K, as flash-decoding does) and merge the
// chunks of a (batch, KV head) at the end. GQA is native: the g query heads of a KV head and the nq new tokens form
// the g*nq rows of one problem (row r = head-in-group * nq + token), so every key is read once for all of them.
//
// Quantized chunks read KIVI's packed codes directly (kvfactory.quant.groups / packing), nothing dequantized is
// materialised:
//   keys per channel, a group of G tokens shares scale s[c] and zero z[c]:
//     q.k_t = sum_c q_c (z_c + s_c code_tc) = (q.z) + sum_c (q_c s_c) code_tc
//   so per group the rows' q*s and q.z are formed once, then each token costs one unpack and g*nq dot products;
//   values per token, a group of Gv channels shares s_t,z_t:
//     sum_t p_t v_t = sum_t (p_t s_t) code_t + sum_t p_t z_t.
// Codes of one byte are 8/b channels apart in the packed order (channel per_byte*j + slot at bit nbits*slot): the
// kernel works in the permuted "slot-major" order (q*s permuted once per group, the value accumulator un-permuted
// once per chunk), so unpacking is a contiguous shift-and-mask loop the compiler vectorizes.
//
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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

// Tokens unpacked at once: their codes, as floats, stay in L1/L2 (tile_tokens * head_dim floats).
constexpr int64_t kTileTokens = 128;

// Unpacks `tokens` consecutive packed rows (tokens x width bytes, contiguous) into per_byte slot planes, each
// (tokens x width) floats row-major: plane[slot][t * width + j] = code of channel per_byte * j + slot of token t,
// minus the middle level (2^b - 1) / 2. Centred codes keep the running sums free of the systematic offset that
// min-based zero-points add (sum_t p_t z_t and sum_t p_t s_t code_t would both be large and nearly cancel, which
// costs fp32 precision); the zero term becomes the group's mid-range value. One long loop per slot: vectorized.
void unpack_tile(const uint8_t* packed, int64_t tokens, int64_t nbits, int64_t width, float* planes) {
  const float middle = static_cast<float>((1 << nbits) - 1) * 0.5f;
  const int64_t total = tokens * width;
  if (nbits == 8) {
#pragma omp simd
    for (int64_t i = 0; i < total; ++i) planes[i] = static_cast<float>(packed[i]) - middle;
    return;
  }
  const int per_byte = 8 / static_cast<int>(nbits);
  const unsigned mask = (1u << nbits) - 1u;
  for (int slot = 0; slot < per_byte; ++slot) {
    const int shift = slot * static_cast<int>(nbits);
    float* dst = planes + slot * total;
#pragma omp simd
    for (int64_t i = 0; i < total; ++i) dst[i] = static_cast<float>((packed[i] >> shift) & mask) - middle;
  }
}

// channel of slot-major index i
inline int64_t channel_of(int64_t i, int64_t per_byte, int64_t width) { return (i % width) * per_byte + i / width; }

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

// Attends one chunk: writes m (rows), l (rows) and acc (rows x d, natural channel order).
void attend_chunk(const Shape& s, const Source& src, const float* q, float* m, float* l, float* acc,
                  std::vector<float>& logits, std::vector<float>& scratch) {
  const int64_t rows = s.rows, d = s.head_dim, count = src.count;
  logits.resize(rows * count);
  float* P = logits.data();  // rows x count, row-major (column-major count x rows, ld count)
  const int64_t per_byte = src.quantized ? 8 / s.nbits : 1, width = d / per_byte;
  if (src.quantized) scratch.resize(kTileTokens * d + 2 * rows * d + rows * (d + 1));
  float* tile = scratch.data();
  // -- logits
  if (!src.quantized) {
    gemm('T', 'N', count, rows, d, 1.f, src.k, src.row_stride, q, d, 0.f, P, count);
  } else {
    const float middle = static_cast<float>((1 << s.nbits) - 1) * 0.5f;
    float* qs = tile + kTileTokens * d;  // rows x d, slot-major: q * key scale
    float* qz = qs + rows * d;           // rows: q . (zero + middle * scale)
    for (int64_t start = 0; start < count; start += s.key_group) {
      const int64_t group = start / s.key_group, tokens = std::min(count, start + s.key_group) - start;
      for (const auto r : c10::irange(rows)) {
        float zsum = 0.f;
        for (const auto i : c10::irange(d)) {
          const int64_t c = channel_of(i, per_byte, width);
          const float scale = src.key_scale[group * d + c];
          qs[r * d + i] = q[r * d + c] * scale;
          zsum += q[r * d + c] * (src.key_zero[group * d + c] + middle * scale);
        }
        qz[r] = zsum;
      }
      for (int64_t t0 = 0; t0 < tokens; t0 += kTileTokens) {
        const int64_t n = std::min(kTileTokens, tokens - t0);
        unpack_tile(src.key_codes + (start + t0) * width, n, s.nbits, width, tile);
        for (const auto slot : c10::irange(per_byte)) {  // logits (n x rows) += plane (n x W) . qs_slot (W x rows)
          gemm('T', 'N', n, rows, width, 1.f, tile + slot * n * width, width, qs + slot * width, d,
               slot ? 1.f : 0.f, P + start + t0, count);
        }
        for (const auto r : c10::irange(rows)) {
          float* row = P + r * count + start + t0;
          for (const auto t : c10::irange(n)) row[t] += qz[r];
        }
      }
    }
  }
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
  const float middle = static_cast<float>((1 << s.nbits) - 1) * 0.5f;
  const int64_t vgroups = d / s.value_group, group_width = s.value_group / per_byte;  // j-range per value group
  float* permuted = tile + kTileTokens * d;      // rows x d slot-major accumulator
  float* weights = permuted + rows * d;          // kTileTokens x rows (column-major): p * value scale
  float* zeros = weights + kTileTokens * rows;   // rows x vgroups: sum_t p_t (z_t + middle * s_t)
  scratch.resize(kTileTokens * d + rows * d + kTileTokens * rows + rows * vgroups);
  tile = scratch.data(), permuted = tile + kTileTokens * d, weights = permuted + rows * d;
  zeros = weights + kTileTokens * rows;
  std::fill(permuted, permuted + rows * d, 0.f);
  std::fill(zeros, zeros + rows * vgroups, 0.f);
  for (int64_t t0 = 0; t0 < count; t0 += kTileTokens) {
    const int64_t n = std::min(kTileTokens, count - t0);
    unpack_tile(src.value_codes + t0 * width, n, s.nbits, width, tile);
    for (const auto g : c10::irange(vgroups)) {
      for (const auto r : c10::irange(rows)) {
        const float* p = P + r * count + t0;
        float* w = weights + r * n;
        float zsum = 0.f;
        for (const auto t : c10::irange(n)) {
          const float step = src.value_scale[(t0 + t) * vgroups + g];
          w[t] = p[t] * step;
          zsum += p[t] * (src.value_zero[(t0 + t) * vgroups + g] + middle * step);
        }
        zeros[r * vgroups + g] += zsum;
      }
      for (const auto slot : c10::irange(per_byte)) {  // acc (gw x rows) += plane^T (gw x n) . weights (n x rows)
        const int64_t offset = slot * width + g * group_width;
        gemm('N', 'N', group_width, rows, n, 1.f, tile + slot * n * width + g * group_width, width, weights, n,
             1.f, permuted + offset, d);
      }
    }
  }
  for (const auto r : c10::irange(rows)) {
    for (const auto i : c10::irange(d)) {
      const int64_t c = channel_of(i, per_byte, width);
      acc[r * d + c] = permuted[r * d + i] + zeros[r * vgroups + c / s.value_group];
    }
  }
}

// Below this many (row, token) logits a call runs on one thread (measured: C=128 tokens per head, 3 KV heads).
constexpr int64_t kSerialWork = 1 << 15;

// Runs every source and merges the chunks of each (batch, KV head). query (B, Hq, nq, d) fp32 contiguous.
at::Tensor run_sources(const at::Tensor& query, const Shape& s, int64_t num_kv_heads,
                       const std::vector<Source>& sources) {
  const int64_t batch = query.size(0), rows = s.rows, d = s.head_dim;
  // the rows of (b, kv head) are contiguous in (B, Hq, nq, d): head-in-group then token
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  at::Tensor scaled = query.mul(scale).contiguous();
  const float* q = scaled.data_ptr<float>();
  const int64_t items = static_cast<int64_t>(sources.size());
  std::vector<float> partial(items * rows * (d + 2));
  // a small cache is attended on the calling thread: waking the pool would cost more than the work
  int64_t work = 0;
  for (const Source& src : sources) work += src.count * rows;
  const int64_t grain = work < kSerialWork ? std::max<int64_t>(items, 1) : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> logits, scratch;
    for (int64_t item = begin; item < end; ++item) {
      const Source& src = sources[item];
      float* base = partial.data() + item * rows * (d + 2);
      attend_chunk(s, src, q + (src.batch * num_kv_heads + src.head) * rows * d, base, base + rows,
                   base + 2 * rows, logits, scratch);
    }
  });
  at::Tensor out = at::empty({batch, num_kv_heads * s.groups, s.nq, d}, scaled.options());
  float* o = out.data_ptr<float>();
  // sources are listed (b, head)-major: find each problem's range
  std::vector<int64_t> first(batch * num_kv_heads + 1, items);
  for (int64_t item = items - 1; item >= 0; --item) first[sources[item].batch * num_kv_heads + sources[item].head] = item;
  for (int64_t p = batch * num_kv_heads - 1; p >= 0; --p) first[p] = std::min(first[p], first[p + 1]);
  at::parallel_for(0, batch * num_kv_heads, work < kSerialWork ? batch * num_kv_heads : 1,
                   [&](int64_t begin, int64_t end) {
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
  return Shape{groups, query.size(2), groups * query.size(2), query.size(3), 0, 0, 0};
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
  TORCH_CHECK(residual_keys.scalar_type() == at::kFloat && residual_keys.is_contiguous() &&
                  residual_values.scalar_type() == at::kFloat && residual_values.is_contiguous(),
              "residual keys/values must be contiguous float32 (B, Hkv, R, d)");
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
        src.k = residual_keys.data_ptr<float>() + (b * num_kv_heads + h) * residual * d;
        src.v = residual_values.data_ptr<float>() + (b * num_kv_heads + h) * residual * d;
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
