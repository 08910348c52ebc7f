// zqhero::quantized_linear on the CPU: INT8 x INT8 -> exact INT32, with the whole epilogue (row x column scales, bias,
// activation, residual, float output or requantization to INT8) applied to each register tile before it is stored,
// so the INT32 accumulator never goes to memory. Launcher, ISA choice and build: zqhero_fx/kernels/int8_cpu.py;
// the spec: kernels/quantized_linear.py `quantized_linear_ref`.
//
// Compiled twice by int8_cpu.py: for AVX-512 (F/BW/VL/DQ/VNNI) and for AVX2 + FMA; the host picks at run time.
//  * `quantized_linear` (AVX-512 VNNI build only) runs its own GEMM on the weight as stored ([N, K] int8, rows
//    contiguous); nothing is packed ahead of time and the weight is never copied whole:
//     - decode (M <= kDecodeRows): dot-product orientation. R rows of x against C weight rows, 64 k at a time: the
//       weight row's bytes, sign bit flipped (w + 128, vpdpbusd's unsigned operand), times x; one horizontal sum per
//       output at the end. Each weight byte is read once per call: this is weight-bandwidth bound, as decode is.
//     - prefill: blocks of 64 output channels x up to kMaxBlockDepth k are transposed (16 x 16 words at a time) into
//       a per-thread buffer in the VNNI layout [k/4][64][4] of w + 128, which stays in cache; register tiles of
//       6 rows x 64 channels run one vpdpbusd per 64 multiply-adds; the first k block starts from -128 sum_k x[m, k],
//       which takes the +128 back out exactly. On the last k block the tile goes through the epilogue in registers.
//  * `linear_epilogue` (both builds) applies the same epilogue to an INT32 [M, N] accumulator from elsewhere: oneDNN's
//    `_int_mm`, which is what runs the GEMM on AMX hosts (tile instructions beat VNNI there) and on AVX2-only hosts.
//
// The epilogue is the reference's operation order, one rounding per reference op (built with -ffp-contract=off so
// that no multiply-add is fused): y = acc * x_scale[m] * w_scale[n] + bias[n], activation (ATen's vectorised formulas,
// as F.gelu etc. on the CPU), + residual[m, n]; then float32 out, or q = clamp(round_half_even(y / out_scale), +-127)
// with an IEEE division, NaN to 0 (as torch's float->int8 cast on CPU).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "cpu_parallel.h"
#include "int8_store.h"

#ifdef CPU_CAPABILITY_AVX512
#include "vnni_tiles.h"
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kMinScale = 1e-8f;  // formats.MIN_SCALE

// The order of zqhero_fx.ops.ACTIVATIONS.
enum Activation : int64_t { kNone = 0, kGelu, kGeluTanh, kRelu, kSilu, kQuickGelu, kActivations };

inline Vec activate(Vec y, int64_t activation) {
  switch (activation) {
    // ATen's GeLU (erf), as F.gelu: x * 0.5 * (1 + erf(x / sqrt 2)). (A rational erf without exp, within 4.3e-7,
    // made this epilogue ~3x cheaper but flipped one of MiniLM's 1000 polarity predictions under M3: not taken.)
    case kGelu:
      return y * Vec(0.5f) * (Vec(1.0f) + (y * Vec((float)M_SQRT1_2)).erf());
    case kGeluTanh: {  // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
      const Vec inner = Vec((float)(M_SQRT2 * M_2_SQRTPI * 0.5)) * (y + Vec(0.044715f) * (y * y * y));
      return Vec(0.5f) * y * (Vec(1.0f) + inner.tanh());
    }
    case kRelu:
      return at::vec::clamp_min(y, Vec(0.0f));
    case kSilu:
      return y / (Vec(1.0f) + y.neg().exp());
    case kQuickGelu:  // y * sigmoid(1.702 y)
      return y * (Vec(1.0f) / (Vec(1.0f) + (Vec(1.702f) * y).neg().exp()));
    default:
      return y;
  }
}

inline Vec load(const float* p, int64_t count) { return count == kLanes ? Vec::loadu(p) : Vec::loadu(p, count); }

