// The W8A8 (and grouped W4A8 / W4A4) linear on x86 CPUs with AVX2 but without AVX512-VNNI or AMX, where torch's int8
// products are many times slower than float32 and oneDNN's saturate (llmquant.nn.int8_linear.int_mm_refusal): y = s_x *
// s_w * (x_q @ W_q^T) + b in one call (int8_gemm) at any row count, reading the weight at one byte a code, packed in
// panels of 16 outputs, instead of the four of its float32 copy; and the per-token input codes (token_codes) in one
// call instead of torch's six operations, static ones (static_codes) instead of four, and for a decode step's few rows
// the codes and the product in one call (token_linear, static_linear); and weight-only int8 Linears (W8A16:
// weight_only_gemm, float32 products of the codes converted as they are read); and the INT8 (or FP8) KV cache's decode
// step: its per-token codes written into the cache's stores (store_token_codes) and the attention over its codes
// (int8_decode_attention, as the VNNI op's, 8 lanes at a time); and W4 weight-only Linears, their inputs as per-token
// int16 codes (int16_token_codes) multiplied by int8_gemm, both in one call (int16_linear). Built by
// llmquant.nn.int8_gemv with -mavx2 -mfma, on CPUs that have them (checked there before building).
//
// VPMADDWD multiplies 16 signed 16-bit pairs and adds adjacent products into 8 int32 lanes. The int8 codes of both
// sides are widened to 16 bits (the input's once per call; the weight's as it is read, VPMOVSXBW, or once per panel
// for a chunk of rows), so every product (at most 128 * 128) and every pair sum (at most 2^15) is exact and nothing
// saturates; the int32 sums are exact as long as they fit, as torch._int_mm's. Then the same float32 operations, in
// the same order, as llmquant.nn.int8_linear's torch path (scale_output, grouped_linear): the same bits. int16 input
// codes (llmquant.nn.int4_linear.int16_linear) go in as they are: pair sums at most 2^23.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "block_codes.h"
#include "int8_ops_common.h"

using llmquant::float_bias;
using llmquant::HeadInputs;

namespace {

// The input codes widened to int16 (VPMADDWD's operand), once per call.
std::vector<int16_t> widened_codes(const torch::Tensor& codes) {
  const int8_t* c = codes.data_ptr<int8_t>();
  std::vector<int16_t> wide(codes.numel());
  for (size_t i = 0; i < wide.size(); ++i) wide[i] = c[i];
  return wide;
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

// The per-token codes and scale of one row (int8_ops_common.h's token_codes), as the VNNI op's row_codes: the
// same formula and bits, 8 values at a time. Unclipped, |x / scale| <= qmax already; a NaN row's codes one by one.
void row_codes(const float* row, int64_t inner, float qmin, float qmax, float clip, float min_scale, int8_t* codes,
               float* scale) {
  const float absmax = absolute_max(row, inner);
  const float unbounded = (clip == 1.0f ? absmax : absmax * clip) / qmax;
  const float row_scale = unbounded < min_scale ? min_scale : unbounded;
  *scale = row_scale;
  if (std::isnan(absmax)) {
    for (int64_t i = 0; i < inner; ++i) codes[i] = static_cast<int8_t>(std::nearbyint(row[i] / row_scale));
    return;
  }
  divided_codes(row, inner, row_scale, clip == 1.0f ? -qmax : qmin, qmax, codes);
}

// Eight outputs' weight pairs (w_o,k, w_o,k+1) as 16-bit lanes: widened as they are read from the packed int8 codes,
// or loaded from a panel widened beforehand (int8_gemm's wide_panel).
inline __m256i weight_pairs8(const int8_t* codes) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
}
inline __m256i weight_pairs8(const int16_t* codes) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
}

// One row of int16_token_codes.
void int16_row_codes(const float* row, int64_t inner, int16_t* codes, float* scale) {
  const float unbounded = absolute_max(row, inner) / 32767.0f;
  const float row_scale = unbounded < FLT_MIN ? FLT_MIN : unbounded;  // (NaN stays NaN)
  *scale = row_scale;
  const __m256 divisor = _mm256_set1_ps(row_scale);
  int64_t i = 0;
  for (; i + 8 <= inner; i += 8) {
    const __m256i whole = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + i), divisor),
                                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm_packs_epi32(_mm256_castsi256_si128(whole), _mm256_extracti128_si256(whole, 1)));
  }
  for (; i < inner; ++i) codes[i] = static_cast<int16_t>(std::nearbyint(row[i] / row_scale));
}

