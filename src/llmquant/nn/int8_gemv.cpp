// The W8A8 linear for a few rows (a decode step), in two calls instead of a dozen small torch operations: the
// per-token input codes (token_codes), and s_x * s_w * (x_q @ W_q^T) + b (int8_gemv; W4A8 and W4A4 too, weights in
// groups with a scale each) with AVX512-VNNI's VPDPBUSD, an exact int32 dot product of every input row with every
// weight row (or group); the same float32 operations, in the same order, as llmquant.nn.int8_linear's torch path, so
// the same bits; grouped_gemm for W4A8 at any row count, the weight packed in VPDPBUSD's layout. Also the INT8 KV
// cache's decode step: its per-token codes (written into the cache's stores: store_token_codes), its dequantization
// (dequantize_rows) and the attention of one query position over its int8 codes (int8_decode_attention; the frames
// of these shared with the AVX2 op in int8_ops_common.h); and, with that op, block_codes (block_codes.h: a W4A4
// input's codes per token or group, asymmetric or with a clip ratio searched per block); the weight-only W8A16
// (weight_only_gemv) and W4 (int4_gemv, 4-bit fields read as stored) linears of a few float32 rows, in float32.
// Built by llmquant.nn.int8_gemv with -mavx512f -mavx512bw -mavx512vnni, on CPUs that have them (checked there before
// building).
//
// VPDPBUSD multiplies unsigned by signed bytes. The input codes c (int8) are made unsigned, u = c + 128 in [0, 255],
// and the weight row's sum corrects the result: sum_k c_k w_k = sum_k u_k w_k - 128 * sum_k w_k. Each instruction
// adds four byte products into an int32 lane without saturation, so the sum is exact (as long as it fits in int32,
// as torch._int_mm's does). The weight is read once per call, row by row, in its stored [out, in] layout.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "block_codes.h"
#include "int8_ops_common.h"

using llmquant::float_bias;
using llmquant::HeadInputs;

namespace {

// The first `count` of 16 lanes.
inline __mmask16 lanes(int64_t count) { return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1); }

// Asks for the cache line 8 weight rows (`stride` bytes each) after `at`: the same place in the next block of 8 rows,
// read while this block is multiplied (the hardware prefetcher, following eight interleaved row streams, starts late
// on each new block: 10-25% of a decode step's products from memory, BENCHMARKS.md). Past the weight's end it asks
// for nothing that can fault (a prefetch never does).
bool prefetching = true;  // set_prefetch: off only to measure what it gains (scripts/runtime_profile.py prefetch)

inline void prefetch_next_block(const int8_t* at, int64_t stride) {
  if (prefetching) _mm_prefetch(reinterpret_cast<const char*>(at + 8 * stride), _MM_HINT_T0);
}

// u = c + 128 (the sign bit flipped) of `count` int8 codes: the unsigned operand of VPDPBUSD.
std::vector<uint8_t> unsigned_codes(const torch::Tensor& codes) {
  const int8_t* c = codes.data_ptr<int8_t>();
  std::vector<uint8_t> shifted(codes.numel());
  for (size_t i = 0; i < shifted.size(); ++i) shifted[i] = static_cast<uint8_t>(c[i]) ^ 0x80;
  return shifted;
}

int32_t unsigned_dot(const uint8_t* u, const int8_t* w, int64_t full_blocks, __mmask64 tail) {
  __m512i sum = _mm512_setzero_si512();
  for (int64_t b = 0; b < full_blocks; ++b) {
    sum = _mm512_dpbusd_epi32(sum, _mm512_loadu_si512(u + 64 * b), _mm512_loadu_si512(w + 64 * b));
  }
  if (tail) {
    const int64_t offset = 64 * full_blocks;
    sum = _mm512_dpbusd_epi32(sum, _mm512_maskz_loadu_epi8(tail, u + offset), _mm512_maskz_loadu_epi8(tail, w + offset));
  }
  return _mm512_reduce_add_epi32(sum);
}

// The dots of u with `count` (at most 8) weight rows `stride` bytes apart, exact in int32: with 8 rows, eight
// accumulators read u once per block and are summed across their lanes together (a hadd tree), not one by one.
void row_dots(const uint8_t* u, const int8_t* w, int64_t stride, int64_t count, int64_t full_blocks, __mmask64 tail,
              int32_t* dots) {
  if (count < 8) {
    for (int64_t r = 0; r < count; ++r) dots[r] = unsigned_dot(u, w + r * stride, full_blocks, tail);
    return;
  }
  __m512i acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t b = 0; b < full_blocks; ++b) {
    const __m512i x = _mm512_loadu_si512(u + 64 * b);
    for (int r = 0; r < 8; ++r) {
      prefetch_next_block(w + r * stride + 64 * b, stride);
      acc[r] = _mm512_dpbusd_epi32(acc[r], x, _mm512_loadu_si512(w + r * stride + 64 * b));
    }
  }
  if (tail) {
    const int64_t offset = 64 * full_blocks;
    const __m512i x = _mm512_maskz_loadu_epi8(tail, u + offset);
    for (int r = 0; r < 8; ++r) {
      acc[r] = _mm512_dpbusd_epi32(acc[r], x, _mm512_maskz_loadu_epi8(tail, w + r * stride + offset));
    }
  }
  __m256i half[8];  // 16 lanes -> 8
  for (int r = 0; r < 8; ++r) {
    half[r] = _mm256_add_epi32(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1));
  }
  const __m256i t0 = _mm256_hadd_epi32(half[0], half[1]), t1 = _mm256_hadd_epi32(half[2], half[3]);
  const __m256i t2 = _mm256_hadd_epi32(half[4], half[5]), t3 = _mm256_hadd_epi32(half[6], half[7]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);  // rows 0-3, 4-7 by 128-bit half
  const __m256i total = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                                         _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots), total);
}

}  // namespace

// Per-token symmetric int8 codes of float rows [..., in] (their scales [rows, 1]), as
// llmquant.nn.int8_linear.input_codes makes them (dynamic "token"): scale = max(absmax / qmax, min_scale), code =
// round-half-even(x / scale); with a clip ratio below 1, scale = max(absmax * clip / qmax, min_scale) and the codes
// clamped to [qmin, qmax]. In float32 (a correctly rounded division, as torch's: the same bits), 16 values at a time,
// the rows in parallel. A row with a NaN takes the scalar loop (its absmax NaN, as amax's).
namespace {

// codes[i] = clamp(round-half-even(row[i] / scale), low, high) as int8, 16 values a step (a correctly rounded
// division: torch's bits).
void divided_codes(const float* row, int64_t inner, float scale, float low, float high, int8_t* codes) {
  const __m512 divisor = _mm512_set1_ps(scale), lowest = _mm512_set1_ps(low), highest = _mm512_set1_ps(high);
  for (int64_t i = 0; i < inner; i += 16) {
    const __mmask16 m = lanes(inner - i);
    const __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, row + i), divisor),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 clamped = _mm512_min_ps(_mm512_max_ps(rounded, lowest), highest);
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, m, _mm512_cvtps_epi32(clamped));
  }
}

