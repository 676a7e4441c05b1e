// Causal self-attention of a prompt plus the column sums of its attention weights, in one pass (CPU, fp32).
//
// For each (batch, query head, block of query rows) the logits of the block against keys [0, end of block) are
// materialized in a thread-local buffer small enough to stay in L2; each row is softmaxed (max, exp, sum), its
// normalized probabilities are added to a thread-local column-sum buffer, and the block is multiplied by V.
// GQA is native: query head h reads KV head h / groups. Work items pair block i with block (blocks - 1 - i) so
// that every item costs about the same (causal blocks grow linearly). Registered as
// torch.ops.kvfactory.causal_attention_column_sums(q, k, v, block) -> (output (B, Hq, n, d), column_sums (B, Hq, n)).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

// The Fortran BLAS sgemm PyTorch links in (MKL on x86 builds); column-major like cpublas::gemm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// Column-major C (m x n) = alpha * op(A) * op(B) + beta * C.
void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  sgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

float row_max(const float* row, int64_t length) {
  Vec best0(-std::numeric_limits<float>::infinity()), best1 = best0;
  int64_t j = 0;
  for (; j + 2 * kLanes <= length; j += 2 * kLanes) {
    best0 = at::vec::maximum(best0, Vec::loadu(row + j));
    best1 = at::vec::maximum(best1, Vec::loadu(row + j + kLanes));
  }
  float best = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); },
                                              at::vec::maximum(best0, best1));
  for (; j < length; ++j) best = std::max(best, row[j]);
  return best;
}

// row[j] = exp(row[j] - shift) for j < length; returns their sum.
float exp_in_place(float* row, int64_t length, float shift) {
  const Vec vshift(shift);
  Vec sum0(0.f), sum1(0.f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= length; j += 2 * kLanes) {
    Vec x0 = (Vec::loadu(row + j) - vshift).exp_u20();
    Vec x1 = (Vec::loadu(row + j + kLanes) - vshift).exp_u20();
    x0.store(row + j);
    x1.store(row + j + kLanes);
    sum0 = sum0 + x0;
    sum1 = sum1 + x1;
  }
  for (; j < length; j += kLanes) {
    const int64_t count = std::min(kLanes, length - j);
    Vec x = (Vec::loadu(row + j, count) - vshift).exp_u20();
    x = Vec::set(Vec(0.f), x, count);
    x.store(row + j, count);
    sum0 = sum0 + x;
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum0 + sum1);
}

// sums[j] += row[j] * weight for j < length.
void add_scaled(float* sums, const float* row, int64_t length, float weight) {
  const Vec vweight(weight);
  int64_t j = 0;
  for (; j + kLanes <= length; j += kLanes) {
    at::vec::fmadd(Vec::loadu(row + j), vweight, Vec::loadu(sums + j)).store(sums + j);
  }
  if (j < length) {
    const int64_t count = length - j;
    at::vec::fmadd(Vec::loadu(row + j, count), vweight, Vec::loadu(sums + j, count)).store(sums + j, count);
  }
}

void scale_row(float* row, int64_t length, float weight) {
  const Vec vweight(weight);
  int64_t j = 0;
  for (; j + kLanes <= length; j += kLanes) (Vec::loadu(row + j) * vweight).store(row + j);
  if (j < length) (Vec::loadu(row + j, length - j) * vweight).store(row + j, length - j);
}

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t q_batch, q_head, q_row;
  int64_t k_batch, k_head, k_row;
  int64_t v_batch, v_head, v_row;
  int64_t out_batch, out_head, out_row;
  int64_t num_q_heads, groups, n, head_dim, block;
  float scale;
};

