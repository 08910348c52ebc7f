// The float-unpack CPU GEMM of zqhero::packed_linear: FP6 E3M2 "4+2" weight-only and W4A8 (FP4 E2M1 / INT4 codes
// with power-of-two group scales). Built just in time by zqhero_fx/kernels/lowbit_float_cpu.py with
// torch.utils.cpp_extension.load (flags: lowbit_float_cpu.CPP_FLAGS); the extension's name carries a hash of this file.
//
// acc[m, n] = sum_k x[m, k] * f[n, k / group_size] * v[n, k] in float32, v the code's value (weights.py), f the group
// factor 2**e (1 for FP6). The weight is never expanded: a decoder turns one chunk of one row (128 features for FP6,
// 64 for 4-bit codes) into float32 vectors in registers, which are multiplied at once (few rows of x) or through a
// small panel buffer that stays in cache (many rows). Every decoded weight is exact in float32 (E3M2 / E2M1 / INT4
// values have at most 3 significant bits, and 2**e scales exactly), and the caller widens x to float32 exactly, so
// every product is the reference's and only the order of the float32 summation differs from it.
//
// The decoders work on the packed bytes as they are, in a feature order of their own (`feature(v, d)`: vector v, lane
// d of a chunk); x is permuted the same way once per call (permute_x), so nothing else needs shuffling:
//   * FP6: a 16-bit lane w holds the nibble word of features 4w .. 4w+3 (lo4 stream) and, widened, their hi2 byte. For
//     each j = 0..3 two shifts and a select put the 6-bit code of feature 4w + j in bits 0-5, one permute looks the
//     bf16 magnitude up in a 32-entry table held in a register (VPERMW reads bits 0-4), the sign (bit 5) is OR-ed into
//     bit 15, and the even / odd 16-bit lanes become float32 by a shift / a mask: 32 weights in about 8 instructions.
//   * FP4 / INT4: a 32-bit lane i holds the nibbles of features 4i .. 4i+3; for each j a shift and a permute look the
//     float32 value up in a 16-entry table, times the lane's group factor 2**e.
//
// Two GEMM shapes on the decoders, both parallel over output channels on ATen's thread pool:
//   * rows_gemm (M < panel_rows_min: decode shapes, bound by decoding the weight): a register block of up to 8 rows x
//     2..8 channels accumulates 16-lane partial dot products over all of K, reduced once at the end;
//   * panel_gemm (more rows, bound by the multiplies): the rows of 96 channels x 256 features are decoded into a
//     per-thread buffer, and x^T (transposed once per call) multiplies it in register blocks of 6 channels x 64 rows
//     (the weight broadcast, x^T in vectors), so each weight is decoded once per call and never transposed.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu_parallel.h"