// Per-token int16 codes of float32 rows [n, in] and their scales [n, 1] (W4 on such CPUs,
// llmquant.nn.int4_linear.int16_linear): scale = max(absmax / 32767, FLT_MIN), code = round-half-even(x / scale),
// 8 values a step: torch's bits (abs, amax, div_, clamp_, div, round_, cast) in two passes over a row. A row with a
// NaN has a NaN scale.
std::vector<torch::Tensor> int16_token_codes(const torch::Tensor& rows_in) {
  return llmquant::codes_by_row<int16_t>(rows_in, "int16_token_codes: float32 rows [n, in]", int16_row_codes);
}

constexpr int kTileRows = 6;      // input rows of a tile: 12 int32 accumulators, 2 weight vectors, a broadcast
constexpr int kPanelOutputs = 16;  // outputs of a packed panel: two 8-lane vectors
constexpr int64_t kChunkBytes = 256 * 1024;  // widened input codes multiplied by every panel before the next rows

// The exact int32 dots of MR input rows (widened codes, `inner` apart) with the 16 outputs of a panel over input
// pairs [first, end), into dots[2 m + v] (outputs 8 v to 8 v + 7 of row m): per pair, VPMADDWD of the broadcast
// input pair (x_k, x_k+1) with the 16 weight pairs. Not inlined, with local accumulators (one array per half of the
// panel), the row loops unrolled and a pointer out, so that g++ 12 keeps the 12 sums in registers
// (bench/speed_2026-12-07_epyc_avx2_after/pair_dots_asm.py counts it): with one [MR][2] array it copied each sum back
// into its accumulator (eight extra moves a pair at MR 4), without the unrolling it kept half of them on the stack (at
// MR 6).
template <int MR, typename Weight>
__attribute__((noinline)) void pair_dots(const int16_t* x, int64_t inner, const Weight* panel, int64_t first,
                                         int64_t end, __m256i* dots) {
  __m256i low[MR], high[MR];  // (local: stored to `dots` at the end, not at every step)
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) low[m] = high[m] = _mm256_setzero_si256();
  for (int64_t p = first; p < end; ++p) {
    const __m256i w0 = weight_pairs8(panel + 32 * p), w1 = weight_pairs8(panel + 32 * p + 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * inner + 2 * p, 4);
      const __m256i xs = _mm256_set1_epi32(pair);
      low[m] = _mm256_add_epi32(low[m], _mm256_madd_epi16(xs, w0));
      high[m] = _mm256_add_epi32(high[m], _mm256_madd_epi16(xs, w1));
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) dots[2 * m] = low[m], dots[2 * m + 1] = high[m];
}

// How int8_gemm scales its integer dots: one group of the whole input, the weight's scales in groups of columns
// (W4A8), the input's scales in groups of columns (inputs per token in groups: W4A4 with Atom's activations), or
// both in the same groups of columns (Atom's weights and activations, the MX formats' blocks).
enum class Groups { kNone, kWeight, kInput, kBoth };

