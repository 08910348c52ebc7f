"""Quantized attention core, flash-attention style: quantized Q.K^T, softmax with quantized probabilities, quantized P.V.

q [B, H, Sq, D], k and v [B, Hkv, Sk, D] are int8 or float8 (any strides). Hkv divides H (GQA; MQA at Hkv = 1): query
head h attends with K/V head h // (H / Hkv). The reference repeats the K/V heads; both kernels read the shared head in
place (no repeated K/V is ever stored). For INT8 the matmuls are exact INT32; for FP8 they accumulate exact
products in fp32, and the probabilities are FP8 in q's format (p_scale 1/448 for E4M3 covers (0, 1]). The Triton kernel
takes INT8 and FP8 (E4M3 or E5M2; q, k and v in one format; sm_89+ on a GPU), the CPU kernel INT8.
Logits are acc * qk_scale, where qk_scale already holds s_q * s_k * softmax_scale. The mask is additive (float) or
boolean (True = attend); `is_causal` adds the causal mask.
Probabilities are quantized *before* normalisation: p_q = quantize(exp(s - rowmax), p_scale) in q's format, e.g.
round(p / p_scale) in [0, 127] for INT8 (the static SQ scale; 1/127 covers (0, 1] exactly), so a long, diffuse row keeps
its resolution. Then out = (p_q . v) * p_scale / rowsum, in units of v's code values. With `out_scale` (broadcasting
against [B, H, Sq, D], e.g. [H, 1, D] per feature) the output is requantized into `out_dtype` (INT8 or FP8) as
quantize(out, out_scale); otherwise cast to `out_dtype`. Rows with every key masked give 0.

The Triton kernel tiles like flash attention (nothing of size Sq x Sk is ever stored) but sweeps the keys twice: once
for the exact row max, once for exp, the row sum and quantized P.V against that max. Quantizing p against a running max
instead would change which grid step each probability lands on; with the final max it lands where the reference puts
it, and P.V stays one sum over all key blocks (an exact INT32 one for INT8).

Decoder shapes take the same path: decode is Sq = 1 query row against a key cache of any length (trailing cache slots
masked out by a boolean [B, 1, Sq, Sk] mask, broadcast over heads); prefill is Sq = Sk with `is_causal`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zqhero_fx import dispatch
from zqhero_fx.formats import INT8, format_of_dtype
from zqhero_fx.kernels import vnni_cpu
from zqhero_fx.kernels._triton_common import (
    accumulator_dtype,
    cast_rne,
    device_guard,
    interpreting,
    is_fp8,
    quantize_by_reciprocal,
    quantize_to,
    triton_takes_format,
)
from zqhero_fx.kernels.quantized_linear import check_output

QMAX = int(INT8.max_value)
DEFAULT_P_SCALE = 1.0 / QMAX


# ---------------------------------------------------------------- reference (the spec)
def attention_logits_mask(attn_mask, is_causal, sq, sk, device):
    """The additive float mask the reference applies (None when nothing is masked)."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask.float() if attn_mask.dtype != torch.bool else torch.where(
            attn_mask, torch.zeros((), device=device), torch.full((), float("-inf"), device=device))
    if is_causal:
        keep = torch.tril(torch.ones(sq, sk, dtype=torch.bool, device=device), diagonal=sk - sq)
        causal = torch.where(keep, torch.zeros((), device=device), torch.full((), float("-inf"), device=device))
        mask = causal if mask is None else mask + causal
    return mask


# float32 adds integers exactly below 2**24: a sum of `n` products of two int8 values in [-127, 127] stays exact
# while n * 127 * 127 < 2**24, i.e. n <= 1040 (any head size, sequences up to 1040). Past that, float64.
EXACT_FP32_TERMS = (1 << 24) // (127 * 127)


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor, terms) -> torch.Tensor:
    """a @ b for integer-valued a, b (|values| <= 127) summing `terms` products, exactly; float32 result.

    On a CPU with AVX-512 VNNI this is zqhero::int8_bmm (INT8 in, exact INT32 out, ~5x the float32 batched matmul);
    elsewhere a float32 matmul, exact up to EXACT_FP32_TERMS, or float64 past that. All give the same numbers."""
    if vnni_cpu.fast_path_applies(a, b):
        return torch.ops.zqhero.int8_bmm(a.to(torch.int8), b.to(torch.int8)).float()
    if terms <= EXACT_FP32_TERMS:
        return torch.matmul(a.float(), b.float())
    return torch.matmul(a.double(), b.double()).float()