// `count` int32 values as float (the reference's int32 -> float32 cast, round to nearest even).
inline Vec int32_as_float(const int32_t* p, int64_t count) {
#ifdef CPU_CAPABILITY_AVX512
  return Vec(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32((__mmask16)((1u << count) - 1u), p)));
#else
  if (count == 8) return Vec(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)p)));
  int32_t all[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(all, p, count * sizeof(int32_t));
  return Vec(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)all)));
#endif
}

// The operands of one call's epilogue. Row scales: x_scale[m] (per token) or x_scale[0]; out_scale[n] or [0].
struct Epilogue {
  const float* x_scale;
  bool x_scale_per_row;
  const float* w_scale;
  const float* bias;  // or null
  int64_t activation;
  const float* multiplier;  // [M, N] (row stride N) multiplying the activation's output, or null (gated MLPs)
  const float* residual;  // [M, N] with row stride residual_stride, or null
  int64_t residual_stride;
  const float* out_scale;  // null: float32 output
  bool out_scale_per_column;
  float* out_float;
  int8_t* out_int8;
  int64_t out_stride;

  // Output row m, columns n .. n + count - 1 (count <= kLanes), from their float32 accumulators.
  inline void apply(int64_t m, int64_t n, Vec acc, int64_t count) const {
    Vec y = acc * Vec(x_scale[x_scale_per_row ? m : 0]) * load(w_scale + n, count);
    if (bias != nullptr) y = y + load(bias + n, count);
    y = activate(y, activation);
    if (multiplier != nullptr) y = y * load(multiplier + m * out_stride + n, count);
    if (residual != nullptr) y = y + load(residual + m * residual_stride + n, count);
    if (out_scale == nullptr) {
      if (count == kLanes) {
        y.store(out_float + m * out_stride + n);
      } else {
        y.store(out_float + m * out_stride + n, count);
      }
      return;
    }
    const Vec scale = at::vec::clamp_min(out_scale_per_column ? load(out_scale + n, count) : Vec(out_scale[0]),
                                         Vec(kMinScale));
    const Vec q = at::vec::clamp((y / scale).round(), Vec(-127.0f), Vec(127.0f));
    zqhero::store_int8(q, out_int8 + m * out_stride + n, count);
  }

  // Rows [m_begin, m_end) x columns [n_begin, n_end) of an int32 accumulator [., ldc].
  __attribute__((noinline)) void apply_block(const int32_t* acc, int64_t ldc, int64_t m_begin, int64_t m_end,
                                             int64_t n_begin, int64_t n_end) const {
    for (int64_t m = m_begin; m < m_end; ++m)
      for (int64_t n = n_begin; n < n_end; n += kLanes) {
        const int64_t count = std::min(kLanes, n_end - n);
        apply(m, n, int32_as_float(acc + m * ldc + n, count), count);
      }
  }
};

#ifdef CPU_CAPABILITY_AVX512
using zqhero::Accumulators;
using zqhero::each;
using zqhero::low_bits;
using zqhero::settled;
using zqhero::tile_rows;
using zqhero::kTileRows;

const __m512i kSignBits = _mm512_set1_epi8((char)0x80);

// ---------------------------------------------------------------- decode: dot-product orientation
constexpr int64_t kDecodeRows = 8;

// Weight rows per tile for R rows of x: R * C accumulators plus C weight vectors within the 32 registers.
constexpr int decode_columns(int R) { return R <= 2 ? 8 : R == 3 ? 6 : R <= 5 ? 4 : 3; }

// out[r, c] (int32, row stride ldo) = sum_k x[r, k] w[c, k] for R rows of x and C rows of w (row stride ldw).
template <int R, int C>
void dot_tile(const int8_t* x, int64_t K, const int8_t* w, int64_t ldw, const int32_t* shift, int32_t* out,
              int64_t ldo) {
  Accumulators acc;
  each<R * C>([&](auto i) { acc.template at<i>() = _mm512_setzero_si512(); });
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 valid = low_bits(K - k);
    __m512i wv[C];
    // w + 128 as unsigned bytes; past K it is 128 times x's zero padding: nothing
    each<C>([&](auto c) { wv[c] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(valid, w + c * ldw + k), kSignBits); });
    each<R>([&](auto r) {
      const __m512i xv = _mm512_maskz_loadu_epi8(valid, x + r * K + k);
      each<C>([&](auto c) {
        __m512i& a = acc.template at<C * r + c>();
        a = _mm512_dpbusd_epi32(a, wv[c], xv);
      });
    });
  }
  Accumulators sums = settled<R * C>(acc);
  each<R>([&](auto r) {
    each<C>([&](auto c) { out[r * ldo + c] = _mm512_reduce_add_epi32(sums.template at<C * r + c>()) - shift[r]; });
  });
}

