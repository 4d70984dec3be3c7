// The W8A8 (and grouped W4A8 / W4A4) linear on x86 CPUs with AVX2 but without AVX512-VNNI or AMX, where torch's int8
// products are many times slower than float32 and oneDNN's saturate (llmquant.nn.int8_linear.int_mm_refusal):
// y = s_x * s_w * (x_q @ W_q^T) + b in one call (int8_gemm) at any row count, reading the weight at one byte a code,
// packed in panels of 16 outputs, instead of the four of its float32 copy; and the per-token input codes
// (token_codes) in one call instead of torch's six operations; and weight-only int8 Linears (W8A16: weight_only_gemm,
// float32 products of the codes converted as they are read). Built by llmquant.nn.int8_gemv with -mavx2 -mfma, on
// CPUs that have them (checked there before building).
//
// VPMADDWD multiplies 16 signed 16-bit pairs and adds adjacent products into 8 int32 lanes. The int8 codes of both
// sides are widened to 16 bits (the input's once per call, the weight's as it is read: VPMOVSXBW), so every product
// (at most 128 * 128) and every pair sum (at most 2^15) is exact and nothing saturates; the int32 sums are exact as
// long as they fit, as torch._int_mm's. Then the same float32 operations, in the same order, as
// llmquant.nn.int8_linear's torch path (scale_output, grouped_linear): the same bits.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

// The input codes widened to int16 (VPMADDWD's operand), once per call.
std::vector<int16_t> widened_codes(const torch::Tensor& codes) {
  const int8_t* c = codes.data_ptr<int8_t>();
  std::vector<int16_t> wide(codes.numel());
  for (size_t i = 0; i < wide.size(); ++i) wide[i] = c[i];
  return wide;
}

// The bias as float32 (undefined without one), checked to hold one value per output; `op` names the caller.
torch::Tensor float_bias(const std::optional<torch::Tensor>& bias, int64_t outputs, const char* op) {
  if (!bias.has_value()) return torch::Tensor();
  torch::Tensor b = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(b.numel() == outputs, op, ": one bias per output");
  return b;
}

// codes[i] = clamp(round-half-even(row[i] / scale), low, high) as int8, 8 values a step, the rest one by one (a
// correctly rounded division in both: torch's bits).
void divided_codes(const float* row, int64_t inner, float scale, float low, float high, int8_t* codes) {
  const __m256 divisor = _mm256_set1_ps(scale), lowest = _mm256_set1_ps(low), highest = _mm256_set1_ps(high);
  int64_t i = 0;
  for (; i + 8 <= inner; i += 8) {
    const __m256 rounded = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + i), divisor),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i whole = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(rounded, lowest), highest));
    const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(whole), _mm256_extracti128_si256(whole, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packs_epi16(halves, halves));
  }
  for (; i < inner; ++i) {
    codes[i] = static_cast<int8_t>(std::min(std::max(std::nearbyint(row[i] / scale), low), high));
  }
}

// max |x| of `count` values, NaN where one is (as amax's).
float absolute_max(const float* x, int64_t count) {
  const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 high = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 magnitude = _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude_bits);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(magnitude, magnitude, _CMP_UNORD_Q));
    high = _mm256_max_ps(high, magnitude);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, high);
  float result = 0.0f;
  for (float lane : lanes) result = std::max(result, lane);
  bool seen_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < count; ++i) {
    seen_nan = seen_nan || std::isnan(x[i]);
    result = std::max(result, std::fabs(x[i]));
  }
  return seen_nan ? NAN : result;
}

}  // namespace