def repeat_kv_heads(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """K or V with its heads repeated to q's head count (GQA / MQA: each group of H / Hkv query heads shares one)."""
    if q.dim() != 4 or kv.shape[-3] == q.shape[-3]:
        return kv
    heads, kv_heads = q.shape[-3], kv.shape[-3]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"quantized_attention: {heads} query heads cannot share {kv_heads} key/value heads")
    return kv.repeat_interleave(heads // kv_heads, dim=-3)


def shares_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether k and v pair with q the way the kernels read them: 3-D or 4-D, one batch size, and for 4-D operands
    K/V heads that divide q's heads (Hkv == H; GQA; MQA at Hkv = 1). The kernels index the shared head, no repeat."""
    if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4) and k.shape[:-2] == v.shape[:-2]
            and q.shape[0] == k.shape[0]):
        return False
    if q.dim() == 3:  # [B * H, S, D]: no head dim to share (the reference does not repeat here either)
        return True
    heads, kv_heads = q.shape[1], k.shape[1]
    return kv_heads == heads or (kv_heads > 0 and heads % kv_heads == 0)


def _matmul(a: torch.Tensor, b: torch.Tensor, terms: int, integer: bool) -> torch.Tensor:
    return exact_int_matmul(a, b, terms) if integer else torch.matmul(a.float(), b.float())


def quantized_attention_ref(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype):
    check_output(out_scale, out_dtype, "quantized_attention")
    k, v = repeat_kv_heads(q, k), repeat_kv_heads(q, v)
    integer = q.dtype == torch.int8
    logits = _matmul(q, k.transpose(-1, -2), q.shape[-1], integer) * qk_scale
    mask = attention_logits_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        logits = logits + mask
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.exp(logits - row_max)
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    # Probabilities in q's format, before normalisation (exp(s - rowmax) lies in (0, 1]).
    p_q = format_of_dtype(q.dtype).quantize(unnormalised, torch.tensor([p_scale])).float()
    acc = _matmul(p_q, v, k.shape[-2], integer)
    out = acc * p_scale / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    if out_scale is not None:
        return format_of_dtype(out_dtype).quantize(out, out_scale)
    return out.to(out_dtype)


