// Causal attention on the CPU, each block of query rows over the keys it can see
// (llmquant.nn.causal_blocks.causal_block_attention):
//
//   out[i] = sum_{j <= c + i} softmax_j(scale * q_i . k_j) v_j,   c = (key positions) - (query positions)
//
// (c = 0 for a prefill; c > 0 where the keys hold earlier positions, a cache: a decode step's one query row sees every
// key.) For query rows [s, e) of one head: S = scale * Q[s:e] K[0:c+e]^T (one float32 GEMM), the softmax of each row
// over its visible keys j <= c + i (the rest of the last e - s columns set to 0), O = P V[0:c+e] (a second GEMM), each
// row divided by its sum. The GEMMs are BLAS's sgemm (torch's own MKL, exported by libtorch_cpu), one thread each; the
// pieces (batch, head, block) run on torch's threads, taken from a shared counter, the longest rows first, so that the
// threads end together. What torch's sdpa does per call, without its costs at these sizes: below 768 positions its
// flash kernel multiplies the whole square (a 512-position prefill), and one sdpa call per block (the Python loop of
// causal_blocks) splits 64 rows of 9 heads into too few pieces for two threads (2.0x on one against 1.6x on two). A
// decode step's query heads of one KV head are the rows of one piece: that head's keys and values read once for them.
// The exponential is exp8 (below), not torch's: the same function to float32's rounding, not the same bits.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// C = alpha op(A) op(B) in BLAS's column-major terms (a row-major matrix is its transpose there).
void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  const int m32 = static_cast<int>(m), n32 = static_cast<int>(n), k32 = static_cast<int>(k);
  const int lda32 = static_cast<int>(lda), ldb32 = static_cast<int>(ldb), ldc32 = static_cast<int>(ldc);
  const float beta = 0.0f;
  sgemm_(&transa, &transb, &m32, &n32, &k32, &alpha, a, &lda32, b, &ldb32, &beta, c, &ldc32);
}

// e^x of 8 floats: x = n ln2 + r (n = round(x / ln2), ln2 in two parts, |r| <= ln2 / 2), e^r by its Taylor
// polynomial of degree 7 (remainder below r^8 / 8! = 5e-9, an eighth of float32's spacing), times 2^n by the
// exponent's bits. Below -87.3 (e^x under float32's smallest normal: a score far below its row's largest) it gives 0;
// a NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 below = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(lowest, x);  // (max returns its second operand, x, when either is NaN)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

// row[0, visible) -> e^(row - its largest), row[visible, width) -> 0; returns the sum of the exponentials.
float exponentials(float* row, int64_t visible, int64_t width) {
  __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= visible; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float top = *std::max_element(lanes, lanes + 8);
  for (; j < visible; ++j) top = std::max(top, row[j]);
  top8 = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= visible; j += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), top8));
    _mm256_storeu_ps(row + j, p);
    sum8 = _mm256_add_ps(sum8, p);
  }
  alignas(32) float tail[8] = {0};
  const int64_t left = visible - j;
  std::copy(row + j, row + visible, tail);
  const __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(tail), top8));
  _mm256_store_ps(tail, p);
  std::copy(tail, tail + left, row + j);
  _mm256_store_ps(lanes, sum8);
  float sum = 0.0f;
  for (const float lane : lanes) sum += lane;
  for (int64_t i = 0; i < left; ++i) sum += tail[i];
  std::fill(row + visible, row + width, 0.0f);
  return sum;
}

// One piece of work: `rows` query rows (`q_stride` apart) over the keys [0, seen) (rows `k_stride` / `v_stride` apart),
// row r seeing the keys [0, first_visible + r * step) (step 1: rows that are positions; 0: rows that are the heads of
// one position), into `rows` output rows `o_stride` apart. `scores` holds rows x seen floats, `sums` rows.
void attend(const float* q, int64_t q_stride, int64_t rows, const float* k, int64_t k_stride, const float* v,
            int64_t v_stride, int64_t seen, int64_t first_visible, int64_t step, int64_t dim, float scale,
            float* scores, float* sums, float* o, int64_t o_stride) {
  gemm('T', 'N', seen, rows, dim, scale, k, k_stride, q, q_stride, scores, seen);  // S [rows, seen], row-major
  for (int64_t r = 0; r < rows; ++r) sums[r] = exponentials(scores + r * seen, first_visible + r * step, seen);
  gemm('N', 'N', dim, rows, seen, 1.0f, v, v_stride, scores, seen, o, o_stride);
  for (int64_t r = 0; r < rows; ++r) {
    const float inverse = 1.0f / sums[r];
    for (int64_t d = 0; d < dim; ++d) o[r * o_stride + d] *= inverse;
  }
}