namespace {

enum Format : int64_t { kFp6E3M2 = 0, kFp4E2M1 = 1, kInt4 = 2 };  // lowbit_float_cpu.FORMAT_IDS

constexpr int64_t kFeatureStep = 64;   // K and the group sizes of 64 or more are multiples of it
constexpr int64_t kDotRowsMax = 8;     // rows per rows_gemm register block
constexpr int64_t kPanelChannels = 96; // panel_gemm: channels decoded per K-block (register blocks of 6, 8, 12, 24)
constexpr int64_t kPanelK = 256;       // panel_gemm: features per K-block (a 96 KiB panel, in L2)
constexpr int64_t kRowBlock = 64;      // panel_gemm: rows of x per register block (4 vectors of 16)

// |E3M2| by its 5-bit magnitude code (bias 3: subnormals m/16, normals 2**(e-3) * (1 + m/4)); the sign is bit 5.
alignas(64) constexpr float kFp6Magnitudes[32] = {
    0.0f, 0.0625f, 0.125f, 0.1875f, 0.25f, 0.3125f, 0.375f, 0.4375f, 0.5f, 0.625f, 0.75f, 0.875f,
    1.0f, 1.25f, 1.5f, 1.75f, 2.0f, 2.5f, 3.0f, 3.5f, 4.0f, 5.0f, 6.0f, 7.0f,
    8.0f, 10.0f, 12.0f, 14.0f, 16.0f, 20.0f, 24.0f, 28.0f};
// E2M1 by its 4-bit code (sign bit 3), and two's-complement INT4.
alignas(64) constexpr float kFp4Values[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
alignas(64) constexpr float kInt4Values[16] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f,
                                               -8.0f, -7.0f, -6.0f, -5.0f, -4.0f, -3.0f, -2.0f, -1.0f};

// 2**e for every int8 exponent, exactly (ldexp is exact, subnormal results included).
struct PowersOfTwo {
  float value[256];
  PowersOfTwo() {
    for (int e = -128; e < 128; ++e) value[e + 128] = std::ldexp(1.0f, e);
  }
  float operator()(int8_t e) const { return value[e + 128]; }
};
const PowersOfTwo kPowerOfTwo;

struct PackedWeight {
  const uint8_t* lo;        // [N, K/2] nibbles (FP6: the low 4 bits of each code)
  const uint8_t* hi;        // FP6: [N, K/4] top 2 bits, four per byte; else null
  const int8_t* exponent;   // [N, groups] group exponents e (factor 2**e), or null (factor 1)
  int64_t n, k, groups, group_size;  // group_size: 16, 32 or a multiple of 64
};

// ---------------------------------------------------------------- decoding
// The FP6 magnitudes as bf16 (the top half of each float32; exact: 3 significant bits).
struct Fp6Bf16Table {
  alignas(64) uint16_t magnitude[32];
  Fp6Bf16Table() {
    for (int i = 0; i < 32; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &kFp6Magnitudes[i], 4);
      magnitude[i] = (uint16_t)(bits >> 16);
    }
  }
};
const Fp6Bf16Table kFp6Bf16;

struct Fp6Decoder {
  static constexpr int64_t kFeatures = 128;  // per chunk: 64 lo4 bytes, 32 hi2 bytes
  static constexpr int kVectorsOut = 8;
  // out[2j + p], lane d: feature 8d + 4p + j (16-bit lane 2d + p of the j-th code vector)
  static constexpr int64_t feature(int v, int d) { return 8 * d + 4 * (v & 1) + (v >> 1); }

  const PackedWeight& w;
  const __m512i nibble_mask = _mm512_set1_epi16(0x0F);
  const __m512i sign_bit = _mm512_set1_epi16((int16_t)0x8000);
  const __m512i high_half = _mm512_set1_epi32((int32_t)0xFFFF0000u);
  const __m512i magnitudes = _mm512_load_si512(kFp6Bf16.magnitude);

  explicit Fp6Decoder(const PackedWeight& weight) : w(weight) {}

  inline void operator()(int64_t n, int64_t c, __m512 out[kVectorsOut]) const {
    const uint8_t* lo = w.lo + n * (w.k / 2) + c * (kFeatures / 2);
    const uint8_t* hi = w.hi + n * (w.k / 4) + c * (kFeatures / 4);
    __m512i nibbles, top;  // 16-bit lane w: features 4w .. 4w+3 (nibbles in bits 4j..4j+3, top bits in 2j, 2j+1)
    if ((c + 1) * kFeatures <= w.k) {
      nibbles = _mm512_loadu_si512(lo);
      top = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)));
    } else {  // K's last 64 features (K is a multiple of 64): the lanes past K decode to zeros
      nibbles = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)), 0);
      top = _mm512_cvtepu8_epi16(
          _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 0));
    }
    // j's top bits moved to bits 4-5; what lands in bits 0-3 is not selected below
    const __m512i high[4] = {_mm512_slli_epi16(top, 4), _mm512_slli_epi16(top, 2), top, _mm512_srli_epi16(top, 2)};
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i low = j == 0 ? nibbles : _mm512_srli_epi16(nibbles, 4 * j);
      const __m512i code = _mm512_ternarylogic_epi32(low, high[j], nibble_mask, 0xE4);  // nibble_mask ? low : high
      // VPERMW reads the 5-bit magnitude code (bits 0-4); the sign, bit 5, goes to bit 15
      const __m512i magnitude = _mm512_permutexvar_epi16(code, magnitudes);
      const __m512i bf16 = _mm512_ternarylogic_epi32(magnitude, _mm512_slli_epi16(code, 10), sign_bit,
                                                     0xF8);  // magnitude | (sign & sign_bit)
      out[2 * j] = _mm512_castsi512_ps(_mm512_slli_epi32(bf16, 16));
      out[2 * j + 1] = _mm512_castsi512_ps(_mm512_and_si512(bf16, high_half));
    }
  }
};