// max |x| of `count` values, NaN where one is (as amax's).
float absolute_max(const float* x, int64_t count) {
  __m512 high = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < count; i += 16) {
    const __m512 magnitude = _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes(count - i), x + i));
    nan |= _mm512_cmp_ps_mask(magnitude, magnitude, _CMP_UNORD_Q);
    high = _mm512_max_ps(high, magnitude);
  }
  return nan ? NAN : _mm512_reduce_max_ps(high);
}

// input_codes' dynamic scale: max((clip < 1 ? absmax * clip : absmax) / qmax, min_scale); a NaN absmax stays NaN.
float dynamic_scale(float absmax, float qmax, float clip, float min_scale) {
  const float scale = (clip == 1.0f ? absmax : absmax * clip) / qmax;
  return scale < min_scale ? min_scale : scale;
}

void row_codes(const float* row, int64_t inner, float qmin, float qmax, float clip, float min_scale, int8_t* codes,
               float* scale) {
  const float absmax = absolute_max(row, inner);
  const float row_scale = dynamic_scale(absmax, qmax, clip, min_scale);
  *scale = row_scale;
  if (std::isnan(absmax)) {
    for (int64_t i = 0; i < inner; ++i) codes[i] = static_cast<int8_t>(std::nearbyint(row[i] / row_scale));
    return;
  }
  divided_codes(row, inner, row_scale, clip == 1.0f ? -qmax : qmin, qmax, codes);  // (unclipped: |x / s| <= qmax)
}

}  // namespace

// Per-tensor dynamic codes of float rows [..., in] (their one scale [1, 1]), as llmquant.nn.int8_linear.input_codes
// makes them (dynamic "tensor"): scale = max(absmax * clip / qmax, min_scale) over every value, then row_codes' division
// and rounding (clamped to [qmin, qmax] when clipped). A NaN makes the scale NaN, as amax's.
std::vector<torch::Tensor> tensor_codes(const torch::Tensor& rows_in, double qmax, double min_scale, double qmin,
                                        double clip) {
  TORCH_CHECK(rows_in.dim() >= 2 && rows_in.scalar_type() == torch::kFloat32, "tensor_codes: float32 rows");
  const torch::Tensor rows = rows_in.contiguous();
  const int64_t count = rows.numel();
  const float* x = rows.data_ptr<float>();
  const float limit = static_cast<float>(qmax);
  const float scale = dynamic_scale(absolute_max(x, count), limit, static_cast<float>(clip),
                                    static_cast<float>(min_scale));
  torch::Tensor codes = torch::empty(rows.sizes(), rows.options().dtype(torch::kInt8));
  int8_t* c = codes.data_ptr<int8_t>();
  const float low = clip == 1.0 ? -limit : static_cast<float>(qmin);
  at::parallel_for(0, (count + 4095) / 4096, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = block * 4096;
      divided_codes(x + start, std::min<int64_t>(4096, count - start), scale, low, limit, c + start);
    }
  });
  return {codes, torch::full({1, 1}, scale, rows.options())};
}

// FP8 (E4M3, fn) codes of float rows [..., in] under one static scale: code = e4m3(clamp(x / scale, -qmax, qmax)),
// as llmquant.quant.primitives.quantize makes them for a float spec: the correctly rounded division, the clamp (a NaN
// kept, as torch's), then torch's own float -> float8_e4m3fn conversion (c10::Float8_e4m3fn: round to nearest even).
// Returned as their bytes (uint8), the rows in parallel: a static FP8 KV cache's update at a decode step.
torch::Tensor static_fp8_codes(const torch::Tensor& rows_in, const torch::Tensor& scale_in, double qmax) {
  TORCH_CHECK(rows_in.dim() >= 2 && rows_in.scalar_type() == torch::kFloat32 && scale_in.numel() == 1,
              "static_fp8_codes: float32 rows and one scale");
  const torch::Tensor rows = rows_in.contiguous();
  torch::Tensor codes = torch::empty(rows.sizes(), rows.options().dtype(torch::kUInt8));
  const float* x = rows.data_ptr<float>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  const float scale = scale_in.to(torch::kFloat32).item<float>(), high = static_cast<float>(qmax);
  at::parallel_for(0, rows.numel(), 4096, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const float v = x[i] / scale;
      c[i] = c10::Float8_e4m3fn(std::isnan(v) ? v : std::min(std::max(v, -high), high)).x;
    }
  });
  return codes;
}

// An int32 row converted to float32 in its own memory (torch's promotion: rounded to nearest beyond 2^24), each
// value read and written through memcpy (no type punning).
void int32_row_to_float(unsigned char* row, int64_t outputs) {
  for (int64_t j = 0; j < outputs; ++j) {
    int32_t value;
    std::memcpy(&value, row + 4 * j, 4);
    const float converted = static_cast<float>(value);
    std::memcpy(row + 4 * j, &converted, 4);
  }
}

// product[m, j] = product[m, j] * (s_x[m] * s_w[j]) + b[j], in place, for a float32 product [rows, out] (oneDNN's
// exact integer product) or an int32 one (torch._int_mm's, converted to float32 in its own memory first: the caller
// reads the result as float32): llmquant.nn.int8_linear.scale_output's operations and order without its [rows, out]
// outer product s_x * s_w, in one pass.
void scale_product(torch::Tensor& product, const torch::Tensor& input_scale, const torch::Tensor& weight_scale,
                   const std::optional<torch::Tensor>& bias) {
  const bool integer = product.scalar_type() == torch::kInt32;
  TORCH_CHECK(product.dim() == 2 && (integer || product.scalar_type() == torch::kFloat32) && product.is_contiguous(),
              "scale_product: a contiguous float32 or int32 [rows, out] product");
  const int64_t rows = product.size(0), outputs = product.size(1);
  const torch::Tensor s_x = input_scale.to(torch::kFloat32).contiguous();
  const torch::Tensor s_w = weight_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(s_x.numel() == 1 || s_x.numel() == rows, "scale_product: one input scale, or one per row");
  TORCH_CHECK(s_w.numel() == 1 || s_w.numel() == outputs, "scale_product: one weight scale, or one per output");
  const torch::Tensor b = float_bias(bias, outputs, "scale_product");
  unsigned char* bytes = static_cast<unsigned char*>(product.data_ptr());
  float* y = reinterpret_cast<float*>(bytes);
  const float* sx = s_x.data_ptr<float>();
  const float* sw = s_w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool per_row = s_x.numel() > 1, per_output = s_w.numel() > 1;
  at::parallel_for(0, rows, 8, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const float row_scale = sx[per_row ? m : 0];
      if (integer) int32_row_to_float(bytes + 4 * m * outputs, outputs);
      float* row = y + m * outputs;
      if (per_output) {
        for (int64_t j = 0; j < outputs; ++j) row[j] = row[j] * (row_scale * sw[j]);
      } else {
        const float outer = row_scale * sw[0];
        for (int64_t j = 0; j < outputs; ++j) row[j] = row[j] * outer;
      }
      if (bp != nullptr) {
        for (int64_t j = 0; j < outputs; ++j) row[j] = row[j] + bp[j];
      }
    }
  });
}