// One block of query rows [start, stop) of (batch, head): output rows and column sums (added to sums).
void attend_block(const Problem& p, int64_t batch, int64_t head, int64_t start, int64_t stop, float* logits,
                  float* inverse_sums, float* sums) {
  const int64_t rows = stop - start, keys = stop;
  const int64_t kv_head = head / p.groups;
  const float* q = p.q + batch * p.q_batch + head * p.q_head + start * p.q_row;
  const float* k = p.k + batch * p.k_batch + kv_head * p.k_head;
  const float* v = p.v + batch * p.v_batch + kv_head * p.v_head;
  float* out = p.out + batch * p.out_batch + head * p.out_head + start * p.out_row;
  // logits (rows x keys, row-major) = scale * q k^T
  gemm('T', 'N', keys, rows, p.head_dim, p.scale, k, p.k_row, q, p.q_row, 0.f, logits, keys);
  for (const auto r : c10::irange(rows)) {
    float* row = logits + r * keys;
    const int64_t visible = start + r + 1;
    const float total = exp_in_place(row, visible, row_max(row, visible));
    std::fill(row + visible, row + keys, 0.f);
    inverse_sums[r] = 1.f / total;
    add_scaled(sums, row, visible, inverse_sums[r]);
  }
  // out (rows x d) = unnormalized probabilities @ v, then each row divided by its sum
  gemm('N', 'N', p.head_dim, rows, keys, 1.f, v, p.v_row, logits, keys, 0.f, out, p.out_row);
  for (const auto r : c10::irange(rows)) scale_row(out + r * p.out_row, p.head_dim, inverse_sums[r]);
}

std::tuple<at::Tensor, at::Tensor> causal_attention_column_sums(const at::Tensor& query, const at::Tensor& key,
                                                                const at::Tensor& value, int64_t block) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "expected (B, H, n, d) tensors");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(), "CPU tensors only");
  const int64_t batch = query.size(0), num_q_heads = query.size(1), n = query.size(2), head_dim = query.size(3);
  const int64_t num_kv_heads = key.size(1);
  TORCH_CHECK(key.size(0) == batch && value.size(0) == batch && key.size(2) == n && value.size(2) == n,
              "causal prefill only: keys and values must hold the n query tokens");
  TORCH_CHECK(key.size(3) == head_dim && value.size(3) == head_dim && value.size(1) == num_kv_heads,
              "query, key and value head shapes differ");
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block > 0, "block must be positive");
  const auto as_rows = [](const at::Tensor& t) {
    const at::Tensor f = t.to(at::kFloat);
    return f.stride(-1) == 1 ? f : f.contiguous();
  };
  const at::Tensor q = as_rows(query), k = as_rows(key), v = as_rows(value);
  // (B, n, Hq, d) storage: the model's next step (transpose + reshape to (B, n, Hq*d)) is then free
  at::Tensor out = at::empty({batch, n, num_q_heads, head_dim}, q.options());
  const int64_t threads = at::get_num_threads();
  at::Tensor partial_sums = at::zeros({threads, batch * num_q_heads, n}, q.options());

  const Problem p{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(2), out.stride(1),
                  num_q_heads, num_q_heads / num_kv_heads, n, head_dim, std::min(block, std::max<int64_t>(n, 1)),
                  static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)))};
  const int64_t blocks = (n + p.block - 1) / p.block;
  const int64_t pairs = (blocks + 1) / 2;
  float* sums_base = partial_sums.data_ptr<float>();
  at::parallel_for(0, batch * num_q_heads * pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(p.block * n), inverse_sums(p.block);
    float* sums_of_thread = sums_base + at::get_thread_num() * batch * num_q_heads * n;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item % pairs, head = (item / pairs) % num_q_heads, b = item / (pairs * num_q_heads);
      float* sums = sums_of_thread + (b * num_q_heads + head) * n;
      for (const int64_t index : {pair, blocks - 1 - pair}) {
        const int64_t start = index * p.block;
        attend_block(p, b, head, start, std::min(n, start + p.block), logits.data(), inverse_sums.data(), sums);
        if (index == blocks - 1 - pair) break;  // a middle block pairs with itself
      }
    }
  });
  at::Tensor column_sums = partial_sums.sum(0).view({batch, num_q_heads, n});
  return {out.transpose(1, 2).to(query.scalar_type()), column_sums};
}

}  // namespace

TORCH_LIBRARY(kvfactory, m) {
  m.def("causal_attention_column_sums(Tensor query, Tensor key, Tensor value, int block) -> (Tensor, Tensor)",
        &causal_attention_column_sums);
}