template <int64_t F>
struct NibbleDecoder {
  static constexpr int64_t kFeatures = 64;  // per chunk: 32 bytes
  static constexpr int kVectorsOut = 4;
  // out[j], lane i: feature 4i + j
  static constexpr int64_t feature(int v, int i) { return 4 * i + v; }

  const PackedWeight& w;
  const __m512 values = _mm512_load_ps(F == kFp4E2M1 ? kFp4Values : kInt4Values);
  // lane i's group within a chunk when groups are smaller than one (16 features: i / 4, 32: i / 8)
  const __m512i lane_group = _mm512_srli_epi32(
      _mm512_set_epi32(60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0), w.group_size == 16 ? 4 : 5);
  std::vector<int64_t> first_group;  // chunk c's first group (no division in the decode loop)

  explicit NibbleDecoder(const PackedWeight& weight) : w(weight), first_group(weight.k / kFeatures) {
    for (int64_t c = 0; c < w.k / kFeatures; ++c) first_group[c] = c * kFeatures / w.group_size;
  }

  // The group factors of row n for chunk c's lanes (lane i: features 4i .. 4i+3, one group).
  inline __m512 factors(int64_t n, int64_t c) const {
    const int8_t* e = w.exponent + n * w.groups;
    const int64_t first = first_group[c];
    if (w.group_size >= kFeatures) return _mm512_set1_ps(kPowerOfTwo(e[first]));
    alignas(16) float per_group[4];
    for (int64_t g = 0; g < kFeatures / w.group_size; ++g) per_group[g] = kPowerOfTwo(e[first + g]);
    return _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(_mm_load_ps(per_group)));
  }

  inline void operator()(int64_t n, int64_t c, __m512 out[kVectorsOut]) const {
    const __m512i nibbles = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.lo + n * (w.k / 2) + c * (kFeatures / 2))));
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)  // the permute reads bits 0-3 of each lane
      out[j] = _mm512_permutexvar_ps(j == 0 ? nibbles : _mm512_srli_epi32(nibbles, 4 * j), values);
    if (w.exponent != nullptr) {
      const __m512 f = factors(n, c);
      for (int j = 0; j < 4; ++j) out[j] = _mm512_mul_ps(out[j], f);
    }
  }
};

template <int64_t F>
using Decoder = std::conditional_t<F == kFp6E3M2, Fp6Decoder, NibbleDecoder<F>>;

// K rounded up to whole chunks: the row length of the permuted x.
template <class D>
int64_t padded_features(int64_t k) {
  return (k + D::kFeatures - 1) / D::kFeatures * D::kFeatures;
}

