// What the two CPU ops of llmquant.nn.int8_gemv share (int8_gemv.cpp, AVX512-VNNI; int8_gemv_avx2.cpp, AVX2): the bias
// check, a decode step's static codes written into a KV cache (store_static_codes), and the frames of the per-token and
// static codes (token_codes, store_token_codes, static_codes) and of the attention of one query position over a KV
// cache's codes (int8_decode_attention): the arguments checked, the work split in parallel, each piece done by the op's
// own function (its row codes, its division, its head of attention), passed in; and their bindings (bind_common). No
// intrinsics here: each op keeps its own.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace llmquant {

// The bias as float32 (undefined without one), checked to hold one value per output; `op` names the caller.
inline torch::Tensor float_bias(const std::optional<torch::Tensor>& bias, int64_t outputs, const char* op) {
  if (!bias.has_value()) return torch::Tensor();
  torch::Tensor b = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(b.numel() == outputs, op, ": one bias per output");
  return b;
}

// Per-token int8 codes of float32 rows [..., in] and their scales [rows, 1], as llmquant.nn.int8_linear.input_codes
// makes them (dynamic "token"), each row by the op's row_codes(row, inner, qmin, qmax, clip, min_scale, codes,
// &scale) (the ops bind token_codes<their row_codes>): scale = max((clip < 1 ? absmax * clip : absmax) / qmax,
// min_scale), code = round-half-even(x / scale) (clamped to [qmin, qmax] when clipped). A row with a NaN has a NaN
// scale, as amax's.
using RowCodes = void (*)(const float* row, int64_t inner, float qmin, float qmax, float clip, float min_scale,
                         int8_t* codes, float* scale);

// Codes of type Code in the shape of float32 `rows_in` [..., in] and their scales [rows, 1], each row by
// row(values, inner, codes, &scale), the rows in parallel; `message` where rows_in is not float32 rows.
template <typename Code, typename Row>
std::vector<torch::Tensor> codes_by_row(const torch::Tensor& rows_in, const char* message, const Row& row) {
  TORCH_CHECK(rows_in.dim() >= 2 && rows_in.scalar_type() == torch::kFloat32, message);
  const torch::Tensor rows = rows_in.contiguous();
  const int64_t inner = rows.size(-1), count = inner > 0 ? rows.numel() / inner : 0;
  torch::Tensor codes = torch::empty(rows.sizes(), rows.options().dtype(c10::CppTypeToScalarType<Code>::value));
  torch::Tensor scale = torch::empty({count, 1}, rows.options());
  const float* x = rows.data_ptr<float>();
  Code* c = codes.data_ptr<Code>();
  float* s = scale.data_ptr<float>();
  at::parallel_for(0, count, 16, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) row(x + m * inner, inner, c + m * inner, s + m);
  });
  return {codes, scale};
}

template <RowCodes row_codes>
std::vector<torch::Tensor> token_codes(const torch::Tensor& rows_in, double qmax, double min_scale, double qmin,
                                       double clip) {
  return codes_by_row<int8_t>(rows_in, "token_codes: float32 rows",
                              [&](const float* row, int64_t inner, int8_t* codes, float* scale) {
                                row_codes(row, inner, static_cast<float>(qmin), static_cast<float>(qmax),
                                          static_cast<float>(clip), static_cast<float>(min_scale), codes, scale);
                              });
}

// Int8 codes of float32 rows [..., in] under one static scale, as llmquant.nn.int8_linear.input_codes makes them:
// code = clamp(round-half-even(x / scale), qmin, qmax), each row by the op's divided_codes(row, inner, scale, qmin,
// qmax, codes) (the ops bind static_codes<their divided_codes>), the rows in parallel.
using DividedCodes = void (*)(const float* row, int64_t inner, float scale, float low, float high, int8_t* codes);
template <DividedCodes divided_codes>
torch::Tensor static_codes(const torch::Tensor& rows_in, const torch::Tensor& scale_in, double qmin, double qmax) {
  TORCH_CHECK(rows_in.dim() >= 2 && rows_in.scalar_type() == torch::kFloat32 && scale_in.numel() == 1,
              "static_codes: float32 rows and one scale");
  const torch::Tensor rows = rows_in.contiguous();
  const int64_t inner = rows.size(-1), count = inner > 0 ? rows.numel() / inner : 0;
  torch::Tensor codes = torch::empty(rows.sizes(), rows.options().dtype(torch::kInt8));
  const float* x = rows.data_ptr<float>();
  int8_t* c = codes.data_ptr<int8_t>();
  const float scale = scale_in.to(torch::kFloat32).item<float>();
  at::parallel_for(0, count, 16, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      divided_codes(x + m * inner, inner, scale, static_cast<float>(qmin), static_cast<float>(qmax), c + m * inner);
    }
  });
  return codes;
}