// One tile of R rows x up to C weight rows (`cols` of them; fewer only at the end of N).
template <int R>
void dot_tiles(const int8_t* x, int64_t K, const int8_t* w, int64_t ldw, const int32_t* shift, int32_t* out,
               int64_t ldo, int64_t cols) {
  constexpr int C = decode_columns(R);
  if (cols == C) {
    dot_tile<R, C>(x, K, w, ldw, shift, out, ldo);
    return;
  }
  for (int64_t c = 0; c < cols; ++c) dot_tile<R, 1>(x, K, w + c * ldw, ldw, shift, out + c, ldo);
}

template <int R>
void decode(const int8_t* x, int64_t K, const int8_t* w, int64_t ldw, int64_t N, const Epilogue& epilogue) {
  constexpr int C = decode_columns(R);
  std::vector<int32_t> shift(R);
  zqhero::row_shifts(x, R, K, shift.data());
  std::vector<int32_t> acc(R * N);
  const int64_t tiles = (N + C - 1) / C;
  // Each thread takes whole 16-column groups so that its epilogue covers exactly the columns it computed.
  const int64_t groups = (N + 15) / 16;
  zqhero::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t n_begin = begin * 16, n_end = std::min(N, end * 16);
    for (int64_t t = n_begin / C; t < tiles && t * C < n_end; ++t) {
      const int64_t n0 = std::max(t * C, n_begin), cols = std::min<int64_t>(std::min(t * C + C, n_end) - n0, C);
      if (n0 == t * C && cols == C) {
        dot_tiles<R>(x, K, w + n0 * ldw, ldw, shift.data(), acc.data() + n0, N, C);
      } else {
        dot_tiles<R>(x, K, w + n0 * ldw, ldw, shift.data(), acc.data() + n0, N, cols);
      }
    }
    epilogue.apply_block(acc.data(), N, 0, R, n_begin, n_end);
  });
}

// ---------------------------------------------------------------- prefill: blocks of the weight in the VNNI layout
constexpr int64_t kBlockCols = 64;       // channels per block: 4 vectors of 16
constexpr int64_t kMaxBlockDepth = 4096; // k per block: BERT's and SmolLM2's K are one block, so no int32 round trip
constexpr int64_t kPanelBytes = 512 * 1024;  // blocks transposed together (sharing each slice of x), in L2
constexpr int64_t kSliceBytes = 384 * 1024;  // rows of x per slice, at most this many bytes of them, in L2
constexpr int64_t kMinRowsPerPart = 256;     // fewest rows one thread transposes a panel for

// Channels n0 .. n0 + cols - 1 (cols <= 64; the rest of the block is left as it is, never stored) x k in
// [k0, k0 + depth) of w [N, K] (row stride ldw) -> block[(k - k0) / 4][64][4] bytes of w + 128.
void transpose_block(const int8_t* w, int64_t ldw, int64_t K, int64_t n0, int64_t cols, int64_t k0, int64_t depth,
                     uint8_t* block) {
  for (int64_t v = 0; v < kBlockCols / 16; ++v) {
    if (16 * v >= cols) break;
    for (int64_t k = k0; k < k0 + depth; k += 64) {
      const __mmask64 valid = low_bits(std::min(K, k0 + depth) - k);
      __m512i rows[16];
      for (int64_t t = 0; t < 16; ++t) {
        const int64_t j = 16 * v + t;
        rows[t] = j < cols ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(valid, w + (n0 + j) * ldw + k), kSignBits)
                           : _mm512_setzero_si512();
      }
      zqhero::transpose_16x16_words(rows);
      uint8_t* dst = block + (k - k0) / 4 * (4 * kBlockCols) + 64 * v;
      const int64_t words = std::min<int64_t>(16, (k0 + depth - k + 3) / 4);
      for (int64_t q = 0; q < words; ++q) _mm512_storeu_si512(dst + q * 4 * kBlockCols, rows[q]);
    }
  }
}