// x_hat = float(q) * s into out [planes, s, d] float32, for int8 codes [planes, s, d] and their scales [planes, s, 1]
// (one per position: the INT8 KV cache's), in one pass: the value of the codes converted, then scaled (one rounding).
// The planes may lie apart (views of the first positions of larger stores); each plane's rows are contiguous.
void dequantize_rows(const torch::Tensor& codes, const torch::Tensor& scales, torch::Tensor& out) {
  TORCH_CHECK(codes.dim() == 3 && scales.dim() == 3 && out.dim() == 3, "dequantize_rows: [planes, s, d] tensors");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && scales.scalar_type() == torch::kFloat32 &&
              out.scalar_type() == torch::kFloat32, "dequantize_rows: int8 codes, float32 scales and output");
  const int64_t planes = codes.size(0), positions = codes.size(1), width = codes.size(2);
  TORCH_CHECK(scales.size(0) == planes && scales.size(1) == positions && scales.size(2) == 1 &&
              out.sizes() == codes.sizes(), "dequantize_rows: matching shapes");
  TORCH_CHECK(codes.stride(2) == 1 && codes.stride(1) == width && scales.stride(1) == 1 && out.is_contiguous(),
              "dequantize_rows: contiguous rows");
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < planes; ++p) {
    const int8_t* plane = c + p * codes.stride(0);
    const float* plane_scales = sc + p * scales.stride(0);
    float* plane_out = o + p * positions * width;
    for (int64_t t = 0; t < positions; ++t) {
      const float scale = plane_scales[t];
      for (int64_t i = 0; i < width; ++i) plane_out[t * width + i] = static_cast<float>(plane[t * width + i]) * scale;
    }
  }
}