// The per-token codes (token_codes) of `states`, p float32 tensors [b, h, n, d] (a decode step's keys and values),
// written straight into an INT8 KV cache's stores at the positions [length, length + n): codes [p, b, h, capacity, d]
// int8 (rows contiguous) and scales [p, b, h, capacity, 1] float32, at any strides otherwise. What the cache layer
// did in four steps (stack, quantize, append the codes, append the scales), in one call and no new tensor.
template <RowCodes row_codes>
void store_token_codes(const std::vector<torch::Tensor>& states, const torch::Tensor& codes,
                       const torch::Tensor& scales, int64_t length, double qmax, double min_scale, double qmin,
                       double clip) {
  const int64_t planes = static_cast<int64_t>(states.size());
  TORCH_CHECK(planes > 0 && codes.dim() == 5 && scales.dim() == 5 && codes.size(0) == planes &&
              scales.size(0) == planes && codes.scalar_type() == torch::kInt8 &&
              scales.scalar_type() == torch::kFloat32 && codes.stride(4) == 1 && scales.size(4) == 1,
              "store_token_codes: int8 codes [p, b, h, capacity, d] (rows contiguous) and float32 scales "
              "[p, b, h, capacity, 1] for p states");
  std::vector<torch::Tensor> rows;
  for (const torch::Tensor& state : states) {
    TORCH_CHECK(state.dim() == 4 && state.scalar_type() == torch::kFloat32 && state.sizes() == states[0].sizes(),
                "store_token_codes: float32 states [b, h, n, d] of one shape");
    rows.push_back(state.contiguous());
  }
  const int64_t batch = rows[0].size(0), heads = rows[0].size(1), count = rows[0].size(2), inner = rows[0].size(3);
  for (const torch::Tensor* store : {&codes, &scales}) {
    TORCH_CHECK(store->size(1) == batch && store->size(2) == heads && length >= 0 &&
                store->size(3) >= length + count, "store_token_codes: stores [p, b, h, capacity >= length + n, .] "
                "for states [b, h, n, d]");
  }
  TORCH_CHECK(codes.size(4) == inner, "store_token_codes: codes as wide as the states");
  int8_t* code_base = codes.data_ptr<int8_t>();
  float* scale_base = scales.data_ptr<float>();
  at::parallel_for(0, planes * batch * heads * count, 16, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t t = item % count, h = item / count % heads, b = item / (count * heads) % batch;
      const int64_t p = item / (count * heads * batch), position = length + t;
      row_codes(rows[p].data_ptr<float>() + item % (batch * heads * count) * inner, inner, static_cast<float>(qmin),
                static_cast<float>(qmax), static_cast<float>(clip), static_cast<float>(min_scale),
                code_base + p * codes.stride(0) + b * codes.stride(1) + h * codes.stride(2) +
                    position * codes.stride(3),
                scale_base + p * scales.stride(0) + b * scales.stride(1) + h * scales.stride(2) +
                    position * scales.stride(3));
    }
  });
}