// R rows of x (from column k0; row stride K) against a block over `quads` groups of 4 k. Not the last k block: adds
// into the int32 partial sums (row stride ldp); the last: the tile's totals go through the epilogue.
template <int R>
void prefill_tile(const int8_t* x, int64_t K, const uint8_t* block, int64_t quads, bool first, bool last,
                  const int32_t* shift, int32_t* partial, int64_t ldp, int64_t m0, int64_t n0, int64_t cols,
                  const Epilogue& epilogue) {
  constexpr int V = kBlockCols / 16;
  Accumulators acc;
  each<R * V>([&](auto i) { acc.template at<i>() = _mm512_setzero_si512(); });
  // quads is a multiple of 4 (K and the blocks are multiples of 16 k): four per iteration, so that the loop's scalar
  // bookkeeping takes fewer of the issue slots the vpdpbusd ports share
  for (int64_t q0 = 0; q0 < quads; q0 += 4) {
    each<4>([&](auto u) {
      const int64_t q = q0 + u;
      each<R>([&](auto r) {
        int32_t four;
        std::memcpy(&four, x + r * K + 4 * q, 4);
        const __m512i xb = _mm512_set1_epi32(four);
        each<V>([&](auto v) {
          __m512i& a = acc.template at<V * r + v>();
          a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(block + q * 4 * kBlockCols + 64 * v), xb);
        });
      });
    });
  }
  Accumulators sums = settled<R * V>(acc);
  // The last k block's totals go through the epilogue from a small buffer in L1, in a separate function: inlined
  // here, the epilogue's code made GCC spill the accumulators inside the k loop (5x slower).
  alignas(64) int32_t totals[kTileRows * kBlockCols];
  int32_t* dst = last ? totals : partial;
  const int64_t ld = last ? kBlockCols : ldp;
  each<V>([&](auto v) {
    const __mmask16 keep = (__mmask16)low_bits(std::clamp<int64_t>(cols - 16 * (int64_t)v, 0, 16));
    each<R>([&](auto r) {
      const __m512i before =
          first ? _mm512_set1_epi32(-shift[r]) : _mm512_maskz_loadu_epi32(keep, partial + r * ldp + 16 * v);
      _mm512_mask_storeu_epi32(dst + r * ld + 16 * v, keep, _mm512_add_epi32(before, sums.template at<V * r + v>()));
    });
  });
  if (last) epilogue.apply_block(totals - m0 * kBlockCols - n0, kBlockCols, m0, m0 + R, n0, n0 + cols);
}

void prefill_rows(int64_t rows, const int8_t* x, int64_t K, const uint8_t* block, int64_t quads, bool first, bool last,
                  const int32_t* shift, int32_t* partial, int64_t ldp, int64_t m0, int64_t n0, int64_t cols,
                  const Epilogue& e) {
  switch (rows) {
    case 6: prefill_tile<6>(x, K, block, quads, first, last, shift, partial, ldp, m0, n0, cols, e); break;
    case 5: prefill_tile<5>(x, K, block, quads, first, last, shift, partial, ldp, m0, n0, cols, e); break;
    case 4: prefill_tile<4>(x, K, block, quads, first, last, shift, partial, ldp, m0, n0, cols, e); break;
    case 3: prefill_tile<3>(x, K, block, quads, first, last, shift, partial, ldp, m0, n0, cols, e); break;
    case 2: prefill_tile<2>(x, K, block, quads, first, last, shift, partial, ldp, m0, n0, cols, e); break;
    default: prefill_tile<1>(x, K, block, quads, first, last, shift, partial, ldp, m0, n0, cols, e); break;
  }
}

