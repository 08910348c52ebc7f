"""Quantized GEMM with a fused epilogue: INT8 x INT8 -> INT32 (exact), or FP8 x FP8 accumulated in fp32.

y = act(acc * x_scale * w_scale + bias) (+ residual), then either cast to `out_dtype` or requantized into `out_dtype`
(int8 / float8) with `out_scale` for the next quantized consumer. `xq` is [..., K]; `x_scale` is per token ([..., 1])
or a scalar ([1], the unit scale left after an FWQ fold); `wq` is [N, K], K-major (the layout Hopper's MMA wants for
B); `w_scale` is [N]; `out_scale` is [N] (FWQ) or [1] (SQ).

The Triton kernel takes INT8 x INT8 (exact INT32 accumulation) and FP8 x FP8 (E4M3 or E5M2, either side; fp32
accumulation; sm_89+ on a GPU), and writes a float, INT8 or FP8 output: one kernel, the operands' element types pick
the specialisation. On CPU, float8 operands run the reference (an fp32 matmul of the widened operands): torch 2.13's
CPU `torch._scaled_mm` widens them the same way and adds copies and scale multiplies, and measured slower at every
BERT-base shape (benchmarks/bench_fp8_cpu.py), so it is not registered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zqhero_fx import dispatch
from zqhero_fx.kernels import int8_cpu
from zqhero_fx.formats import format_of_dtype, is_quantized_dtype
from zqhero_fx.kernels._triton_common import (
    grouped_tile,
    ACTIVATION_CODES,
    FP8_DTYPES,
    accumulator_dtype,
    as_rows,
    cast_rne,
    device_guard,
    epilogue_activation,
    interpreting,
    is_fp8,
    quantize_to,
    row_scale_operand,
    triton_takes_format,
)
from zqhero_fx.ops import ACTIVATIONS


# ---------------------------------------------------------------- reference (the spec)
def int8_matmul_ref(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    """Exact int32 a[M, K] @ b[N, K]^T. torch._int_mm runs oneDNN's INT8 GEMM on CPU.

    torch._int_mm returns wrong values on CPU when K == 1 (torch 2.13: e.g. [[-4891, 7102]] comes back as [[0, 0]]),
    and K == 0 is not a GEMM it takes; both are outer products (or zeros), computed exactly in int32 instead.
    """
    if a.shape[1] == 0:
        return a.new_zeros((a.shape[0], b_nk.shape[0]), dtype=torch.int32)
    if a.shape[1] == 1:
        return a.to(torch.int32) * b_nk.to(torch.int32).t()
    return torch._int_mm(a.contiguous(), b_nk.t())


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    raise ValueError(f"quantized_linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def quantized_matmul_ref(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    """a[M, K] @ b[N, K]^T as float32: exact INT32 for int8 operands, fp32 accumulation of exact products for float8."""
    if a.dtype == torch.int8 and b_nk.dtype == torch.int8:
        return int8_matmul_ref(a, b_nk).float()
    return a.float() @ b_nk.float().t()


def check_output(out_scale, out_dtype, op: str) -> None:
    if out_scale is not None and not is_quantized_dtype(out_dtype):
        raise ValueError(f"{op}: out_scale is given, so out_dtype must be a quantized dtype (int8, float8), "
                         f"got {out_dtype}")
    if out_scale is None and is_quantized_dtype(out_dtype):
        raise ValueError(f"{op}: out_dtype {out_dtype} is quantized but no out_scale was given")


def quantized_linear_ref(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype):
    check_output(out_scale, out_dtype, "quantized_linear")
    acc = quantized_matmul_ref(xq.reshape(-1, xq.shape[-1]), wq)
    return linear_epilogue_ref(acc, xq.shape[:-1], x_scale, w_scale, bias, residual, out_scale, activation, out_dtype)


def linear_epilogue_ref(acc, lead, x_scale, w_scale, bias, residual, out_scale, activation, out_dtype):
    """The reference's epilogue on the float32 accumulator [M, N]: scales, bias, activation, residual, output."""
    row_scale = x_scale.float().reshape(-1, 1) if x_scale.numel() != 1 else x_scale.float().reshape(1, 1)
    y = acc * row_scale * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    y = apply_activation(y, activation).reshape(*lead, acc.shape[1])
    if residual is not None:
        y = y + residual.float()
    if out_scale is not None:
        return format_of_dtype(out_dtype).quantize(y, out_scale)
    return y.to(out_dtype)


