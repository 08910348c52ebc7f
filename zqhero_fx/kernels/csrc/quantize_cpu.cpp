// zqhero::quantize_per_token (TWQ) and zqhero::quantize (FWQ / SQ) to INT8 on the CPU, one pass per row held in L1.
// The spec: kernels/quantize.py (the INT8 format's quantize in formats.py); launcher and build: kernels/int8_cpu.py
// (part of the INT8 CPU extension, compiled for AVX-512 and for AVX2 + FMA). Bit-exact to the references: absmax,
// scale = max(absmax / 127, 1e-8), q = clamp(round_half_even(x / scale), +-127) with an IEEE division, NaN -> 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "int8_store.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kMinScale = 1e-8f;  // formats.MIN_SCALE

inline Vec load(const float* p, int64_t count) { return count == kLanes ? Vec::loadu(p) : Vec::loadu(p, count); }

inline void quantize_row(const float* x, const float* scale, bool per_feature, int64_t D, int8_t* q) {
  for (int64_t d = 0; d < D; d += kLanes) {
    const int64_t count = std::min(kLanes, D - d);
    const Vec s = at::vec::clamp_min(per_feature ? load(scale + d, count) : Vec(scale[0]), Vec(kMinScale));
    zqhero::store_int8(at::vec::clamp((load(x + d, count) / s).round(), Vec(-127.0f), Vec(127.0f)), q + d, count);
  }
}

}  // namespace

// x [..., D] float32 contiguous -> (q int8 like x, scale float32 [..., 1])
std::vector<torch::Tensor> quantize_per_token(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "quantize_per_token (CPU): x must be contiguous float32");
  const int64_t D = x.size(-1), M = D == 0 ? 0 : x.numel() / D;
  auto q = torch::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = 1;
  auto scale = torch::empty(scale_shape, x.options());
  if (M == 0) {
    scale.fill_(kMinScale);
    return {q, scale};
  }
  const float* xs = x.data_ptr<float>();
  int8_t* qs = q.data_ptr<int8_t>();
  float* ss = scale.data_ptr<float>();
  zqhero::parallel_for(0, M, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      Vec absmax(0.0f);
      for (int64_t d = 0; d < D; d += kLanes)
        absmax = at::vec::maximum(absmax, load(xs + m * D + d, std::min(kLanes, D - d)).abs());
      const float amax = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, absmax);
      ss[m] = std::max(amax / 127.0f, kMinScale);
      quantize_row(xs + m * D, ss + m, false, D, qs + m * D);
    }
  });
  return {q, scale};
}

// x [..., D] float32 contiguous, scale float32 [D] (per feature) or [1] (per tensor) -> q int8 like x
torch::Tensor quantize_static(const torch::Tensor& x, const torch::Tensor& scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "quantize (CPU): x must be contiguous float32");
  const int64_t D = x.size(-1), M = D == 0 ? 0 : x.numel() / D;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && (scale.numel() == D || scale.numel() == 1),
              "quantize (CPU): scale must be contiguous float32 [", D, "] or [1], got ", scale.sizes());
  auto q = torch::empty(x.sizes(), x.options().dtype(at::kChar));
  if (M == 0) return q;
  const float* xs = x.data_ptr<float>();
  const float* ss = scale.data_ptr<float>();
  const bool per_feature = scale.numel() == D && D != 1;
  int8_t* qs = q.data_ptr<int8_t>();
  zqhero::parallel_for(0, M, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row(xs + m * D, ss, per_feature, D, qs + m * D);
  });
  return q;
}