void prefill(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t N, const Epilogue& epilogue) {
  std::vector<int32_t> shift(M);
  zqhero::row_shifts(x, M, K, shift.data());
  // K (a multiple of 16) in equal blocks, each a multiple of 16 k
  const int64_t k_blocks = (K + kMaxBlockDepth - 1) / kMaxBlockDepth;
  const int64_t block_depth = (K / 16 + k_blocks - 1) / k_blocks * 16, block_bytes = block_depth * kBlockCols;
  // int32 partial sums between k blocks, only where K takes more than one
  std::vector<int32_t> partial(k_blocks > 1 ? M * N : 0);
  // Work items: a panel of blocks of channels x a part of the rows (as in a8w4_cpu.cpp's prefill).
  const int64_t blocks = (N + kBlockCols - 1) / kBlockCols, threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t panel_blocks = std::clamp<int64_t>(kPanelBytes / block_bytes, 1, 4);
  while (panel_blocks > 1 && blocks % (panel_blocks * threads) != 0) --panel_blocks;
  const int64_t panels = (blocks + panel_blocks - 1) / panel_blocks, panel_cols = panel_blocks * kBlockCols;
  const int64_t parts = std::max<int64_t>(1, std::min(threads / std::gcd(panels, threads), M / kMinRowsPerPart));
  const int64_t part_rows = (M + parts - 1) / parts;
  const int64_t slice_rows = std::max<int64_t>(kTileRows, kSliceBytes / block_depth / kTileRows * kTileRows);
  zqhero::parallel_for(0, panels * parts, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint8_t> scratch;
    if ((int64_t)scratch.size() < panel_blocks * block_bytes) scratch.resize(panel_blocks * block_bytes);
    uint8_t* panel = scratch.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n_begin = item / parts * panel_cols, n_end = std::min(N, n_begin + panel_cols);
      const int64_t m_begin = item % parts * part_rows, m_end = std::min(M, m_begin + part_rows);
      for (int64_t k0 = 0; k0 < K; k0 += block_depth) {
        const int64_t depth = std::min(block_depth, K - k0), quads = depth / 4;
        const bool first = k0 == 0, last = k0 + depth >= K;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockCols)
          transpose_block(w, ldw, K, n0, std::min(kBlockCols, n_end - n0), k0, depth,
                          panel + (n0 - n_begin) / kBlockCols * block_bytes);
        // a block stays in L1 for a slice of rows, whose x stays in L2 for the panel
        for (int64_t ms = m_begin; ms < m_end; ms += slice_rows) {
          const int64_t slice_end = std::min(m_end, ms + slice_rows);
          for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockCols) {
            const uint8_t* block = panel + (n0 - n_begin) / kBlockCols * block_bytes;
            for (int64_t m0 = ms, rows; m0 < slice_end; m0 += rows) {
              rows = tile_rows(slice_end - m0);
              prefill_rows(rows, x + m0 * K + k0, K, block, quads, first, last, shift.data() + m0,
                           partial.data() + m0 * N + n0, N, m0, n0, std::min(kBlockCols, n_end - n0), epilogue);
            }
          }
        }
      }
    }
  });
}

void gemm_with_epilogue(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t N,
                        const Epilogue& e) {
  switch (M) {  // decode up to kDecodeRows rows: the tile shape is a template parameter
    case 1: decode<1>(x, K, w, ldw, N, e); break;
    case 2: decode<2>(x, K, w, ldw, N, e); break;
    case 3: decode<3>(x, K, w, ldw, N, e); break;
    case 4: decode<4>(x, K, w, ldw, N, e); break;
    case 5: decode<5>(x, K, w, ldw, N, e); break;
    case 6: decode<6>(x, K, w, ldw, N, e); break;
    case 7: decode<7>(x, K, w, ldw, N, e); break;
    case 8: decode<8>(x, K, w, ldw, N, e); break;
    default: prefill(x, M, K, w, ldw, N, e); break;
  }
  static_assert(kDecodeRows == 8, "a decode case per row count");
}
#endif  // CPU_CAPABILITY_AVX512

// ---------------------------------------------------------------- operand checks
void check_float_vector(const torch::Tensor& t, int64_t size, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == size, "quantized_linear (CPU): ",
              name, " must be a contiguous float32 tensor of ", size, " elements, got ", t.scalar_type(), " ",
              t.sizes());
}

