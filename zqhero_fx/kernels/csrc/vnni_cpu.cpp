// AVX-512 VNNI CPU kernels of zqhero_fx: the exact INT8 batched matmul (zqhero::int8_bmm) and the fused INT8
// attention kernel (zqhero::int8_attention on CPU tensors). Built just in time by zqhero_fx/kernels/vnni_cpu.py with
// torch.utils.cpp_extension.load (flags: vnni_cpu.CPP_FLAGS); the extension's name carries a hash of this file.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "vnni_tiles.h"

namespace {

constexpr int kRows = 4;      // output rows per register tile
constexpr int kVectors = 4;   // 16-column vectors per register tile (64 columns)

// C[r, 16v + j] = sum_g dot4(A[r, 4g..4g+3] + 128 as u8, Bp[g][16v + j][0..3] as s8) - comp[16v + j], where
// comp = 128 * colsum(B) takes the +128 shift back out exactly. Flipping the sign bit of an int8 adds 128.
template <int R, int V>
inline void tile(const int8_t* a, int64_t lda, const int8_t* bp, int64_t group_bytes, int64_t groups,
                 const int32_t* comp, int32_t* c, int64_t ldc, int64_t cols_left) {
  __m512i acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_si512(bp + g * group_bytes + 64 * v);
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, a + r * lda + 4 * g, 4);
      const __m512i a4 = _mm512_set1_epi32(word ^ (int32_t)0x80808080u);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], a4, b[v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    const int64_t left = cols_left - 16 * v;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    const __m512i shift = _mm512_loadu_si512(comp + 16 * v);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_epi32(c + r * ldc + 16 * v, mask, _mm512_sub_epi32(acc[r][v], shift));
  }
}

template <int R>
inline void row_block(const int8_t* a, int64_t lda, const int8_t* bp, int64_t groups, const int32_t* comp,
                      int32_t* c, int64_t n, int64_t n_padded) {
  for (int64_t n0 = 0; n0 < n_padded; n0 += 16 * kVectors) {
    const int64_t vectors = std::min<int64_t>(kVectors, (n_padded - n0) / 16);
    const int8_t* b = bp + 4 * n0;
    const int64_t group_bytes = 4 * n_padded;
    switch (vectors) {
      case 4: tile<R, 4>(a, lda, b, group_bytes, groups, comp + n0, c + n0, n, n - n0); break;
      case 3: tile<R, 3>(a, lda, b, group_bytes, groups, comp + n0, c + n0, n, n - n0); break;
      case 2: tile<R, 2>(a, lda, b, group_bytes, groups, comp + n0, c + n0, n, n - n0); break;
      default: tile<R, 1>(a, lda, b, group_bytes, groups, comp + n0, c + n0, n, n - n0); break;
    }
  }
}

// `rows` (1..kRows) output rows: the register-tile template for that many.
inline void rows_block(int64_t rows, const int8_t* a, int64_t lda, const int8_t* bp, int64_t groups,
                       const int32_t* comp, int32_t* c, int64_t n, int64_t n_padded) {
  switch (rows) {
    case 4: row_block<4>(a, lda, bp, groups, comp, c, n, n_padded); break;
    case 3: row_block<3>(a, lda, bp, groups, comp, c, n, n_padded); break;
    case 2: row_block<2>(a, lda, bp, groups, comp, c, n, n_padded); break;
    default: row_block<1>(a, lda, bp, groups, comp, c, n, n_padded); break;
  }
}