// One tile of int8_gemm: MR input rows (widened codes, `inner` apart) by the 16 outputs of one packed panel, over
// every group: per group the exact int32 dots, VPMADDWD of a broadcast input pair (x_k, x_k+1) with the panel's
// 16 weight pairs (w_o,k, w_o,k+1) widened to 16 bits; then, in the torch path's float32 order, either
//   kNone:   y = float(dot) * (s_x * s_w) + b                                            (scale_output), or
//   kWeight: y = ((float(dot_0) * s_w,0 + float(dot_1) * s_w,1) + ...) * s_x + b         (grouped_linear), or
//   kInput:  y = ((float(dot_0) * s_x,0 + float(dot_1) * s_x,1) + ...) * s_w + b         (input_grouped_linear), or
//   kBoth:   y = ((float(dot_0) * s_x,0) * s_w,0 + (float(dot_1) * s_x,1) * s_w,1 + ...) + b (the same, both grouped).
// `scales` holds [groups, padded outputs] weight scales (kNone, kInput: [1, padded outputs]); `row_scales` one
// input scale, or one per row, or (kInput, kBoth) `groups` per row; `bias` [outputs] or null.
template <int MR, typename Weight>
void gemm_tile(const int16_t* x, int64_t inner, const Weight* panel, int64_t groups, int64_t pairs_per_group,
               Groups grouping, const float* scales, int64_t padded_outputs, const float* row_scales, bool per_row,
               const float* bias, int64_t j0, int64_t outputs, float* out) {
  __m256 total[MR][2];
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[MR][2];
    pair_dots<MR>(x, inner, panel, g * pairs_per_group, (g + 1) * pairs_per_group, &acc[0][0]);
    for (int v = 0; v < 2; ++v) {
      const bool weight_groups = grouping == Groups::kWeight || grouping == Groups::kBoth;
      const __m256 scale = _mm256_loadu_ps(scales + (weight_groups ? g * padded_outputs : 0) + j0 + 8 * v);
      for (int m = 0; m < MR; ++m) {
        const __m256 dots = _mm256_cvtepi32_ps(acc[m][v]);
        if (grouping == Groups::kNone) {
          total[m][v] = _mm256_mul_ps(dots, _mm256_mul_ps(_mm256_set1_ps(row_scales[per_row ? m : 0]), scale));
          continue;
        }
        __m256 part = _mm256_mul_ps(
            dots, grouping == Groups::kWeight ? scale : _mm256_set1_ps(row_scales[m * groups + g]));
        if (grouping == Groups::kBoth) part = _mm256_mul_ps(part, scale);
        total[m][v] = g == 0 ? part : _mm256_add_ps(total[m][v], part);
      }
    }
  }
  alignas(32) float values[kPanelOutputs], biases[kPanelOutputs] = {};
  const int64_t valid = std::min<int64_t>(kPanelOutputs, outputs - j0);
  if (bias != nullptr) std::memcpy(biases, bias + j0, valid * sizeof(float));
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < 2; ++v) {
      __m256 y = total[m][v];
      if (grouping == Groups::kWeight) y = _mm256_mul_ps(y, _mm256_set1_ps(row_scales[per_row ? m : 0]));
      if (grouping == Groups::kInput) y = _mm256_mul_ps(y, _mm256_loadu_ps(scales + j0 + 8 * v));
      if (bias != nullptr) y = _mm256_add_ps(y, _mm256_load_ps(biases + 8 * v));
      _mm256_store_ps(values + 8 * v, y);
    }
    std::memcpy(out + m * outputs + j0, values, valid * sizeof(float));
  }
}

// gemm_tile for 1 to kTileRows rows of a panel of `Weight` codes.
template <typename Weight>
auto tile_of(int64_t rows) {
  static constexpr decltype(&gemm_tile<1, Weight>) tiles[kTileRows] = {
      gemm_tile<1, Weight>, gemm_tile<2, Weight>, gemm_tile<3, Weight>,
      gemm_tile<4, Weight>, gemm_tile<5, Weight>, gemm_tile<6, Weight>};
  return tiles[rows - 1];
}

}  // namespace

