"""Quantize / dequantize primitives: symmetric INT8 in [-127, 127], no zero point.

`quantize_per_token` is TWQ (one dynamic scale per row, absmax/127); `quantize` is the static form (FWQ when the scale
has one entry per feature, SQ when it is a scalar); `dequantize` multiplies back. Scales never fall below MIN_SCALE, so
all-zero rows and zero-range channels quantize to 0 instead of dividing by zero; values past a static range saturate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zqhero_fx.kernels._select import wants_triton
from zqhero_fx.kernels._triton_common import (
    MIN_SCALE_F,
    QMAX_F,
    as_rows,
    cast_rne,
    device_guard,
    quantize_int8,
)

QMAX = 127
MIN_SCALE = 1e-8


# ---------------------------------------------------------------- reference (the spec)
def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(MIN_SCALE)
    q = torch.round(x32 / scale).clamp(-QMAX, QMAX).to(torch.int8)
    # Contiguous like the fake implementations say: elementwise ops would otherwise keep a permuted input's strides
    # (CPU SDPA returns a transposed layout), and Inductor checks the strides of extern-call outputs.
    return q.contiguous(), scale.contiguous()


def quantize_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.round(x.float() / scale.float().clamp_min(MIN_SCALE))
    return q.clamp(-QMAX, QMAX).to(torch.int8).contiguous()


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(out_dtype).contiguous()


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline weight quantization, one scale per output channel (row of an [N, K] weight)."""
    q, scale = quantize_per_token_ref(weight)
    return q.contiguous(), scale.reshape(-1).contiguous()


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr,
    n_rows, n_cols,
    stride_xm, stride_xn, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    # BLOCK_M rows per program; int64 row offsets so row * stride cannot overflow on large activations.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rows[:, None] * stride_xm
    q_rows = q_ptr + rows[:, None] * stride_qm
    if SINGLE_PASS:
        # The whole row fits one block: read it once, keep it in registers for both the absmax and the quantization.
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), QMAX_F), MIN_SCALE_F)
        tl.store(q_rows + cols[None, :], quantize_int8(x, scale[:, None]), mask=mask)
    else:
        # Rows wider than a register block: one sweep for the absmax, a second one (mostly L2 hits) to quantize.
        absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & ((start + cols)[None, :] < n_cols)
            x = tl.load(x_rows + (start + cols)[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        scale = tl.maximum(tl.math.div_rn(absmax, QMAX_F), MIN_SCALE_F)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & ((start + cols)[None, :] < n_cols)
            x = tl.load(x_rows + (start + cols)[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + (start + cols)[None, :], quantize_int8(x, scale[:, None]), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


@triton.jit
def _quantize_kernel(
    x_ptr, scale_ptr, q_ptr,
    n_rows, n_cols,
    stride_xm, stride_xn, stride_sm, stride_sn, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 2-D tile of the [rows, cols] view; the scale is a strided view whose broadcast dimensions have stride 0.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=mask, other=1.0)
    # Same floor as the reference, so a zero-range channel (scale 0) quantizes to 0 instead of dividing by zero.
    scale = tl.maximum(scale.to(tl.float32), MIN_SCALE_F)
    q = quantize_int8(x.to(tl.float32), scale)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr,
    n_rows, n_cols,
    stride_qm, stride_qn, stride_sm, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # q and scale both arrive as broadcast views of the output shape, so either may carry the broadcast.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qn, mask=mask, other=0)
    scale = tl.load(scale_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=mask, other=0.0)
    out = q.to(tl.float32) * scale.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers
# Widest row (in elements) that quantize_per_token keeps in registers; wider rows take the two-sweep path.
MAX_FUSED_COLS = 16384
# Elements per program the row-wise launchers aim for: enough work per program to hide latency on a GPU, and few
# programs for the interpreter (whose cost is per program).
TILE_ELEMENTS = 4096


def elementwise_blocks(n_cols: int, max_block_n: int = 1024) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a row-wise tile over [rows, n_cols]."""
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), max_block_n)
    block_m = max(1, min(64, TILE_ELEMENTS // block_n))
    num_warps = max(1, min(8, block_m * block_n // 512))
    return block_m, block_n, num_warps


def quantize_per_token_triton(x):
    out_q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    out_scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        # Nothing to reduce: rows of width 0 get the floor scale, like an all-zero row.
        return out_q, out_scale.fill_(MIN_SCALE)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    n_rows = x2.shape[0]
    full_block = triton.next_power_of_2(n_cols)
    single_pass = full_block <= MAX_FUSED_COLS
    block_n = full_block if single_pass else 1024
    block_m = max(1, min(64, TILE_ELEMENTS // block_n))
    num_warps = max(1, min(16, block_m * block_n // 256))
    with device_guard(x):
        _quantize_per_token_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, out_q, out_scale,
            n_rows, n_cols,
            x2.stride(0), x2.stride(1), n_cols,
            BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single_pass, num_warps=num_warps,
        )
    return out_q, out_scale


def quantize_triton(x, scale):
    out_q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.numel() == 0:
        return out_q
    x2, stride_xm, stride_xn = as_rows(x, x.shape)
    s2, stride_sm, stride_sn = as_rows(scale, x.shape)
    n_rows, n_cols = x2.shape
    block_m, block_n, num_warps = elementwise_blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    with device_guard(x):
        _quantize_kernel[grid](
            x2, s2, out_q,
            n_rows, n_cols,
            stride_xm, stride_xn, stride_sm, stride_sn, n_cols,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return out_q


def dequantize_triton(q, scale, out_dtype):
    shape = torch.broadcast_shapes(q.shape, scale.shape)
    out = torch.empty(shape, dtype=out_dtype, device=q.device)
    if out.numel() == 0:
        return out
    q2, stride_qm, stride_qn = as_rows(q, shape)
    s2, stride_sm, stride_sn = as_rows(scale, shape)
    n_rows, n_cols = q2.shape
    block_m, block_n, num_warps = elementwise_blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    with device_guard(q):
        _dequantize_kernel[grid](
            q2, s2, out,
            n_rows, n_cols,
            stride_qm, stride_qn, stride_sm, stride_sn, n_cols,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return out


# ---------------------------------------------------------------- registration
@torch.library.custom_op("zqhero::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TWQ: int8 values and a float32 scale of shape x.shape[:-1] + (1,)."""
    if wants_triton(x):
        return quantize_per_token_triton(x)
    return quantize_per_token_ref(x)


@quantize_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("zqhero::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static quantization; `scale` broadcasts against x (a scalar [1] for SQ, per feature for FWQ)."""
    if wants_triton(x):
        return quantize_triton(x, scale)
    return quantize_ref(x, scale)


@quantize.register_fake
def _(x, scale):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("zqhero::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if wants_triton(q):
        return dequantize_triton(q, scale, out_dtype)
    return dequantize_ref(q, scale, out_dtype)


@dequantize.register_fake
def _(q, scale, out_dtype=torch.float32):
    return q.new_empty(torch.broadcast_shapes(q.shape, scale.shape), dtype=out_dtype)
