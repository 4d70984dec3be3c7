// The simulation's FP8 (E4M3) quantize-dequantize of float32 rows in one pass over each row
// (llmquant.nn.e4m3_simulation): x_hat = (E4M3(clamp(x / s, -448, 448)) + 0) * s, where E4M3 is the rounding to the
// nearest E4M3 value, half to even, that torch's float8_e4m3fn cast makes, and s is either given (static scales) or
// each row's max(clip * max|x| / 448, min_scale) (dynamic). The same float32 operations, in the same order, as
// `llmquant.quant.primitives.fake_quantize` of a float spec (the "+ 0" is its zero point, which turns -0 into +0), so
// the same bits for finite inputs; the primitives take about eleven passes over the tensor for it.
//
// The rounding works in float32 without the cast: below 2^-6 (E4M3's subnormals, a step of 2^-9) adding and
// subtracting 2^14 rounds |v| to a multiple of 2^-9, half to even; above, the mantissa is rounded to its first 3 bits,
// half to even, on the integer bits. Both are c10's fp8e4m3fn_from_fp32_value, read back as the float it encodes;
// the clamp keeps |v| below 480, where that function would give NaN. Eight lanes at a time in AVX2.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements a thread takes at least

inline uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

inline float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// The E4M3 value nearest to v, half to even, for |v| <= 448.
inline float nearest_e4m3(float v) {
  const uint32_t bits = bits_of(v);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t magnitude = bits ^ sign;
  const uint32_t subnormal = bits_of((float_of(magnitude) + 16384.0f) - 16384.0f);
  const uint32_t normal = (magnitude + 0x7FFFFu + ((magnitude >> 20) & 1u)) & ~0xFFFFFu;
  return float_of((magnitude < (121u << 23) ? subnormal : normal) | sign);
}

// Eight lanes of nearest_e4m3, for |v| <= 448.
inline __m256 nearest_e4m3(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256i magnitude = _mm256_xor_si256(bits, sign);
  const __m256 two_14 = _mm256_set1_ps(16384.0f);
  const __m256i subnormal =
      _mm256_castps_si256(_mm256_sub_ps(_mm256_add_ps(_mm256_castsi256_ps(magnitude), two_14), two_14));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(magnitude, 20), _mm256_set1_epi32(1));
  const __m256i normal = _mm256_and_si256(
      _mm256_add_epi32(_mm256_add_epi32(magnitude, _mm256_set1_epi32(0x7FFFF)), odd),
      _mm256_set1_epi32(static_cast<int>(~0xFFFFFu)));
  const __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), magnitude);  // (magnitude < 2^31)
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_blendv_epi8(normal, subnormal, below), sign));
}

// clamp(v, -qmax, qmax) as torch's clamp: a NaN stays NaN (max_ps and min_ps return their second operand then).
inline float clamped(float v, float qmax) { return std::isnan(v) ? v : std::min(std::max(v, -qmax), qmax); }

void fake_row(const float* x, int64_t width, float scale, float qmax, float* out) {
  const __m256 s = _mm256_set1_ps(scale), high = _mm256_set1_ps(qmax), low = _mm256_set1_ps(-qmax);
  int64_t j = 0;
  for (; j + 8 <= width; j += 8) {
    const __m256 v = _mm256_min_ps(high, _mm256_max_ps(low, _mm256_div_ps(_mm256_loadu_ps(x + j), s)));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_add_ps(nearest_e4m3(v), _mm256_setzero_ps()), s));
  }
  for (; j < width; ++j) out[j] = (nearest_e4m3(clamped(x[j] / scale, qmax)) + 0.0f) * scale;
}

float row_scale(const float* x, int64_t width, float clip, float qmax, float min_scale) {
  const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 lanes = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= width; j += 8) lanes = _mm256_max_ps(lanes, _mm256_and_ps(_mm256_loadu_ps(x + j), magnitude_bits));
  alignas(32) float lane[8];
  _mm256_store_ps(lane, lanes);
  float absmax = *std::max_element(lane, lane + 8);
  for (; j < width; ++j) absmax = std::max(absmax, std::fabs(x[j]));
  return std::max(absmax * clip / qmax, min_scale);  // (clip 1: the product is exact)
}

// rows [n, width] contiguous float32; scales: float32, empty (dynamic: each row's own) or k values, row r taking
// scales[r % k] (k = 1: per tensor; k heads of keys [b, heads, s * d]: per head).
torch::Tensor e4m3_fake_quantize(const torch::Tensor& rows, const torch::Tensor& scales, double qmax, double clip,
                                 double min_scale) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == torch::kFloat32 && rows.is_contiguous(),
              "e4m3_fake_quantize takes contiguous float32 rows [n, width]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous(), "scales: contiguous float32");
  auto out = torch::empty_like(rows);
  const int64_t n = rows.size(0), width = rows.size(1), count = scales.numel();
  const float* x = rows.data_ptr<float>();
  const float* given = scales.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const float q = static_cast<float>(qmax), c = static_cast<float>(clip), floor = static_cast<float>(min_scale);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * width;
      const float scale = count ? given[r % count] : row_scale(row, width, c, q, floor);
      fake_row(row, width, scale, q, y + r * width);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("e4m3_fake_quantize", &e4m3_fake_quantize, "E4M3 quantize-dequantize of float32 rows, one pass a row");
}