// The W8A8 (or grouped W4A8) linear of a few rows of int8 codes, float32 [..., out]: codes [..., in] int8, weight
// [out, in] int8, weight_row_sums [out, groups] int32 (each weight row's sum over each group), input_scale [rows, 1]
// or [1, 1], weight_scale [1, out] or [1, 1] (group_size 0) or [out, groups], bias [out] or None. In the orders
// llmquant.nn.int8_linear keeps:
//   group_size 0 (scale_output):    y = float(x_q . w_q) * (s_x * s_w) + b
//   group_size g (grouped_linear):  y = ((float(x_q,0 . w_q,0) * s_w,0 + float(x_q,1 . w_q,1) * s_w,1) + ...) * s_x + b
torch::Tensor int8_gemv(const torch::Tensor& codes, const torch::Tensor& weight, const torch::Tensor& weight_row_sums,
                        const torch::Tensor& input_scale, const torch::Tensor& weight_scale,
                        const std::optional<torch::Tensor>& bias, int64_t group_size) {
  TORCH_CHECK(codes.dim() >= 2 && weight.dim() == 2 && codes.size(-1) == weight.size(1), "int8_gemv: shapes");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && weight.scalar_type() == torch::kInt8, "int8_gemv: int8 codes");
  TORCH_CHECK(codes.is_contiguous() && weight.is_contiguous() && weight_row_sums.is_contiguous(),
              "int8_gemv: contiguous tensors");
  const int64_t inner = codes.size(-1), rows = inner > 0 ? codes.numel() / inner : 0, outputs = weight.size(0);
  TORCH_CHECK(group_size >= 0 && (group_size == 0 || inner % group_size == 0), "int8_gemv: groups divide the input");
  const int64_t groups = group_size > 0 ? inner / group_size : 1, span = group_size > 0 ? group_size : inner;
  TORCH_CHECK(weight_row_sums.scalar_type() == torch::kInt32 && weight_row_sums.numel() == outputs * groups,
              "int8_gemv: one int32 sum per weight row and group");
  const torch::Tensor s_x = input_scale.to(torch::kFloat32).contiguous();
  const torch::Tensor s_w = weight_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(s_x.numel() == 1 || s_x.numel() == rows, "int8_gemv: one input scale, or one per row");
  TORCH_CHECK(group_size > 0 ? s_w.numel() == outputs * groups : (s_w.numel() == 1 || s_w.numel() == outputs),
              "int8_gemv: one weight scale, one per output, or one per output and group");
  const torch::Tensor b = float_bias(bias, outputs, "int8_gemv");
  const std::vector<uint8_t> shifted = unsigned_codes(codes);
  const uint8_t* u = shifted.data();
  std::vector<int64_t> shape(codes.sizes().begin(), codes.sizes().end());  // the codes' leading dimensions
  shape.back() = outputs;
  torch::Tensor y = torch::empty(shape, codes.options().dtype(torch::kFloat32));
  const int8_t* w = weight.data_ptr<int8_t>();
  const int32_t* row_sums = weight_row_sums.data_ptr<int32_t>();
  const float* sx = s_x.data_ptr<float>();
  const float* sw = s_w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool per_row = s_x.numel() > 1, per_output = s_w.numel() > 1;
  float* out = y.data_ptr<float>();
  const int64_t full_blocks = span / 64;
  const __mmask64 tail = (span % 64) ? (~__mmask64(0) >> (64 - span % 64)) : __mmask64(0);
  const int64_t blocks = (outputs + 7) / 8;  // of 8 outputs: their weight rows stay in cache across the input rows
  at::parallel_for(0, blocks, 2, [&](int64_t first, int64_t last) {
    int32_t dots[8];
    float values[8];
    for (int64_t block = first; block < last; ++block) {
      const int64_t j0 = block * 8, count = std::min<int64_t>(8, outputs - j0);
      const int8_t* weight_rows = w + j0 * inner;
      for (int64_t m = 0; m < rows; ++m) {
        const uint8_t* input_row = u + m * inner;
        const float row_scale = sx[per_row ? m : 0];
        if (group_size == 0) {
          row_dots(input_row, weight_rows, inner, count, full_blocks, tail, dots);
          for (int64_t r = 0; r < count; ++r) {
            const int64_t j = j0 + r;
            values[r] = static_cast<float>(dots[r] - 128 * row_sums[j]) * (row_scale * sw[per_output ? j : 0]);
          }
        } else {
          for (int64_t g = 0; g < groups; ++g) {
            row_dots(input_row + g * span, weight_rows + g * span, inner, count, full_blocks, tail, dots);
            for (int64_t r = 0; r < count; ++r) {
              const int64_t at = (j0 + r) * groups + g;
              const float part = static_cast<float>(dots[r] - 128 * row_sums[at]) * sw[at];
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

// How grouped_gemm scales each group's dots (the orders of llmquant.nn.int8_linear, separate multiplications and
// additions, no fused multiply-add):
//   kWeight (grouped_linear, W4A8 / W4A4 with the weight in groups): y = (sum_g float(dot_g) * s_w[g, j]) * s_x[m] + b
//   kInput (input_grouped_linear, inputs per token in groups, the weight per channel or tensor):
//     y = (sum_g float(dot_g) * s_x[m, g]) * s_w[j] + b
//   kBoth (input_grouped_linear, both in the same groups: Atom's layout): y = sum_g (float(dot_g) * s_x[m, g]) *
//     s_w[g, j] + b
enum class GroupScales { kWeight, kInput, kBoth };

// One block of `MR` input rows by `NV` x 16 outputs of grouped_gemm: per group, the exact int32 dots (VPDPBUSD on the
// unsigned codes u and the packed weight, 4 codes of 16 outputs per 64-byte load) corrected by 128 * the group's
// weight sums, converted, scaled as `S` says, added group after group; then the last scale, plus the bias. Row m's
// scales start at row_scales + m * row_stride (kWeight: one a row, or one for all with stride 0; else one a group).
template <int MR, int NV, GroupScales S>
void grouped_block(const uint8_t* u, int64_t inner, const int8_t* packed, int64_t block_bytes, int64_t groups,
                   int64_t steps_per_group, const int32_t* sums128, const float* scales, int64_t padded_outputs,
                   const float* row_scales, int64_t row_stride, const float* bias, int64_t j0, int64_t outputs,
                   float* out) {
  __m512 total[MR][NV];
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[MR][NV];
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_si512();
    }
    for (int64_t t = g * steps_per_group, end = t + steps_per_group; t < end; ++t) {
      __m512i weights[NV];
      for (int v = 0; v < NV; ++v) weights[v] = _mm512_loadu_si512(packed + v * block_bytes + 64 * t);
      for (int m = 0; m < MR; ++m) {
        int32_t four;
        std::memcpy(&four, u + m * inner + 4 * t, 4);
        const __m512i x = _mm512_set1_epi32(four);
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], x, weights[v]);
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int64_t at = g * padded_outputs + j0 + 16 * v;
      const __m512i correction = _mm512_loadu_si512(sums128 + at);
      const __m512 scale = S == GroupScales::kInput ? _mm512_setzero_ps() : _mm512_loadu_ps(scales + at);
      for (int m = 0; m < MR; ++m) {
        __m512 part = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][v], correction));
        if (S != GroupScales::kWeight) part = _mm512_mul_ps(part, _mm512_set1_ps(row_scales[m * row_stride + g]));
        if (S != GroupScales::kInput) part = _mm512_mul_ps(part, scale);
        total[m][v] = g == 0 ? part : _mm512_add_ps(total[m][v], part);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t j = j0 + 16 * v;
    const __mmask16 valid = lanes(outputs - j);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(valid, bias + j) : _mm512_setzero_ps();
    const __m512 channel_scale = S == GroupScales::kInput ? _mm512_loadu_ps(scales + j) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) {
      __m512 y = total[m][v];
      if (S == GroupScales::kWeight) y = _mm512_mul_ps(y, _mm512_set1_ps(row_scales[m * row_stride]));
      if (S == GroupScales::kInput) y = _mm512_mul_ps(y, channel_scale);
      if (bias != nullptr) y = _mm512_add_ps(y, b);
      _mm512_mask_storeu_ps(out + m * outputs + j, valid, y);
    }
  }
}

template <int NV, GroupScales S>
void grouped_rows(const uint8_t* u, int64_t rows, int64_t inner, const int8_t* packed, int64_t block_bytes,
                  int64_t groups, int64_t steps_per_group, const int32_t* sums128, const float* scales,
                  int64_t padded_outputs, const float* row_scales, int64_t row_stride, const float* bias, int64_t j0,
                  int64_t outputs, float* out) {
  constexpr int kRows = 6;
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows) {
    grouped_block<kRows, NV, S>(u + m * inner, inner, packed, block_bytes, groups, steps_per_group, sums128, scales,
                                padded_outputs, row_scales + m * row_stride, row_stride, bias, j0, outputs,
                                out + m * outputs);
  }
  for (; m < rows; ++m) {
    grouped_block<1, NV, S>(u + m * inner, inner, packed, block_bytes, groups, steps_per_group, sums128, scales,
                            padded_outputs, row_scales + m * row_stride, row_stride, bias, j0, outputs,
                            out + m * outputs);
  }
}

}  // namespace