# ---------------------------------------------------------------- Triton kernel
@triton.jit
def _attention_scores(
    q, k_base, mask_base, start_n, offs_m, offs_n, offs_d,
    seqlen_q, seqlen_k, head_dim_qk, qk_scale,
    stride_kn, stride_kd, stride_mm, stride_mn,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Masked fp32 logits for one [BLOCK_M, BLOCK_N] tile: dot(q, k^T) * qk_scale + mask; -inf where masked."""
    cols = start_n + offs_n
    col_valid = cols < seqlen_k
    # K^T tile [BLOCK_D, BLOCK_N] through K's strides: contiguous along D, the reduction dimension, which is the B
    # layout 8-bit tensor cores take, so no transpose is materialised. INT8 x INT8 -> INT32 is exact; FP8 x FP8
    # accumulates exact products in fp32 (a K tile is one head: one promotion into fp32 per tile on sm_90).
    kt = tl.load(
        k_base + offs_d[:, None] * stride_kd + cols[None, :].to(tl.int64) * stride_kn,
        mask=(offs_d < head_dim_qk)[:, None] & col_valid[None, :],
        other=0.0,
    )
    if is_fp8(q.dtype):
        s = tl.dot(q, kt, max_num_imprecise_acc=q.shape[1]) * qk_scale
    else:
        s = tl.dot(q, kt).to(tl.float32) * qk_scale
    # Padding mask, read through broadcast strides (0 on broadcast dims): additive float or boolean keep-mask.
    if MASK_KIND != 0:
        mask_ptrs = mask_base + offs_m[:, None].to(tl.int64) * stride_mm + cols[None, :].to(tl.int64) * stride_mn
        mask_valid = (offs_m < seqlen_q)[:, None] & col_valid[None, :]
        if MASK_KIND == 1:
            s = s + tl.load(mask_ptrs, mask=mask_valid, other=0.0).to(tl.float32)
        else:
            keep = tl.load(mask_ptrs, mask=mask_valid, other=0) != 0
            s = tl.where(keep, s, float("-inf"))
    # Causal mask aligned to the bottom-right corner, like the reference's tril(sk - sq).
    if IS_CAUSAL:
        s = tl.where(cols[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q), s, float("-inf"))
    # Tail columns past the sequence end take no probability mass.
    return tl.where(col_valid[None, :], s, float("-inf"))


@triton.jit
def _quantized_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, os_ptr, out_ptr,
    qk_scale, inv_p_scale, p_scale,
    H, kv_group, seqlen_q, seqlen_k, head_dim_qk, head_dim_v,
    sq_bucket, sk_bucket,  # autotune keys only: next powers of two of the sequence lengths
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_osb, stride_osh, stride_osm, stride_osd,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, QUANT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # One program per (BLOCK_M queries, batch * query head). GQA / MQA: `kv_group` consecutive query heads share one
    # K/V head, read in place through K's and V's head stride. Their programs are adjacent in the grid, so on a GPU the
    # group's K/V tiles come from L2 after the first.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kv_h = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_valid = offs_m < seqlen_q
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh

    # The Q tile stays in registers for both passes.
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh
        + offs_m[:, None].to(tl.int64) * stride_qm + offs_dqk[None, :] * stride_qd,
        mask=row_valid[:, None] & (offs_dqk < head_dim_qk)[None, :],
        other=0.0,
    )
    # With the causal mask, key blocks past the last query's diagonal are masked for every row here: skip them.
    hi = seqlen_k
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q)

    # Pass 1: the exact row max. Quantizing p against the final max (not a running one) is what the reference does,
    # and it keeps P.V one sum over all key blocks (exact INT32 for INT8): no rescaling of the accumulator is needed.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        s = _attention_scores(
            q, k_base, mask_base, start_n, offs_m, offs_n, offs_dqk, seqlen_q, seqlen_k, head_dim_qk, qk_scale,
            stride_kn, stride_kd, stride_mm, stride_mn, MASK_KIND, IS_CAUSAL,
        )
        m_i = tl.maximum(m_i, tl.max(s, axis=1))
    # A fully-masked row has max -inf; 0 instead makes every exp(-inf - 0) = 0, so the row's output is 0.
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)

    # Pass 2: unnormalised probabilities, their row sum, quantization with the static p_scale into q's format, P.V.
    P_DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=accumulator_dtype(P_DTYPE))
    for start_n in range(0, hi, BLOCK_N):
        s = _attention_scores(
            q, k_base, mask_base, start_n, offs_m, offs_n, offs_dqk, seqlen_q, seqlen_k, head_dim_qk, qk_scale,
            stride_kn, stride_kd, stride_mm, stride_mn, MASK_KIND, IS_CAUSAL,
        )
        p = tl.exp(s - m_i[:, None])
        l_i += tl.sum(p, axis=1)
        # p in [0, 1]: p / p_scale onto the format's grid (INT8 [0, 127], E4M3 [0, 448], ...), saturating, by
        # reciprocal (an IEEE division per logit would cost more than the exp).
        p_q = quantize_by_reciprocal(p, inv_p_scale, P_DTYPE)
        cols = start_n + offs_n
        v = tl.load(
            v_base + cols[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
            mask=(cols < seqlen_k)[:, None] & (offs_dv < head_dim_v)[None, :],
            other=0.0,
        )
        if is_fp8(P_DTYPE):
            acc = tl.dot(p_q, v, acc, max_num_imprecise_acc=BLOCK_N)
        else:
            acc = tl.dot(p_q, v, acc)

    # Normalise once at the end, in the reference's order: acc * p_scale / rowsum (a zero sum only on masked rows).
    out = tl.math.div_rn(acc.to(tl.float32) * p_scale, tl.where(l_i > 0.0, l_i, 1.0)[:, None])
    out_mask = row_valid[:, None] & (offs_dv < head_dim_v)[None, :]
    out_ptrs = out_ptr + ((b * H + h) * seqlen_q + offs_m[:, None].to(tl.int64)) * head_dim_v + offs_dv[None, :]
    if QUANT_OUT:
        out_scale = tl.load(
            os_ptr + b * stride_osb + h * stride_osh + offs_m[:, None].to(tl.int64) * stride_osm
            + offs_dv[None, :] * stride_osd,
            mask=out_mask,
            other=1.0,
        ).to(tl.float32)
        tl.store(out_ptrs, quantize_to(out, out_scale, out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, cast_rne(out, out_ptr.dtype.element_ty), mask=out_mask)


def _attention_config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Bounded tuning space for A100/H100/H200 at head dims 32-128. Large BLOCK_M amortises the two K sweeps; BLOCK_N 128
# suits long sequences, 64 the BERT-length ones (384 = 3 x 128 = 6 x 64).
ATTENTION_CONFIGS = [
    _attention_config(128, 64, 4, 2),
    _attention_config(128, 64, 8, 3),
    _attention_config(128, 128, 8, 2),
    _attention_config(64, 64, 4, 2),
    _attention_config(64, 128, 4, 3),
]
MAX_HEAD_DIM = 256


def _prune_attention_configs(configs, named_args, **kwargs):
    """Skip query tiles much taller than the query sequence."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, named_args["sq_bucket"])]
    return kept or configs


_quantized_attention_kernel_tuned = triton.autotune(
    configs=ATTENTION_CONFIGS,
    key=["sq_bucket", "sk_bucket", "BLOCK_DQK", "BLOCK_DV", "MASK_KIND", "IS_CAUSAL", "QUANT_OUT"],
    prune_configs_by={"early_config_prune": _prune_attention_configs},
)(_quantized_attention_kernel)


# ---------------------------------------------------------------- launcher
def quantized_attention_triton(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype):
    check_output(out_scale, out_dtype, "quantized_attention")
    if q.dim() == 3:
        # [B * H, S, D]: a batch of one with B * H heads; the mask and out_scale still broadcast the same way.
        out = quantized_attention_triton(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask, qk_scale, p_scale, out_scale, is_causal,
            out_dtype,
        )
        return out.squeeze(0)
    if q.dim() != 4:
        raise ValueError(f"quantized_attention: q must be [B, H, S, D] (or [B*H, S, D]); got {tuple(q.shape)}")
    if not shares_kv_heads(q, k, v):
        raise ValueError(f"quantized_attention: k {tuple(k.shape)} and v {tuple(v.shape)} do not pair with q "
                         f"{tuple(q.shape)} (same batch, K/V heads dividing q's heads)")
    batch, heads, seqlen_q, head_dim_qk = q.shape
    seqlen_k, head_dim_v = k.shape[-2], v.shape[-1]
    if max(head_dim_qk, head_dim_v) > MAX_HEAD_DIM:
        raise ValueError(
            f"quantized_attention: head dims up to {MAX_HEAD_DIM} are supported; got {head_dim_qk}/{head_dim_v}"
        )
    out_shape = (batch, heads, seqlen_q, head_dim_v)
    out = torch.empty(out_shape, dtype=out_dtype, device=q.device)
    if out.numel() == 0:
        return out
    if seqlen_k == 0:
        return out.zero_()  # no keys: every row is fully masked

    full = (batch, heads, seqlen_q, seqlen_k)
    if attn_mask is None:
        mask_kind, mask, mask_strides = 0, q, (0, 0, 0, 0)  # never read
    else:
        mask_kind = 2 if attn_mask.dtype == torch.bool else 1
        mask = attn_mask.view(torch.uint8) if mask_kind == 2 else attn_mask
        mask = mask.expand(full)  # broadcast dimensions get stride 0: no copy
        mask_strides = mask.stride()
    if out_scale is not None:
        os_ = out_scale.expand(out_shape)
        os_strides = os_.stride()
    else:
        os_, os_strides = q, (0, 0, 0, 0)  # never read

    block_dqk = max(32, triton.next_power_of_2(head_dim_qk))
    block_dv = max(32, triton.next_power_of_2(head_dim_v))
    args = (
        q, k, v, mask, os_, out,
        float(qk_scale), 1.0 / float(p_scale), float(p_scale),
        heads, heads // k.shape[1], seqlen_q, seqlen_k, head_dim_qk, head_dim_v,
        triton.next_power_of_2(seqlen_q), triton.next_power_of_2(seqlen_k),
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *os_strides,
    )
    flags = dict(
        MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal), QUANT_OUT=out_scale is not None,
        BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
    )
    # enable_fp_fusion=False: logits * qk_scale + mask must round like the reference's two separate ops, not as an FMA.
    with device_guard(q):
        if interpreting():
            # One small tile, no tuning (the interpreter is slow per program); still exercises tail blocks.
            block_m = min(32, max(16, triton.next_power_of_2(seqlen_q)))
            grid = (triton.cdiv(seqlen_q, block_m), batch * heads)
            _quantized_attention_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=32, enable_fp_fusion=False)
        else:
            grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
            _quantized_attention_kernel_tuned[grid](*args, **flags, enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------- CPU kernel (AVX-512 VNNI, vnni_cpu.py)
def cpu_kernel_applies(q, k, v, attn_mask, out_scale) -> bool:
    """Whether the fused VNNI kernel takes these operands: int8 q, k, v on the CPU, 3-D or 4-D with one batch size and
    K/V heads that divide q's heads (shares_kv_heads), head dim and key count within int32's exact range
    (vnni_cpu.MAX_TERMS: caches up to 65792 keys), a mask and an output scale that broadcast to the logits and the
    output, and the extension available."""
    if not all(t.device.type == "cpu" and t.dtype == torch.int8 for t in (q, k, v)):
        return False
    if not (shares_kv_heads(q, k, v) and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]):
        return False
    if max(q.shape[-1], k.shape[-2]) > vnni_cpu.MAX_TERMS or vnni_cpu.extension() is None:
        return False
    logits_shape = (*q.shape[:-1], k.shape[-2])
    out_shape = (*q.shape[:-1], v.shape[-1])
    for operand, shape in ((attn_mask, logits_shape), (out_scale, out_shape)):
        if operand is not None and (operand.device.type != "cpu" or operand.dim() > 4
                                    or not _expands_to(operand.shape, shape)):
            return False
    return True