// B [K, N] (strides sk, sn) -> VNNI words packed[g * n_padded + n] = b[4g..4g+3, n], zero padded in K and N.
void pack_b(const int8_t* b, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t n_padded, int32_t* packed) {
  const int64_t full = K / 4, groups = (K + 3) / 4;
  std::fill(packed, packed + groups * n_padded, 0);
  if (sk == 1) {  // each 4-byte group is contiguous (B = K^T of a row-major K)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < full; ++g) std::memcpy(packed + g * n_padded + n, b + n * sn + 4 * g, 4);
  } else {  // interleave four rows of B
    for (int64_t g = 0; g < full; ++g) {
      const uint8_t* r0 = (const uint8_t*)b + (4 * g) * sk;
      const uint8_t* r1 = r0 + sk;
      const uint8_t* r2 = r1 + sk;
      const uint8_t* r3 = r2 + sk;
      int32_t* out = packed + g * n_padded;
      if (sn == 1) {
        for (int64_t n = 0; n < N; ++n)
          out[n] = (int32_t)((uint32_t)r0[n] | ((uint32_t)r1[n] << 8) | ((uint32_t)r2[n] << 16) | ((uint32_t)r3[n] << 24));
      } else {
        for (int64_t n = 0; n < N; ++n)
          out[n] = (int32_t)((uint32_t)r0[n * sn] | ((uint32_t)r1[n * sn] << 8) | ((uint32_t)r2[n * sn] << 16) |
                             ((uint32_t)r3[n * sn] << 24));
      }
    }
  }
  int8_t* bytes = (int8_t*)packed;
  for (int64_t k = 4 * full; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) bytes[(k / 4) * n_padded * 4 + n * 4 + (k % 4)] = b[k * sk + n * sn];
}

// The tiles read A in place when its rows are contiguous whole 4-byte groups.
inline bool a_in_place(int64_t sk, int64_t K) { return sk == 1 && K % 4 == 0; }

// Rows of A [rows, K] (strides sr, sk) for the tiles: in place (see a_in_place), else copied into `buffer`
// ([rows][k_padded], zero padded). Returns the rows to read and sets their stride.
inline const int8_t* a_rows_for_tiles(const int8_t* a, int64_t sr, int64_t sk, int64_t rows, int64_t K,
                                      int64_t k_padded, std::vector<int8_t>& buffer, int64_t* lda) {
  if (a_in_place(sk, K)) {
    *lda = sr;
    return a;
  }
  std::fill(buffer.begin(), buffer.end(), 0);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < K; ++k) buffer[m * k_padded + k] = a[m * sr + k * sk];
  *lda = k_padded;
  return buffer.data();
}

// comp[n] = 128 * sum_k B[k, n], from the packed words: dpbusd with all-ones u8 sums each word's four bytes.
void column_shift(const int32_t* packed, int64_t groups, int64_t n_padded, int32_t* comp) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t n0 = 0; n0 < n_padded; n0 += 16) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t g = 0; g < groups; ++g) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(packed + g * n_padded + n0));
    _mm512_storeu_si512(comp + n0, _mm512_slli_epi32(acc, 7));
  }
}

}  // namespace

// exp(x) for a vector, Cephes-style (range reduction to [-ln2/2, ln2/2], degree-5 polynomial, 2^n by exponent
// bits): within ~1 ulp of expf, like the Sleef exp Inductor's code calls; x < -87.3 (masked logits, -inf) gives 0.
inline __m512 exp512(__m512 x) {
  const __m512 underflow = _mm512_set1_ps(-87.33654f);
  const __mmask16 zero = _mm512_cmp_ps_mask(x, underflow, _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.37626f)), underflow);
  __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(~zero, y, _mm512_castsi512_ps(n));
}

inline __mmask16 head_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

using zqhero::transpose_16x16_words;

// K [N keys, D] with unit stride along D (every usual K layout) as B of Q.K^T in pack_b's VNNI layout:
// packed[g * n_padded + n] = k[n, 4g..4g+3], zero past the keys and past D. 16 keys x 64 bytes at a time, transposed
// in registers, so each store fills a whole cache line. (pack_b stores one word at a time to lines 4 * n_padded bytes
// apart; on a long key cache those crowd into a few L1 sets, and packing K took ~4x longer at Sk = 2048.) Writes every
// word, so needs no clearing first.
void pack_keys(const int8_t* k, int64_t key_stride, int64_t N, int64_t D, int64_t n_padded, int32_t* packed) {
  const int64_t groups = (D + 3) / 4;
  for (int64_t n0 = 0; n0 < n_padded; n0 += 16) {
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      const __mmask64 bytes = D - c0 >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (D - c0)) - 1);
      __m512i rows[16];
      for (int t = 0; t < 16; ++t)
        rows[t] = n0 + t < N ? _mm512_maskz_loadu_epi8(bytes, k + (n0 + t) * key_stride + c0) : _mm512_setzero_si512();
      transpose_16x16_words(rows);
      const int64_t words = std::min<int64_t>(16, groups - c0 / 4);
      for (int64_t w = 0; w < words; ++w) _mm512_storeu_si512(packed + (c0 / 4 + w) * n_padded + n0, rows[w]);
    }
  }
}