// The linear of int8 codes by int8 weights quantized in groups of input columns (W4A8 in a prefill), float32 [n, out]:
// codes [n, in] int8; packed the weight codes in VPDPBUSD's layout [ceil(out / 16), in / 4, 16, 4] (zero past out);
// sums128 [groups, padded out] int32, 128 times each output's code sum over each group; scales [groups, padded out]
// float32, the weight scales; input_scale [n, 1] or [1, 1]; bias [out] or None. y = (sum over groups in order of
// float(x_q,g . w_q,g) * s_w,g) * s_x + b: llmquant.nn.int8_linear.grouped_linear's values, exactly (the dots exact in
// int32). With input_groups, the input quantized per token in the same groups (input_scale [n, groups]) and the
// weight per channel (scales [1, padded out]) or in those groups: input_grouped_linear's values (GroupScales). Each
// thread takes blocks of 32 outputs (their weight stays in cache) for every row, 6 rows at a time.
torch::Tensor grouped_gemm(const torch::Tensor& codes, const torch::Tensor& packed, const torch::Tensor& sums128,
                           const torch::Tensor& scales, const torch::Tensor& input_scale,
                           const std::optional<torch::Tensor>& bias, int64_t outputs, int64_t group_size,
                           bool input_groups) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.is_contiguous(),
              "grouped_gemm: contiguous int8 codes [n, in]");
  const int64_t rows = codes.size(0), inner = codes.size(1), padded = (outputs + 15) / 16 * 16;
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0 && inner % group_size == 0,
              "grouped_gemm: groups of a multiple of 4 columns that divide the input");
  const int64_t groups = inner / group_size;
  TORCH_CHECK(packed.scalar_type() == torch::kInt8 && packed.is_contiguous() && packed.numel() == padded * inner,
              "grouped_gemm: the weight packed [ceil(out / 16), in / 4, 16, 4]");
  const bool per_channel = input_groups && scales.numel() == padded;
  TORCH_CHECK(sums128.scalar_type() == torch::kInt32 && sums128.is_contiguous() && sums128.numel() == groups * padded &&
              scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() &&
              (scales.numel() == groups * padded || per_channel),
              "grouped_gemm: sums [groups, padded out], scales [groups, padded out] (or [1, padded out] with input "
              "groups)");
  const torch::Tensor s_x = input_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(input_groups ? s_x.numel() == rows * groups : (s_x.numel() == 1 || s_x.numel() == rows),
              "grouped_gemm: one input scale, or one per row (per row and group with input groups)");
  const int64_t row_stride = input_groups ? groups : (s_x.numel() > 1 ? 1 : 0);
  const torch::Tensor b = float_bias(bias, outputs, "grouped_gemm");
  const std::vector<uint8_t> shifted = unsigned_codes(codes);
  torch::Tensor y = torch::empty({rows, outputs}, codes.options().dtype(torch::kFloat32));
  const int8_t* w = packed.data_ptr<int8_t>();
  const int64_t block_bytes = 16 * inner, vectors = padded / 16;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::parallel_for(0, (vectors + 1) / 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t v0 = 2 * pair, j0 = 16 * v0;
      auto run = [&](auto nv, auto scaled) {
        grouped_rows<decltype(nv)::value, decltype(scaled)::value>(
            shifted.data(), rows, inner, w + v0 * block_bytes, block_bytes, groups, group_size / 4,
            sums128.data_ptr<int32_t>(), scales.data_ptr<float>(), padded, s_x.data_ptr<float>(), row_stride, bp, j0,
            outputs, y.data_ptr<float>());
      };
      auto run_scaled = [&](auto nv) {
        if (!input_groups) {
          run(nv, std::integral_constant<GroupScales, GroupScales::kWeight>());
        } else if (per_channel) {
          run(nv, std::integral_constant<GroupScales, GroupScales::kInput>());
        } else {
          run(nv, std::integral_constant<GroupScales, GroupScales::kBoth>());
        }
      };
      if (v0 + 1 < vectors) {
        run_scaled(std::integral_constant<int, 2>());
      } else {
        run_scaled(std::integral_constant<int, 1>());
      }
    }
  });
  return y;
}

namespace {

// exp(x) for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor polynomial of degree 7 (truncation
// below 6e-9 relative: under a float32 rounding), times 2^n (scalef). Below -87 (and -inf: a masked position) 0.
__m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts, the first exact times n
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  const __m512 result = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), result);
}

// 16 int8 codes (the first `count`, the rest 0) as floats.
inline __m512 code_floats(const int8_t* codes, int64_t count) {
  const __m128i bytes = _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(lanes(count), codes));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}

// 16 float8 E4M3 (fn) codes (the first `count`, the rest 0) as floats, exactly: sign, exponent (bias 7) and 3
// mantissa bits moved into float32's fields (exponent + 120), subnormals (exponent 0) as m * 2^-9, NaN (all ones).
inline __m512 fp8_floats(const int8_t* codes, int64_t count) {
  const __m512i u = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(_mm512_maskz_loadu_epi8(lanes(count), codes)));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x80)), 24);
  const __m512i exponent = _mm512_and_si512(_mm512_srli_epi32(u, 3), _mm512_set1_epi32(0xF));
  const __m512i mantissa = _mm512_and_si512(u, _mm512_set1_epi32(0x7));
  const __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(exponent, _mm512_set1_epi32(120)), 23),
                                         _mm512_slli_epi32(mantissa, 20));
  const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(mantissa), _mm512_set1_ps(1.0f / 512.0f));
  __m512 magnitude = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(exponent, _mm512_setzero_si512()),
                                          _mm512_castsi512_ps(normal), subnormal);
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7F)), _mm512_set1_epi32(0x7F));
  magnitude = _mm512_mask_blend_ps(nan, magnitude, _mm512_set1_ps(NAN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), sign));
}

// 16 codes of a KV cache as floats: int8, or float8 E4M3.
template <bool kFloat8>
inline __m512 cache_floats(const int8_t* codes, int64_t count) {
  return kFloat8 ? fp8_floats(codes, count) : code_floats(codes, count);
}

