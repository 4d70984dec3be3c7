// The W8A8 (and grouped W4A8 / W4A4) linear of a few rows (a decode step) on x86 CPUs with AVX2 but without
// AVX512-VNNI, where torch's int8 products are many times slower than float32 and oneDNN's saturate
// (llmquant.nn.int8_linear.int_mm_refusal): y = s_x * s_w * (x_q @ W_q^T) + b in one call, reading the weight at one
// byte a code instead of the four of its float32 copy. Built by llmquant.nn.int8_gemv with -mavx2, on CPUs that have
// it (checked there before building).
//
// VPMADDWD multiplies 16 signed 16-bit pairs and adds adjacent products into 8 int32 lanes. The int8 codes of both
// sides are widened to 16 bits (the input's once per call, the weight's as it is read: VPMOVSXBW), so every product
// (at most 128 * 128) and every pair sum (at most 2^15) is exact and nothing saturates; the int32 sums are exact as
// long as they fit, as torch._int_mm's. Then the same float32 operations, in the same order, as
// llmquant.nn.int8_linear's torch path (scale_output, grouped_linear): the same bits. The weight is read once per
// call, 8 rows at a time, in its stored [out, in] layout. Also the per-token input codes (token_codes), in one call
// instead of torch's six operations.

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

// Asks for the cache line `ahead` weight rows (`stride` bytes each) after `at`: the same place in the next block of
// rows, read while this block is multiplied (as int8_gemv.cpp does). A prefetch never faults past the weight's end.
inline void prefetch_next_block(const int8_t* at, int64_t stride, int64_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(at + ahead * stride), _MM_HINT_T0);
}

constexpr int kBlock = 8;  // weight rows multiplied together: the input read once for 8 of them

// The exact int32 dots of the widened input x (`span` columns) with `count` (at most kBlock) weight rows `stride`
// bytes apart: 16 columns a step (VPMOVSXBW, VPMADDWD, VPADDD), the last span % 16 columns one by one.
void row_dots(const int16_t* x, const int8_t* w, int64_t stride, int64_t count, int64_t span, int32_t* dots) {
  const int64_t steps = span / 16;
  __m256i acc[kBlock];
  for (int r = 0; r < kBlock; ++r) acc[r] = _mm256_setzero_si256();
  if (count == kBlock) {
    for (int64_t s = 0; s < steps; ++s) {
      const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * s));
      for (int r = 0; r < kBlock; ++r) {
        const int8_t* at = w + r * stride + 16 * s;
        if ((s & 3) == 0) prefetch_next_block(at, stride, kBlock);  // (one 64-byte line per 4 steps)
        const __m256i ws = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(xs, ws));
      }
    }
  } else {
    for (int64_t s = 0; s < steps; ++s) {
      const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * s));
      for (int64_t r = 0; r < count; ++r) {
        const __m128i narrow = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * stride + 16 * s));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(xs, _mm256_cvtepi8_epi16(narrow)));
      }
    }
  }
  alignas(32) int32_t lanes[8];
  for (int64_t r = 0; r < count; ++r) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[r]);
    int32_t sum = 0;
    for (int l = 0; l < 8; ++l) sum += lanes[l];
    for (int64_t k = 16 * steps; k < span; ++k) sum += static_cast<int32_t>(x[k]) * w[r * stride + k];
    dots[r] = sum;
  }
}