// x [M, K] -> xp [M, padded K] in the decoder's feature order: xp[m, c * kFeatures + 16v + d] = x[m, c * kFeatures +
// feature(v, d)], zero past K. Lane d of vector v holds feature S * d + feature(v, 0), S = kVectorsOut: a stride-S
// deinterleave of each chunk, done as log2(S) rounds of even / odd splits (two-source permutes, no gathers).
template <class D>
void permute_x(const float* x, int64_t m, int64_t k, float* xp) {
  constexpr int S = D::kVectorsOut, kRounds = S == 8 ? 3 : 2;
  static_assert(S == 4 || S == 8, "a power of two stride");
  const int64_t kp = padded_features<D>(k);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  // After the splits, vector r holds the features congruent to bitreverse(r) mod S: store it as the decoder's
  // vector with that residue.
  int destination[S];
  for (int r = 0; r < S; ++r) {
    int residue = 0;
    for (int b = 0; b < kRounds; ++b) residue |= ((r >> b) & 1) << (kRounds - 1 - b);
    for (int v = 0; v < S; ++v)
      if (D::feature(v, 0) == residue) destination[r] = v;
  }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c0 = 0; c0 < kp; c0 += D::kFeatures) {
      __m512 a[S];  // every loop here unrolled whole, so that a[] stays in registers
#pragma GCC unroll 8
      for (int i = 0; i < S; ++i)  // K is a multiple of 16: a vector is inside or past it
        a[i] = c0 + 16 * i < k ? _mm512_loadu_ps(x + r * k + c0 + 16 * i) : _mm512_setzero_ps();
#pragma GCC unroll 3
      for (int run = S; run > 1; run /= 2)  // split every run of `run` vectors into its evens, then its odds
#pragma GCC unroll 4
        for (int first = 0; first < S; first += run) {
          __m512 split[S];
#pragma GCC unroll 4
          for (int i = 0; i < run / 2; ++i) {
            split[i] = _mm512_permutex2var_ps(a[first + 2 * i], even, a[first + 2 * i + 1]);
            split[run / 2 + i] = _mm512_permutex2var_ps(a[first + 2 * i], odd, a[first + 2 * i + 1]);
          }
#pragma GCC unroll 8
          for (int i = 0; i < run; ++i) a[first + i] = split[i];
        }
#pragma GCC unroll 8
      for (int i = 0; i < S; ++i) _mm512_storeu_ps(xp + r * kp + c0 + 16 * destination[i], a[i]);
    }
}

