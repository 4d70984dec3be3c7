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
//
// Two more entries serve a float spec's weights: e4m3_codes stores the same rounding as E4M3 bytes (the float8_e4m3fn
// codes that `llmquant.quant.primitives.quantize` casts to), and e4m3_code_errors gives each row's squared error of
// the codes' values times its scale against the float row, and the row's squared norm, without the dequantized copy
// (the weight errors of the manifest: ||W_hat - W||^2 and ||W||^2).

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

// The E4M3 bytes of eight E4M3 values (nearest_e4m3's results, or NaN), each in the low byte of its 32-bit lane: the
// sign, then 4 exponent bits (bias 7) and 3 mantissa bits; below 2^-6 a subnormal k 2^-9, byte k; NaN 0x7F (torch's).
inline __m256i e4m3_bytes(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i sign = _mm256_srli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0x80000000u))), 24);
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i normal = _mm256_or_si256(
      _mm256_slli_epi32(_mm256_sub_epi32(_mm256_srli_epi32(magnitude, 23), _mm256_set1_epi32(120)), 3),
      _mm256_and_si256(_mm256_srli_epi32(magnitude, 20), _mm256_set1_epi32(7)));
  const __m256i subnormal = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(magnitude), _mm256_set1_ps(512.0f)));
  const __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), magnitude);
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
  const __m256i body = _mm256_blendv_epi8(_mm256_blendv_epi8(normal, subnormal, below), _mm256_set1_epi32(0x7F), nan);
  return _mm256_or_si256(body, sign);
}

inline uint8_t e4m3_byte(float v) {
  const uint32_t bits = bits_of(v), sign = (bits >> 24) & 0x80u, magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Fu);
  if (magnitude < (121u << 23)) return static_cast<uint8_t>(sign | static_cast<uint32_t>(float_of(magnitude) * 512.0f));
  return static_cast<uint8_t>(sign | (((magnitude >> 23) - 120u) << 3) | ((magnitude >> 20) & 7u));
}

// The float32 values of eight E4M3 bytes (codes of clamped values: no NaN among them).
inline __m256 e4m3_values(const uint8_t* codes) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)), 20),
                                          _mm256_set1_epi32(120 << 23));
  const __m256i subnormal = _mm256_castps_si256(
      _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(7))), _mm256_set1_ps(1.0f / 512.0f)));
  const __m256i zero_exponent =
      _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x78)), _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_blendv_epi8(normal, subnormal, zero_exponent), sign));
}

inline float e4m3_value(uint8_t code) {
  const uint32_t exponent = (code >> 3) & 15u, mantissa = code & 7u;
  const float magnitude = exponent ? float_of(((exponent + 120u) << 23) | (mantissa << 20)) : mantissa / 512.0f;
  return (code & 0x80u) ? -magnitude : magnitude;
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

void codes_row(const float* x, int64_t width, float scale, float qmax, uint8_t* out) {
  const __m256 s = _mm256_set1_ps(scale), high = _mm256_set1_ps(qmax), low = _mm256_set1_ps(-qmax);
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i halves = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  int64_t j = 0;
  for (; j + 8 <= width; j += 8) {
    const __m256 v = _mm256_min_ps(high, _mm256_max_ps(low, _mm256_div_ps(_mm256_loadu_ps(x + j), s)));
    const __m256i lanes = _mm256_shuffle_epi8(e4m3_bytes(nearest_e4m3(v)), low_bytes);  // (4 bytes a half)
    const __m256i bytes = _mm256_permutevar8x32_epi32(lanes, halves);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j), _mm256_castsi256_si128(bytes));
  }
  for (; j < width; ++j) out[j] = e4m3_byte(nearest_e4m3(clamped(x[j] / scale, qmax)));
}

// Squared error of the codes' values times scale against x, and x's squared norm, over one row.
void code_errors_row(const uint8_t* codes, const float* x, int64_t width, float scale, double* sums) {
  const __m256 s = _mm256_set1_ps(scale);
  __m256 error = _mm256_setzero_ps(), norm = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= width; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 d = _mm256_sub_ps(_mm256_mul_ps(e4m3_values(codes + j), s), v);
    error = _mm256_add_ps(error, _mm256_mul_ps(d, d));
    norm = _mm256_add_ps(norm, _mm256_mul_ps(v, v));
  }
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, error);
  _mm256_store_ps(lanes + 8, norm);
  double e = 0.0, n = 0.0;
  for (int k = 0; k < 8; ++k) e += lanes[k], n += lanes[8 + k];
  for (; j < width; ++j) {
    const double d = static_cast<double>(e4m3_value(codes[j]) * scale) - x[j];
    e += d * d, n += static_cast<double>(x[j]) * x[j];
  }
  sums[0] = e, sums[1] = n;
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

void check_rows(const torch::Tensor& rows, const torch::Tensor& scales, const char* name) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == torch::kFloat32 && rows.is_contiguous(), name,
              " takes contiguous float32 rows [n, width]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.numel() > 0,
              name, ": scales, contiguous float32 (row r takes scales[r % k])");
}

// E4M3 bytes of clamp(rows / s, -qmax, qmax), row r divided by scales[r % k] (uint8 [n, width]).
torch::Tensor e4m3_codes(const torch::Tensor& rows, const torch::Tensor& scales, double qmax) {
  check_rows(rows, scales, "e4m3_codes");
  auto out = torch::empty(rows.sizes(), rows.options().dtype(torch::kUInt8));
  const int64_t n = rows.size(0), width = rows.size(1), count = scales.numel();
  const float* x = rows.data_ptr<float>();
  const float* given = scales.data_ptr<float>();
  uint8_t* y = out.data_ptr<uint8_t>();
  const float q = static_cast<float>(qmax);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) codes_row(x + r * width, width, given[r % count], q, y + r * width);
  });
  return out;
}

// Each row's squared error of the E4M3 codes' values times scales[r % k] against rows, and the row's squared norm
// (float64 [n, 2]).
torch::Tensor e4m3_code_errors(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& rows) {
  check_rows(rows, scales, "e4m3_code_errors");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.sizes() == rows.sizes(),
              "e4m3_code_errors: codes, contiguous uint8 of the rows' shape");
  auto out = torch::empty({rows.size(0), 2}, rows.options().dtype(torch::kFloat64));
  const int64_t n = rows.size(0), width = rows.size(1), count = scales.numel();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* x = rows.data_ptr<float>();
  const float* given = scales.data_ptr<float>();
  double* sums = out.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      code_errors_row(c + r * width, x + r * width, width, given[r % count], sums + 2 * r);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("e4m3_fake_quantize", &e4m3_fake_quantize, "E4M3 quantize-dequantize of float32 rows, one pass a row");
  m.def("e4m3_codes", &e4m3_codes, "E4M3 bytes of float32 rows over their scales, one pass a row");
  m.def("e4m3_code_errors", &e4m3_code_errors, "each row's squared error of E4M3 codes times scales, and norm");
}