// Buffers of the attention kernel, one set per thread, kept between calls: a decode step (one query row per head
// against the whole key cache) would otherwise allocate and zero its packed K / V on every call. They only grow.
struct AttentionScratch {
  std::vector<int32_t> k_packed, k_shift, v_packed, v_shift, scores, pv;
  std::vector<int8_t> q_rows, p_rows;
  std::vector<float> logits;
};

inline AttentionScratch& attention_scratch() {
  thread_local AttentionScratch scratch;
  return scratch;
}

template <typename T>
inline T* at_least(std::vector<T>& buffer, int64_t size) {
  if ((int64_t)buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// The int8_attention reference without anything of size Sq x Sk stored: logits = (q.k^T) * qk_scale + mask (-inf
// where the boolean mask is False or causal hides a key), p_q = round(exp(l - rowmax) / p_scale) in [0, 127] (rowmax
// 0 when the row is all -inf), out = (p_q.v) * p_scale / rowsum (rowsum 1 when 0), then round(out / out_scale) to
// int8, or float32. Q.K^T and P.V are exact INT32 VNNI tiles (P's values 0..127 are valid int8, so the same sign-flip
// trick applies); only exp and the order of the row sum differ from the reference.
//
// q [B, H, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] (any strides; Hkv divides H: GQA, MQA at Hkv = 1); mask
// (float32 additive or bool keep-mask) and out_scale expanded to [B, H, Sq, Sk] and [B, H, Sq, Dv] (stride 0 on
// broadcast dims). Query head h reads K/V head h / (H / Hkv) in place. The work is the query rows that share one K/V
// head (its group's heads x Sq, head-major), cut into items of up to kRows rows; a thread packs a K/V head once for all
// the consecutive items it runs on it. With one row per head (decode), a group's heads fill one register tile, so the
// packed K and V serve several rows at once. Items shrink below kRows rows only when there would otherwise be fewer
// items than threads.
torch::Tensor int8_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const c10::optional<torch::Tensor>& mask, double qk_scale_d, double p_scale_d,
                             const c10::optional<torch::Tensor>& out_scale, bool is_causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "int8_attention: expected 4-D q, k, v");
  TORCH_CHECK(q.scalar_type() == at::kChar && k.scalar_type() == at::kChar && v.scalar_type() == at::kChar,
              "int8_attention: expected int8 q, k, v");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == Sk && k.size(3) == D,
              "int8_attention: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " do not pair");
  TORCH_CHECK(Hkv == H || (Hkv > 0 && H % Hkv == 0), "int8_attention: ", H, " query heads cannot share ", Hkv,
              " key/value heads");
  const bool quant_out = out_scale.has_value();
  auto out = torch::empty({B, H, Sq, Dv}, q.options().dtype(quant_out ? at::kChar : at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t group = H / Hkv;
  const float qk_scale = (float)qk_scale_d, p_scale = (float)p_scale_d;
  const std::vector<int64_t> sq(q.strides().begin(), q.strides().end()), sk(k.strides().begin(), k.strides().end()),
      sv(v.strides().begin(), v.strides().end());
  std::vector<int64_t> sm(4, 0), so(4, 0);
  const float* m_float = nullptr;
  const uint8_t* m_keep = nullptr;
  const float* o_base = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == B && mask->size(1) == H && mask->size(2) == Sq &&
                    mask->size(3) == Sk,
                "int8_attention: the mask must be expanded to [B, H, Sq, Sk]");
    if (mask->scalar_type() == at::kBool) {
      m_keep = (const uint8_t*)mask->data_ptr<bool>();
    } else {
      TORCH_CHECK(mask->scalar_type() == at::kFloat, "int8_attention: the mask must be float32 or bool");
      m_float = mask->data_ptr<float>();
    }
    sm.assign(mask->strides().begin(), mask->strides().end());
  }
  if (quant_out) {
    TORCH_CHECK(out_scale->scalar_type() == at::kFloat && out_scale->dim() == 4, "int8_attention: out_scale must be a "
                "float32 tensor expanded to [B, H, Sq, Dv]");
    o_base = out_scale->data_ptr<float>();
    so.assign(out_scale->strides().begin(), out_scale->strides().end());
  }
  const int64_t groups_d = (D + 3) / 4, d_padded = 4 * groups_d, sk_padded16 = (Sk + 15) / 16 * 16;
  const int64_t groups_k = (Sk + 3) / 4, k_padded4 = 4 * groups_k, dv_padded = (Dv + 15) / 16 * 16;
  const int8_t* q_base = q.data_ptr<int8_t>();
  const int8_t* k_base = k.data_ptr<int8_t>();
  const int8_t* v_base = v.data_ptr<int8_t>();
  char* out_base = (char*)out.data_ptr();
  const int64_t out_item = quant_out ? 1 : 4;

  const int64_t slices = B * Hkv, slice_rows = group * Sq, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows_per_thread = (slices * slice_rows + threads - 1) / threads;
  const int64_t rows_per_item = std::min<int64_t>(kRows, std::max<int64_t>(1, rows_per_thread));
  const int64_t items_per_slice = (slice_rows + rows_per_item - 1) / rows_per_item;
  zqhero::parallel_for(0, slices * items_per_slice, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch& scratch = attention_scratch();
    int32_t* kp = at_least(scratch.k_packed, groups_d * sk_padded16);
    int32_t* kcomp = at_least(scratch.k_shift, sk_padded16);
    int32_t* vp = at_least(scratch.v_packed, groups_k * dv_padded);
    int32_t* vcomp = at_least(scratch.v_shift, dv_padded);
    int32_t* scores = at_least(scratch.scores, kRows * Sk);
    int32_t* pv = at_least(scratch.pv, kRows * Dv);
    int8_t* q_rows = at_least(scratch.q_rows, kRows * d_padded);
    int8_t* p_rows = at_least(scratch.p_rows, kRows * k_padded4);
    float* logits = at_least(scratch.logits, sk_padded16);
    int64_t packed_slice = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slice = item / items_per_slice, b = slice / Hkv, kv_h = slice % Hkv;
      if (slice != packed_slice) {
        // K^T as B of Q.K^T ([D, Sk]: D strided by sk[3], keys by sk[2]); V as B of P.V ([Sk, Dv]).
        const int8_t* k_slice = k_base + b * sk[0] + kv_h * sk[1];
        if (sk[3] == 1) {
          pack_keys(k_slice, sk[2], Sk, D, sk_padded16, kp);
        } else {
          pack_b(k_slice, sk[3], sk[2], D, Sk, sk_padded16, kp);
        }
        column_shift(kp, groups_d, sk_padded16, kcomp);
        pack_b(v_base + b * sv[0] + kv_h * sv[1], sv[2], sv[3], Sk, Dv, dv_padded, vp);
        column_shift(vp, groups_k, dv_padded, vcomp);
        packed_slice = slice;
      }
      const int64_t row0 = (item % items_per_slice) * rows_per_item;
      const int64_t rows = std::min<int64_t>(rows_per_item, slice_rows - row0);
      int64_t head[kRows], query[kRows];
      // The item's query rows, possibly from several heads of the group, gathered into one zero-padded tile.
      for (int64_t r = 0; r < rows; ++r) {
        head[r] = kv_h * group + (row0 + r) / Sq;
        query[r] = (row0 + r) % Sq;
        const int8_t* src = q_base + b * sq[0] + head[r] * sq[1] + query[r] * sq[2];
        int8_t* dst = q_rows + r * d_padded;
        if (sq[3] == 1) {
          std::memcpy(dst, src, D);
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d * sq[3]];
        }
        std::fill(dst + D, dst + d_padded, (int8_t)0);
      }
      rows_block(rows, q_rows, d_padded, (const int8_t*)kp, groups_d, kcomp, scores, Sk, sk_padded16);
      float row_sum[kRows];
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = head[r], i = query[r];
        const int32_t* sc = scores + r * Sk;
        const int64_t mask_row = b * sm[0] + h * sm[1] + i * sm[2];
        const float* mrow = m_float ? m_float + mask_row : nullptr;
        const uint8_t* keep_row = m_keep ? m_keep + mask_row : nullptr;
        // The causal mask (aligned to the bottom-right corner, like the reference's tril(Sk - Sq)) hides every key
        // past the diagonal: those logits are -inf, their p_q 0, so the row stops there (0 keys: a fully masked row).
        const int64_t keys = is_causal ? std::min<int64_t>(Sk, std::max<int64_t>(0, Sk - Sq + i + 1)) : Sk;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < keys; j += 16) {
          const __mmask16 valid = head_mask(keys - j);
          __m512 l = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, sc + j)), _mm512_set1_ps(qk_scale));
          if (mrow) {
            __m512 mv;
            if (sm[3] == 1) {
              mv = _mm512_maskz_loadu_ps(valid, mrow + j);
            } else {
              alignas(64) float tmp[16] = {0};
              for (int64_t t = 0; t < 16 && j + t < keys; ++t) tmp[t] = mrow[(j + t) * sm[3]];
              mv = _mm512_load_ps(tmp);
            }
            l = _mm512_add_ps(l, mv);
          }
          if (keep_row) {  // the reference adds 0 where kept (exact) and -inf elsewhere
            __mmask16 keep;
            if (sm[3] == 1) {
              // 16 mask bytes in the low lane (masked-off bytes are not read): a keep bit per nonzero byte.
              keep = (__mmask16)_mm512_test_epi8_mask(_mm512_maskz_loadu_epi8((__mmask64)valid, keep_row + j),
                                                      _mm512_set1_epi8((char)0xFF));
            } else {
              keep = 0;
              for (int64_t t = 0; t < 16 && j + t < keys; ++t)
                if (keep_row[(j + t) * sm[3]]) keep |= (__mmask16)(1u << t);
            }
            l = _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), l);
          }
          _mm512_storeu_ps(logits + j, l);
          vmax = _mm512_mask_max_ps(vmax, valid, vmax, l);
        }
        float row_max = _mm512_reduce_max_ps(vmax);
        if (!std::isfinite(row_max)) row_max = 0.0f;
        __m512 vsum = _mm512_setzero_ps();
        int8_t* prow = p_rows + r * k_padded4;
        for (int64_t j = 0; j < keys; j += 16) {
          const __mmask16 valid = head_mask(keys - j);
          const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(logits + j), _mm512_set1_ps(row_max)));
          vsum = _mm512_mask_add_ps(vsum, valid, vsum, e);
          __m512 pq = _mm512_roundscale_ps(_mm512_div_ps(e, _mm512_set1_ps(p_scale)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          pq = _mm512_min_ps(_mm512_max_ps(pq, _mm512_setzero_ps()), _mm512_set1_ps(127.0f));
          _mm512_mask_cvtepi32_storeu_epi8(prow + j, valid, _mm512_cvtps_epi32(pq));
        }
        std::fill(prow + keys, prow + k_padded4, (int8_t)0);  // hidden keys, and the last VNNI word's padding
        row_sum[r] = _mm512_reduce_add_ps(vsum);
      }
      rows_block(rows, p_rows, k_padded4, (const int8_t*)vp, groups_k, vcomp, pv, Dv, dv_padded);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = head[r], i = query[r];
        const __m512 denom = _mm512_set1_ps(row_sum[r] > 0.0f ? row_sum[r] : 1.0f);
        char* orow = out_base + (((b * H + h) * Sq + i) * Dv) * out_item;
        const float* osrow = o_base ? o_base + b * so[0] + h * so[1] + i * so[2] : nullptr;
        for (int64_t d = 0; d < Dv; d += 16) {
          const __mmask16 valid = head_mask(Dv - d);
          __m512 o = _mm512_div_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, pv + r * Dv + d)),
                                                 _mm512_set1_ps(p_scale)), denom);
          if (!quant_out) {
            _mm512_mask_storeu_ps((float*)orow + d, valid, o);
            continue;
          }
          __m512 os;
          if (so[3] == 1) {
            os = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), valid, osrow + d);
          } else {
            alignas(64) float tmp[16];
            for (int t = 0; t < 16; ++t) tmp[t] = d + t < Dv ? osrow[(d + t) * so[3]] : 1.0f;
            os = _mm512_load_ps(tmp);
          }
          __m512 qv = _mm512_roundscale_ps(_mm512_div_ps(o, os), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          qv = _mm512_min_ps(_mm512_max_ps(qv, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
          _mm512_mask_cvtepi32_storeu_epi8((int8_t*)orow + d, valid, _mm512_cvtps_epi32(qv));
        }
      }
    }
  });
  return out;
}