// The W8A8 (or grouped W4A8 / W4A4) linear of int8 codes [rows, in] (any number of rows; or int16 codes, W4
// weight-only Linears: exact while |x| * |w| * group stays below 2^31, the caller's check), float32 [rows, out], the
// weight packed by llmquant.nn.int8_gemv.avx2_gemm_pack: panels of 16 outputs, [ceil(out / 16), in / 2, 16, 2] int8
// (each input pair of 16 outputs in 32 bytes, read in order: one stream per panel; zero rows past `out`). scales:
// [groups, ceil(out / 16) * 16] float32 (one group when group_size is 0), bias: [out] or None, input_scale [rows, 1]
// or [1, 1]; or, with input_group_size (inputs per token in groups of that many columns; group_size 0, or the same
// size: both grouped), the weight's scales [1 or groups, ceil(out / 16) * 16] and input_scale [rows, in /
// input_group_size]. Tiles of 6 rows by 16 outputs, the panels in parallel, the rows in chunks.
torch::Tensor int8_gemm(const torch::Tensor& codes, const torch::Tensor& packed, const torch::Tensor& scales,
                        const torch::Tensor& input_scale, const std::optional<torch::Tensor>& bias, int64_t outputs,
                        int64_t group_size, int64_t input_group_size) {
  const bool int16_codes = codes.scalar_type() == torch::kInt16;
  TORCH_CHECK(codes.dim() == 2 && (codes.scalar_type() == torch::kInt8 || int16_codes) && codes.is_contiguous(),
              "int8_gemm: contiguous int8 or int16 codes [rows, in]");
  const int64_t rows = codes.size(0), inner = codes.size(1), panels = (outputs + kPanelOutputs - 1) / kPanelOutputs;
  const int64_t padded = panels * kPanelOutputs;
  TORCH_CHECK(inner % 2 == 0 && (group_size == 0 || (group_size % 2 == 0 && inner % group_size == 0)),
              "int8_gemm: an even input width, in even groups dividing it");
  TORCH_CHECK(packed.scalar_type() == torch::kInt8 && packed.is_contiguous() && packed.numel() == padded * inner,
              "int8_gemm: the weight packed in panels of 16 outputs");
  const Groups grouping = input_group_size > 0 ? (group_size > 0 ? Groups::kBoth : Groups::kInput)
                          : group_size > 0 ? Groups::kWeight : Groups::kNone;
  TORCH_CHECK(input_group_size == 0 || ((group_size == 0 || group_size == input_group_size) &&
                                        input_group_size % 2 == 0 && inner % input_group_size == 0),
              "int8_gemm: input groups of an even size dividing the inputs, with a weight scale per output or one, "
              "or in the same groups");
  const bool input_groups = grouping == Groups::kInput || grouping == Groups::kBoth;
  const int64_t groups = grouping == Groups::kWeight || grouping == Groups::kBoth ? inner / group_size
                         : input_groups ? inner / input_group_size : 1;
  const int64_t weight_groups = grouping == Groups::kWeight || grouping == Groups::kBoth ? groups : 1;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() &&
                  scales.numel() == weight_groups * padded,
              "int8_gemm: [groups, padded outputs] float32 weight scales");
  const torch::Tensor s_x = input_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(input_groups ? s_x.numel() == rows * groups : s_x.numel() == 1 || s_x.numel() == rows,
              "int8_gemm: one input scale, or one per row (per row and input group with input groups)");
  const torch::Tensor b = float_bias(bias, outputs, "int8_gemm");
  const std::vector<int16_t> widened = int16_codes ? std::vector<int16_t>() : widened_codes(codes);
  const int16_t* wide = int16_codes ? codes.data_ptr<int16_t>() : widened.data();
  torch::Tensor y = torch::empty({rows, outputs}, codes.options().dtype(torch::kFloat32));
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* sw = scales.data_ptr<float>();
  const float* sx = s_x.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool per_row = s_x.numel() > 1;
  const int64_t pairs_per_group = inner / groups / 2, row_scale_stride = input_groups ? groups : 1;
  float* out = y.data_ptr<float>();
  // The rows in chunks of widened codes that stay in a core's L2 cache while every panel multiplies them (a prefill
  // of 8 x 512 rows read them again from memory for each panel otherwise). A chunk of more than one tile multiplies
  // a copy of each panel widened once to 16 bits (16 x in x 2 bytes), not the codes widened again in every tile.
  const int64_t chunk = std::max<int64_t>(kTileRows, kChunkBytes / (2 * inner) / kTileRows * kTileRows);
  for (int64_t first_row = 0; first_row < rows; first_row += chunk) {
    const int64_t end_row = std::min(rows, first_row + chunk);
    const bool widen = end_row - first_row > kTileRows;
    at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
      std::vector<int16_t> wide_panel(widen ? kPanelOutputs * inner : 0);
      for (int64_t panel = first; panel < last; ++panel) {
        const int8_t* weights = w + panel * kPanelOutputs * inner;
        const int64_t j0 = panel * kPanelOutputs;
        const auto tiles = [&](auto* panel_codes, auto tile_of_rows) {
          for (int64_t m0 = first_row; m0 < end_row; m0 += kTileRows) {
            tile_of_rows(std::min<int64_t>(kTileRows, end_row - m0))(
                wide + m0 * inner, inner, panel_codes, groups, pairs_per_group, grouping, sw, padded,
                sx + (per_row ? m0 * row_scale_stride : 0), per_row, bp, j0, outputs, out + m0 * outputs);
          }
        };
        if (widen) {
          for (int64_t i = 0; i < kPanelOutputs * inner; ++i) wide_panel[i] = weights[i];
          tiles(wide_panel.data(), tile_of<int16_t>);
        } else {
          tiles(weights, tile_of<int8_t>);
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

namespace {

// Lanes [0, count) of 8 set (a mask for maskload / maskstore).
inline __m256i lanes8(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(count, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 bytes of codes (the first `count`, the rest 0), never read past the `count`th.
inline __m128i code_bytes8(const int8_t* codes, int64_t count) {
  if (count >= 8) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  int64_t bytes = 0;
  std::memcpy(&bytes, codes, static_cast<size_t>(std::max<int64_t>(count, 0)));
  return _mm_cvtsi64_si128(bytes);
}

// exp(x) for 8 floats, as the VNNI op's exp16: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor polynomial of
// degree 7, times 2^n built in the exponent field (a normal float: n >= -126 where x >= -87). Below -87 (and -inf:
// a masked position; NaN) 0.
inline __m256 exp8(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts, the first exact times n
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
  return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ), result);
}

// 8 int8 codes (the first `count`, the rest 0) as floats.
inline __m256 code_floats8(const int8_t* codes, int64_t count) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(code_bytes8(codes, count)));
}

// 8 float8 E4M3 (fn) codes (the first `count`, the rest 0) as floats, exactly, as the VNNI op's fp8_floats: sign,
// exponent (bias 7) and 3 mantissa bits moved into float32's fields (exponent + 120), subnormals (exponent 0) as
// m * 2^-9, NaN (all ones).
inline __m256 fp8_floats8(const int8_t* codes, int64_t count) {
  const __m256i u = _mm256_cvtepu8_epi32(code_bytes8(codes, count));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x80)), 24);
  const __m256i exponent = _mm256_and_si256(_mm256_srli_epi32(u, 3), _mm256_set1_epi32(0xF));
  const __m256i mantissa = _mm256_and_si256(u, _mm256_set1_epi32(0x7));
  const __m256 normal = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_slli_epi32(_mm256_add_epi32(exponent, _mm256_set1_epi32(120)), 23), _mm256_slli_epi32(mantissa, 20)));
  const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(mantissa), _mm256_set1_ps(1.0f / 512.0f));
  const __m256i zero_exponent = _mm256_cmpeq_epi32(exponent, _mm256_setzero_si256());
  __m256 magnitude = _mm256_blendv_ps(normal, subnormal, _mm256_castsi256_ps(zero_exponent));
  const __m256i nan = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7F)), _mm256_set1_epi32(0x7F));
  magnitude = _mm256_blendv_ps(magnitude, _mm256_set1_ps(NAN), _mm256_castsi256_ps(nan));
  return _mm256_or_ps(magnitude, _mm256_castsi256_ps(sign));
}