// The epilogue's operands for an output of M rows x N columns; `out` is float32 or int8 [M, N], contiguous.
Epilogue make_epilogue(int64_t M, int64_t N, const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                       const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual,
                       const c10::optional<torch::Tensor>& out_scale, int64_t activation, torch::Tensor& out) {
  TORCH_CHECK(activation >= 0 && activation < kActivations, "quantized_linear (CPU): unknown activation code ",
              activation);
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() &&
                  (x_scale.numel() == M || x_scale.numel() == 1),
              "quantized_linear (CPU): x_scale must be contiguous float32 with one value per row (", M,
              ") or one in all, got ", x_scale.sizes());
  check_float_vector(w_scale, N, "w_scale");
  if (bias) check_float_vector(*bias, N, "bias");
  if (out_scale)
    TORCH_CHECK(out_scale->scalar_type() == at::kFloat && out_scale->is_contiguous() &&
                    (out_scale->numel() == N || out_scale->numel() == 1),
                "quantized_linear (CPU): out_scale must be contiguous float32 [N] or [1], got ", out_scale->sizes());
  if (residual)
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->dim() == 2 && residual->size(0) == M &&
                    residual->size(1) == N && residual->stride(1) == 1,
                "quantized_linear (CPU): residual must be float32 [M, N] with unit column stride, got ",
                residual->sizes());
  Epilogue e{};
  e.x_scale = x_scale.data_ptr<float>();
  e.x_scale_per_row = x_scale.numel() == M && M != 1;
  e.w_scale = w_scale.data_ptr<float>();
  e.bias = bias ? bias->data_ptr<float>() : nullptr;
  e.activation = activation;
  e.residual = residual ? residual->data_ptr<float>() : nullptr;
  e.residual_stride = residual ? residual->stride(0) : 0;
  e.out_scale = out_scale ? out_scale->data_ptr<float>() : nullptr;
  e.out_scale_per_column = out_scale && out_scale->numel() == N && N != 1;
  e.out_float = out_scale ? nullptr : out.data_ptr<float>();
  e.out_int8 = out_scale ? out.data_ptr<int8_t>() : nullptr;
  e.out_stride = N;
  return e;
}

torch::Tensor empty_output(const torch::Tensor& like, int64_t M, int64_t N, bool quantized) {
  return torch::empty({M, N}, like.options().dtype(quantized ? at::kChar : at::kFloat));
}

}  // namespace

namespace {

// The GEMM with its epilogue; `multiplier` (float32 [M, N] contiguous, or undefined) multiplies the activation's
// output.
torch::Tensor run_linear(const torch::Tensor& x, const torch::Tensor& x_scale, const torch::Tensor& w,
                         const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias,
                         const c10::optional<torch::Tensor>& residual, const c10::optional<torch::Tensor>& out_scale,
                         int64_t activation, const torch::Tensor& multiplier) {
#ifdef CPU_CAPABILITY_AVX512
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar && x.is_contiguous(),
              "quantized_linear (CPU): x must be a contiguous int8 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.stride(1) == 1 && w.size(1) == x.size(1),
              "quantized_linear (CPU): w must be int8 [N, K] with contiguous rows and K = ", x.size(1), ", got ",
              w.sizes(), " strides ", w.strides());
  TORCH_CHECK(x.size(1) % 16 == 0, "quantized_linear (CPU): the VNNI GEMM takes K a multiple of 16, got ", x.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  torch::Tensor out = empty_output(x, M, N, out_scale.has_value());
  Epilogue e = make_epilogue(M, N, x_scale, w_scale, bias, residual, out_scale, activation, out);
  e.multiplier = multiplier.defined() ? multiplier.data_ptr<float>() : nullptr;
  if (M > 0 && N > 0) {
    if (K == 0) {
      std::vector<int32_t> zeros(M * N, 0);
      e.apply_block(zeros.data(), N, 0, M, 0, N);
    } else {
      gemm_with_epilogue(x.data_ptr<int8_t>(), M, K, w.data_ptr<int8_t>(), w.stride(0), N, e);
    }
  }
  return out;
#else
  TORCH_CHECK(false, "quantized_linear (CPU): this build has no VNNI GEMM (AVX2 build); use linear_epilogue");
#endif
}

torch::Tensor run_epilogue(const torch::Tensor& acc, const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                           const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual,
                           const c10::optional<torch::Tensor>& out_scale, int64_t activation,
                           const torch::Tensor& multiplier) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt && acc.is_contiguous(),
              "linear_epilogue (CPU): acc must be a contiguous int32 [M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  torch::Tensor out = empty_output(acc, M, N, out_scale.has_value());
  Epilogue e = make_epilogue(M, N, x_scale, w_scale, bias, residual, out_scale, activation, out);
  e.multiplier = multiplier.defined() ? multiplier.data_ptr<float>() : nullptr;
  const int32_t* a = acc.data_ptr<int32_t>();
  // rows in chunks worth a thread's start-up (at least ~16K outputs each)
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N));
  zqhero::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) { e.apply_block(a, N, begin, end, 0, N); });
  return out;
}

}  // namespace