def _expands_to(shape, target) -> bool:
    """Whether a tensor of `shape` expands to `target` (what torch.broadcast_shapes(shape, target) == target says,
    at a fraction of its ~15 us, which a decode step's dispatch would pay per layer)."""
    return len(shape) <= len(target) and all(size in (1, full) for size, full in zip(reversed(shape), reversed(target)))


def quantized_attention_cpu(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype):
    """Launcher for the fused CPU kernel: operands as 4-D strided views (broadcasts as stride 0), one call. K/V keep
    their own head count (GQA / MQA are indexed in the kernel); a boolean mask goes in as it is (no float copy of
    it), and causal masking happens inside the kernel."""
    four_d = [vnni_cpu.as_4d(t) for t in (q, k, v)]
    b, h, sq, _ = four_d[0].shape
    sk, dv = four_d[1].shape[-2], four_d[2].shape[-1]
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype in (torch.bool, torch.float32) else attn_mask.float()
        mask = mask.expand(b, h, sq, sk)
    scale = out_scale.float().expand(b, h, sq, dv) if out_scale is not None else None
    out = vnni_cpu.extension().int8_attention(*four_d, mask, float(qk_scale), float(p_scale), scale, bool(is_causal))
    out = out.reshape(*q.shape[:-1], dv)
    return out if out_scale is not None else out.to(out_dtype)