// A KV cache's static per-tensor codes of a decode step's keys or values `state` [b, h, n, d] float32, written straight
// into the cache's store `codes` [1, b, h, capacity, d] (int8 or float8_e4m3fn, rows contiguous) at the positions
// [length, length + n), and the one `scale` into its scale store `scales` [1, b, 1, capacity, 1] float32 there, as
// llmquant.nn.kv_storage.quantize_states makes them with torch's operations: int8 clamp(round-half-even(x / s), qmin,
// qmax), or E4M3 e4m3(clamp(x / s, -qmax, qmax)) by torch's own conversion (c10::Float8_e4m3fn: round to nearest
// even, NaN kept). One value at a time: a decode step's few rows (a prefill is quantized by the ops' vectorised
// calls, then appended).
inline void store_static_codes(const torch::Tensor& state_in, const torch::Tensor& codes, const torch::Tensor& scales,
                               int64_t length, const torch::Tensor& scale_in, double qmin, double qmax) {
  const bool float8 = codes.scalar_type() == torch::kFloat8_e4m3fn;
  TORCH_CHECK(state_in.dim() == 4 && state_in.scalar_type() == torch::kFloat32 && codes.dim() == 5 &&
              (float8 || codes.scalar_type() == torch::kInt8) && codes.size(0) == 1 && codes.stride(4) == 1 &&
              scales.dim() == 5 && scales.scalar_type() == torch::kFloat32 && scales.size(0) == 1 &&
              scales.size(2) == 1 && scales.size(4) == 1 && scale_in.numel() == 1,
              "store_static_codes: float32 states [b, h, n, d], int8 or float8 codes [1, b, h, capacity, d] (rows "
              "contiguous), float32 scales [1, b, 1, capacity, 1] and one scale");
  const torch::Tensor state = state_in.contiguous();
  const int64_t batch = state.size(0), heads = state.size(1), count = state.size(2), inner = state.size(3);
  TORCH_CHECK(codes.size(1) == batch && codes.size(2) == heads && codes.size(4) == inner && scales.size(1) == batch &&
              length >= 0 && codes.size(3) >= length + count && scales.size(3) >= length + count,
              "store_static_codes: stores [1, b, h or 1, capacity >= length + n, .] for states [b, h, n, d]");
  const float scale = scale_in.to(torch::kFloat32).item<float>();
  const float low = static_cast<float>(qmin), high = static_cast<float>(qmax);
  const float* x = state.data_ptr<float>();
  uint8_t* code_base = static_cast<uint8_t*>(codes.data_ptr());
  for (int64_t row = 0; row < batch * heads * count; ++row) {
    const int64_t t = row % count, h = row / count % heads, b = row / (count * heads);
    uint8_t* out = code_base + b * codes.stride(1) + h * codes.stride(2) + (length + t) * codes.stride(3);
    for (int64_t i = 0; i < inner; ++i) {
      const float v = x[row * inner + i] / scale;
      if (float8) {
        out[i] = c10::Float8_e4m3fn(std::isnan(v) ? v : std::min(std::max(v, -high), high)).x;
      } else {
        out[i] = static_cast<uint8_t>(static_cast<int8_t>(std::min(std::max(std::nearbyint(v), low), high)));
      }
    }
  }
  float* scale_base = scales.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < count; ++t) scale_base[b * scales.stride(1) + (length + t) * scales.stride(3)] = scale;
  }
}

// One (batch, KV head) of int8_decode_attention: its `group` query heads [group, dk] and what they read.
struct HeadInputs {
  const float* queries;
  const int8_t* keys;          // [positions, dk] codes, rows contiguous
  const int8_t* values;        // [positions, dv] codes, rows contiguous
  const float* key_scales;     // [positions]
  const float* value_scales;   // [positions]
  const float* additive_mask;  // [group or 1, positions] rows `mask_stride` apart, or null
  const bool* allowed;         // the same for a bool mask (true: attend), or null
  int64_t mask_stride;
};

// Attention of one query position over an INT8 (or FP8 E4M3) KV cache, read as codes (never dequantized in memory):
//   score[t] = (q . k_q[t]) * (scaling * s_k[t]) + mask[t],   out = sum_t softmax(score)[t] * s_v[t] * v_q[t]
// for query [b, H, dk] float32, keys [b, h, s, dk] and values [b, h, s, dv] int8 or float8_e4m3fn (rows contiguous,
// the heads and batches at any strides: views of the cache's stores), key_scales / value_scales [b, 1 or h, s, 1]
// float32 (one per position), mask None or [b, 1 or H, s] float32 (added) or bool (true: attend). Query head i reads
// KV head i / (H / h) (grouped-query attention, as transformers' repeat_kv). Each (batch, KV head) is
// attend_head(inputs, group, positions, dk, dv, scaling, out [group, dv]), the op's float32 arithmetic: Int8Head for
// int8 codes, Float8Head for E4M3 ones. The ops bind int8_decode_attention<their heads> below.
using AttendHead = void (*)(const HeadInputs&, int64_t, int64_t, int64_t, int64_t, float, float*);