// 8 codes of a KV cache as floats: int8, or float8 E4M3.
template <bool kFloat8>
inline __m256 cache_floats8(const int8_t* codes, int64_t count) {
  return kFloat8 ? fp8_floats8(codes, count) : code_floats8(codes, count);
}

// The 8 dot products of q (`width` floats, a multiple of 8) with the 8 rows of `rows` (8 x width floats): eight
// accumulators, then their lanes summed together by a tree of horizontal adds.
__m256 dots8(const float* q, const float* rows, int64_t width) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < width; i += 8) {
    const __m256 x = _mm256_loadu_ps(q + i);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + r * width + i), acc[r]);
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// out[r, i..i+8) = sum_t weights[r, t] * v[t, i..i+8) / sums[r] for R query heads (accumulators in registers; the
// weights' rows `span` apart).
template <int R, bool kFloat8>
void weighted_values(const int8_t* values, int64_t dv, int64_t i, int64_t positions, const float* weights,
                     int64_t span, const float* sums, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t count = dv - i;
  for (int64_t t = 0; t < positions; ++t) {
    const __m256 value = cache_floats8<kFloat8>(values + t * dv + i, count);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + r * span + t), value, acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    _mm256_maskstore_ps(out + r * dv + i, lanes8(count), _mm256_div_ps(acc[r], _mm256_set1_ps(sums[r])));
  }
}