// x [M, K] int8 contiguous, w [N, K] int8 with contiguous rows -> [M, N] float32 (out_scale None) or int8.
torch::Tensor quantized_linear(const torch::Tensor& x, const torch::Tensor& x_scale, const torch::Tensor& w,
                               const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias,
                               const c10::optional<torch::Tensor>& residual,
                               const c10::optional<torch::Tensor>& out_scale, int64_t activation) {
  return run_linear(x, x_scale, w, w_scale, bias, residual, out_scale, activation, torch::Tensor());
}

// The gated MLP front: act(x w_gate^T * x_scale * w_gate_scale) * (x w_up^T * x_scale * w_up_scale), float32 out or
// INT8 with out_scale: the up branch to float32 first, then the gate GEMM multiplies it in its epilogue.
torch::Tensor quantized_gated_linear(const torch::Tensor& x, const torch::Tensor& x_scale, const torch::Tensor& w_gate,
                                     const torch::Tensor& w_gate_scale, const torch::Tensor& w_up,
                                     const torch::Tensor& w_up_scale, const c10::optional<torch::Tensor>& out_scale,
                                     int64_t activation) {
  const auto up = run_linear(x, x_scale, w_up, w_up_scale, c10::nullopt, c10::nullopt, c10::nullopt, kNone,
                             torch::Tensor());
  return run_linear(x, x_scale, w_gate, w_gate_scale, c10::nullopt, c10::nullopt, out_scale, activation, up);
}

// The same epilogue on an int32 accumulator acc [M, N] (contiguous) computed elsewhere.
torch::Tensor linear_epilogue(const torch::Tensor& acc, const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                              const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual,
                              const c10::optional<torch::Tensor>& out_scale, int64_t activation) {
  return run_epilogue(acc, x_scale, w_scale, bias, residual, out_scale, activation, torch::Tensor());
}

// quantized_gated_linear's epilogue on the two int32 accumulators computed elsewhere.
torch::Tensor gated_epilogue(const torch::Tensor& acc_gate, const torch::Tensor& acc_up, const torch::Tensor& x_scale,
                             const torch::Tensor& w_gate_scale, const torch::Tensor& w_up_scale,
                             const c10::optional<torch::Tensor>& out_scale, int64_t activation) {
  const auto up = run_epilogue(acc_up, x_scale, w_up_scale, c10::nullopt, c10::nullopt, c10::nullopt, kNone,
                               torch::Tensor());
  return run_epilogue(acc_gate, x_scale, w_gate_scale, c10::nullopt, c10::nullopt, out_scale, activation, up);
}

std::vector<torch::Tensor> norm_quant(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                      const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                                      double eps, bool emit_normed, bool emit_sum, bool rms);
std::vector<torch::Tensor> embedding_norm_quant(const std::vector<torch::Tensor>& indices,
                                                const std::vector<torch::Tensor>& tables,
                                                const std::vector<torch::Tensor>& scales, const torch::Tensor& weight,
                                                const c10::optional<torch::Tensor>& bias, double eps,
                                                bool emit_normed);
std::vector<torch::Tensor> quantize_per_token(const torch::Tensor& x);
torch::Tensor quantize_static(const torch::Tensor& x, const torch::Tensor& scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step_downs", []() { return zqhero::step_downs().load(); });
  m.def("quantized_linear", &quantized_linear);
  m.def("linear_epilogue", &linear_epilogue);
  m.def("quantized_gated_linear", &quantized_gated_linear);
  m.def("gated_epilogue", &gated_epilogue);
  m.def("norm_quant", &norm_quant);
  m.def("embedding_norm_quant", &embedding_norm_quant);
  m.def("quantize_per_token", &quantize_per_token);
  m.def("quantize_static", &quantize_static);
}
