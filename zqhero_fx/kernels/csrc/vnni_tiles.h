// Register-tile helpers shared by the AVX-512 VNNI kernels of zqhero_fx (a8w4_cpu.cpp, vnni_cpu.cpp,
// quantized_linear_cpu.cpp). Header-only; every file that includes it is compiled with AVX-512 F/BW/VNNI.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace zqhero {

// A mask of the low `n` bits (all 64 from n >= 64; none for n <= 0).
inline __mmask64 low_bits(int64_t n) {
  return n >= 64 ? ~(__mmask64)0 : n <= 0 ? (__mmask64)0 : (((__mmask64)1 << n) - 1);
}

// A tile's accumulators as named variables, each addressed by a compile-time index (`each` unrolls a loop into a
// fold): GCC (12) keeps named vectors in registers through the k loop, while an array of them, even fully unrolled,
// is copied between registers or spilled on every iteration (half the throughput or less).
struct Accumulators {
  __m512i v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15, v16, v17, v18, v19, v20, v21, v22, v23;
  template <size_t I>
  __m512i& at() {
    static_assert(I < 24, "24 accumulators");
    __m512i* const all[24] = {&v0,  &v1,  &v2,  &v3,  &v4,  &v5,  &v6,  &v7,  &v8,  &v9,  &v10, &v11,
                              &v12, &v13, &v14, &v15, &v16, &v17, &v18, &v19, &v20, &v21, &v22, &v23};
    return *all[I];
  }
};

template <typename F, size_t... I>
inline void each_of(F&& f, std::index_sequence<I...>) {
  (f(std::integral_constant<size_t, I>{}), ...);
}

// f(i) for i = 0 .. N - 1, each i a compile-time constant.
template <size_t N, typename F>
inline void each(F&& f) {
  each_of(f, std::make_index_sequence<N>{});
}

// Ends a tile's k loop: the empty asm makes each accumulator's value opaque to what follows. Without it GCC lets the
// stores after the loop (masked stores in particular) shape the accumulators' register allocation inside it, and the
// loop copies every accumulator between registers, or spills it, on each iteration.
template <size_t N>
inline Accumulators settled(Accumulators acc) {
  each<N>([&](auto i) { asm("" : "+v"(acc.template at<i>())); });
  return acc;
}

// Transposes 16 rows of 16 32-bit words in place: afterwards rows[w] holds word w of every input row, in row order.
inline void transpose_16x16_words(__m512i rows[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks within each 128-bit lane
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks: lane L of rows[i + j] is now word 4L + j of rows i..i+3
    rows[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    rows[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    rows[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    rows[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // gather the lanes: even lanes (0x88), odd lanes (0xdd)
    t[j] = _mm512_shuffle_i32x4(rows[j], rows[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(rows[j], rows[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_i32x4(rows[8 + j], rows[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(rows[8 + j], rows[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    rows[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    rows[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
    rows[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    rows[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

// Rows of x per register tile of the prefill GEMMs (6 rows x 4 vectors of 16 channels = 24 accumulators).
constexpr int kTileRows = 6;

// Rows for the next register tile out of `left`: full tiles of kTileRows, but the last 7 or 8 rows as two tiles of 4
// and 3 or 4 (a tile of one or two rows multiplies each loaded weight vector only once or twice).
inline int64_t tile_rows(int64_t left) { return left == 7 || left == 8 ? 4 : (left < kTileRows ? left : kTileRows); }

// 128 * sum_k x[m, k] for each of M rows of int8 x [M, K] (row stride K): what a +128 shift of the other operand of
// vpdpbusd (which multiplies u8 by s8) adds to every output of row m, to be taken back out.
inline void row_shifts(const int8_t* x, int64_t M, int64_t K, int32_t* shift) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64)
      acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(low_bits(K - k), x + m * K + k));
    shift[m] = 128 * _mm512_reduce_add_epi32(acc);
  }
}

}  // namespace zqhero
