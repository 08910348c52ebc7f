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

// The int8_attention reference, one (batch, head) slice at a time and four query rows at a time, nothing of size
// Sq x Sk stored: logits = (q.k^T) * qk_scale + mask (-inf where causal hides a key), p_q = round(exp(l - rowmax) /
// p_scale) in [0, 127] (rowmax 0 when the row is all -inf), out = (p_q.v) * p_scale / rowsum (rowsum 1 when 0), then
// round(out / out_scale) to int8, or float32. Q.K^T and P.V are exact INT32 VNNI tiles (P's values 0..127 are valid
// int8, so the same sign-flip trick applies); only exp and the order of the row sum differ from the reference.
torch::Tensor int8_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const c10::optional<torch::Tensor>& mask, double qk_scale_d, double p_scale_d,
                             const c10::optional<torch::Tensor>& out_scale, bool is_causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "int8_attention: expected 4-D q, k, v");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2), Dv = v.size(3);
  const bool quant_out = out_scale.has_value();
  auto out = torch::empty({B, H, Sq, Dv}, q.options().dtype(quant_out ? at::kChar : at::kFloat));
  if (out.numel() == 0) return out;
  const float qk_scale = (float)qk_scale_d, p_scale = (float)p_scale_d;
  const std::vector<int64_t> sq(q.strides().begin(), q.strides().end()), sk(k.strides().begin(), k.strides().end()),
      sv(v.strides().begin(), v.strides().end());
  std::vector<int64_t> sm(4, 0), so(4, 0);
  const float* m_base = nullptr;
  const float* o_base = nullptr;
  if (mask.has_value()) { m_base = mask->data_ptr<float>(); sm.assign(mask->strides().begin(), mask->strides().end()); }
  if (quant_out) { o_base = out_scale->data_ptr<float>(); so.assign(out_scale->strides().begin(), out_scale->strides().end()); }
  const int64_t groups_d = (D + 3) / 4, d_padded = 4 * groups_d, sk_padded16 = (Sk + 15) / 16 * 16;
  const int64_t groups_k = (Sk + 3) / 4, k_padded4 = 4 * groups_k, dv_padded = (Dv + 15) / 16 * 16;
  const int8_t* q_base = q.data_ptr<int8_t>();
  const int8_t* k_base = k.data_ptr<int8_t>();
  const int8_t* v_base = v.data_ptr<int8_t>();
  char* out_base = (char*)out.data_ptr();
  const int64_t out_item = quant_out ? 1 : 4;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> kp(groups_d * sk_padded16), kcomp(sk_padded16), vp(groups_k * dv_padded), vcomp(dv_padded);
    std::vector<int8_t> q_rows(a_in_place(sq[3], D) ? 0 : kRows * d_padded), p_rows(kRows * k_padded4);
    std::vector<int32_t> scores(kRows * Sk), pv(kRows * Dv);
    std::vector<float> logits(sk_padded16);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / H, h = s % H;
      const int8_t* qs = q_base + b * sq[0] + h * sq[1];
      // K^T as B of Q.K^T ([D, Sk]: D strided by sk[3], keys by sk[2]); V as B of P.V ([Sk, Dv]).
      pack_b(k_base + b * sk[0] + h * sk[1], sk[3], sk[2], D, Sk, sk_padded16, kp.data());
      column_shift(kp.data(), groups_d, sk_padded16, kcomp.data());
      pack_b(v_base + b * sv[0] + h * sv[1], sv[2], sv[3], Sk, Dv, dv_padded, vp.data());
      column_shift(vp.data(), groups_k, dv_padded, vcomp.data());
      for (int64_t i0 = 0; i0 < Sq; i0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, Sq - i0);
        int64_t lda;
        const int8_t* a = a_rows_for_tiles(qs + i0 * sq[2], sq[2], sq[3], rows, D, d_padded, q_rows, &lda);
        rows_block(rows, a, lda, (const int8_t*)kp.data(), groups_d, kcomp.data(), scores.data(), Sk, sk_padded16);
        float row_sum[kRows];
        std::fill(p_rows.begin(), p_rows.end(), 0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const int32_t* sc = scores.data() + r * Sk;
          const float* mrow = m_base ? m_base + b * sm[0] + h * sm[1] + i * sm[2] : nullptr;
          const int64_t causal_last = Sk - Sq + i;  // keys j > causal_last are hidden
          __m512 vmax = _mm512_set1_ps(-INFINITY);
          for (int64_t j = 0; j < Sk; j += 16) {
            const __mmask16 valid = head_mask(Sk - j);
            __m512 l = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, sc + j)), _mm512_set1_ps(qk_scale));
            if (mrow) {
              __m512 mv;
              if (sm[3] == 1) {
                mv = _mm512_maskz_loadu_ps(valid, mrow + j);
              } else {
                alignas(64) float tmp[16] = {0};
                for (int64_t t = 0; t < 16 && j + t < Sk; ++t) tmp[t] = mrow[(j + t) * sm[3]];
                mv = _mm512_load_ps(tmp);
              }
              l = _mm512_add_ps(l, mv);
            }
            if (is_causal) {
              const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32((int32_t)j),
                                                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
              const __mmask16 hidden =
                  _mm512_cmp_epi32_mask(cols, _mm512_set1_epi32((int32_t)std::max<int64_t>(causal_last, -1)), _MM_CMPINT_NLE);
              l = _mm512_mask_blend_ps(hidden, l, _mm512_set1_ps(-INFINITY));
            }
            _mm512_storeu_ps(logits.data() + j, l);
            vmax = _mm512_mask_max_ps(vmax, valid, vmax, l);
          }
          float row_max = _mm512_reduce_max_ps(vmax);
          if (!std::isfinite(row_max)) row_max = 0.0f;
          __m512 vsum = _mm512_setzero_ps();
          int8_t* prow = p_rows.data() + r * k_padded4;
          for (int64_t j = 0; j < Sk; j += 16) {
            const __mmask16 valid = head_mask(Sk - j);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(logits.data() + j), _mm512_set1_ps(row_max)));
            vsum = _mm512_mask_add_ps(vsum, valid, vsum, e);
            __m512 pq = _mm512_roundscale_ps(_mm512_div_ps(e, _mm512_set1_ps(p_scale)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            pq = _mm512_min_ps(_mm512_max_ps(pq, _mm512_setzero_ps()), _mm512_set1_ps(127.0f));
            _mm512_mask_cvtepi32_storeu_epi8(prow + j, valid, _mm512_cvtps_epi32(pq));
          }
          row_sum[r] = _mm512_reduce_add_ps(vsum);
        }
        rows_block(rows, p_rows.data(), k_padded4, (const int8_t*)vp.data(), groups_k, vcomp.data(), pv.data(), Dv,
                   dv_padded);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const __m512 denom = _mm512_set1_ps(row_sum[r] > 0.0f ? row_sum[r] : 1.0f);
          char* orow = out_base + (((b * H + h) * Sq + i) * Dv) * out_item;
          const float* osrow = o_base ? o_base + b * so[0] + h * so[1] + i * so[2] : nullptr;
          for (int64_t d = 0; d < Dv; d += 16) {
            const __mmask16 valid = head_mask(Dv - d);
            __m512 o = _mm512_div_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, pv.data() + r * Dv + d)),
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
  at::parallel_for(0, B1 * B2, 1, [&](int64_t begin, int64_t end) {
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