template <bool kFloat8>
void weighted_values_of(int64_t heads, const int8_t* values, int64_t dv, int64_t i, int64_t positions,
                        const float* weights, int64_t span, const float* sums, float* out) {
  using Block = void (*)(const int8_t*, int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*);
  static constexpr Block blocks[] = {weighted_values<1, kFloat8>, weighted_values<2, kFloat8>,
                                     weighted_values<3, kFloat8>, weighted_values<4, kFloat8>,
                                     weighted_values<5, kFloat8>, weighted_values<6, kFloat8>,
                                     weighted_values<7, kFloat8>, weighted_values<8, kFloat8>};
  for (int64_t r = 0; r < heads; r += 8) {
    blocks[std::min<int64_t>(8, heads - r) - 1](values, dv, i, positions, weights + r * span, span, sums + r,
                                                 out + r * dv);
  }
}

// The sum and the maximum of 8 lanes.
float lane_sum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

float lane_max(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return *std::max_element(lanes, lanes + 8);
}

// One (batch, KV head) of int8_decode_attention (int8_ops_common.h), as the VNNI op's attend_one_head with 8 lanes:
// the scores 8 positions at a time (their key rows converted once for every query head of the group), the mask, the
// softmax's numerators (the maximum subtracted) times the value scales and their sum, then the values 8 columns at a
// time for every query head at once. The score rows are padded to whole vectors with -inf (weight 0). float32
// throughout, exp by exp8: not the bits of sdpa over the dequantized cache, within a few float32 roundings of it.
template <bool kFloat8>
void attend_one_head(const HeadInputs& in, int64_t group, int64_t positions, int64_t dk, int64_t dv, float scaling,
                     float* out) {
  const int64_t width = (dk + 7) / 8 * 8, span = (positions + 7) / 8 * 8;
  std::vector<float> queries(group * width, 0.0f), block(8 * width, 0.0f), scores(group * span, -INFINITY);
  std::vector<float> sums(group);
  for (int64_t r = 0; r < group; ++r) std::copy(in.queries + r * dk, in.queries + (r + 1) * dk, &queries[r * width]);
  alignas(32) float dots[8];
  for (int64_t t0 = 0; t0 < positions; t0 += 8) {
    const int64_t count = std::min<int64_t>(8, positions - t0);
    for (int64_t p = 0; p < 8; ++p) {
      for (int64_t i = 0; i < width; i += 8) {
        const __m256 codes = p < count ? cache_floats8<kFloat8>(in.keys + (t0 + p) * dk + i, dk - i)
                                       : _mm256_setzero_ps();
        _mm256_storeu_ps(&block[p * width + i], codes);
      }
    }
    for (int64_t r = 0; r < group; ++r) {
      _mm256_store_ps(dots, dots8(&queries[r * width], block.data(), width));
      for (int64_t p = 0; p < count; ++p) scores[r * span + t0 + p] = dots[p] * (scaling * in.key_scales[t0 + p]);
    }
  }
  for (int64_t r = 0; r < group; ++r) {
    float* score = &scores[r * span];
    const int64_t row = in.mask_stride * r;
    if (in.allowed != nullptr) {
      for (int64_t t = 0; t < positions; ++t) if (!in.allowed[row + t]) score[t] = -INFINITY;
    } else if (in.additive_mask != nullptr) {
      for (int64_t t = 0; t < positions; ++t) score[t] += in.additive_mask[row + t];
    }
    __m256 highs = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < span; t += 8) highs = _mm256_max_ps(highs, _mm256_loadu_ps(score + t));
    const __m256 high = _mm256_set1_ps(lane_max(highs));
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < span; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(score + t), high));
      total = _mm256_add_ps(total, e);
      const __m256 value_scales = _mm256_maskload_ps(in.value_scales + t, lanes8(positions - t));
      _mm256_storeu_ps(score + t, _mm256_mul_ps(e, value_scales));
    }
    sums[r] = lane_sum(total);
  }
  for (int64_t i = 0; i < dv; i += 8) {
    weighted_values_of<kFloat8>(group, in.values, dv, i, positions, scores.data(), span, sums.data(), out);
  }
}