template <AttendHead Int8Head, AttendHead Float8Head>
torch::Tensor int8_decode_attention(const torch::Tensor& query_in, const torch::Tensor& keys,
                                    const torch::Tensor& values, const torch::Tensor& key_scales,
                                    const torch::Tensor& value_scales, const std::optional<torch::Tensor>& mask_in,
                                    double scaling) {
  TORCH_CHECK(query_in.dim() == 3 && keys.dim() == 4 && values.dim() == 4 && key_scales.dim() == 4 &&
              value_scales.dim() == 4, "int8_decode_attention: query [b, H, dk], keys and values [b, h, s, d]");
  const bool float8 = keys.scalar_type() == torch::kFloat8_e4m3fn;
  TORCH_CHECK(query_in.scalar_type() == torch::kFloat32 && (float8 || keys.scalar_type() == torch::kInt8) &&
              values.scalar_type() == keys.scalar_type() && key_scales.scalar_type() == torch::kFloat32 &&
              value_scales.scalar_type() == torch::kFloat32,
              "int8_decode_attention: a float32 query, int8 or float8 (E4M3) codes, float32 scales");
  const torch::Tensor query = query_in.contiguous();
  const int64_t batch = query.size(0), heads = query.size(1), dk = query.size(2);
  const int64_t kv_heads = keys.size(1), positions = keys.size(2), dv = values.size(3);
  TORCH_CHECK(keys.size(0) == batch && keys.size(3) == dk && values.size(0) == batch && values.size(1) == kv_heads &&
              values.size(2) == positions && kv_heads > 0 && heads % kv_heads == 0,
              "int8_decode_attention: matching shapes");
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == dk && values.stride(3) == 1 && values.stride(2) == dv,
              "int8_decode_attention: contiguous rows of codes");
  for (const torch::Tensor* scales : {&key_scales, &value_scales}) {
    TORCH_CHECK(scales->size(0) == batch && (scales->size(1) == 1 || scales->size(1) == kv_heads) &&
                scales->size(2) == positions && scales->size(3) == 1 && scales->stride(2) == 1,
                "int8_decode_attention: scales [b, 1 or h, s, 1], one per position");
  }
  torch::Tensor mask;
  if (mask_in.has_value()) {
    mask = mask_in->contiguous();
    TORCH_CHECK(mask.dim() == 3 && mask.size(0) == batch && (mask.size(1) == 1 || mask.size(1) == heads) &&
                mask.size(2) == positions &&
                (mask.scalar_type() == torch::kFloat32 || mask.scalar_type() == torch::kBool),
                "int8_decode_attention: mask [b, 1 or H, s], float32 or bool");
  }
  torch::Tensor out = torch::empty({batch, heads, dv}, query.options());
  const int64_t group = heads / kv_heads;
  const int64_t key_head_scale = key_scales.size(1) > 1 ? key_scales.stride(1) : 0;
  const int64_t value_head_scale = value_scales.size(1) > 1 ? value_scales.stride(1) : 0;
  const int64_t mask_head = mask.defined() && mask.size(1) > 1 ? positions : 0;
  const bool boolean = mask.defined() && mask.scalar_type() == torch::kBool;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t bi = item / kv_heads, g = item % kv_heads;
      const int64_t mask_row = mask.defined() ? bi * mask.size(1) * positions + g * group * mask_head : 0;
      const HeadInputs inputs{
          query.data_ptr<float>() + (bi * heads + g * group) * dk,
          static_cast<const int8_t*>(keys.data_ptr()) + bi * keys.stride(0) + g * keys.stride(1),
          static_cast<const int8_t*>(values.data_ptr()) + bi * values.stride(0) + g * values.stride(1),
          key_scales.data_ptr<float>() + bi * key_scales.stride(0) + g * key_head_scale,
          value_scales.data_ptr<float>() + bi * value_scales.stride(0) + g * value_head_scale,
          mask.defined() && !boolean ? mask.data_ptr<float>() + mask_row : nullptr,
          boolean ? mask.data_ptr<bool>() + mask_row : nullptr,
          mask_head};
      (float8 ? Float8Head : Int8Head)(inputs, group, positions, dk, dv, static_cast<float>(scaling),
                                       out.data_ptr<float>() + (bi * heads + g * group) * dv);
    }
  });
  return out;
}

// What every op binds from here, with its own row codes, division and heads of attention.
template <RowCodes row_codes, DividedCodes divided_codes, AttendHead Int8Head, AttendHead Float8Head>
void bind_common(pybind11::module_& module) {
  module.def("token_codes", &token_codes<row_codes>, "per-token int8 codes of float32 rows and their scales");
  module.def("static_codes", &static_codes<divided_codes>, "int8 codes of float32 rows under one static scale");
  module.def("store_token_codes", &store_token_codes<row_codes>,
             "per-token codes and scales written into a KV cache's stores");
  module.def("store_static_codes", &store_static_codes,
             "static per-tensor int8 or FP8 codes and their scale written into a KV cache's stores");
  module.def("int8_decode_attention", &int8_decode_attention<Int8Head, Float8Head>,
             "softmax(q k^T * scaling + mask) v for one query position over int8 or FP8 KV codes");
}

}  // namespace llmquant
