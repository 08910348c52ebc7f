"""Quantize / dequantize kernels for the 8-bit activation formats (INT8 symmetric in [-127, 127]; FP8 E4M3/E5M2).

`quantize_per_token` is TWQ (one dynamic scale per row, absmax / the format's max); `quantize` is the static form (FWQ
when the scale has one entry per feature, SQ when it is a scalar); `dequantize` multiplies back. The references are the
formats' own (zqhero_fx/formats.py). Scales never fall below MIN_SCALE, so all-zero rows and zero-range channels
quantize to 0 instead of dividing by zero; values past a static range saturate. The Triton kernels cover INT8, FP8 E4M3
and FP8 E5M2 (one kernel each op; the output / input pointer's element type picks the format), bit-exact against the
references: IEEE division, and FP8 rounding done in integer arithmetic (`round_to_fp8_grid`), not by the cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zqhero_fx import dispatch
from zqhero_fx.kernels import int8_cpu
from zqhero_fx.formats import INT8, MIN_SCALE, format_of_dtype
from zqhero_fx.kernels._triton_common import (
    MIN_SCALE_F,
    as_rows,
    cast_rne,
    device_guard,
    per_token_scale,
    quantize_to,
    triton_takes_format,
)

QMAX = int(INT8.max_value)


# ---------------------------------------------------------------- reference (the spec)
def quantize_per_token_ref(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = format_of_dtype(dtype).quantize_per_token(x)
    # Contiguous like the fake implementations say: elementwise ops would otherwise keep a permuted input's strides
    # (CPU SDPA returns a transposed layout), and Inductor checks the strides of extern-call outputs.
    return q.contiguous(), scale.contiguous()


def quantize_ref(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    return format_of_dtype(dtype).quantize(x, scale).contiguous()


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(out_dtype).contiguous()


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr,
    n_rows, n_cols,
    stride_xm, stride_xn, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    # The format is q's element type (int8, float8e4nv, float8e5): a compile-time constant.
    Q_DTYPE: tl.constexpr = q_ptr.dtype.element_ty
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
        scale = per_token_scale(tl.max(tl.abs(x), axis=1), Q_DTYPE)
        tl.store(q_rows + cols[None, :], quantize_to(x, scale[:, None], Q_DTYPE), mask=mask)
    else:
        # Rows wider than a register block: one sweep for the absmax, a second one (mostly L2 hits) to quantize.
        absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & ((start + cols)[None, :] < n_cols)
            x = tl.load(x_rows + (start + cols)[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        scale = per_token_scale(absmax, Q_DTYPE)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & ((start + cols)[None, :] < n_cols)
            x = tl.load(x_rows + (start + cols)[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + (start + cols)[None, :], quantize_to(x, scale[:, None], Q_DTYPE), mask=mask)
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
    q = quantize_to(x.to(tl.float32), scale, q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr,
    n_rows, n_cols,
    stride_qm, stride_qn, stride_sm, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # q and scale both arrive as broadcast views of the output shape, so either may carry the broadcast. Loading an
    # int8 or float8 code and widening it to fp32 is exact (FP8 NaN / inf codes aside under the interpreter, which
    # decodes them as finite numbers; the GPU does not).
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qn, mask=mask, other=0.0)
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


def quantize_per_token_triton(x, dtype=torch.int8):
    out_q = torch.empty(x.shape, dtype=dtype, device=x.device)
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


def quantize_triton(x, scale, dtype=torch.int8):
    out_q = torch.empty(x.shape, dtype=dtype, device=x.device)
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
def _quantized_out(x, *rest) -> bool:
    """The output dtype (the last argument) is one the kernels write: int8, or float8 on sm_89+ / the interpreter."""
    return isinstance(rest[-1], torch.dtype) and triton_takes_format(rest[-1], x.device)


def _dequantize_takes(q, *rest) -> bool:
    return triton_takes_format(q.dtype, q.device)


# CPU (INT8 from float32): one pass per row in C++ (csrc/quantize_cpu.cpp, via int8_cpu.py). Under Inductor these
# decompose into the references instead, which it fuses with the float op that produces x.
dispatch.register("quantize_per_token", dispatch.KernelSpec(
    reference=quantize_per_token_ref, triton=quantize_per_token_triton, triton_applies=_quantized_out,
    cpu=int8_cpu.quantize_per_token, cpu_applies=int8_cpu.quantize_per_token_takes, cpu_available=int8_cpu.available))
dispatch.register("quantize", dispatch.KernelSpec(
    reference=quantize_ref, triton=quantize_triton, triton_applies=_quantized_out,
    cpu=int8_cpu.quantize, cpu_applies=int8_cpu.quantize_takes, cpu_available=int8_cpu.available))
dispatch.register("dequantize", dispatch.KernelSpec(
    reference=dequantize_ref, triton=dequantize_triton, triton_applies=_dequantize_takes))
