// A8W4 (DGQ) GEMM on AVX-512 VNNI: int8 activations x unsigned INT4 weight codes with a zero point and integer group
// scales, W8[n, k] = s[n, g] * (code[n, k] - z[n, g]), g = k / group_size, an INT8 weight (the quantizer bounds it to
// [-127, 127]). Exact int32 accumulators out; the epilogue runs in Python (kernels/packed_linear.py `epilogue`). Built
// just in time by zqhero_fx/kernels/a8w4_cpu.py with torch.utils.cpp_extension.load (the name hashes this file).
//
// The weight is read as stored (row-major [N, K/2] nibbles, low nibble first) and never expanded to a full-size copy.
// group_size is a multiple of 16. Two paths:
//
//  * decode (M <= kDecodeRows): the codes go straight into the dot products, no INT8 weight at all. 64 bytes of codes
//    (128 k) split into their low and high nibbles, the codes of the even and the odd k; x is split the same way once
//    per call. vpmaddubsw(codes as u8, x as s8) sums code x x over pairs of k (|.| <= 2 * 15 * 128, no saturation),
//    the even and odd halves add up to the sum over 4 consecutive k, and vpdpwssd multiplies that by the group scale
//    s and accumulates (a 32-bit lane covers 8 consecutive k, inside one group). sum_g s z sum_{k in g} x takes the
//    zero point back out. Dot-product orientation: tiles of R rows of x x 16 / R weight rows, 16 accumulators of
//    16 lanes, horizontal sums once per tile. A few instructions per 128 weights, reading half the bytes of INT8.
//  * prefill (M > kDecodeRows): blocks of 64 output channels x up to 2048 k are expanded to W8 + 128 (vpdpbusd's
//    unsigned operand) in a per-thread buffer that stays in cache, in the VNNI layout [k/4][64 channels][4 k]: one
//    16-byte table per (row, group), T[c] = s (c - z) + 128, looked up for 64 codes at a time by vpshufb (a 128-bit
//    lane's 16 k share a group, so a lane holds its group's table), then 16 rows x 64 k transposed as 16 x 16 words.
//    Register tiles of 6 rows x 64 channels run vpdpbusd(acc, W8 + 128, 4 bytes of x broadcast), one instruction
//    per 64 multiply-adds, accumulating into the int32 output across k blocks; the first block's sums start from
//    -128 sum_k x[m, k], which takes the +128 back out exactly.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include "cpu_parallel.h"
#include "vnni_tiles.h"