// a [B1, B2, M, K] int8, b [B1, B2, K, N] int8, any strides -> [B1, B2, M, N] int32, contiguous.
torch::Tensor int8_bmm(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4, "int8_bmm: expected 4-D operands");
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar, "int8_bmm: expected int8 operands");
  const int64_t B1 = a.size(0), B2 = a.size(1), M = a.size(2), K = a.size(3), N = b.size(3);
  TORCH_CHECK(b.size(0) == B1 && b.size(1) == B2 && b.size(2) == K, "int8_bmm: shapes do not match");
  auto c = torch::empty({B1, B2, M, N}, a.options().dtype(at::kInt));
  if (c.numel() == 0) return c;
  if (K == 0) return c.zero_();
  const int64_t groups = (K + 3) / 4, k_padded = 4 * groups, n_padded = (N + 15) / 16 * 16;
  const int8_t* a_base = a.data_ptr<int8_t>();
  const int8_t* b_base = b.data_ptr<int8_t>();
  int32_t* c_base = c.data_ptr<int32_t>();
  const std::vector<int64_t> sa(a.strides().begin(), a.strides().end()), sb(b.strides().begin(), b.strides().end());
  zqhero::parallel_for(0, B1 * B2, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> a_packed(a_in_place(sa[3], K) ? 0 : M * k_padded);
    std::vector<int32_t> b_packed(groups * n_padded), comp(n_padded);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t i = s / B2, j = s % B2;
      const int8_t* as = a_base + i * sa[0] + j * sa[1];
      const int8_t* bs = b_base + i * sb[0] + j * sb[1];
      int64_t lda;
      const int8_t* a_rows = a_rows_for_tiles(as, sa[2], sa[3], M, K, k_padded, a_packed, &lda);
      pack_b(bs, sb[2], sb[3], K, N, n_padded, b_packed.data());
      column_shift(b_packed.data(), groups, n_padded, comp.data());
      const int8_t* bp = (const int8_t*)b_packed.data();
      int32_t* cs = c_base + s * M * N;
      for (int64_t m0 = 0; m0 < M; m0 += kRows)
        rows_block(std::min<int64_t>(kRows, M - m0), a_rows + m0 * lda, lda, bp, groups, comp.data(), cs + m0 * N, N,
                   n_padded);
    }
  });
  return c;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_bmm", torch::wrap_pybind_function(int8_bmm), "int8_bmm");
  m.def("int8_attention", torch::wrap_pybind_function(int8_attention), "int8_attention");
}