# ---------------------------------------------------------------- Triton kernel
@triton.jit
def _quantized_linear_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, res_ptr, os_ptr, out_ptr,
    M, N, K,
    m_bucket,  # autotune key only: the next power of two of M, so a new batch size does not re-tune
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_xs, stride_ws, stride_rm, stride_rn, stride_os,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, QUANT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # weight tiles shared in L2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap onto valid ones for the loads (their results are never stored), so the main
    # loop masks only the K tail.
    rows_a = (offs_m % M).to(tl.int64)
    cols_b = (offs_n % N).to(tl.int64)
    a_ptrs = x_ptr + rows_a[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # B tile [BLOCK_K, BLOCK_N] read straight from the [N, K] K-major weight through its strides: no transposed copy,
    # and K-contiguous is the B layout Hopper's 8-bit wgmma (INT8 and FP8) takes.
    b_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols_b[None, :] * stride_wn

    # Main loop. INT8 x INT8 -> INT32: exact integer accumulation. FP8 x FP8 (E4M3 / E5M2, mixed too): the products
    # are exact in fp32 and accumulate in fp32. On sm_90 an FP8 wgmma chain accumulates at reduced precision, so
    # max_num_imprecise_acc=BLOCK_K adds each K tile's partial sum into the fp32 accumulator with an ordinary fp32
    # add (promotion every <= 128 terms, the DeepSeek-V3 recipe); Triton's sm_90 default would never promote.
    FP8_OPERANDS: tl.constexpr = is_fp8(x_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=accumulator_dtype(x_ptr.dtype.element_ty))
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if FP8_OPERANDS:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk

    # Epilogue, in the reference's operation order so that each fp32 rounding matches:
    # acc * x_scale (per token, or stride 0 for a scalar) * w_scale (per channel, or stride 0).
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    x_scale = tl.load(xs_ptr + offs_m * stride_xs, mask=m_mask, other=0.0).to(tl.float32)
    w_scale = tl.load(ws_ptr + offs_n * stride_ws, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = epilogue_activation(y, ACTIVATION)
    rows_out = offs_m.to(tl.int64)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows_out[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
        y = y + res.to(tl.float32)

    # Output: float in out_ptr's dtype, or requantized (INT8 or FP8: out_ptr's element type) for the next quantized
    # consumer, with the reference's IEEE division and rounding.
    out_ptrs = out_ptr + rows_out[:, None] * N + offs_n[None, :]
    if QUANT_OUT:
        out_scale = tl.load(os_ptr + offs_n * stride_os, mask=n_mask, other=1.0).to(tl.float32)
        tl.store(out_ptrs, quantize_to(y, out_scale[None, :], out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


def _gemm_config(block_m, block_n, block_k, num_warps, num_stages):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_warps=num_warps, num_stages=num_stages,
    )


# Bounded tuning space for A100 (mma.sync m16n8k32) and H100/H200 (wgmma): 8-bit tiles (INT8 and FP8 alike) are
# twice as deep in K as the FP16 ones for the same bytes. The largest (128x256x128, 3 stages) needs 144 KiB of shared
# memory, within both parts' limits; the small-M configs keep decode-like shapes from idling most of a 128-row tile.
# FP8 (sm_89+: Ada, H100/H200) uses the same tiles: its operands have INT8's size.
GEMM_CONFIGS = [
    _gemm_config(128, 256, 128, 8, 3),
    _gemm_config(256, 128, 128, 8, 3),
    _gemm_config(128, 128, 128, 8, 4),
    _gemm_config(128, 128, 64, 4, 4),
    _gemm_config(128, 64, 128, 4, 4),
    _gemm_config(64, 128, 128, 4, 4),
    _gemm_config(64, 64, 128, 4, 5),
    _gemm_config(32, 64, 128, 4, 5),
]
# Under TRITON_INTERPRET one small tile, no tuning: the interpreter's cost is per program and per op, not per FLOP.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Skip tiles more than twice as tall as the (bucketed) M: they only add idle rows and tuning time."""
    m_bucket = named_args["m_bucket"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, 2 * m_bucket)]
    return kept or configs


# The operand and output dtypes are part of the key: INT8 and FP8 specialisations tune separately.
_quantized_linear_kernel_tuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["m_bucket", "N", "K", "HAS_BIAS", "HAS_RESIDUAL", "ACTIVATION", "QUANT_OUT"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_quantized_linear_kernel)


# ---------------------------------------------------------------- launcher
def quantized_linear_triton(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype):
    check_output(out_scale, out_dtype, "quantized_linear")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"quantized_linear: the Triton kernel has no {activation!r} epilogue; it has "
                         f"{tuple(ACTIVATION_CODES)}")
    lead, k = xq.shape[:-1], xq.shape[-1]
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise ValueError(f"quantized_linear: xq has K={k} but wq is {tuple(wq.shape)}")
    out = torch.empty((*lead, n), dtype=out_dtype, device=xq.device)
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    if out.numel() == 0:
        return out
    xs, stride_xs = row_scale_operand(x_scale, m, "quantized_linear x_scale")
    ws, stride_ws = row_scale_operand(w_scale, n, "quantized_linear w_scale")
    if residual is not None:
        r2, stride_rm, stride_rn = as_rows(residual, out.shape)
    else:
        r2, stride_rm, stride_rn = out, 0, 0  # never read: HAS_RESIDUAL is False
    if out_scale is not None:
        os_, stride_os = row_scale_operand(out_scale, n, "quantized_linear out_scale")
    else:
        os_, stride_os = ws, 0  # never read: QUANT_OUT is False
    args = (
        x2, wq, xs, ws, bias.contiguous() if bias is not None else ws, r2, os_, out,
        m, n, k, triton.next_power_of_2(m),
        x2.stride(0), x2.stride(1), wq.stride(0), wq.stride(1),
        stride_xs, stride_ws, stride_rm, stride_rn, stride_os,
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        ACTIVATION=ACTIVATION_CODES[activation], QUANT_OUT=out_scale is not None,
    )
    # enable_fp_fusion=False: no FMA contraction of the epilogue's multiply-adds, so each fp32 rounding happens where
    # the reference's separate ops round, and the float output is bit-identical to it (GeLU aside).
    with device_guard(xq):
        if interpreting():
            cfg = INTERPRETER_CONFIG
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            _quantized_linear_kernel[grid](*args, **flags, **cfg, enable_fp_fusion=False)
        else:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            _quantized_linear_kernel_tuned[grid](*args, **flags, enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------- registration
def _triton_takes(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype) -> bool:
    """INT8 x INT8 or FP8 x FP8 operands (FP8 on sm_89+), a known epilogue, a float or INT8 / FP8 output."""
    operands_ok = (xq.dtype == wq.dtype == torch.int8) or (
        xq.dtype in FP8_DTYPES and wq.dtype in FP8_DTYPES and triton_takes_format(xq.dtype, xq.device))
    output_ok = out_scale is None or triton_takes_format(out_dtype, xq.device)
    return operands_ok and output_ok and activation in ACTIVATION_CODES


# CPU: INT8 x INT8 in C++ with the epilogue fused (csrc/quantized_linear_cpu.cpp; int8_cpu.py picks zqhero's VNNI GEMM
# or oneDNN's by instruction set). Kept opaque under Inductor too, so that every entry point runs the same kernel.
dispatch.register("quantized_linear", dispatch.KernelSpec(
    reference=quantized_linear_ref, triton=quantized_linear_triton, triton_applies=_triton_takes,
    cpu=int8_cpu.quantized_linear, cpu_applies=int8_cpu.linear_takes, cpu_available=int8_cpu.available,
    cpu_kernel_beats_inductor=True))