namespace {

// Up to this many rows of x: the decode path. With more, its per-row cost (two vpmaddubsw and a vpdpwssd per 128
// weights) overtakes expanding the weight once for all rows (measured crossover: 4 rows at SmolLM2's 576 x 1536, 6 at
// 4096 x 4096).
constexpr int64_t kDecodeRows = 4;
constexpr int64_t kCodeChunk = 128;  // decode: k per 64-byte vector of codes
constexpr int64_t kChunk = 64;       // prefill: k per 64-byte vector of expanded weights
constexpr int64_t kBlockCols = 64;   // prefill: channels per block, 4 vectors of 16
// prefill: k per block (64 x 2048 bytes of expanded weights: 128 KiB, in L2). Deep blocks keep a register tile on one
// output tile for long (each block adds to the int32 output once); at 4096 x 4096, 512 rows, blocks of 576 k took a
// quarter longer.
constexpr int64_t kMaxBlockDepth = 2048;
constexpr int64_t kPanelBlocks = 4;  // prefill: blocks of channels expanded together, sharing each slice of x
constexpr int64_t kChunkRows = 192;  // prefill: rows of x per slice (at most 192 x 2048 bytes, in L2), a multiple of 6
// prefill: fewest rows of x one thread expands a panel for (below that, a thread idle for part of the call costs
// less than expanding the weight twice)
constexpr int64_t kMinRowsPerPart = 256;

using zqhero::Accumulators;
using zqhero::each;
using zqhero::low_bits;
using zqhero::row_shifts;
using zqhero::settled;
using zqhero::tile_rows;
using zqhero::kTileRows;
using zqhero::transpose_16x16_words;

// ---------------------------------------------------------------- decode
// Per 128-k chunk of codes: g0, the group of its first k, and (group_size not a multiple of 128) which of the
// groups g0 .. g0 + 15 each 32-bit lane (8 consecutive k) belongs to. The same for every row.
struct CodeChunks {
  std::vector<int64_t> first;
  std::vector<int32_t> lane_group;  // 16 per chunk
  bool uniform = true;              // every chunk within one group
};

CodeChunks code_chunks(int64_t K, int64_t group_size, int64_t groups) {
  const int64_t chunks = (K + kCodeChunk - 1) / kCodeChunk;
  CodeChunks map;
  map.first.resize(chunks);
  map.lane_group.resize(16 * chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    map.first[c] = c * kCodeChunk / group_size;
    for (int64_t lane = 0; lane < 16; ++lane) {
      // lanes past K (the last chunk) may read any valid group: their x is zero
      const int64_t g = std::min((c * kCodeChunk + 8 * lane) / group_size, groups - 1);
      map.lane_group[16 * c + lane] = (int32_t)(g - map.first[c]);
      if (g != map.first[c]) map.uniform = false;
    }
  }
  return map;
}

// x rows split into their even and odd k (the order of the codes' low and high nibbles): xe[r][i] = x[r][2i],
// xo[r][i] = x[r][2i + 1], zero past K (rows of `half` = round_up(K, 128) / 2 bytes).
void split_even_odd(const int8_t* x, int64_t rows, int64_t K, int64_t half, int8_t* xe, int8_t* xo) {
  // within each 128-bit lane: the 8 even bytes, then the 8 odd ones; then the lanes' even halves, the odd halves
  const __m512i bytes = _mm512_set_epi8(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0,
                                        15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0,
                                        15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0,
                                        15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i halves = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < 2 * half; k += 64) {
      const __m512i v = _mm512_maskz_loadu_epi8(low_bits(std::max<int64_t>(0, K - k)), x + r * K + k);
      const __m512i split = _mm512_permutexvar_epi64(halves, _mm512_shuffle_epi8(v, bytes));
      _mm256_storeu_si256((__m256i*)(xe + r * half + k / 2), _mm512_castsi512_si256(split));
      _mm256_storeu_si256((__m256i*)(xo + r * half + k / 2), _mm512_extracti64x4_epi64(split, 1));
    }
  }
}

// sums[r * stride + g] = sum of x[r, k] over group g (zero past the last group): psadbw sums 8 bytes at a time.
void group_sums(const int8_t* x, int64_t rows, int64_t K, int64_t group_size, int32_t* sums, int64_t stride) {
  std::vector<int64_t> eights((K + 63) / 64 * 8);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < K; k += 64) {
      const __m512i v = _mm512_maskz_loadu_epi8(low_bits(K - k), x + r * K + k);
      // x + 128 as unsigned bytes (masked-off bytes come in as 0x80, i.e. x = 0)
      _mm512_storeu_si512(eights.data() + k / 8, _mm512_sad_epu8(_mm512_xor_si512(v, _mm512_set1_epi8((char)0x80)),
                                                               _mm512_setzero_si512()));
    }
    std::fill(sums + r * stride, sums + (r + 1) * stride, 0);
    for (int64_t e = 0; e < K / 8; ++e) sums[r * stride + 8 * e / group_size] += (int32_t)eights[e] - 8 * 128;
  }
}

