"""Exact INT8 x INT8 -> INT32 batched matmul on the CPU, for the attention core's Q.K^T and P.V.

oneDNN's `torch._int_mm` is 2-D only, and looping it over BERT's 96 (batch x head) slices of 128x64x128 costs more in
per-call set-up than the float32 batched matmul it would replace. The reference therefore used float32 (exact for
int8 products up to 1040 terms), at float32 speed. This op is a small C++ kernel built on first use with
`torch.utils.cpp_extension`: each slice's B is packed into the VNNI layout ([K/4][N][4] bytes), A is shifted to
unsigned (a + 128, as `vpdpbusd` wants u8 x s8) and the shift is taken back out exactly with 128 * column sums of B;
4 x 64 output tiles accumulate in 16 AVX-512 registers; slices run in parallel on ATen's thread pool. A is read in
place (sign bit flipped as it is broadcast) when its rows are contiguous.

`int8_bmm_ref` is the spec (an exact int64 matmul); the op falls back to it where the CPU lacks AVX-512 VNNI, the
build fails (one warning says why), the tensors are not on the CPU, K is so long that int32 could overflow, or
ZQHERO_CPU_INT8_BMM=0.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings

import torch

# |sum| <= 255 * 128 * K before the shift is removed: int32 holds it for K <= 65792.
MAX_TERMS = (2**31 - 1) // (255 * 128)


# ---------------------------------------------------------------- reference (the spec)
def int8_bmm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., M, K] int8 @ b [..., K, N] int8 -> int32, exactly (batch dims must match; float64 holds every partial
    sum exactly for K < 2**53 / 128**2, on any device)."""
    return torch.matmul(a.double(), b.double()).to(torch.int32)


# ---------------------------------------------------------------- C++ kernel (AVX-512 VNNI)
CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
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
  // A is read in place when its rows are contiguous and whole 4-byte groups; else copied with zero padding.
  const bool a_in_place = sa[3] == 1 && K % 4 == 0;
  at::parallel_for(0, B1 * B2, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> a_packed(a_in_place ? 0 : M * k_padded);
    std::vector<int32_t> b_packed(groups * n_padded), comp(n_padded);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t i = s / B2, j = s % B2;
      const int8_t* as = a_base + i * sa[0] + j * sa[1];
      const int8_t* bs = b_base + i * sb[0] + j * sb[1];
      const int8_t* a_rows = as;
      int64_t lda = sa[2];
      if (!a_in_place) {
        std::fill(a_packed.begin(), a_packed.end(), 0);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k = 0; k < K; ++k) a_packed[m * k_padded + k] = as[m * sa[2] + k * sa[3]];
        a_rows = a_packed.data();
        lda = k_padded;
      }
      pack_b(bs, sb[2], sb[3], K, N, n_padded, b_packed.data());
      column_shift(b_packed.data(), groups, n_padded, comp.data());
      const int8_t* bp = (const int8_t*)b_packed.data();
      int32_t* cs = c_base + s * M * N;
      int64_t m0 = 0;
      for (; m0 + kRows <= M; m0 += kRows)
        row_block<kRows>(a_rows + m0 * lda, lda, bp, groups, comp.data(), cs + m0 * N, N, n_padded);
      switch (M - m0) {
        case 3: row_block<3>(a_rows + m0 * lda, lda, bp, groups, comp.data(), cs + m0 * N, N, n_padded); break;
        case 2: row_block<2>(a_rows + m0 * lda, lda, bp, groups, comp.data(), cs + m0 * N, N, n_padded); break;
        case 1: row_block<1>(a_rows + m0 * lda, lda, bp, groups, comp.data(), cs + m0 * N, N, n_padded); break;
        default: break;
      }
    }
  });
  return c;
}
"""

CPP_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"]
_build_lock = threading.Lock()
log = logging.getLogger(__name__)


def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512_vnni"} <= flags
    except OSError:
        pass
    return False


@functools.cache
def extension():
    """The compiled module, or None (with one warning saying why) where it cannot be used here."""
    if os.environ.get("ZQHERO_CPU_INT8_BMM", "1").strip() == "0" or not cpu_has_vnni():
        return None
    with _build_lock:
        try:
            from torch.utils.cpp_extension import load_inline

            log.info("zqhero: building (or loading the cached) AVX-512 VNNI int8 batched matmul")
            return load_inline("zqhero_int8_bmm_cpu", cpp_sources=CPP_SOURCE, functions=["int8_bmm"],
                               extra_cflags=CPP_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as error:  # no compiler / ninja: stay correct, just slower
            warnings.warn(f"zqhero: the AVX-512 VNNI int8 batched matmul did not build ({type(error).__name__}: "
                          f"{str(error)[:300]}); attention matmuls on the CPU use exact float32/float64 instead",
                          RuntimeWarning, stacklevel=2)
            return None


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def fast_path_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the VNNI kernel takes a @ b (shapes and devices; the operands must also be, or become, int8)."""
    return (a.device.type == "cpu" and b.device.type == "cpu" and 2 <= a.dim() <= 4 and a.dim() == b.dim()
            and a.shape[:-2] == b.shape[:-2] and a.shape[-1] == b.shape[-2] and a.shape[-1] <= MAX_TERMS
            and extension() is not None)


def int8_bmm_impl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"zqhero::int8_bmm takes int8 operands, got {a.dtype} and {b.dtype}")
    if not fast_path_applies(a, b):
        return int8_bmm_ref(a, b)
    out = extension().int8_bmm(_as_4d(a), _as_4d(b))
    return out.reshape(*a.shape[:-1], b.shape[-1])


# ---------------------------------------------------------------- registration
@torch.library.custom_op("zqhero::int8_bmm", mutates_args=())
def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [..., M, K] @ int8 [..., K, N] -> int32 [..., M, N] (matching batch dims)."""
    return int8_bmm_impl(a, b)


@int8_bmm.register_fake
def _(a, b):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)
