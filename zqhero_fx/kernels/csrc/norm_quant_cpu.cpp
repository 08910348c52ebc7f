// zqhero::norm_quant on the CPU: optional residual add, LayerNorm or RMSNorm, per-token absmax and INT8 quantization,
// one pass over each row held in L1 (the row is read from memory once, and each output written once). The spec:
// kernels/norm_quant.py `norm_quant_ref`; launcher and build: kernels/int8_cpu.py (part of the quantized_linear_cpu
// extension, compiled for AVX-512 and for AVX2 + FMA; ATen's Vectorized<float> is either).
//
// Reference order: summed = x + residual; LayerNorm: mean, variance around it (both over the row, float32), then
// (s - mean) * rstd * weight + bias with rstd = 1 / sqrt(var + eps); RMSNorm: s * rsqrt(mean(s^2) + eps) * weight
// (+ bias); scale = max(absmax / 127, 1e-8); q = clamp(round_half_even(normed / scale), +-127). ATen sums in a
// different order (cascaded), so the float results agree to a few ulps, not bit for bit; a code can move by one
// where normed / scale falls that close to a rounding boundary.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "int8_store.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kMinScale = 1e-8f;  // formats.MIN_SCALE

inline Vec load(const float* p, int64_t count) { return count == kLanes ? Vec::loadu(p) : Vec::loadu(p, count); }
inline void store(Vec v, float* p, int64_t count) {
  if (count == kLanes) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

inline float sum_of(const float* row, int64_t D) {
  Vec acc(0.0f);
  for (int64_t d = 0; d < D; d += kLanes) acc = acc + load(row + d, std::min(kLanes, D - d));
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
}

inline float sum_of_squares(const float* row, int64_t D, float centre) {
  Vec acc(0.0f);
  const Vec c(centre);
  for (int64_t d = 0; d < D; d += kLanes) {
    const int64_t count = std::min(kLanes, D - d);
    // padded lanes load 0; subtracting the centre there would add centre^2 each, so they are masked back to 0
    Vec v = load(row + d, count) - c;
    if (count != kLanes) v = Vec::set(Vec(0.0f), v, count);
    acc = acc + v * v;
  }
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
}

// The row (D float32 values, overwritten) -> LayerNorm / RMSNorm -> `normed` (when not null), the per-token scale and
// the INT8 codes.
void normalise_and_quantize(float* row, int64_t D, const float* weight, const float* bias, float eps, bool rms,
                            float* normed, int8_t* q, float* scale) {
  const float inv_d = 1.0f / (float)D;
  float mean = 0.0f, rstd;
  if (rms) {
    rstd = 1.0f / std::sqrt(sum_of_squares(row, D, 0.0f) * inv_d + eps);
  } else {
    mean = sum_of(row, D) * inv_d;
    rstd = 1.0f / std::sqrt(sum_of_squares(row, D, mean) * inv_d + eps);
  }
  Vec absmax(0.0f);
  for (int64_t d = 0; d < D; d += kLanes) {
    const int64_t count = std::min(kLanes, D - d);
    Vec y = (load(row + d, count) - Vec(mean)) * Vec(rstd) * load(weight + d, count);
    if (bias != nullptr) y = y + load(bias + d, count);
    if (count != kLanes) y = Vec::set(Vec(0.0f), y, count);
    store(y, row + d, count);
    if (normed != nullptr) store(y, normed + d, count);
    absmax = at::vec::maximum(absmax, y.abs());
  }
  const float amax = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, absmax);
  const float s = std::max(amax / 127.0f, kMinScale);
  *scale = s;
  const Vec sv(s);
  for (int64_t d = 0; d < D; d += kLanes) {
    const int64_t count = std::min(kLanes, D - d);
    zqhero::store_int8(at::vec::clamp((load(row + d, count) / sv).round(), Vec(-127.0f), Vec(127.0f)), q + d, count);
  }
}

void check_norm_operands(const char* op, int64_t D, const torch::Tensor& weight,
                         const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == D, op,
              " (CPU): weight must be contiguous float32 [", D, "]");
  if (bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == D, op,
                " (CPU): bias must be contiguous float32 [", D, "]");
}

}  // namespace

std::vector<torch::Tensor> norm_quant(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                      const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                                      double eps, bool emit_normed, bool emit_sum, bool rms) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "norm_quant (CPU): x must be contiguous float32");
  const int64_t D = x.size(-1), M = D == 0 ? 0 : x.numel() / D;
  if (residual)
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->sizes() == x.sizes(),
                "norm_quant (CPU): residual must be contiguous float32 shaped like x");
  check_norm_operands("norm_quant", D, weight, bias);
  auto q = torch::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = 1;
  auto scale = torch::empty(scale_shape, x.options());
  auto normed = emit_normed ? torch::empty_like(x) : x.new_empty({0});
  auto summed = emit_sum ? torch::empty_like(x) : x.new_empty({0});
  if (M == 0) return {q, scale, normed, summed};

  const float* xs = x.data_ptr<float>();
  const float* rs = residual ? residual->data_ptr<float>() : nullptr;
  const float* ws = weight.data_ptr<float>();
  const float* bs = bias ? bias->data_ptr<float>() : nullptr;
  int8_t* qs = q.data_ptr<int8_t>();
  float* ss = scale.data_ptr<float>();
  float* ns = emit_normed ? normed.data_ptr<float>() : nullptr;
  float* sums = emit_sum ? summed.data_ptr<float>() : nullptr;
  // rows in chunks worth a thread's start-up (at least ~16K elements each)
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  zqhero::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buffer;
    if ((int64_t)buffer.size() < D) buffer.resize(D);
    float* row = buffer.data();
    for (int64_t m = begin; m < end; ++m) {
      const float* xr = xs + m * D;
      for (int64_t d = 0; d < D; d += kLanes) {
        const int64_t count = std::min(kLanes, D - d);
        Vec s = load(xr + d, count);
        if (rs != nullptr) s = s + load(rs + m * D + d, count);
        store(s, row + d, count);
        if (sums != nullptr) store(s, sums + m * D + d, count);
      }
      normalise_and_quantize(row, D, ws, bs, (float)eps, rms, ns == nullptr ? nullptr : ns + m * D, qs + m * D,
                             ss + m);
    }
  });
  return {q, scale, normed, summed};
}