// Sixteen vectors -> one vector of their sixteen horizontal sums, in order (two unpack rounds sum within 128-bit
// lanes, two lane shuffles across them).
inline __m512i sum16(const __m512i v[16]) {
  __m512i a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // lane L of b[i]: the lane-L sums of v[4i .. 4i + 3]
    b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]),
                            _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  const __m512i d0 = _mm512_add_epi32(_mm512_shuffle_i32x4(b[0], b[1], 0x88), _mm512_shuffle_i32x4(b[0], b[1], 0xDD));
  const __m512i d1 = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2], b[3], 0x88), _mm512_shuffle_i32x4(b[2], b[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(d0, d1, 0x88), _mm512_shuffle_i32x4(d0, d1, 0xDD));
}

// The decode tile: R rows of x (split, rows of `half` bytes) against C = 16 / R weight rows (codes rows of K / 2
// bytes; scales as int32 words s | s << 16, rows of ls, each readable 16 words past its last group). zero_terms[C r
// + j] (a vector of s z sum_{k in g} x over groups) comes off before the horizontal sums. The int32 lanes may wrap
// on the way (s c can exceed 127 where s (c - z) does not); the result is exact modulo 2^32 and lies in int32's
// range, so it is exact.
template <int R, bool Uniform>
void decode_tile(const int8_t* xe, const int8_t* xo, int64_t half, const uint8_t* codes, int64_t K,
                 const int32_t* scales, int64_t ls, const CodeChunks& map, const __m512i* zero_terms, int64_t cols,
                 int32_t* out, int64_t ldo) {
  constexpr int C = 16 / R;
  const int64_t lc = K / 2, full = K / kCodeChunk, chunks = (K + kCodeChunk - 1) / kCodeChunk;
  const __mmask64 tail = low_bits(lc % 64);
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  Accumulators acc;
  each<R * C>([&](auto i) { acc.template at<i>() = _mm512_setzero_si512(); });
  for (int64_t c = 0; c < chunks; ++c) {
    const __mmask64 valid = c < full ? ~(__mmask64)0 : tail;
    const int64_t g0 = map.first[c];
    const __m512i lane_group = Uniform ? _mm512_setzero_si512() : _mm512_loadu_si512(map.lane_group.data() + 16 * c);
    each<C>([&](auto j) {
      // The next strip's line (its rows follow this strip's), into L2: each row alone is too short a stream for the
      // hardware prefetcher to follow (2 KiB at K = 4096), and a decode step's weight comes from memory.
      _mm_prefetch((const char*)(codes + (C + j) * lc + 64 * c), _MM_HINT_T1);
      const __m512i packed = _mm512_maskz_loadu_epi8(valid, codes + j * lc + 64 * c);
      const __m512i even = _mm512_and_si512(packed, low_nibbles);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
      const int32_t* s = scales + j * ls + g0;
      const __m512i s_lanes = Uniform ? _mm512_set1_epi32(*s)
                                      : _mm512_permutexvar_epi32(lane_group, _mm512_loadu_si512(s));
      each<R>([&](auto r) {
        const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(even, _mm512_loadu_si512(xe + r * half + 64 * c)),
                                               _mm512_maddubs_epi16(odd, _mm512_loadu_si512(xo + r * half + 64 * c)));
        __m512i& a = acc.template at<C * r + j>();
        a = _mm512_dpwssd_epi32(a, pairs, s_lanes);
      });
    });
  }
  Accumulators totals = settled<R * C>(acc);
  __m512i all[16];
  each<16>([&](auto i) {
    if constexpr (i < R * C) {
      all[i] = _mm512_sub_epi32(totals.template at<i>(), zero_terms[i]);
    } else {
      all[i] = _mm512_setzero_si512();
    }
  });
  alignas(64) int32_t sums[16];
  _mm512_store_si512(sums, sum16(all));
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < std::min<int64_t>(C, cols); ++j) out[r * ldo + j] = sums[C * r + j];
}