// Per-token symmetric int8 codes of float rows [..., in] (their scales [rows, 1]), as
// llmquant.nn.int8_linear.input_codes makes them (dynamic "token"): int8_gemv.cpp's token_codes (the same formula and
// bits), 8 values at a time: scale = max((clip < 1 ? absmax * clip : absmax) / qmax, min_scale), code =
// round-half-even(x / scale), clamped to [qmin, qmax] when clipped (unclipped, |x / scale| <= qmax already). A row
// with a NaN has a NaN scale, as amax's, and its codes converted one by one.
std::vector<torch::Tensor> token_codes(const torch::Tensor& rows_in, double qmax, double min_scale, double qmin,
                                       double clip) {
  TORCH_CHECK(rows_in.dim() >= 2 && rows_in.scalar_type() == torch::kFloat32, "token_codes: float32 rows");
  const torch::Tensor rows = rows_in.contiguous();
  const int64_t inner = rows.size(-1), count = inner > 0 ? rows.numel() / inner : 0;
  torch::Tensor codes = torch::empty(rows.sizes(), rows.options().dtype(torch::kInt8));
  torch::Tensor scale = torch::empty({count, 1}, rows.options());
  const float* x = rows.data_ptr<float>();
  int8_t* c = codes.data_ptr<int8_t>();
  float* s = scale.data_ptr<float>();
  const float limit = static_cast<float>(qmax), ratio = static_cast<float>(clip);
  const float low = clip == 1.0 ? -limit : static_cast<float>(qmin);
  at::parallel_for(0, count, 16, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const float* row = x + m * inner;
      const float absmax = absolute_max(row, inner);
      const float unbounded = (ratio == 1.0f ? absmax : absmax * ratio) / limit;
      const float row_scale = unbounded < static_cast<float>(min_scale) ? static_cast<float>(min_scale) : unbounded;
      s[m] = row_scale;
      if (std::isnan(absmax)) {
        for (int64_t i = 0; i < inner; ++i) {
          c[m * inner + i] = static_cast<int8_t>(std::nearbyint(row[i] / row_scale));
        }
      } else {
        divided_codes(row, inner, row_scale, low, limit, c + m * inner);
      }
    }
  });
  return {codes, scale};
}

namespace {

constexpr int kTileRows = 3;      // input rows of a tile: 6 int32 accumulators, 2 weight vectors, 3 broadcasts
constexpr int kPanelOutputs = 16;  // outputs of a packed panel: two 8-lane vectors
constexpr int64_t kChunkBytes = 256 * 1024;  // widened input codes multiplied by every panel before the next rows

// One tile of int8_gemm: MR input rows (widened codes, `inner` apart) by the 16 outputs of one packed panel, over
// every group: per group the exact int32 dots, VPMADDWD of a broadcast input pair (x_k, x_k+1) with the panel's
// 16 weight pairs (w_o,k, w_o,k+1) widened to 16 bits; then, in the torch path's float32 order, either
//   group_size 0: y = float(dot) * (s_x * s_w) + b                                          (scale_output), or
//   groups:       y = ((float(dot_0) * s_w,0 + float(dot_1) * s_w,1) + ...) * s_x + b       (grouped_linear).
// `scales` holds [groups, padded outputs] weight scales (one group: [1, padded outputs]); `bias` [outputs] or null.
template <int MR>
void gemm_tile(const int16_t* x, int64_t inner, const int8_t* panel, int64_t groups, int64_t pairs_per_group,
               bool grouped, const float* scales, int64_t padded_outputs, const float* row_scales, bool per_row,
               const float* bias, int64_t j0, int64_t outputs, float* out) {
  __m256 total[MR][2];
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t p = g * pairs_per_group, end = p + pairs_per_group; p < end; ++p) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + 32 * p)));
      const __m256i w1 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + 32 * p + 16)));
      for (int m = 0; m < MR; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * inner + 2 * p, 4);
        const __m256i xs = _mm256_set1_epi32(pair);
        acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(xs, w0));
        acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(xs, w1));
      }
    }
    for (int v = 0; v < 2; ++v) {
      const __m256 scale = _mm256_loadu_ps(scales + g * padded_outputs + j0 + 8 * v);
      for (int m = 0; m < MR; ++m) {
        const __m256 dots = _mm256_cvtepi32_ps(acc[m][v]);
        if (!grouped) {
          total[m][v] = _mm256_mul_ps(dots, _mm256_mul_ps(_mm256_set1_ps(row_scales[per_row ? m : 0]), scale));
        } else {
          const __m256 part = _mm256_mul_ps(dots, scale);
          total[m][v] = g == 0 ? part : _mm256_add_ps(total[m][v], part);
        }
      }
    }
  }
  alignas(32) float values[kPanelOutputs], biases[kPanelOutputs] = {};
  const int64_t valid = std::min<int64_t>(kPanelOutputs, outputs - j0);
  if (bias != nullptr) std::memcpy(biases, bias + j0, valid * sizeof(float));
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < 2; ++v) {
      __m256 y = total[m][v];
      if (grouped) y = _mm256_mul_ps(y, _mm256_set1_ps(row_scales[per_row ? m : 0]));
      if (bias != nullptr) y = _mm256_add_ps(y, _mm256_load_ps(biases + 8 * v));
      _mm256_store_ps(values + 8 * v, y);
    }
    std::memcpy(out + m * outputs + j0, values, valid * sizeof(float));
  }
}

}  // namespace