// The sums of the 16 lanes of each of 8 accumulators, as 8 floats: halves added, then a hadd tree (as row_dots).
__m256 lane_sums8(const __m512 acc[8]) {
  __m256 half[8];
  for (int r = 0; r < 8; ++r) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1));
    half[r] = _mm256_add_ps(_mm512_castps512_ps256(acc[r]), high);
  }
  const __m256 t0 = _mm256_hadd_ps(half[0], half[1]), t1 = _mm256_hadd_ps(half[2], half[3]);
  const __m256 t2 = _mm256_hadd_ps(half[4], half[5]), t3 = _mm256_hadd_ps(half[6], half[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The 8 dot products of q (`width` floats, a multiple of 16) with the 8 rows of `rows` (8 x width floats): eight
// accumulators, summed across their lanes together (lane_sums8).
__m256 dots8(const float* q, const float* rows, int64_t width) {
  __m512 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < width; i += 16) {
    const __m512 x = _mm512_loadu_ps(q + i);
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(x, _mm512_loadu_ps(rows + r * width + i), acc[r]);
  }
  return lane_sums8(acc);
}

// out[r, i..i+16) = sum_t weights[r, t] * v[t, i..i+16) / sums[r] for R query heads (accumulators in registers).
template <int R, bool kFloat8>
void weighted_values(const int8_t* values, int64_t dv, int64_t i, int64_t positions, const float* weights,
                     const float* sums, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t count = dv - i;
  for (int64_t t = 0; t < positions; ++t) {
    const __m512 value = cache_floats<kFloat8>(values + t * dv + i, count);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(weights[r * positions + t]), value, acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(out + r * dv + i, lanes(count), _mm512_div_ps(acc[r], _mm512_set1_ps(sums[r])));
  }
}

template <bool kFloat8>
void weighted_values_of(int64_t heads, const int8_t* values, int64_t dv, int64_t i, int64_t positions,
                        const float* weights, const float* sums, float* out) {
  using Block = void (*)(const int8_t*, int64_t, int64_t, int64_t, const float*, const float*, float*);
  static constexpr Block blocks[] = {weighted_values<1, kFloat8>, weighted_values<2, kFloat8>,
                                     weighted_values<3, kFloat8>, weighted_values<4, kFloat8>,
                                     weighted_values<5, kFloat8>, weighted_values<6, kFloat8>,
                                     weighted_values<7, kFloat8>, weighted_values<8, kFloat8>};
  for (int64_t r = 0; r < heads; r += 8) {
    blocks[std::min<int64_t>(8, heads - r) - 1](values, dv, i, positions, weights + r * positions, sums + r,
                                                 out + r * dv);
  }
}

// One (batch, KV head) of int8_decode_attention (int8_ops_common.h): the scores 8 positions at a time (their key rows
// converted once for every query head of the group), the mask, the softmax's numerators (the maximum subtracted)
// times the value scales and their sum, then the values 16 columns at a time for every query head at once. float32
// throughout, exp by exp16: not the bits of sdpa over the dequantized cache, within a few float32 roundings of it.
template <bool kFloat8>
void attend_one_head(const HeadInputs& in, int64_t group, int64_t positions, int64_t dk, int64_t dv, float scaling,
                     float* out) {
  const int64_t width = (dk + 15) / 16 * 16;  // rows padded with zeros to whole vectors
  std::vector<float> queries(group * width, 0.0f), block(8 * width, 0.0f), scores(group * positions), sums(group);
  for (int64_t r = 0; r < group; ++r) std::copy(in.queries + r * dk, in.queries + (r + 1) * dk, &queries[r * width]);
  alignas(32) float dots[8];
  for (int64_t t0 = 0; t0 < positions; t0 += 8) {  // scores, 8 positions at a time: their key rows converted once
    const int64_t count = std::min<int64_t>(8, positions - t0);
    for (int64_t p = 0; p < 8; ++p) {
      for (int64_t i = 0; i < width; i += 16) {
        const __m512 codes = p < count ? cache_floats<kFloat8>(in.keys + (t0 + p) * dk + i, dk - i)
                                       : _mm512_setzero_ps();
        _mm512_storeu_ps(&block[p * width + i], codes);
      }
    }
    for (int64_t r = 0; r < group; ++r) {
      _mm256_store_ps(dots, dots8(&queries[r * width], block.data(), width));
      for (int64_t p = 0; p < count; ++p) scores[r * positions + t0 + p] = dots[p] * (scaling * in.key_scales[t0 + p]);
    }
  }
  for (int64_t r = 0; r < group; ++r) {  // the mask; softmax's numerators (the maximum subtracted) and their sum
    float* score = &scores[r * positions];
    const int64_t row = in.mask_stride * r;
    if (in.allowed != nullptr) {
      for (int64_t t = 0; t < positions; ++t) if (!in.allowed[row + t]) score[t] = -INFINITY;
    } else if (in.additive_mask != nullptr) {
      for (int64_t t = 0; t < positions; ++t) score[t] += in.additive_mask[row + t];
    }
    __m512 highs = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < positions; t += 16) {
      highs = _mm512_max_ps(highs, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes(positions - t), score + t));
    }
    const float high = _mm512_reduce_max_ps(highs);
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < positions; t += 16) {
      const __mmask16 m = lanes(positions - t);
      const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, score + t),
                                                                  _mm512_set1_ps(high))));
      total = _mm512_add_ps(total, e);
      _mm512_mask_storeu_ps(score + t, m, _mm512_mul_ps(e, _mm512_maskz_loadu_ps(m, in.value_scales + t)));
    }
    sums[r] = _mm512_reduce_add_ps(total);
  }
  for (int64_t i = 0; i < dv; i += 16) {  // the values, 16 columns at a time, every query head of the group at once
    weighted_values_of<kFloat8>(group, in.values, dv, i, positions, scores.data(), sums.data(), out);
  }
}

// The 8 dot products of the float row x (`inner` values) with 8 int8 weight rows `stride` bytes apart, the codes
// converted to float 16 at a time: eight accumulators summed across their lanes together (lane_sums8). With groups
// (`group` > 0, a multiple of 16 dividing `inner`), each group's partial sums are scaled by its row's scale (`scales`:
// the 8 rows' [groups] scales, `groups` apart) and added up, group after group: sum_g s_g (x_g . w_g).
__m256 float_code_dots8(const float* x, const int8_t* w, int64_t stride, int64_t inner, int64_t group,
                        const float* scales, int64_t groups) {
  __m512 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
  if (group == 0) {
    for (int64_t i = 0; i < inner; i += 16) {
      const __m512 xs = _mm512_maskz_loadu_ps(lanes(inner - i), x + i);
      for (int r = 0; r < 8; ++r) {
        if ((i & 63) == 0) prefetch_next_block(w + r * stride + i, stride);
        acc[r] = _mm512_fmadd_ps(xs, code_floats(w + r * stride + i, inner - i), acc[r]);
      }
    }
    return lane_sums8(acc);
  }
  __m512 part[8];
  for (int64_t g = 0, i = 0; g < groups; ++g) {
    for (int r = 0; r < 8; ++r) part[r] = _mm512_setzero_ps();
    for (const int64_t end = i + group; i < end; i += 16) {
      const __m512 xs = _mm512_loadu_ps(x + i);
      for (int r = 0; r < 8; ++r) {
        if ((i & 63) == 0) prefetch_next_block(w + r * stride + i, stride);
        part[r] = _mm512_fmadd_ps(xs, code_floats(w + r * stride + i, 16), part[r]);
      }
    }
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(part[r], _mm512_set1_ps(scales[r * groups + g]), acc[r]);
  }
  return lane_sums8(acc);
}