// For the strip's weight rows j < rows: scales[j * ls + g] = s | s << 16 (vpdpwssd's two 16-bit factors), and
// terms[C r + j] = the lanes of sum_g s z x_sums[r, g], 16 groups at a time: what the zero point adds to the code dot
// products.
template <int R>
void strip_scales(const uint8_t* zero, const int8_t* scale, int64_t G, int64_t rows, const int32_t* x_sums,
                  int64_t sums_stride, int32_t* scales, int64_t ls, __m512i* terms) {
  constexpr int C = 16 / R;
  for (int i = 0; i < 16; ++i) terms[i] = _mm512_setzero_si512();
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask64 take = low_bits(std::min<int64_t>(16, G - g));
      const __m512i z = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(_mm512_maskz_loadu_epi8(take, zero + j * G + g)));
      const __m512i s = _mm512_cvtepi8_epi32(_mm512_castsi512_si128(_mm512_maskz_loadu_epi8(take, scale + j * G + g)));
      // (s & 0xFFFF) | s << 16
      const __m512i both = _mm512_ternarylogic_epi32(s, _mm512_slli_epi32(s, 16), _mm512_set1_epi32(0xFFFF), 0xEC);
      _mm512_storeu_si512(scales + j * ls + g, both);
      const __m512i sz = _mm512_mullo_epi32(s, z);
      for (int r = 0; r < R; ++r)
        terms[C * r + j] = _mm512_add_epi32(terms[C * r + j],
                                            _mm512_mullo_epi32(sz, _mm512_loadu_si512(x_sums + r * sums_stride + g)));
    }
  }
}

struct DecodeScratch {
  std::vector<int32_t> scales;
  std::vector<uint8_t> codes;
};

template <int R>
void decode(const int8_t* x, int64_t K, const uint8_t* codes, const uint8_t* zero, const int8_t* scale, int64_t G,
            int64_t group_size, int64_t N, int32_t* out) {
  constexpr int C = 16 / R;
  const CodeChunks map = code_chunks(K, group_size, G);
  const int64_t half = (K + kCodeChunk - 1) / kCodeChunk * kCodeChunk / 2, sums_stride = (G + 15) / 16 * 16;
  std::vector<int8_t> xe(R * half), xo(R * half);
  std::vector<int32_t> x_sums(R * sums_stride);
  split_even_odd(x, R, K, half, xe.data(), xo.data());
  group_sums(x, R, K, group_size, x_sums.data(), sums_stride);
  const int64_t strips = (N + C - 1) / C, ls = (G + 15) / 16 * 16 + 16, lc = K / 2;
  zqhero::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
    thread_local DecodeScratch scratch;
    if ((int64_t)scratch.scales.size() < C * ls) scratch.scales.resize(C * ls);
    int32_t* scales = scratch.scales.data();
    for (int64_t strip = begin; strip < end; ++strip) {
      const int64_t n0 = strip * C, cols = std::min<int64_t>(C, N - n0);
      alignas(64) __m512i terms[16];
      strip_scales<R>(zero + n0 * G, scale + n0 * G, G, cols, x_sums.data(), sums_stride, scales, ls, terms);
      const uint8_t* rows = codes + n0 * lc;
      if (cols < C) {
        if ((int64_t)scratch.codes.size() < C * lc) scratch.codes.resize(C * lc);
        for (int64_t j = 0; j < C; ++j)
          std::memcpy(scratch.codes.data() + j * lc, codes + std::min(n0 + j, N - 1) * lc, lc);
        rows = scratch.codes.data();
      }
      if (map.uniform) {
        decode_tile<R, true>(xe.data(), xo.data(), half, rows, K, scales, ls, map, terms, cols, out + n0, N);
      } else {
        decode_tile<R, false>(xe.data(), xo.data(), half, rows, K, scales, ls, map, terms, cols, out + n0, N);
      }
    }
  });
}