// The bias as float32 (undefined without one), checked to hold one value per output.
torch::Tensor float_bias(const std::optional<torch::Tensor>& bias, int64_t outputs) {
  if (!bias.has_value()) return torch::Tensor();
  torch::Tensor b = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(b.numel() == outputs, "int8_gemv: one bias per output");
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

// The W8A8 (or grouped W4A8 / W4A4) linear of a few rows of int8 codes, float32 [..., out]: codes [..., in] int8,
// weight [out, in] int8, input_scale [rows, 1] or [1, 1], weight_scale [1, out] or [1, 1] (group_size 0) or
// [out, groups], bias [out] or None; int8_gemv.cpp's arguments, less its row sums (VPMADDWD multiplies signed codes).
// In the orders llmquant.nn.int8_linear keeps:
//   group_size 0 (scale_output):    y = float(x_q . w_q) * (s_x * s_w) + b
//   group_size g (grouped_linear):  y = ((float(x_q,0 . w_q,0) * s_w,0 + float(x_q,1 . w_q,1) * s_w,1) + ...) * s_x + b
torch::Tensor int8_gemv(const torch::Tensor& codes, const torch::Tensor& weight, const torch::Tensor& input_scale,
                        const torch::Tensor& weight_scale, const std::optional<torch::Tensor>& bias,
                        int64_t group_size) {
  TORCH_CHECK(codes.dim() >= 2 && weight.dim() == 2 && codes.size(-1) == weight.size(1), "int8_gemv: shapes");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && weight.scalar_type() == torch::kInt8, "int8_gemv: int8 codes");
  TORCH_CHECK(codes.is_contiguous() && weight.is_contiguous(), "int8_gemv: contiguous tensors");
  const int64_t inner = codes.size(-1), rows = inner > 0 ? codes.numel() / inner : 0, outputs = weight.size(0);
  TORCH_CHECK(group_size >= 0 && (group_size == 0 || inner % group_size == 0), "int8_gemv: groups divide the input");
  const int64_t groups = group_size > 0 ? inner / group_size : 1, span = group_size > 0 ? group_size : inner;
  const torch::Tensor s_x = input_scale.to(torch::kFloat32).contiguous();
  const torch::Tensor s_w = weight_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(s_x.numel() == 1 || s_x.numel() == rows, "int8_gemv: one input scale, or one per row");
  TORCH_CHECK(group_size > 0 ? s_w.numel() == outputs * groups : (s_w.numel() == 1 || s_w.numel() == outputs),
              "int8_gemv: one weight scale, one per output, or one per output and group");
  const torch::Tensor b = float_bias(bias, outputs);
  const std::vector<int16_t> wide = widened_codes(codes);
  std::vector<int64_t> shape(codes.sizes().begin(), codes.sizes().end());  // the codes' leading dimensions
  shape.back() = outputs;
  torch::Tensor y = torch::empty(shape, codes.options().dtype(torch::kFloat32));
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* sx = s_x.data_ptr<float>();
  const float* sw = s_w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool per_row = s_x.numel() > 1, per_output = s_w.numel() > 1;
  float* out = y.data_ptr<float>();
  const int64_t blocks = (outputs + kBlock - 1) / kBlock;  // their weight rows stay in cache across the input rows
  at::parallel_for(0, blocks, 2, [&](int64_t first, int64_t last) {
    int32_t dots[kBlock];
    float values[kBlock];
    for (int64_t block = first; block < last; ++block) {
      const int64_t j0 = block * kBlock, count = std::min<int64_t>(kBlock, outputs - j0);
      const int8_t* weight_rows = w + j0 * inner;
      for (int64_t m = 0; m < rows; ++m) {
        const int16_t* input_row = wide.data() + m * inner;
        const float row_scale = sx[per_row ? m : 0];
        if (group_size == 0) {
          row_dots(input_row, weight_rows, inner, count, span, dots);
          for (int64_t r = 0; r < count; ++r) {
            values[r] = static_cast<float>(dots[r]) * (row_scale * sw[per_output ? j0 + r : 0]);
          }
        } else {
          for (int64_t g = 0; g < groups; ++g) {
            row_dots(input_row + g * span, weight_rows + g * span, inner, count, span, dots);
            for (int64_t r = 0; r < count; ++r) {
              const float part = static_cast<float>(dots[r]) * sw[(j0 + r) * groups + g];
              values[r] = g == 0 ? part : values[r] + part;
            }
          }
          for (int64_t r = 0; r < count; ++r) values[r] = values[r] * row_scale;
        }
        for (int64_t r = 0; r < count; ++r) {
          out[m * outputs + j0 + r] = bp != nullptr ? values[r] + bp[j0 + r] : values[r];
        }
      }
    }
  });
  return y;
}

namespace {

constexpr int kTileRows = 3;      // input rows of a tile: 6 int32 accumulators, 2 weight vectors, 3 broadcasts
constexpr int kPanelOutputs = 16;  // outputs of a packed panel: two 8-lane vectors

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
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + 32 * p + 16)));
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

// The W8A8 (or grouped W4A8 / W4A4) linear of any number of rows of int8 codes, float32 [rows, out], with the weight
// packed by llmquant.nn.int8_gemv.avx2_gemm_pack: panels of 16 outputs, [ceil(out / 16), in / 2, 16, 2] int8 (each
// input pair of 16 outputs in 32 bytes; zero rows past `out`). scales: [groups, ceil(out / 16) * 16] float32 (one
// group when group_size is 0), bias: [out] or None, input_scale [rows, 1] or [1, 1]. Tiles of
// 4 rows by 16 outputs, the panels in parallel; int8_gemv's orders and bits.
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
  const torch::Tensor b = float_bias(bias, outputs);
  const std::vector<int16_t> wide = widened_codes(codes);
  torch::Tensor y = torch::empty({rows, outputs}, codes.options().dtype(torch::kFloat32));
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* sw = scales.data_ptr<float>();
  const float* sx = s_x.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool per_row = s_x.numel() > 1, grouped = group_size > 0;
  const int64_t pairs_per_group = (grouped ? group_size : inner) / 2;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    for (int64_t panel = first; panel < last; ++panel) {
      const int8_t* weights = w + panel * kPanelOutputs * inner;
      const int64_t j0 = panel * kPanelOutputs;
      for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
        const int16_t* x = wide.data() + m0 * inner;
        const float* row_scales = sx + (per_row ? m0 : 0);
        float* tile_out = out + m0 * outputs;
        switch (std::min<int64_t>(kTileRows, rows - m0)) {
#define LLMQUANT_TILE(MR)                                                                                         \
  case MR:                                                                                                         \
    gemm_tile<MR>(x, inner, weights, groups, pairs_per_group, grouped, sw, padded, row_scales, per_row, bp, j0,   \
                  outputs, tile_out);                                                                              \
    break;
          LLMQUANT_TILE(1) LLMQUANT_TILE(2) LLMQUANT_TILE(3)
#undef LLMQUANT_TILE
        }
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("int8_gemv", &int8_gemv, "y = s_x * s_w * (x_q @ W_q^T) + b for a few rows (VPMADDWD, exact)");
  module.def("token_codes", &token_codes, "per-token int8 codes of float32 rows and their scales");
  module.def("int8_gemm", &int8_gemm, "the same for any number of rows, the weight packed in panels (VPMADDWD)");
}