// One dot product of the float row x with the int8 weight row w, as float_code_dots8 computes each of its eight.
float float_code_dot(const float* x, const int8_t* w, int64_t inner, int64_t group, const float* scales,
                     int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  if (group == 0) {
    for (int64_t i = 0; i < inner; i += 16) {
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes(inner - i), x + i), code_floats(w + i, inner - i), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
  for (int64_t g = 0, i = 0; g < groups; ++g) {
    __m512 part = _mm512_setzero_ps();
    for (const int64_t end = i + group; i < end; i += 16) {
      part = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), code_floats(w + i, 16), part);
    }
    acc = _mm512_fmadd_ps(part, _mm512_set1_ps(scales[g]), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// The 32 4-bit fields of 16 bytes (two a byte, the even field in the low nibble: a 4-bit checkpoint's packed int32
// words read as bytes) as floats: the 16 even fields, then the 16 odd ones (the inputs are laid out in that order,
// `split_pairs`, so that no field moves across lanes).
inline void nibble_floats(const uint8_t* bytes, __m512& even, __m512& odd) {
  const __m512i packed = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  even = _mm512_cvtepi32_ps(_mm512_and_si512(packed, _mm512_set1_epi32(0x0F)));
  odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(packed, 4));
}

// x [count, inner] with each 32 columns as their 16 even columns, then their 16 odd ones (nibble_floats' order).
std::vector<float> split_pairs(const float* x, int64_t count, int64_t inner) {
  std::vector<float> split(count * inner);
  for (int64_t at = 0; at < count * inner; at += 32) {
    for (int64_t t = 0; t < 16; ++t) {
      split[at + t] = x[at + 2 * t];
      split[at + 16 + t] = x[at + 2 * t + 1];
    }
  }
  return split;
}

// The dot products sum_g s_g (x_g . (u_g - z_g)) of R float rows x (split_pairs' order, `inner` apart) with W rows of
// 4-bit fields u (`stride` bytes apart) in groups of `group` columns (a multiple of 32), into out [R, W]: each field
// converted once for the R rows, each group's dot as s_g (x_g . u_g - z_g sum(x_g)) lane by lane (`xsums`: each row's
// 16-lane partial sums per group, `groups` apart, so that the lanes of part - z xsum add up to x_g . (u_g - z_g)).
// `scales` and `zeros` are the W rows' [groups] values, `groups` apart.
template <int R, int W>
void nibble_dots(const float* x, int64_t inner, const __m512* xsums, const uint8_t* w, int64_t stride, int64_t group,
                 const float* scales, const float* zeros, int64_t groups, float* out) {
  __m512 acc[R][W], part[R][W];
  for (int m = 0; m < R; ++m) {
    for (int r = 0; r < W; ++r) acc[m][r] = _mm512_setzero_ps();
  }
  for (int64_t g = 0, i = 0; g < groups; ++g) {
    for (int m = 0; m < R; ++m) {
      for (int r = 0; r < W; ++r) part[m][r] = _mm512_setzero_ps();
    }
    for (const int64_t end = i + group; i < end; i += 32) {
      __m512 x_even[R], x_odd[R];
      for (int m = 0; m < R; ++m) {
        x_even[m] = _mm512_loadu_ps(x + m * inner + i);
        x_odd[m] = _mm512_loadu_ps(x + m * inner + i + 16);
      }
      for (int r = 0; r < W; ++r) {
        const uint8_t* fields = w + r * stride + i / 2;
        if ((i & 127) == 0) prefetch_next_block(reinterpret_cast<const int8_t*>(fields), stride);
        __m512 even, odd;
        nibble_floats(fields, even, odd);
        for (int m = 0; m < R; ++m) {
          part[m][r] = _mm512_fmadd_ps(x_odd[m], odd, _mm512_fmadd_ps(x_even[m], even, part[m][r]));
        }
      }
    }
    for (int r = 0; r < W; ++r) {
      const __m512 zero = _mm512_set1_ps(zeros[r * groups + g]), scale = _mm512_set1_ps(scales[r * groups + g]);
      for (int m = 0; m < R; ++m) {
        acc[m][r] = _mm512_fmadd_ps(_mm512_fnmadd_ps(zero, xsums[m * groups + g], part[m][r]), scale, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < R; ++m) {
    if constexpr (W == 8) {
      _mm256_storeu_ps(out + m * W, lane_sums8(acc[m]));
    } else {
      for (int r = 0; r < W; ++r) out[m * W + r] = _mm512_reduce_add_ps(acc[m][r]);
    }
  }
}

// nibble_dots of R input rows with 8 weight rows, W at a time, into out [R, outputs] (its first 8 columns).
template <int R, int W>
void nibble_dots_of(const float* x, int64_t inner, const __m512* xsums, const uint8_t* w, int64_t stride,
                    int64_t group, const float* scales, const float* zeros, int64_t groups, float* out,
                    int64_t outputs) {
  float dots[R * W];
  for (int half = 0; half < 8 / W; ++half) {
    nibble_dots<R, W>(x, inner, xsums, w + W * half * stride, stride, group, scales + W * half * groups,
                      zeros + W * half * groups, groups, dots);
    for (int m = 0; m < R; ++m) std::copy(dots + W * m, dots + W * (m + 1), out + m * outputs + W * half);
  }
}

// nibble_dots of `count` rows with 8 weight rows: 4 or 3 input rows at a time with 4 weight rows twice (the
// accumulators of 8 would not fit the registers), then 2 or 1 with all 8.
void nibble_dots_rows(const float* x, int64_t count, int64_t inner, const __m512* xsums, const uint8_t* w,
                      int64_t stride, int64_t group, const float* scales, const float* zeros, int64_t groups,
                      float* out, int64_t outputs) {
  for (int64_t m = 0; m < count;) {
    const int64_t left = count - m;
    const float* rows = x + m * inner;
    const __m512* sums = xsums + m * groups;
    float* y = out + m * outputs;
    if (left >= 4) {
      nibble_dots_of<4, 4>(rows, inner, sums, w, stride, group, scales, zeros, groups, y, outputs);
    } else if (left == 3) {
      nibble_dots_of<3, 4>(rows, inner, sums, w, stride, group, scales, zeros, groups, y, outputs);
    } else if (left == 2) {
      nibble_dots_of<2, 8>(rows, inner, sums, w, stride, group, scales, zeros, groups, y, outputs);
    } else {
      nibble_dots_of<1, 8>(rows, inner, sums, w, stride, group, scales, zeros, groups, y, outputs);
    }
    m += std::min<int64_t>(left, 4);
  }
}

}  // namespace

// A weight-only int8 linear (W8A16) of a few float32 rows: y = (x . w_q) * s_w + b, x [rows, in] float32, weight
// [out, in] int8, weight_scale [out] (or one), bias [out] or None; with `group_size` > 0 (a multiple of 16 dividing
// in), weight_scale [out, in / group_size] and y = sum_g s_w,g (x_g . w_q,g) + b. float32 sums in the op's order (not
// the bits of x @ (w_q * s_w)^T: within float32 roundings of it). The weight is read once, 8 rows at a time, 1 byte a
// weight (the next 8 rows prefetched).
torch::Tensor weight_only_gemv(const torch::Tensor& rows_in, const torch::Tensor& weight,
                               const torch::Tensor& weight_scale, const std::optional<torch::Tensor>& bias,
                               int64_t group_size) {
  TORCH_CHECK(rows_in.dim() == 2 && weight.dim() == 2 && rows_in.size(1) == weight.size(1) &&
              rows_in.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kInt8 &&
              weight.is_contiguous(), "weight_only_gemv: float32 rows [n, in], contiguous int8 weight [out, in]");
  const torch::Tensor rows = rows_in.contiguous();
  const int64_t count = rows.size(0), inner = rows.size(1), outputs = weight.size(0);
  TORCH_CHECK(group_size == 0 || (group_size > 0 && group_size % 16 == 0 && inner % group_size == 0),
              "weight_only_gemv: groups of a multiple of 16 columns that divide the input");
  const int64_t groups = group_size > 0 ? inner / group_size : 0;
  const torch::Tensor s_w = weight_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(group_size > 0 ? s_w.numel() == outputs * groups : (s_w.numel() == 1 || s_w.numel() == outputs),
              "weight_only_gemv: one weight scale, one per output, or one per output and group");
  const torch::Tensor b = float_bias(bias, outputs, "weight_only_gemv");
  torch::Tensor y = torch::empty({count, outputs}, rows.options());
  const float* x = rows.data_ptr<float>();
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* sw = s_w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  const bool per_output = s_w.numel() > 1;
  at::parallel_for(0, (outputs + 7) / 8, 16, [&](int64_t first, int64_t last) {
    alignas(32) float dots[8];
    for (int64_t block = first; block < last; ++block) {
      const int64_t j0 = block * 8, n = std::min<int64_t>(8, outputs - j0);
      const float* group_scales = sw + j0 * groups;
      for (int64_t m = 0; m < count; ++m) {
        if (n == 8) {
          _mm256_store_ps(dots, float_code_dots8(x + m * inner, w + j0 * inner, inner, inner, group_size,
                                                 group_scales, groups));
        } else {  // the last rows of the weight: one at a time
          for (int64_t r = 0; r < n; ++r) {
            dots[r] = float_code_dot(x + m * inner, w + (j0 + r) * inner, inner, group_size,
                                     group_scales + r * groups, groups);
          }
        }
        for (int64_t r = 0; r < n; ++r) {
          const float value = group_size > 0 ? dots[r] : dots[r] * sw[per_output ? j0 + r : 0];
          out[m * outputs + j0 + r] = bp != nullptr ? value + bp[j0 + r] : value;
        }
      }
    }
  });
  return y;
}

// A weight-only 4-bit linear (W4A16 in float32) of a few float32 rows: y = sum_g s_g (x_g . (u_g - z_g)) + b, x
// [rows, in] float32, `fields` [out, in / 2] uint8 (4-bit fields u, two a byte, the even one in the low nibble), scales
// and zeros [out, groups] float32 (W_hat = (u - z) s), bias [out] or None; groups of `group_size` columns (a multiple
// of 32 dividing in; in itself for a scale per output). float32 sums in the op's order: within float32 roundings of
// x @ W_hat^T, the simulation's function (no rounding of x, s or z). The weight is read once, 8 rows at a time, half a
// byte a weight, as stored (the next 8 rows prefetched).
torch::Tensor int4_gemv(const torch::Tensor& rows_in, const torch::Tensor& fields, const torch::Tensor& scales_in,
                        const torch::Tensor& zeros_in, const std::optional<torch::Tensor>& bias, int64_t group_size) {
  TORCH_CHECK(rows_in.dim() == 2 && fields.dim() == 2 && rows_in.size(1) == 2 * fields.size(1) &&
              rows_in.scalar_type() == torch::kFloat32 && fields.scalar_type() == torch::kUInt8 &&
              fields.is_contiguous(), "int4_gemv: float32 rows [n, in], contiguous uint8 fields [out, in / 2]");
  const torch::Tensor rows = rows_in.contiguous();
  const int64_t count = rows.size(0), inner = rows.size(1), outputs = fields.size(0);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && inner % group_size == 0 && outputs % 8 == 0,
              "int4_gemv: groups of a multiple of 32 columns that divide the input, outputs a multiple of 8");
  const int64_t groups = inner / group_size;
  const torch::Tensor s = scales_in.to(torch::kFloat32).contiguous(), z = zeros_in.to(torch::kFloat32).contiguous();
  TORCH_CHECK(s.numel() == outputs * groups && z.numel() == outputs * groups,
              "int4_gemv: scales and zeros [out, in / group_size]");
  const torch::Tensor b = float_bias(bias, outputs, "int4_gemv");
  const std::vector<float> split = split_pairs(rows.data_ptr<float>(), count, inner);
  std::vector<__m512> xsums(count * groups);  // each row's 16-lane partial sums per group
  for (int64_t m = 0; m < count; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = g * group_size; i < (g + 1) * group_size; i += 16) {
        sum = _mm512_add_ps(sum, _mm512_loadu_ps(split.data() + m * inner + i));
      }
      xsums[m * groups + g] = sum;
    }
  }
  torch::Tensor y = torch::empty({count, outputs}, rows.options());
  const uint8_t* w = fields.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  const int64_t stride = inner / 2;
  at::parallel_for(0, outputs / 8, 16, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const int64_t j0 = block * 8;
      nibble_dots_rows(split.data(), count, inner, xsums.data(), w + j0 * stride, stride, group_size,
                       sp + j0 * groups, zp + j0 * groups, groups, out + j0, outputs);
      for (int64_t m = 0; bp != nullptr && m < count; ++m) {
        for (int r = 0; r < 8; ++r) out[m * outputs + j0 + r] += bp[j0 + r];
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("set_prefetch", [](bool on) { prefetching = on; }, "prefetch the next 8 weight rows (default) or not");
  llmquant::bind_common<row_codes, divided_codes, attend_one_head<false>, attend_one_head<true>>(module);
  llmquant::bind_block_codes(module);
  module.def("tensor_codes", &tensor_codes, "per-tensor dynamic int8 codes of float32 rows and their scale");
  module.def("static_fp8_codes", &static_fp8_codes, "FP8 E4M3 codes (their bytes) of float32 rows under one scale");
  module.def("scale_product", &scale_product,
             "an integer product (float32 or int32) scaled by s_x * s_w and the bias, in place, as float32");
  module.def("dequantize_rows", &dequantize_rows, "int8 codes times one scale per row, into out (the INT8 KV cache)");
  module.def("weight_only_gemv", &weight_only_gemv,
             "(x . w_q) * s_w + b for a few float32 rows and an int8 weight (weight-only int8, W8A16)",
             pybind11::arg("rows"), pybind11::arg("weight"), pybind11::arg("weight_scale"), pybind11::arg("bias"),
             pybind11::arg("group_size") = 0);
  module.def("int4_gemv", &int4_gemv,
             "sum_g s_g (x_g . (u_g - z_g)) + b for a few float32 rows and a weight of 4-bit fields (W4A16 in float32)",
             pybind11::arg("rows"), pybind11::arg("fields"), pybind11::arg("scales"), pybind11::arg("zeros"),
             pybind11::arg("bias"), pybind11::arg("group_size"));
  module.def("grouped_gemm", &grouped_gemm,
             "(sum_g float(x_q,g . w_q,g) * s_w,g) * s_x + b for many rows of int8 codes, the weight packed (W4A8); "
             "with input_groups, the input's scales per row and group (W4A4 with inputs in groups)",
             pybind11::arg("codes"), pybind11::arg("packed"), pybind11::arg("sums128"), pybind11::arg("scales"),
             pybind11::arg("input_scale"), pybind11::arg("bias"), pybind11::arg("outputs"),
             pybind11::arg("group_size"), pybind11::arg("input_groups") = false);
  module.def("int8_gemv", &int8_gemv, "s_x * s_w * (x_q @ W_q^T) + b for a few rows of int8 codes (AVX512-VNNI)",
             pybind11::arg("codes"), pybind11::arg("weight"), pybind11::arg("weight_row_sums"),
             pybind11::arg("input_scale"), pybind11::arg("weight_scale"), pybind11::arg("bias"),
             pybind11::arg("group_size") = 0);
}