// ---------------------------------------------------------------- prefill: expansion
// Four bytes from p (fewer, zero-filled, at the end of a row, which may end the tensor).
inline int32_t four_bytes(const void* p, int64_t available) {
  int32_t four = 0;
  if (available >= 4) {
    std::memcpy(&four, p, 4);
  } else {
    for (int64_t i = 0; i < available; ++i) four |= (int32_t)((const uint8_t*)p)[i] << (8 * i);
  }
  return four;
}

// tables[16 g + c] = s (c - z) + 128 as a byte (W8 + 128), four groups per vector, in 16-bit words: the low byte of
// (c - z) s depends only on the operands' low bytes. `tables` holds 16 * (round_up(groups, 4) + 4) bytes: the padding
// lets a chunk read 64 bytes from any group.
void build_tables(const uint8_t* zero, const int8_t* scale, int64_t groups, uint8_t* tables) {
  // bytes of lane j = j: group j's byte in every byte of lane j
  const __m512i lane_index = _mm512_set_epi32(0x03030303, 0x03030303, 0x03030303, 0x03030303, 0x02020202, 0x02020202,
                                              0x02020202, 0x02020202, 0x01010101, 0x01010101, 0x01010101, 0x01010101,
                                              0, 0, 0, 0);
  // 16-bit words of each lane: the even codes 0, 2, ..., 14 (the odd ones are one more)
  const __m512i even_codes = _mm512_set_epi16(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0,
                                              14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd_codes = _mm512_add_epi16(even_codes, _mm512_set1_epi16(1));
  for (int64_t g = 0; g < groups; g += 4) {
    const __m512i z_lanes = _mm512_shuffle_epi8(_mm512_set1_epi32(four_bytes(zero + g, groups - g)), lane_index);
    const __m512i s_lanes = _mm512_shuffle_epi8(_mm512_set1_epi32(four_bytes(scale + g, groups - g)), lane_index);
    const __m512i even = _mm512_mullo_epi16(_mm512_sub_epi16(even_codes, z_lanes), s_lanes);
    const __m512i odd = _mm512_mullo_epi16(_mm512_sub_epi16(odd_codes, z_lanes), s_lanes);
    const __m512i bytes = _mm512_mask_blend_epi8(0xAAAAAAAAAAAAAAAAull, even, _mm512_slli_epi16(odd, 8));
    _mm512_storeu_si512(tables + 16 * g, _mm512_xor_si512(bytes, _mm512_set1_epi8((char)0x80)));
  }
}

// Per 64-k chunk: g0, the group of its first k, and (group_size not a multiple of 64) the qword order that moves
// table g0 + i into each lane whose 16 k belong to group g0 + i. The same for every row.
struct ChunkTables {
  std::vector<int64_t> first;
  std::vector<int64_t> lane_order;  // 8 per chunk
  bool uniform = true;
};

ChunkTables chunk_tables(int64_t K, int64_t group_size, int64_t groups) {
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  ChunkTables map;
  map.first.resize(chunks);
  map.lane_order.resize(8 * chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    map.first[c] = c * kChunk / group_size;
    for (int64_t lane = 0; lane < 4; ++lane) {
      const int64_t i = std::min((c * kChunk + 16 * lane) / group_size, groups - 1) - map.first[c];
      map.lane_order[8 * c + 2 * lane] = 2 * i;
      map.lane_order[8 * c + 2 * lane + 1] = 2 * i + 1;
      if (i != 0) map.uniform = false;
    }
  }
  return map;
}

// 64 codes -> W8 + 128: the 32 code bytes widen to 16-bit words, (w | w << 4) & 0x0F0F leaves the low nibble in the
// low byte and moves the high one to the high byte, and vpshufb looks each code up in its lane's table.
template <bool Uniform>
inline __m512i expand_chunk(const uint8_t* codes, __mmask32 valid, const uint8_t* tables, int64_t first_group,
                            const ChunkTables& map, int64_t c) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(_mm512_maskz_loadu_epi8(valid, codes + 32 * c)));
  const __m512i nibbles =
      _mm512_ternarylogic_epi32(words, _mm512_slli_epi16(words, 4), _mm512_set1_epi16(0x0F0F), 0xA8);
  const uint8_t* t = tables + 16 * (map.first[c] - first_group);
  const __m512i lanes = Uniform ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)t))
                                : _mm512_permutexvar_epi64(_mm512_loadu_si512(map.lane_order.data() + 8 * c),
                                                           _mm512_loadu_si512(t));
  return _mm512_shuffle_epi8(lanes, nibbles);
}