// The pieces on torch's threads, taken from a shared counter: piece(item, scores, sums) for item in [0, items).
template <typename Piece>
void in_parallel(int64_t items, int64_t score_floats, int64_t rows, const Piece& piece) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(score_floats), sums(rows);
    for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
      piece(item, scores.data(), sums.data());
    }
  });
}

}  // namespace

// query [b, h, n, d], key and value [b, kv, m, d] (m >= n: the query rows are the last n positions; kv dividing h:
// query head h reads kv head h / (h / kv)), float32, the last dimension contiguous, any strides otherwise; returns
// [b, n, h, d] (transformers' attention output layout). Pieces: each (batch, head, block of query rows), the last
// block first; for one query position (a decode step), each (batch, kv head) with its group of query heads as the
// rows, so that the keys and values of a kv head are read once for the group.
torch::Tensor causal_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                               double scale, int64_t block) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4 && query.scalar_type() == torch::kFloat32 &&
              key.scalar_type() == torch::kFloat32 && value.scalar_type() == torch::kFloat32,
              "causal_attention: float32 query [b, h, n, d], key and value [b, kv, m, d]");
  const int64_t batch = query.size(0), heads = query.size(1), positions = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key.size(1), kv_positions = key.size(2), earlier = kv_positions - positions;
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(0) == batch && earlier >= 0 && key.size(3) == dim &&
              kv_heads > 0 && heads % kv_heads == 0 && block > 0,
              "causal_attention: key and value [b, kv, m >= n, d] with kv dividing the query's heads, a positive "
              "block");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "causal_attention: the last dimension contiguous");
  const int64_t group = heads / kv_heads;
  const float scaling = static_cast<float>(scale);
  torch::Tensor out = torch::empty({batch, positions, heads, dim}, query.options());
  const float* q = query.data_ptr<float>();
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (positions == 1) {
    in_parallel(batch * kv_heads, group * kv_positions, group, [&](int64_t item, float* scores, float* sums) {
      const int64_t b = item / kv_heads, g = item % kv_heads;
      attend(q + b * query.stride(0) + g * group * query.stride(1), query.stride(1), group,
             k + b * key.stride(0) + g * key.stride(1), key.stride(2), v + b * value.stride(0) + g * value.stride(1),
             value.stride(2), kv_positions, kv_positions, 0, dim, scaling, scores, sums,
             o + (b * heads + g * group) * dim, dim);
    });
    return out;
  }
  const int64_t blocks = (positions + block - 1) / block, rows = std::min(block, positions);
  in_parallel(batch * heads * blocks, rows * kv_positions, rows, [&](int64_t item, float* scores, float* sums) {
    const int64_t piece = item % (batch * heads), b = piece / heads, h = piece % heads;
    const int64_t start = (blocks - 1 - item / (batch * heads)) * block;  // the last block first
    const int64_t end = std::min(start + block, positions);
    attend(q + b * query.stride(0) + h * query.stride(1) + start * query.stride(2), query.stride(2), end - start,
           k + b * key.stride(0) + h / group * key.stride(1), key.stride(2),
           v + b * value.stride(0) + h / group * value.stride(1), value.stride(2), earlier + end, earlier + start + 1,
           1, dim, scaling, scores, sums, o + ((b * positions + start) * heads + h) * dim, heads * dim);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("causal_attention", &causal_attention,
             "causal attention of float32 query [b, h, n, d] over key / value [b, kv, m >= n, d], as [b, n, h, d]",
             pybind11::arg("query"), pybind11::arg("key"), pybind11::arg("value"), pybind11::arg("scale"),
             pybind11::arg("block"));
}