// y [..., out] of int8_gemm's [rows, out] in the leading dimensions of inputs [..., in].
torch::Tensor in_input_shape(const torch::Tensor& y, const torch::Tensor& inputs, int64_t outputs) {
  std::vector<int64_t> shape(inputs.sizes().begin(), inputs.sizes().end());
  shape.back() = outputs;
  return y.view(shape);
}

}  // namespace

// A W4 (W3, W2) weight-only Linear on such CPUs (llmquant.nn.int4_linear.int16_linear) in one call: the per-token
// int16 codes of float32 inputs [..., in] (int16_token_codes), then int8_gemm with the weight's group scales, y [...,
// out] float32 in the inputs' leading dimensions: the two calls' bits, without their tensors' trips through Python
// (a decode step calls 210 such Linears of the default model).
torch::Tensor int16_linear(const torch::Tensor& inputs, const torch::Tensor& packed, const torch::Tensor& scales,
                           const std::optional<torch::Tensor>& bias, int64_t outputs, int64_t group_size) {
  TORCH_CHECK(inputs.dim() >= 1, "int16_linear: float32 inputs [..., in]");
  const std::vector<torch::Tensor> codes = int16_token_codes(inputs.reshape({-1, inputs.size(-1)}));
  return in_input_shape(int8_gemm(codes[0], packed, scales, codes[1], bias, outputs, group_size, 0), inputs,
                        outputs);
}

// A W8A8 Linear with dynamic per-token inputs (llmquant.nn.int8_linear.DecodeRows, a decode step's few rows) in one
// call: token_codes of float32 inputs [..., in] (qmax, min_scale, qmin, clip as there), then int8_gemm with the
// weight's scales; the two calls' bits, y [..., out] float32 in the inputs' leading dimensions.
torch::Tensor token_linear(const torch::Tensor& inputs, double qmax, double min_scale, double qmin, double clip,
                           const torch::Tensor& packed, const torch::Tensor& scales,
                           const std::optional<torch::Tensor>& bias, int64_t outputs) {
  TORCH_CHECK(inputs.dim() >= 1, "token_linear: float32 inputs [..., in]");
  const std::vector<torch::Tensor> codes =
      llmquant::token_codes<row_codes>(inputs.reshape({-1, inputs.size(-1)}), qmax, min_scale, qmin, clip);
  return in_input_shape(int8_gemm(codes[0], packed, scales, codes[1], bias, outputs, 0, 0), inputs, outputs);
}

// A W8A8 Linear with a static per-tensor input scale (llmquant.nn.int8_linear.DecodeRows, a decode step's few rows)
// in one call: the codes clamp(round-half-even(x / scale), qmin, qmax) of float32 inputs [..., in] (static_codes:
// int8_codes' bits), then int8_gemm with the weight's scales; y [..., out] float32 in the inputs' leading dimensions.
torch::Tensor static_linear(const torch::Tensor& inputs, const torch::Tensor& scale, double qmin, double qmax,
                            const torch::Tensor& packed, const torch::Tensor& scales,
                            const std::optional<torch::Tensor>& bias, int64_t outputs) {
  TORCH_CHECK(inputs.dim() >= 1, "static_linear: float32 inputs [..., in]");
  const torch::Tensor codes =
      llmquant::static_codes<divided_codes>(inputs.reshape({-1, inputs.size(-1)}), scale, qmin, qmax);
  return in_input_shape(int8_gemm(codes, packed, scales, scale, bias, outputs, 0, 0), inputs, outputs);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  llmquant::bind_common<row_codes, divided_codes, attend_one_head<false>, attend_one_head<true>>(module);
  module.def("int8_gemm", &int8_gemm, "y = s_x * s_w * (x_q @ W_q^T) + b, the weight packed in panels (VPMADDWD)");
  module.def("int16_token_codes", &int16_token_codes, "per-token int16 codes and scales of float32 rows");
  module.def("int16_linear", &int16_linear, "int16_token_codes, then int8_gemm, in one call");
  module.def("token_linear", &token_linear, "token_codes, then int8_gemm, in one call");
  module.def("static_linear", &static_linear, "int8 codes under one static scale, then int8_gemm, in one call");
  llmquant::bind_block_codes(module);
  module.def("weight_only_gemm", &weight_only_gemm, "y = sum_g s_w,g (x_g @ W_q,g^T) + b, the weight in panels");
}