# ---------------------------------------------------------------- registration
def _triton_takes(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype) -> bool:
    """q, k, v in one format (INT8, FP8 E4M3 or FP8 E5M2; FP8 on sm_89+), one batch size and K/V heads that divide
    q's heads (shares_kv_heads: GQA / MQA read in place), and a float or INT8 / FP8 output."""
    return (q.dtype == k.dtype == v.dtype and triton_takes_format(q.dtype, q.device)
            and shares_kv_heads(q, k, v)
            and (out_scale is None or triton_takes_format(out_dtype, q.device)))


def _cpu_kernel_takes(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype) -> bool:
    return (q.dtype == torch.int8 and (out_scale is None or out_dtype == torch.int8)
            and _triton_takes(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype)
            and cpu_kernel_applies(q, k, v, attn_mask, out_scale))


dispatch.register("quantized_attention", dispatch.KernelSpec(
    reference=quantized_attention_ref,
    triton=quantized_attention_triton, triton_applies=_triton_takes,
    # The fused AVX-512 VNNI kernel: ~4x the Inductor-compiled reference, nothing of size Sq x Sk stored.
    cpu=quantized_attention_cpu, cpu_applies=_cpu_kernel_takes, cpu_available=lambda: vnni_cpu.extension() is not None,
    cpu_kernel_beats_inductor=True))
