"""Norm^quant: optional residual add + LayerNorm or RMSNorm + per-token absmax + quantized output + per-token scale,
one pass per row.

TWQ is free here because the norm already reduces over the row. Outputs: (q, scale fp32 [..., 1], normed, summed),
where `normed` (the float norm output, needed by a post-LN residual stream) and `summed` (x + residual, needed by a
pre-norm residual stream) are empty tensors unless asked for. `kind` is "layer" (mean and variance, optional bias) or
"rms" (root mean square, no mean subtraction: Llama, T5, Gemma's (1 + w) after canonicalize folds the 1 into w).
The Triton kernel writes INT8, FP8 E4M3 or FP8 E5M2 (q's element type picks the format; FP8 needs sm_89+ on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zqhero_fx import dispatch
from zqhero_fx.kernels import int8_cpu
from zqhero_fx.formats import MIN_SCALE, format_of_dtype
from zqhero_fx.kernels._triton_common import (
    as_rows,
    cast_rne,
    device_guard,
    per_token_scale,
    quantize_by_reciprocal,
    triton_takes_format,
)


# ---------------------------------------------------------------- reference (the spec)
def normalise_ref(summed: torch.Tensor, weight, bias, eps: float, kind: str) -> torch.Tensor:
    """The float32 norm of each row: LayerNorm or RMSNorm (with an optional bias added after the scale)."""
    dim = (summed.shape[-1],)
    b = None if bias is None else bias.float()
    if kind == "layer":
        return F.layer_norm(summed.float(), dim, weight.float(), b, eps)
    if kind == "rms":
        normed = F.rms_norm(summed.float(), dim, weight.float(), eps)
        return normed if b is None else normed + b
    raise ValueError(f"norm_quant: unknown norm kind {kind!r}; expected 'layer' or 'rms'")


def norm_quant_ref(x, residual, weight, bias, eps, emit_normed, emit_sum, kind="layer", dtype=torch.int8):
    summed = x if residual is None else x + residual
    normed32 = normalise_ref(summed, weight, bias, eps, kind)
    q, scale = format_of_dtype(dtype).quantize_per_token(normed32)
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
def norm_quant_rows(s, mask, cols, col_mask, w_ptr, b_ptr, n_cols, eps, HAS_BIAS: tl.constexpr,
                    IS_RMS: tl.constexpr, Q_DTYPE: tl.constexpr):
    """LayerNorm (or RMSNorm) of a [BLOCK_M, BLOCK_N] register tile of fp32 rows, then the per-token scale for the
    quantized element type Q_DTYPE (absmax / 127, / 448 or / 57344).

    Shared with embedding_norm_quant. Padded lanes (mask False) must hold 0 on entry; they stay 0 throughout,
    so they add nothing to the sums and never win the absmax.
    """
    if IS_RMS:
        # Mean of squares around zero: no centring.
        centred = s
    else:
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
    scale = per_token_scale(tl.max(tl.abs(y), axis=1), Q_DTYPE)
    return y, scale


@triton.jit
def _norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr,
    q_ptr, scale_ptr, normed_ptr, sum_ptr,
    n_rows, n_cols,
    stride_xm, stride_xn, stride_rm, stride_rn,
    eps,
    SUM_DTYPE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EMIT_NORMED: tl.constexpr, EMIT_SUM: tl.constexpr,
    IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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

    Q_DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    y, scale = norm_quant_rows(s, mask, cols, col_mask, w_ptr, b_ptr, n_cols, eps, HAS_BIAS, IS_RMS, Q_DTYPE)

    # Quantized output by reciprocal (the norm itself is not bit-exact, see quantize_by_reciprocal), the per-token
    # scale, and the float normed output for a post-LN residual stream.
    inv_scale = 1.0 / scale
    tl.store(q_ptr + out_offsets, quantize_by_reciprocal(y, inv_scale[:, None], Q_DTYPE), mask=mask)
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


def norm_quant_triton(x, residual, weight, bias, eps, emit_normed, emit_sum, kind="layer", dtype=torch.int8):
    n_cols = x.shape[-1]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
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
    block_m, block_n, num_warps = row_blocks(n_cols, max(x.element_size(), 4), "norm_quant")
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    with device_guard(x):
        _norm_quant_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, r2, w, b,
            q, scale, normed if emit_normed else q, summed if emit_sum else q,
            n_rows, n_cols,
            stride_xm, stride_xn, stride_rm, stride_rn,
            eps,
            SUM_DTYPE=_TL_DTYPES[sum_dtype],
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            EMIT_NORMED=emit_normed, EMIT_SUM=emit_sum, IS_RMS=kind == "rms",
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return q, scale, normed, summed


# ---------------------------------------------------------------- registration
def _triton_takes(x, residual, weight, bias, eps, emit_normed, emit_sum, kind="layer", dtype=torch.int8) -> bool:
    return triton_takes_format(dtype, x.device) and kind in ("layer", "rms")


# CPU: one pass per row in C++ (csrc/norm_quant_cpu.cpp, built and chosen by int8_cpu.py). Kept opaque under
# Inductor too, so that every entry point (the converted module, zqhero_fx.compile, backend="zqhero") runs it.
dispatch.register("norm_quant", dispatch.KernelSpec(
    reference=norm_quant_ref, triton=norm_quant_triton, triton_applies=_triton_takes,
    cpu=int8_cpu.norm_quant, cpu_applies=int8_cpu.norm_quant_takes, cpu_available=int8_cpu.available,
    cpu_kernel_beats_inductor=True))
