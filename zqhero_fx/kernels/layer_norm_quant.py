"""LN^quant: optional residual add + LayerNorm + per-token absmax + INT8 output + per-token scale, one pass per row.

TWQ is free here because LayerNorm already reduces over the row. Outputs: (q int8, scale fp32 [..., 1], normed, summed),
where `normed` (the float LayerNorm output, needed by a post-LN residual stream) and `summed` (x + residual, needed by a
pre-LN residual stream) are empty tensors unless asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zqhero_fx.kernels._select import wants_triton
from zqhero_fx.kernels._triton_common import (
    MIN_SCALE_F,
    QMAX_F,
    as_rows,
    cast_rne,
    device_guard,
    quantize_int8_by_reciprocal,
)
from zqhero_fx.kernels.quantize import MIN_SCALE, quantize_per_token_ref


# ---------------------------------------------------------------- reference (the spec)
def layer_norm_quant_ref(x, residual, weight, bias, eps, emit_normed, emit_sum):
    summed = x if residual is None else x + residual
    normed32 = F.layer_norm(
        summed.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps
    )
    q, scale = quantize_per_token_ref(normed32)
    return (
        q,
        scale,
        # Each unused output is its own empty tensor: a custom op's outputs may not alias one another.
        normed32.to(x.dtype) if emit_normed else x.new_empty(0),
        # Without a residual the sum is x itself; a custom op may not return its input, so emit a copy.
        (summed if residual is not None else x.clone()) if emit_sum else x.new_empty(0),
    )


# ---------------------------------------------------------------- Triton kernel
@triton.jit
def layer_norm_quant_rows(s, mask, cols, col_mask, w_ptr, b_ptr, n_cols, eps, HAS_BIAS: tl.constexpr):
    """LayerNorm of a [BLOCK_M, BLOCK_N] register tile of fp32 rows, then the per-token INT8 scale.

    Shared with embedding_layer_norm_quant. Padded lanes (mask False) must hold 0 on entry; they stay 0 throughout,
    so they add nothing to the sums and never win the absmax.
    """
    # Mean, then the variance around it from the registers: two reductions over a row that is read only once.
    mean = tl.sum(s, axis=1) / n_cols
    centred = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    # Affine transform in the reference's order: (x - mean) * rstd * weight + bias.
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    y = tl.where(mask, y, 0.0)
    # TWQ scale: the row is already reduced here, so its absmax costs one more register reduction.
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), axis=1), QMAX_F), MIN_SCALE_F)
    return y, scale


@triton.jit
def _layer_norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr,
    q_ptr, scale_ptr, normed_ptr, sum_ptr,
    n_rows, n_cols,
    stride_xm, stride_xn, stride_rm, stride_rn,
    eps,
    SUM_DTYPE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EMIT_NORMED: tl.constexpr, EMIT_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # BLOCK_M whole rows per program (BLOCK_N >= n_cols): every input byte is read exactly once.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    # Outputs are contiguous [n_rows, n_cols].
    out_offsets = rows[:, None] * n_cols + cols[None, :]

    # Residual add. The reference adds in the inputs' (promoted) dtype, so the sum is rounded to SUM_DTYPE before
    # the LayerNorm sees it, exactly as it would be stored.
    s = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        s_stored = cast_rne(s + r.to(tl.float32), SUM_DTYPE)
        s = s_stored.to(tl.float32)
        if EMIT_SUM:
            tl.store(sum_ptr + out_offsets, s_stored, mask=mask)
    elif EMIT_SUM:
        tl.store(sum_ptr + out_offsets, cast_rne(s, SUM_DTYPE), mask=mask)

    y, scale = layer_norm_quant_rows(s, mask, cols, col_mask, w_ptr, b_ptr, n_cols, eps, HAS_BIAS)

    # INT8 output by reciprocal (the LayerNorm itself is not bit-exact, see quantize_int8_by_reciprocal), the
    # per-token scale, and the float normed output for a post-LN residual stream.
    inv_scale = 1.0 / scale
    tl.store(q_ptr + out_offsets, quantize_int8_by_reciprocal(y, inv_scale[:, None]), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < n_rows)
    if EMIT_NORMED:
        tl.store(normed_ptr + out_offsets, cast_rne(y, normed_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launcher
# Widest row kept in registers: 64 KiB of input per row, as Triton's LayerNorm tutorial. Encoder hidden sizes are far
# below it; a wider row would spill, so it is refused rather than silently slow.
MAX_FUSED_BYTES = 65536

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def row_blocks(n_cols: int, element_size: int, what: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for kernels that hold whole rows in registers."""
    block_n = triton.next_power_of_2(max(n_cols, 1))
    if block_n * element_size > MAX_FUSED_BYTES:
        raise ValueError(
            f"{what}: rows of {n_cols} elements exceed the fused kernel's {MAX_FUSED_BYTES} bytes per row"
        )
    # About 4096 elements per program: a few short rows share one, a long row gets one to itself.
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = max(1, min(16, block_m * block_n // 512))
    return block_m, block_n, num_warps


def layer_norm_quant_triton(x, residual, weight, bias, eps, emit_normed, emit_sum):
    n_cols = x.shape[-1]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    normed = torch.empty(x.shape if emit_normed else (0,), dtype=x.dtype, device=x.device)
    summed = torch.empty(x.shape if emit_sum else (0,), dtype=sum_dtype, device=x.device)
    if x.numel() == 0:
        return q, scale.fill_(MIN_SCALE), normed, summed
    x2, stride_xm, stride_xn = as_rows(x, x.shape)
    if residual is not None:
        r2, stride_rm, stride_rn = as_rows(residual, x.shape)
    else:
        r2, stride_rm, stride_rn = x2, 0, 0  # never read: HAS_RESIDUAL is False
    n_rows = x2.shape[0]
    block_m, block_n, num_warps = row_blocks(n_cols, max(x.element_size(), 4), "layer_norm_quant")
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    with device_guard(x):
        _layer_norm_quant_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, r2, w, b,
            q, scale, normed if emit_normed else q, summed if emit_sum else q,
            n_rows, n_cols,
            stride_xm, stride_xn, stride_rm, stride_rn,
            eps,
            SUM_DTYPE=_TL_DTYPES[sum_dtype],
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            EMIT_NORMED=emit_normed, EMIT_SUM=emit_sum,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return q, scale, normed, summed


# ---------------------------------------------------------------- registration
@torch.library.custom_op("zqhero::layer_norm_quant", mutates_args=())
def layer_norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    emit_normed: bool,
    emit_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if wants_triton(x):
        return layer_norm_quant_triton(x, residual, weight, bias, eps, emit_normed, emit_sum)
    return layer_norm_quant_ref(x, residual, weight, bias, eps, emit_normed, emit_sum)


@layer_norm_quant.register_fake
def _(x, residual, weight, bias, eps, emit_normed, emit_sum):
    # x + residual promotes (fp16 activations + an fp32 residual stream give an fp32 sum), as the reference does.
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
        x.new_empty(x.shape) if emit_normed else x.new_empty(0),
        x.new_empty(x.shape, dtype=sum_dtype) if emit_sum else x.new_empty(0),
    )