// indices: one contiguous int64 [T] per table (already broadcast to the tokens); tables: [V_i, D] int8 with a float32
// scale [V_i] or [1], or float32 with an empty scale -> (q int8 [T, D], scale float32 [T, 1], normed [T, D] or empty).
// The dequantized rows are summed in list order (row * scale, as the reference's quantized_embedding), then as
// norm_quant (LayerNorm).
std::vector<torch::Tensor> embedding_norm_quant(const std::vector<torch::Tensor>& indices,
                                                const std::vector<torch::Tensor>& tables,
                                                const std::vector<torch::Tensor>& scales, const torch::Tensor& weight,
                                                const c10::optional<torch::Tensor>& bias, double eps,
                                                bool emit_normed) {
  TORCH_CHECK(!tables.empty() && indices.size() == tables.size() && scales.size() == tables.size(),
              "embedding_norm_quant (CPU): one index tensor, table and scale per table");
  const int64_t D = tables[0].size(1), T = indices[0].numel();
  check_norm_operands("embedding_norm_quant", D, weight, bias);
  for (size_t i = 0; i < tables.size(); ++i) {
    const auto& t = tables[i];
    TORCH_CHECK(t.dim() == 2 && t.size(1) == D && t.is_contiguous() &&
                    (t.scalar_type() == at::kChar || t.scalar_type() == at::kFloat),
                "embedding_norm_quant (CPU): table ", i, " must be a contiguous int8 or float32 [V, ", D, "]");
    TORCH_CHECK(indices[i].scalar_type() == at::kLong && indices[i].is_contiguous() && indices[i].numel() == T,
                "embedding_norm_quant (CPU): indices ", i, " must be contiguous int64 with ", T, " entries");
    if (t.scalar_type() == at::kChar)
      TORCH_CHECK(scales[i].scalar_type() == at::kFloat && scales[i].is_contiguous() &&
                      (scales[i].numel() == t.size(0) || scales[i].numel() == 1),
                  "embedding_norm_quant (CPU): table ", i, " needs a float32 scale per row or one in all");
    const int64_t* ids = indices[i].data_ptr<int64_t>();
    const int64_t rows = t.size(0);
    for (int64_t k = 0; k < T; ++k)
      TORCH_CHECK(ids[k] >= 0 && ids[k] < rows, "embedding_norm_quant: index ", ids[k], " (position ", k,
                  ") is out of range for embedding table ", i, " of ", rows, " rows");
  }
  auto q = torch::empty({T, D}, weight.options().dtype(at::kChar));
  auto scale = torch::empty({T, 1}, weight.options());
  auto normed = emit_normed ? torch::empty({T, D}, weight.options()) : weight.new_empty({0});
  if (T == 0 || D == 0) return {q, scale, normed};
  const float* ws = weight.data_ptr<float>();
  const float* bs = bias ? bias->data_ptr<float>() : nullptr;
  zqhero::parallel_for(0, T, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buffer;
    if ((int64_t)buffer.size() < D) buffer.resize(D);
    float* row = buffer.data();
    for (int64_t k = begin; k < end; ++k) {
      for (size_t i = 0; i < tables.size(); ++i) {
        const int64_t id = indices[i].data_ptr<int64_t>()[k];
        const bool quantized = tables[i].scalar_type() == at::kChar;
        const float* sp = quantized ? scales[i].data_ptr<float>() : nullptr;
        const Vec row_scale(quantized ? sp[scales[i].numel() == 1 ? 0 : id] : 1.0f);
        for (int64_t d = 0; d < D; d += kLanes) {
          const int64_t count = std::min(kLanes, D - d);
          Vec v;
          if (quantized) {
            v = zqhero::load_int8_as_float(tables[i].data_ptr<int8_t>() + id * D + d, count) * row_scale;
          } else {
            v = load(tables[i].data_ptr<float>() + id * D + d, count);
          }
          store(i == 0 ? v : load(row + d, count) + v, row + d, count);
        }
      }
      float* normed_row = emit_normed ? normed.data_ptr<float>() + k * D : nullptr;
      normalise_and_quantize(row, D, ws, bs, (float)eps, false, normed_row, q.data_ptr<int8_t>() + k * D,
                             scale.data_ptr<float>() + k);
    }
  });
  return {q, scale, normed};
}