// Channels n0 .. n0 + cols - 1 (cols <= 64; the rest of the block's 64 expand from zero codes and are never stored)
// x k in [k0, k0 + depth) -> block[(k - k0) / 4][64][4] bytes of W8 + 128. tables: the block's rows' tables from
// group first_group on, `stride` bytes apart.
template <bool Uniform>
void expand_block(const uint8_t* codes, int64_t K, int64_t n0, int64_t cols, int64_t k0, int64_t depth,
                  const uint8_t* tables, int64_t first_group, int64_t stride, const ChunkTables& map, uint8_t* block) {
  const int64_t lc = K / 2;
  for (int64_t v = 0; v < kBlockCols / 16; ++v) {
    for (int64_t k = k0; k < k0 + depth; k += kChunk) {
      const int64_t c = k / kChunk;
      const __mmask32 valid = (__mmask32)low_bits(std::min<int64_t>(32, (K - k) / 2));
      __m512i rows[16];
      for (int64_t t = 0; t < 16; ++t) {
        const int64_t j = 16 * v + t;
        _mm_prefetch((const char*)(codes + (n0 + j + 16) * lc + 32 * c), _MM_HINT_T0);  // the next 16 rows' codes
        rows[t] = j < cols
                      ? expand_chunk<Uniform>(codes + (n0 + j) * lc, valid, tables + j * stride, first_group, map, c)
                      : _mm512_setzero_si512();
      }
      transpose_16x16_words(rows);
      uint8_t* dst = block + (k - k0) / 4 * (4 * kBlockCols) + 64 * v;
      for (int64_t w = 0; w < 16; ++w) _mm512_storeu_si512(dst + w * 4 * kBlockCols, rows[w]);
    }
  }
}

// ---------------------------------------------------------------- prefill: GEMM
// R rows of x against a block of 64 channels over `quads` groups of 4 k (x read from its column k0): out[r, n] (stride
// ldo, the first `cols` channels) += sum_k (W8 + 128) x, starting from -shift[r] on the first k block.
template <int R>
void prefill_tile(const int8_t* x, int64_t K, const uint8_t* block, int64_t quads, bool first, const int32_t* shift,
                  int32_t* out, int64_t ldo, int64_t cols) {
  constexpr int V = kBlockCols / 16;
  if (!first) {  // the output tile this adds to, last touched a k block ago (a cache miss): fetched while it computes
    each<R>([&](auto r) {
      each<V>([&](auto v) { _mm_prefetch((const char*)(out + r * ldo + 16 * v), _MM_HINT_T0); });
    });
  }
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
  const bool whole = cols == kBlockCols;  // a whole block: no masks
  each<V>([&](auto v) {
    const __mmask16 keep = (__mmask16)low_bits(std::clamp<int64_t>(cols - 16 * (int64_t)v, 0, 16));
    each<R>([&](auto r) {
      int32_t* o = out + r * ldo + 16 * v;
      const __m512i before = first ? _mm512_set1_epi32(-shift[r])
                                   : whole ? _mm512_loadu_si512(o) : _mm512_maskz_loadu_epi32(keep, o);
      const __m512i total = _mm512_add_epi32(before, sums.template at<V * r + v>());
      if (whole) {
        _mm512_storeu_si512(o, total);
      } else {
        _mm512_mask_storeu_epi32(o, keep, total);
      }
    });
  });
}

