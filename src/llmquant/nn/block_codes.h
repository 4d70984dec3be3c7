// Int8 codes of float32 blocks with a clip ratio searched per block (block_codes), shared by the two CPU ops of
// llmquant.nn.int8_gemv (int8_gemv.cpp, AVX512-VNNI; int8_gemv_avx2.cpp, AVX2): AVX2 intrinsics, which both ops'
// flags allow, so the same instructions and the same bits in either. A W4A4 Linear's input codes per token (or per
// token and group of columns), asymmetric or clipped by a grid of ratios, in one call instead of torch's two dozen.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "int8_ops_common.h"

namespace llmquant {

// sum of values[0 .. width) in llmquant.quant.primitives.pairwise_row_sums' order: zeros up to `padded` (a power of
// two), then column j plus column j + half, halving until one is left (8 columns a step while half >= 8: the same
// additions). `values` holds `padded` floats.
inline float pairwise_sum(float* values, int64_t width, int64_t padded) {
  std::fill(values + width, values + padded, 0.0f);
  int64_t half = padded / 2;
  for (; half >= 8; half /= 2) {
    for (int64_t j = 0; j < half; j += 8) {
      _mm256_storeu_ps(values + j, _mm256_add_ps(_mm256_loadu_ps(values + j), _mm256_loadu_ps(values + j + half)));
    }
  }
  if (half == 4) {  // (the last three halvings in registers: lanes j + 4, then j + 2, then j + 1)
    const __m256 eight = _mm256_loadu_ps(values);
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
  }
  for (; half >= 1; half /= 2) {
    for (int64_t j = 0; j < half; ++j) values[j] = values[j] + values[j + half];
  }
  return values[0];
}

// The scale and zero point of a block's range [lo, hi] (lo <= 0 <= hi): symmetric max(-lo, hi) / qmax, zero 0;
// asymmetric (hi - lo) / (qmax - qmin) and clamp(qmin - round(lo / s), qmin, qmax); scales at least min_scale.
inline void range_params(float lo, float hi, float qmin, float qmax, float min_scale, bool asymmetric, float* scale,
                         float* zero) {
  if (asymmetric) {
    *scale = std::max((hi - lo) / (qmax - qmin), min_scale);
    *zero = std::min(std::max(qmin - std::nearbyint(lo / *scale), qmin), qmax);
  } else {
    *scale = std::max(std::max(-lo, hi) / qmax, min_scale);
    *zero = 0.0f;
  }
}

// A value's code shifted by the zero point: clamp(round(x / s) + z, qmin, qmax) - z (round half to even).
inline float shifted_code(float x, float scale, float zero, float qmin, float qmax) {
  return std::min(std::max(std::nearbyint(x / scale) + zero, qmin), qmax) - zero;
}

// shifted_code of 8 values: a correctly rounded division, VROUNDPS to nearest even, the same clamps.
inline __m256 shifted_codes8(__m256 x, __m256 scale, __m256 zero, __m256 qmin, __m256 qmax) {
  const __m256 q = _mm256_round_ps(_mm256_div_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_sub_ps(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, zero), qmin), qmax), zero);
}

// The block's squared errors (code * s - x)^2 at one scale and zero point, into work[0 .. width).
inline void squared_errors(const float* x, int64_t width, float scale, float zero, float qmin, float qmax, float* work) {
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero), lo = _mm256_set1_ps(qmin),
               hi = _mm256_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 8 <= width; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 error = _mm256_sub_ps(_mm256_mul_ps(shifted_codes8(v, s, z, lo, hi), s), v);
    _mm256_storeu_ps(work + i, _mm256_mul_ps(error, error));
  }
  for (; i < width; ++i) {
    const float error = shifted_code(x[i], scale, zero, qmin, qmax) * scale - x[i];
    work[i] = error * error;
  }
}