// ---------------------------------------------------------------- rows_gemm: few rows
// acc[0..R) x [n0, n0 + C): partial dot products over all of K (channels past N decode row N - 1, never stored).
// xp: the permuted x, rows of kp (padded K) floats.
template <class D, int R, int C>
void rows_block(const D& decode, const float* xp, int64_t kp, int64_t n0, float* acc, int64_t ldc) {
  const int64_t n = decode.w.n;
  __m512 sum[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) sum[r][c] = _mm512_setzero_ps();
  for (int64_t chunk = 0; chunk < kp / D::kFeatures; ++chunk) {
    const float* x = xp + chunk * D::kFeatures;
#pragma GCC unroll 8  // unrolled whole, so that the accumulators stay in registers
    for (int c = 0; c < C; ++c) {
      __m512 value[D::kVectorsOut];
      decode(std::min(n0 + c, n - 1), chunk, value);
#pragma GCC unroll 8
      for (int v = 0; v < D::kVectorsOut; ++v)
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          sum[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * kp + 16 * v), value[v], sum[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C && n0 + c < n; ++c) acc[r * ldc + n0 + c] = _mm512_reduce_add_ps(sum[r][c]);
}

// Channels per register block for R rows: R x C accumulators, at most 16 (the decoder uses the other registers).
constexpr int channels_for(int rows) { return rows <= 2 ? 8 : rows <= 4 ? 4 : 2; }

template <class D, int R>
void rows_gemm_r(const D& decode, const float* xp, int64_t kp, int64_t begin, int64_t end, float* acc) {
  constexpr int C = channels_for(R);
  for (int64_t n0 = begin * C; n0 < std::min(end * C, decode.w.n); n0 += C)
    rows_block<D, R, C>(decode, xp, kp, n0, acc, decode.w.n);
}

// Blocks of up to kDotRowsMax rows, each parallel over channel groups (the weight is decoded once per block).
template <class D>
void rows_gemm(const float* xp, int64_t m, const PackedWeight& w, float* acc) {
  const int64_t kp = padded_features<D>(w.k);
  for (int64_t m0 = 0; m0 < m; m0 += kDotRowsMax) {
    const int64_t rows = std::min(kDotRowsMax, m - m0);
    const int64_t channels = channels_for((int)rows);
    const float* x = xp + m0 * kp;
    float* c = acc + m0 * w.n;
    zqhero::parallel_for(0, (w.n + channels - 1) / channels, 1, [&](int64_t begin, int64_t end) {
      const D decode(w);
      switch (rows) {
        case 8: rows_gemm_r<D, 8>(decode, x, kp, begin, end, c); break;
        case 7: rows_gemm_r<D, 7>(decode, x, kp, begin, end, c); break;
        case 6: rows_gemm_r<D, 6>(decode, x, kp, begin, end, c); break;
        case 5: rows_gemm_r<D, 5>(decode, x, kp, begin, end, c); break;
        case 4: rows_gemm_r<D, 4>(decode, x, kp, begin, end, c); break;
        case 3: rows_gemm_r<D, 3>(decode, x, kp, begin, end, c); break;
        case 2: rows_gemm_r<D, 2>(decode, x, kp, begin, end, c); break;
        default: rows_gemm_r<D, 1>(decode, x, kp, begin, end, c); break;
      }
    });
  }
}

// ---------------------------------------------------------------- panel_gemm: many rows
// Transposes 16 x 16 floats in registers: v[r] lane i -> v[i] lane r.
inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // t[2i] holds, in 128-bit lane L, columns 4L, 4L+1 of rows 2i, 2i+1 interleaved; t[2i+1] columns 4L+2, 4L+3
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[4 * i + h]), b = _mm512_castps_pd(t[4 * i + 2 + h]);
      v[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      v[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  // v[4q + s] holds, in 128-bit lane L, column 4L + s of rows 4q..4q+3: a 4 x 4 transpose of 128-bit lanes is left
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(v[i], v[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(v[i], v[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(v[8 + i], v[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(v[8 + i], v[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    v[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    v[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    v[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, AlignedFree>;

inline Buffer aligned_floats(int64_t count) {
  void* p = std::aligned_alloc(64, ((std::max<int64_t>(count, 16) + 15) / 16) * 64);  // whole cache lines
  if (p == nullptr) throw std::bad_alloc();
  return Buffer(static_cast<float*>(p));
}

inline __mmask16 lanes_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

// dst[j][i] = src[i][j] for i < rows, j < cols (row strides lds, ldd), in 16 x 16 register transposes. Each dst row
// is written up to i = dst_rows (>= rows), zeros past `rows`.
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd, int64_t dst_rows) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16)
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      __m512 block[16];
      const __mmask16 read = lanes_mask(cols - j0);
      for (int64_t i = 0; i < 16; ++i)
        block[i] = i0 + i < rows ? _mm512_maskz_loadu_ps(read, src + (i0 + i) * lds + j0) : _mm512_setzero_ps();
      transpose16(block);
      const __mmask16 write = lanes_mask(dst_rows - i0);
      for (int64_t j = 0; j < 16 && j0 + j < cols; ++j)
        _mm512_mask_storeu_ps(dst + (j0 + j) * ldd + i0, write, block[j]);
    }
}

// ct[R channels][16 V rows] (+)= w[R channels, kb] . xt[kb, 16 V rows]: the weight broadcast, x^T in vectors.
template <int R, int V>
inline void panel_block(const float* w, int64_t ldw, const float* xt, int64_t ldx, int64_t kb, float* ct,
                        int64_t ldc, bool accumulate) {
  __m512 acc[R][V];  // the loops over R and V unrolled whole, so that the accumulators stay in registers
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? _mm512_load_ps(ct + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < kb; ++p) {
    __m512 b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = _mm512_load_ps(xt + p * ldx + 16 * v);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(w[r * ldw + p]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_store_ps(ct + r * ldc + 16 * v, acc[r][v]);
}

// The panel's first `channels` (a multiple of 24) channels against the `blocks` x^T blocks from xt (block_floats
// apart; the last V vectors wide, the others kRowBlock), in register blocks of 24 / V channels x V vectors. Channels
// outside, blocks inside: the few channels' panel rows that the broadcasts read stay in L1 while the x^T blocks stream
// through it.
template <int V>
void panel_columns(const float* w, int64_t channels, const float* xt, int64_t block_floats, int64_t blocks,
                   int64_t kb, float* ct, int64_t ldc, bool accumulate) {
  constexpr int R = 24 / V;
  static_assert(kPanelChannels % 24 == 0, "whole register blocks");
  for (int64_t c0 = 0; c0 < channels; c0 += R)
    for (int64_t b = 0; b < blocks; ++b)
      panel_block<R, V>(w + c0 * kPanelK, kPanelK, xt + b * block_floats, kRowBlock, kb,
                        ct + c0 * ldc + b * kRowBlock, ldc, accumulate);
}

// Threads take contiguous runs of kPanelChannels-channel panels. Per panel and K-block, the panel's rows are decoded
// into a per-thread buffer (kPanelChannels x kPanelK floats), then every block of 64 rows of x^T (kPanelK x 64, from
// L2) runs through it; the sums build up in a per-thread ct [kPanelChannels, M] and are transposed into acc once per
// panel.
template <class D>
void panel_gemm(const float* x, int64_t m, const PackedWeight& w, float* acc) {
  static_assert(kPanelK % D::kFeatures == 0, "a panel holds whole chunks");
  const int64_t n = w.n, k = w.k, kp = padded_features<D>(k), mp = (m + 15) / 16 * 16;
  // x^T, permuted, by blocks of kRowBlock rows: xt[b][p][i] = xp[b * kRowBlock + i][p] (xp: permute_x's), zero from
  // M to mp. A block's [kPanelK, kRowBlock] slice, which a register block reads, is then contiguous (a row-major x^T
  // would put its rows M floats apart, in the same few L1 sets).
  const int64_t block_floats = kp * kRowBlock;
  Buffer xt = aligned_floats((mp + kRowBlock - 1) / kRowBlock * block_floats);
  zqhero::parallel_for(0, mp / 16, 1, [&](int64_t begin, int64_t end) {
    Buffer rows = aligned_floats(16 * kp);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t m0 = 16 * b, count = std::min<int64_t>(16, m - m0);
      permute_x<D>(x + m0 * k, count, k, rows.get());
      transpose(rows.get(), kp, count, kp, xt.get() + m0 / kRowBlock * block_floats + m0 % kRowBlock, kRowBlock, 16);
    }
  });
  zqhero::parallel_for(0, (n + kPanelChannels - 1) / kPanelChannels, 1, [&](int64_t begin, int64_t end) {
    const D decode(w);
    Buffer panel = aligned_floats(kPanelChannels * kPanelK);
    Buffer ct = aligned_floats(kPanelChannels * mp);  // the panel's sums, [channel][row]
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanelChannels, channels = std::min(kPanelChannels, n - n0);
      const int64_t live = (channels + 23) / 24 * 24;  // whole register blocks of every shape
      for (int64_t k0 = 0; k0 < kp; k0 += kPanelK) {
        const int64_t kb = std::min(kPanelK, kp - k0);
        for (int64_t c = 0; c < live; ++c)  // channels past N decode row N - 1 (never stored)
          for (int64_t chunk = 0; chunk < kb / D::kFeatures; ++chunk) {
            __m512 value[D::kVectorsOut];
            decode(std::min(n0 + c, n - 1), k0 / D::kFeatures + chunk, value);
            for (int v = 0; v < D::kVectorsOut; ++v)
              _mm512_store_ps(panel.get() + c * kPanelK + chunk * D::kFeatures + 16 * v, value[v]);
          }
        // the full blocks of kRowBlock rows, then the last one (16, 32 or 48 rows)
        const int64_t full = mp / kRowBlock, last = mp % kRowBlock / 16;
        const float* x = xt.get() + k0 * kRowBlock;
        panel_columns<4>(panel.get(), live, x, block_floats, full, kb, ct.get(), mp, k0 > 0);
        x += full * block_floats;
        float* sums = ct.get() + full * kRowBlock;
        switch (last) {
          case 3: panel_columns<3>(panel.get(), live, x, block_floats, 1, kb, sums, mp, k0 > 0); break;
          case 2: panel_columns<2>(panel.get(), live, x, block_floats, 1, kb, sums, mp, k0 > 0); break;
          case 1: panel_columns<1>(panel.get(), live, x, block_floats, 1, kb, sums, mp, k0 > 0); break;
          default: break;
        }
      }
      transpose(ct.get(), mp, channels, m, acc + n0, n, channels);
    }
  });
}

template <int64_t F>
void gemm(const float* x, int64_t m, const PackedWeight& w, int64_t panel_rows_min, float* acc) {
  using D = Decoder<F>;
  if (m >= panel_rows_min) {
    panel_gemm<D>(x, m, w, acc);
    return;
  }
  Buffer xp = aligned_floats(m * padded_features<D>(w.k));
  permute_x<D>(x, m, w.k, xp.get());
  rows_gemm<D>(xp.get(), m, w, acc);
}

}  // namespace

// x [M, K] float32; lo [N, K/2] uint8; hi [N, K/4] uint8 for FP6 (format 0), else None; exponent [N, K / group_size]
// int8 (group factors 2**e) or None; group_size 16, 32 or a multiple of 64 dividing K (K: one group per row); K a
// multiple of 64. M >= panel_rows_min takes panel_gemm, fewer rows rows_gemm. Returns acc [M, N] float32.
torch::Tensor lowbit_float_gemm(const torch::Tensor& x, const torch::Tensor& lo, const c10::optional<torch::Tensor>& hi,
                                const c10::optional<torch::Tensor>& exponent, int64_t group_size, int64_t format,
                                int64_t panel_rows_min) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "lowbit_float_gemm: x must be a contiguous 2-D float32 CPU tensor");
  const int64_t m = x.size(0), k = x.size(1), n = lo.size(0);
  TORCH_CHECK(k % kFeatureStep == 0, "lowbit_float_gemm: K=", k, " must be a multiple of ", kFeatureStep);
  TORCH_CHECK(lo.device().is_cpu() && lo.scalar_type() == at::kByte && lo.is_contiguous() && lo.dim() == 2 &&
                  lo.size(1) == k / 2,
              "lowbit_float_gemm: lo must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(format == kFp6E3M2 || format == kFp4E2M1 || format == kInt4, "lowbit_float_gemm: unknown format ",
              format);
  TORCH_CHECK(hi.has_value() == (format == kFp6E3M2), "lowbit_float_gemm: the hi2 stream goes with FP6 only");
  if (hi.has_value())
    TORCH_CHECK(hi->device().is_cpu() && hi->scalar_type() == at::kByte && hi->is_contiguous() && hi->dim() == 2 &&
                    hi->size(0) == n && hi->size(1) == k / 4,
                "lowbit_float_gemm: hi must be contiguous uint8 [N, K/4]");
  TORCH_CHECK(group_size > 0 && (group_size == 16 || group_size == 32 || group_size % kFeatureStep == 0) &&
                  k % group_size == 0,
              "lowbit_float_gemm: group_size=", group_size, " must be 16, 32 or a multiple of 64 dividing K=", k);
  const int64_t groups = k / group_size;
  if (exponent.has_value())
    TORCH_CHECK(exponent->device().is_cpu() && exponent->scalar_type() == at::kChar && exponent->is_contiguous() &&
                    exponent->dim() == 2 && exponent->size(0) == n && exponent->size(1) == groups,
                "lowbit_float_gemm: exponent must be contiguous int8 [N, K / group_size]");

  auto acc = torch::empty({m, n}, x.options());
  if (m == 0 || n == 0) return acc;
  if (k == 0) return acc.zero_();
  const PackedWeight w{lo.data_ptr<uint8_t>(), hi.has_value() ? hi->data_ptr<uint8_t>() : nullptr,
                       exponent.has_value() ? exponent->data_ptr<int8_t>() : nullptr, n, k, groups, group_size};
  switch (format) {
    case kFp6E3M2: gemm<kFp6E3M2>(x.data_ptr<float>(), m, w, panel_rows_min, acc.data_ptr<float>()); break;
    case kFp4E2M1: gemm<kFp4E2M1>(x.data_ptr<float>(), m, w, panel_rows_min, acc.data_ptr<float>()); break;
    default: gemm<kInt4>(x.data_ptr<float>(), m, w, panel_rows_min, acc.data_ptr<float>()); break;
  }
  return acc;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowbit_float_gemm", &lowbit_float_gemm,
        "x [M, K] float32 . (decoded FP6 / FP4 / INT4 weight)^T -> float32 [M, N] (AVX-512 F/BW)");
}