void prefill_rows(int64_t rows, const int8_t* x, int64_t K, const uint8_t* block, int64_t quads, bool first,
                  const int32_t* shift, int32_t* out, int64_t ldo, int64_t cols) {
  switch (rows) {
    case 6: prefill_tile<6>(x, K, block, quads, first, shift, out, ldo, cols); break;
    case 5: prefill_tile<5>(x, K, block, quads, first, shift, out, ldo, cols); break;
    case 4: prefill_tile<4>(x, K, block, quads, first, shift, out, ldo, cols); break;
    case 3: prefill_tile<3>(x, K, block, quads, first, shift, out, ldo, cols); break;
    case 2: prefill_tile<2>(x, K, block, quads, first, shift, out, ldo, cols); break;
    default: prefill_tile<1>(x, K, block, quads, first, shift, out, ldo, cols); break;
  }
}

struct PrefillScratch {
  std::vector<uint8_t> tables, block;
};

inline uint8_t* at_least(std::vector<uint8_t>& v, int64_t size) {
  if ((int64_t)v.size() < size) v.resize(size);
  return v.data();
}

void prefill(const int8_t* x, int64_t M, int64_t K, const uint8_t* codes, const uint8_t* zero, const int8_t* scale,
             int64_t G, int64_t group_size, int64_t N, int32_t* out) {
  std::vector<int32_t> shift(M);
  row_shifts(x, M, K, shift.data());
  const ChunkTables map = chunk_tables(K, group_size, G);
  // K in equal blocks of whole chunks (SmolLM2's K = 576 and 1536 are one block each, 4096 two)
  const int64_t chunks = (K + kChunk - 1) / kChunk, k_blocks = (chunks * kChunk + kMaxBlockDepth - 1) / kMaxBlockDepth;
  const int64_t block_depth = (chunks + k_blocks - 1) / k_blocks * kChunk;
  // one row's tables for the groups a k block touches, and the padding a chunk's 64-byte read may cross
  const int64_t stride = 16 * (((block_depth + group_size - 1) / group_size + 1 + 3) / 4 * 4 + 4);
  // Work items: a panel of blocks of channels x a part of the rows. Panels of up to kPanelBlocks blocks (x is read
  // from memory once per panel) where that splits the blocks evenly over the threads, else single blocks; the rows
  // are split only where the blocks still do not split evenly and there are rows enough to pay for expanding a panel
  // once per part.
  const int64_t blocks = (N + kBlockCols - 1) / kBlockCols, threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t panel_blocks = kPanelBlocks;
  while (panel_blocks > 1 && blocks % (panel_blocks * threads) != 0) --panel_blocks;
  const int64_t panels = (blocks + panel_blocks - 1) / panel_blocks, panel_cols = panel_blocks * kBlockCols;
  const int64_t parts = std::max<int64_t>(1, std::min(threads / std::gcd(panels, threads), M / kMinRowsPerPart));
  const int64_t part_rows = (M + parts - 1) / parts, block_bytes = block_depth * kBlockCols;
  zqhero::parallel_for(0, panels * parts, 1, [&](int64_t begin, int64_t end) {
    thread_local PrefillScratch scratch;
    uint8_t* tables = at_least(scratch.tables, panel_cols * stride);
    uint8_t* panel = at_least(scratch.block, panel_blocks * block_bytes);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n_begin = item / parts * panel_cols, n_end = std::min(N, n_begin + panel_cols);
      const int64_t m_begin = item % parts * part_rows, m_end = std::min(M, m_begin + part_rows);
      for (int64_t k0 = 0; k0 < K; k0 += block_depth) {
        const int64_t depth = std::min(block_depth, K - k0);
        const int64_t first_group = k0 / group_size, groups = (k0 + depth - 1) / group_size + 1 - first_group;
        for (int64_t n = n_begin; n < n_end; ++n)
          build_tables(zero + n * G + first_group, scale + n * G + first_group, groups,
                       tables + (n - n_begin) * stride);
        for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockCols) {
          const uint8_t* block_tables = tables + (n0 - n_begin) * stride;
          uint8_t* block = panel + (n0 - n_begin) / kBlockCols * block_bytes;
          const int64_t cols = std::min(kBlockCols, n_end - n0);
          if (map.uniform) {
            expand_block<true>(codes, K, n0, cols, k0, depth, block_tables, first_group, stride, map, block);
          } else {
            expand_block<false>(codes, K, n0, cols, k0, depth, block_tables, first_group, stride, map, block);
          }
        }
        // a block of expanded weights stays in L1 for a chunk of rows, whose x slice stays in L2 for the panel
        for (int64_t mc = m_begin; mc < m_end; mc += kChunkRows) {
          for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockCols) {
            const uint8_t* block = panel + (n0 - n_begin) / kBlockCols * block_bytes;
            for (int64_t m0 = mc, rows; m0 < std::min(m_end, mc + kChunkRows); m0 += rows) {
              rows = tile_rows(std::min(m_end, mc + kChunkRows) - m0);
              prefill_rows(rows, x + m0 * K + k0, K, block, depth / 4, k0 == 0, shift.data() + m0,
                           out + m0 * N + n0, N, std::min(kBlockCols, n_end - n0));
            }
          }
        }
      }
    }
  });
}

}  // namespace