// One block of block_codes: its range [min(x) clamped to <= 0, max(x) clamped to >= 0]; the ratio r of `ratios` whose
// range [r lo, r hi] quantizes the block with the least squared error (summed by pairwise_sum; the first on ties;
// no search for one ratio); then its codes and scale at that ratio. `work`: `padded` floats.
inline void clipped_block_codes(const float* x, int64_t width, float qmin, float qmax, float min_scale,
                         const std::vector<float>& ratios, bool asymmetric, int8_t* codes, float* scale_out,
                         float* work, int64_t padded) {
  float low = 0.0f, high = 0.0f;
  bool nan = false;
  int64_t i = 0;
  if (width >= 8) {  // (8 lanes at a time; a NaN found apart, so the vector min and max never see one)
    __m256 lows = _mm256_setzero_ps(), highs = _mm256_setzero_ps(), nans = _mm256_setzero_ps();
    for (; i + 8 <= width; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      nans = _mm256_or_ps(nans, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      lows = _mm256_min_ps(lows, v);
      highs = _mm256_max_ps(highs, v);
    }
    alignas(32) float l[8], h[8];
    _mm256_store_ps(l, lows);
    _mm256_store_ps(h, highs);
    for (int k = 0; k < 8; ++k) low = std::min(low, l[k]), high = std::max(high, h[k]);
    nan = _mm256_movemask_ps(nans) != 0;
  }
  for (; i < width; ++i) {
    nan |= std::isnan(x[i]);
    low = std::min(low, x[i]);
    high = std::max(high, x[i]);
  }
  if (nan) {  // (amin's and amax's NaN: a NaN scale)
    *scale_out = NAN;
    std::fill(codes, codes + width, int8_t{0});
    return;
  }
  float ratio = ratios[0], scale = 0.0f, zero = 0.0f;
  if (ratios.size() > 1) {
    float best = 0.0f;
    for (size_t k = 0; k < ratios.size(); ++k) {
      range_params(low * ratios[k], high * ratios[k], qmin, qmax, min_scale, asymmetric, &scale, &zero);
      squared_errors(x, width, scale, zero, qmin, qmax, work);
      const float sum = pairwise_sum(work, width, padded);
      if (k == 0 || sum < best) best = sum, ratio = ratios[k];
    }
  }
  range_params(low * ratio, high * ratio, qmin, qmax, min_scale, asymmetric, &scale, &zero);
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero), lo = _mm256_set1_ps(qmin),
               hi = _mm256_set1_ps(qmax);
  i = 0;
  for (; i + 8 <= width; i += 8) {  // (integral floats in [-128, 127]: converted exactly, then narrowed)
    const __m256i ints = _mm256_cvtps_epi32(shifted_codes8(_mm256_loadu_ps(x + i), s, z, lo, hi));
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(ints), _mm256_extracti128_si256(ints, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packs_epi16(words, words));
  }
  for (; i < width; ++i) codes[i] = static_cast<int8_t>(shifted_code(x[i], scale, zero, qmin, qmax));
  *scale_out = scale;
}

// Int8 codes of float32 blocks [n, width] (each row a block: a token, or a token's group of columns) and their scales
// [n, 1], as llmquant.nn.int8_linear.input_codes (symmetric) or asymmetric_input_codes (shifted by the zero point)
// make them per token with a clip ratio, or a grid of them searched per block (searched_clip_ratios): the same bits.
inline std::vector<torch::Tensor> block_codes(const torch::Tensor& blocks, double qmin, double qmax, double min_scale,
                                       const std::vector<double>& grid, bool asymmetric) {
  TORCH_CHECK(!grid.empty(), "block_codes: one clip ratio or more");
  const std::vector<float> ratios(grid.begin(), grid.end());
  const int64_t width = blocks.dim() == 2 ? blocks.size(1) : 0;
  int64_t padded = 1;
  while (padded < width) padded *= 2;
  return llmquant::codes_by_row<int8_t>(
      blocks, "block_codes: float32 blocks [n, width]", [&](const float* x, int64_t inner, int8_t* c, float* s) {
        thread_local std::vector<float> work;
        work.resize(padded);
        clipped_block_codes(x, inner, static_cast<float>(qmin), static_cast<float>(qmax),
                            static_cast<float>(min_scale), ratios, asymmetric, c, s, work.data(), padded);
      });
}

inline void bind_block_codes(pybind11::module& module) {
  module.def("block_codes", &block_codes, "int8 codes of float32 blocks, a clip ratio searched per block");
}

}  // namespace llmquant
