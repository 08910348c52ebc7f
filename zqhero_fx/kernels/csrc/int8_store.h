// Storing float32 vectors as INT8 (and loading INT8 as float32), shared by the INT8 CPU kernels
// (quantized_linear_cpu.cpp, norm_quant_cpu.cpp, quantize_cpu.cpp). Compiled for AVX-512 or AVX2 (ATen's
// CPU_CAPABILITY_* macro says which).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace zqhero {

// `count` (<= the vector's lanes) int8 values from float values already rounded and clamped to [-127, 127]; NaN
// stores 0, as torch's float -> int8 cast does on the CPU.
inline void store_int8(at::vec::Vectorized<float> v, int8_t* dst, int64_t count) {
#ifdef CPU_CAPABILITY_AVX512
  const __m512 values = v;
  const __m512 finite = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(values, values, _CMP_ORD_Q), values);
  _mm_mask_storeu_epi8(dst, (__mmask16)((1u << count) - 1u), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(finite)));
#else
  const __m256 values = v;
  const __m256 finite = _mm256_and_ps(values, _mm256_cmp_ps(values, values, _CMP_ORD_Q));
  const __m256i words = _mm256_cvtps_epi32(finite);
  const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
  const __m128i bytes = _mm_packs_epi16(halves, halves);
  if (count == 8) {
    _mm_storel_epi64((__m128i*)dst, bytes);
  } else {
    int8_t all[16];
    _mm_storeu_si128((__m128i*)all, bytes);
    std::memcpy(dst, all, count);
  }
#endif
}

// `count` (<= the vector's lanes) int8 values widened to float32 (the rest of the lanes 0).
inline at::vec::Vectorized<float> load_int8_as_float(const int8_t* src, int64_t count) {
#ifdef CPU_CAPABILITY_AVX512
  const __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << count) - 1u), src);
  return at::vec::Vectorized<float>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
#else
  int64_t eight = 0;
  std::memcpy(&eight, src, count);
  return at::vec::Vectorized<float>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight))));
#endif
}

}  // namespace zqhero