// x [M, K] int8 (contiguous), codes [N, K / 2] uint8 (two codes per byte, low nibble first), zero [N, G] uint8,
// scale [N, G] int8 (G = K / group_size, group_size a multiple of 16) -> [M, N] int32 = x . W8^T, exact where every
// s (code - z) lies in [-127, 127] (the quantizer's bound).
torch::Tensor a8w4_gemm(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& zero,
                        const torch::Tensor& scale, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar && x.is_contiguous(), "a8w4_gemm: x must be a contiguous "
              "int8 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(1) * 2 == K,
              "a8w4_gemm: codes must be a contiguous uint8 [N, K / 2]");
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0 && K % group_size == 0, "a8w4_gemm: group_size ", group_size,
              " must be a multiple of 16 dividing K = ", K);
  const int64_t G = K / group_size;
  TORCH_CHECK(zero.scalar_type() == at::kByte && scale.scalar_type() == at::kChar && zero.is_contiguous() &&
                  scale.is_contiguous() && zero.dim() == 2 && scale.dim() == 2 && zero.size(0) == N &&
                  scale.size(0) == N && zero.size(1) == G && scale.size(1) == G,
              "a8w4_gemm: zero (uint8) and scale (int8) must be contiguous [N, K / group_size]");
  auto out = torch::empty({M, N}, x.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const int8_t* xd = x.data_ptr<int8_t>();
  const uint8_t* cd = codes.data_ptr<uint8_t>();
  const uint8_t* zd = zero.data_ptr<uint8_t>();
  const int8_t* sd = scale.data_ptr<int8_t>();
  int32_t* od = out.data_ptr<int32_t>();
  switch (M) {  // decode up to kDecodeRows rows: the tile shape is a template parameter
    case 1: decode<1>(xd, K, cd, zd, sd, G, group_size, N, od); break;
    case 2: decode<2>(xd, K, cd, zd, sd, G, group_size, N, od); break;
    case 3: decode<3>(xd, K, cd, zd, sd, G, group_size, N, od); break;
    case 4: decode<4>(xd, K, cd, zd, sd, G, group_size, N, od); break;
    default: prefill(xd, M, K, cd, zd, sd, G, group_size, N, od); break;
  }
  static_assert(kDecodeRows == 4, "a decode case per row count");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("a8w4_gemm", torch::wrap_pybind_function(a8w4_gemm), "a8w4_gemm");
}