// The W8A8 (or grouped W4A8 / W4A4) linear of int8 codes [rows, in] (any number of rows), float32 [rows, out], the
// weight packed by llmquant.nn.int8_gemv.avx2_gemm_pack: panels of 16 outputs, [ceil(out / 16), in / 2, 16, 2] int8
// (each input pair of 16 outputs in 32 bytes, read in order: one stream per panel; zero rows past `out`). scales:
// [groups, ceil(out / 16) * 16] float32 (one group when group_size is 0), bias: [out] or None, input_scale [rows, 1]
// or [1, 1]. Tiles of 3 rows by 16 outputs, the panels in parallel, the rows in chunks.
torch::Tensor int8_gemm(const torch::Tensor& codes, const torch::Tensor& packed, const torch::Tensor& scales,
                        const torch::Tensor& input_scale, const std::optional<torch::Tensor>& bias, int64_t outputs,
                        int64_t group_size) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.is_contiguous(),
              "int8_gemm: contiguous int8 codes [rows, in]");
  const int64_t rows = codes.size(0), inner = codes.size(1), panels = (outputs + kPanelOutputs - 1) / kPanelOutputs;
  const int64_t padded = panels * kPanelOutputs;
  TORCH_CHECK(inner % 2 == 0 && (group_size == 0 || (group_size % 2 == 0 && inner % group_size == 0)),
              "int8_gemm: an even input width, in even groups dividing it");
  TORCH_CHECK(packed.scalar_type() == torch::kInt8 && packed.is_contiguous() && packed.numel() == padded * inner,
              "int8_gemm: the weight packed in panels of 16 outputs");
  const int64_t groups = group_size > 0 ? inner / group_size : 1;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == groups * padded,
              "int8_gemm: [groups, padded outputs] float32 weight scales");
  const torch::Tensor s_x = input_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(s_x.numel() == 1 || s_x.numel() == rows, "int8_gemm: one input scale, or one per row");
  const torch::Tensor b = float_bias(bias, outputs, "int8_gemm");
  const std::vector<int16_t> wide = widened_codes(codes);
  torch::Tensor y = torch::empty({rows, outputs}, codes.options().dtype(torch::kFloat32));
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* sw = scales.data_ptr<float>();
  const float* sx = s_x.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool per_row = s_x.numel() > 1, grouped = group_size > 0;
  const int64_t pairs_per_group = (grouped ? group_size : inner) / 2;
  float* out = y.data_ptr<float>();
  // The rows in chunks of widened codes that stay in a core's L2 cache while every panel multiplies them (a prefill
  // of 8 x 512 rows read them again from memory for each panel otherwise).
  const int64_t chunk = std::max<int64_t>(kTileRows, kChunkBytes / (2 * inner) / kTileRows * kTileRows);
  for (int64_t first_row = 0; first_row < rows; first_row += chunk) {
    const int64_t end_row = std::min(rows, first_row + chunk);
    at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
      for (int64_t panel = first; panel < last; ++panel) {
        const int8_t* weights = w + panel * kPanelOutputs * inner;
        const int64_t j0 = panel * kPanelOutputs;
        for (int64_t m0 = first_row; m0 < end_row; m0 += kTileRows) {
          const int64_t tile_rows = std::min<int64_t>(kTileRows, end_row - m0);  // (kTileRows is 3)
          const auto tile = tile_rows == 3 ? gemm_tile<3> : tile_rows == 2 ? gemm_tile<2> : gemm_tile<1>;
          tile(wide.data() + m0 * inner, inner, weights, groups, pairs_per_group, grouped, sw, padded,
               sx + (per_row ? m0 : 0), per_row, bp, j0, outputs, out + m0 * outputs);
        }
      }
    });
  }
  return y;
}

namespace {

// One tile of weight_only_gemm: MR float input rows (`inner` apart) by the 16 outputs of one panel of int8 codes
// ([in, 16]: each input's 16 codes together), over every group: per group the float32 sums of x_k * w_o,k (the
// codes converted to float32 as they are read, VPMOVSXBD and VCVTDQ2PS, then fused multiply-adds), times the group's
// scales, added group after group; plus the bias.
template <int MR>
void weight_only_tile(const float* x, int64_t inner, const int8_t* panel, int64_t groups, int64_t group_size,
                      const float* scales, int64_t padded_outputs, const float* bias, int64_t j0, int64_t outputs,
                      float* out) {
  __m256 total[MR][2];
  for (int m = 0; m < MR; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = g * group_size, end = k + group_size; k < end; ++k) {
      const __m128i eight0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(panel + 16 * k));
      const __m128i eight1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(panel + 16 * k + 8));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight0));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight1));
      for (int m = 0; m < MR; ++m) {
        const __m256 xs = _mm256_broadcast_ss(x + m * inner + k);
        acc[m][0] = _mm256_fmadd_ps(xs, w0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(xs, w1, acc[m][1]);
      }
    }
    for (int v = 0; v < 2; ++v) {
      const __m256 scale = _mm256_loadu_ps(scales + g * padded_outputs + j0 + 8 * v);
      for (int m = 0; m < MR; ++m) total[m][v] = _mm256_fmadd_ps(acc[m][v], scale, total[m][v]);
    }
  }
  alignas(32) float values[kPanelOutputs], biases[kPanelOutputs] = {};
  const int64_t valid = std::min<int64_t>(kPanelOutputs, outputs - j0);
  if (bias != nullptr) std::memcpy(biases, bias + j0, valid * sizeof(float));
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < 2; ++v) {
      _mm256_store_ps(values + 8 * v, _mm256_add_ps(total[m][v], _mm256_load_ps(biases + 8 * v)));
    }
    std::memcpy(out + m * outputs + j0, values, valid * sizeof(float));
  }
}

}  // namespace

// A weight-only int8 linear (W8A16), float32 [rows, out] = sum_g s_w,g (x_g . w_q,g) + b for float32 rows [rows, in]
// and the codes packed by llmquant.nn.int8_gemv.avx2_weight_only_pack: panels of 16 outputs, [ceil(out / 16), in,
// 16] int8 (zero rows past `out`); scales [groups, ceil(out / 16) * 16] float32 (one group: a scale per output),
// bias [out] or None. The weight read at one byte a code; float32 sums in the op's order (within float32 roundings
// of x @ dequantized(W_q)^T, not its bits). Tiles of 2 rows by 16 outputs, the panels in parallel.
torch::Tensor weight_only_gemm(const torch::Tensor& rows_in, const torch::Tensor& packed, const torch::Tensor& scales,
                               const std::optional<torch::Tensor>& bias, int64_t outputs, int64_t group_size) {
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == torch::kFloat32, "weight_only_gemm: float32 rows");
  const torch::Tensor rows = rows_in.contiguous();
  const int64_t count = rows.size(0), inner = rows.size(1), panels = (outputs + kPanelOutputs - 1) / kPanelOutputs;
  const int64_t padded = panels * kPanelOutputs, span = group_size > 0 ? group_size : inner;
  TORCH_CHECK(span > 0 && inner % span == 0, "weight_only_gemm: groups dividing the input");
  TORCH_CHECK(packed.scalar_type() == torch::kInt8 && packed.is_contiguous() && packed.numel() == padded * inner,
              "weight_only_gemm: the weight packed in panels of 16 outputs");
  const int64_t groups = inner / span;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == groups * padded,
              "weight_only_gemm: [groups, padded outputs] float32 weight scales");
  const torch::Tensor b = float_bias(bias, outputs, "weight_only_gemm");
  torch::Tensor y = torch::empty({count, outputs}, rows.options());
  const float* x = rows.data_ptr<float>();
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* sw = scales.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    for (int64_t panel = first; panel < last; ++panel) {
      for (int64_t m0 = 0; m0 < count; m0 += 2) {
        const auto tile = count - m0 >= 2 ? weight_only_tile<2> : weight_only_tile<1>;
        tile(x + m0 * inner, inner, w + panel * kPanelOutputs * inner, groups, span, sw, padded, bp,
             panel * kPanelOutputs, outputs, out + m0 * outputs);
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("token_codes", &token_codes, "per-token int8 codes of float32 rows and their scales");
  module.def("int8_gemm", &int8_gemm, "y = s_x * s_w * (x_q @ W_q^T) + b, the weight packed in panels (VPMADDWD)");
  module.def("weight_only_gemm", &weight_only_gemm, "y = sum_g s_w,g (x_g @ W_q,g^T) + b, the weight in panels");
}
