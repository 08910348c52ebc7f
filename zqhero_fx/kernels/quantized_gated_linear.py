"""The gated MLP front of decoder LLMs, fused: two quantized GEMMs on one activation and their product.

y = act(acc_gate * x_scale * w_gate_scale) * (acc_up * x_scale * w_up_scale), with acc_* = x @ w_*^T (exact INT32 for
INT8 operands, fp32 accumulation of exact products for FP8), then cast to `out_dtype` or quantized into `out_dtype`
(int8 / float8) with `out_scale` ([N] or [1]) exactly as quantized_linear's epilogue does. `activation` "silu" is
Llama's SwiGLU, "gelu_tanh" Gemma's GeGLU; any of ops.ACTIVATIONS is accepted ("none" gives the bilinear GLU).
Shapes as in quantized_linear: x [..., K], x_scale [..., 1] (per token) or [1], w_gate and w_up [N, K] (K-major),
their scales [N].

The reference reuses quantized_linear's pieces (the exact GEMM `quantized_matmul_ref`, the epilogue
`linear_epilogue_ref` for each branch, the output check) and multiplies the branches in fp32. The Triton kernel keeps
two accumulators per program, the gate tile and the up tile of the same N block, fed by the same x tile loads, and
runs the epilogue in the reference's operation order (no FMA contraction): bit-exact for INT8 and exact FP8 sums
wherever the activation itself is (none, relu); exp / erf / tanh may move the last bit.

CPU path (kernels/int8_cpu.py): quantized_linear's CPU kernel twice, the up GEMM to float32 and then the gate GEMM
with the product in its epilogue (the two weights stay separate tensors). One GEMM over both weights would need them
concatenated along N: per call that is a copy of both (3x slower at M=1, measured), and stored concatenated it won
only 1-7 % with oneDNN (K=576, N=1536 on the Intel VM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zqhero_fx import dispatch
from zqhero_fx.kernels import int8_cpu
from zqhero_fx.formats import format_of_dtype
from zqhero_fx.kernels._triton_common import (
    grouped_tile,
    ACTIVATION_CODES,
    FP8_DTYPES,
    MIN_SCALE_F,
    accumulator_dtype,
    cast_rne,
    device_guard,
    epilogue_activation,
    interpreting,
    is_fp8,
    quantize_to,
    row_scale_operand,
    triton_takes_format,
)
from zqhero_fx.kernels.quantized_linear import (
    INTERPRETER_CONFIG,
    _gemm_config,
    _prune_gemm_configs,
    check_output,
    linear_epilogue_ref,
    quantized_matmul_ref,
)
from zqhero_fx.ops import ACTIVATIONS

OP = "quantized_gated_linear"


# ---------------------------------------------------------------- reference (the spec)
def _check_shapes(xq, w_gate, w_up) -> None:
    if w_gate.dim() != 2 or w_gate.shape != w_up.shape:
        raise ValueError(f"{OP}: w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must both be [N, K]")
    if w_gate.shape[1] != xq.shape[-1]:
        raise ValueError(f"{OP}: x has K={xq.shape[-1]} but the weights are {tuple(w_gate.shape)}")


def gated_epilogue_ref(acc_gate, acc_up, lead, x_scale, w_gate_scale, w_up_scale, activation, out_scale, out_dtype):
    """The epilogue on the two float32 accumulators [M, N]: each branch through quantized_linear's epilogue (scales,
    activation on the gate only), their fp32 product, then the output cast or quantization."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    rows = (acc_gate.shape[0],)
    gate = linear_epilogue_ref(acc_gate, rows, x_scale, w_gate_scale, None, None, None, activation, torch.float32)
    up = linear_epilogue_ref(acc_up, rows, x_scale, w_up_scale, None, None, None, "none", torch.float32)
    y = (gate * up).reshape(*lead, acc_gate.shape[1])
    if out_scale is not None:
        return format_of_dtype(out_dtype).quantize(y, out_scale)
    return y.to(out_dtype)


def quantized_gated_linear_ref(xq, x_scale, w_gate, w_gate_scale, w_up, w_up_scale, activation, out_scale, out_dtype):
    check_output(out_scale, out_dtype, OP)
    _check_shapes(xq, w_gate, w_up)
    x2 = xq.reshape(-1, xq.shape[-1])
    acc_gate = quantized_matmul_ref(x2, w_gate)
    acc_up = quantized_matmul_ref(x2, w_up)
    return gated_epilogue_ref(acc_gate, acc_up, xq.shape[:-1], x_scale, w_gate_scale, w_up_scale, activation,
                              out_scale, out_dtype)


# ---------------------------------------------------------------- Triton kernel
@triton.jit
def _quantized_gated_linear_kernel(
    x_ptr, wg_ptr, wu_ptr, xs_ptr, wgs_ptr, wus_ptr, os_ptr, out_ptr,
    M, N, K,
    m_bucket,  # autotune key only: the next power of two of M
    stride_xm, stride_xk, stride_wgn, stride_wgk, stride_wun, stride_wuk,
    stride_xs, stride_wgs, stride_wus, stride_os,
    ACTIVATION: tl.constexpr, QUANT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # weight tiles shared in L2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows / columns wrap onto valid ones for the loads (never stored): only the K tail is masked.
    rows_a = (offs_m % M).to(tl.int64)
    cols_b = (offs_n % N).to(tl.int64)
    a_ptrs = x_ptr + rows_a[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Both B tiles [BLOCK_K, BLOCK_N] read through the [N, K] K-major weights' strides, no transposed copies.
    g_ptrs = wg_ptr + offs_k[:, None] * stride_wgk + cols_b[None, :] * stride_wgn
    u_ptrs = wu_ptr + offs_k[:, None] * stride_wuk + cols_b[None, :] * stride_wun

    # One x tile per K step feeds both dots. INT8: exact INT32 accumulators. FP8: fp32, each K tile's partial sum
    # promoted into the fp32 accumulator (max_num_imprecise_acc, see quantized_linear).
    FP8_OPERANDS: tl.constexpr = is_fp8(x_ptr.dtype.element_ty)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=accumulator_dtype(x_ptr.dtype.element_ty))
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=accumulator_dtype(x_ptr.dtype.element_ty))
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        bg = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        bu = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if FP8_OPERANDS:
            acc_g = tl.dot(a, bg, acc_g, max_num_imprecise_acc=BLOCK_K)
            acc_u = tl.dot(a, bu, acc_u, max_num_imprecise_acc=BLOCK_K)
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wgk
        u_ptrs += BLOCK_K * stride_wuk

    # Epilogue in the reference's order: (acc * x_scale) * w_scale per branch, the activation on the gate, the
    # product, then the output.
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    x_scale = tl.load(xs_ptr + offs_m * stride_xs, mask=m_mask, other=0.0).to(tl.float32)
    wg_scale = tl.load(wgs_ptr + offs_n * stride_wgs, mask=n_mask, other=0.0).to(tl.float32)
    wu_scale = tl.load(wus_ptr + offs_n * stride_wus, mask=n_mask, other=0.0).to(tl.float32)
    gate = acc_g.to(tl.float32) * x_scale[:, None] * wg_scale[None, :]
    gate = epilogue_activation(gate, ACTIVATION)
    up = acc_u.to(tl.float32) * x_scale[:, None] * wu_scale[None, :]
    y = gate * up

    rows_out = offs_m.to(tl.int64)
    out_ptrs = out_ptr + rows_out[:, None] * N + offs_n[None, :]
    if QUANT_OUT:
        # The reference's quantize: y / max(out_scale, MIN_SCALE) with IEEE division, onto the output's grid.
        out_scale = tl.load(os_ptr + offs_n * stride_os, mask=n_mask, other=1.0).to(tl.float32)
        out_scale = tl.maximum(out_scale, MIN_SCALE_F)
        tl.store(out_ptrs, quantize_to(y, out_scale[None, :], out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


# Two accumulators and two B tiles per stage: the largest linear tiles (128x256) would need 256 accumulator registers
# per thread and too much shared memory, so the space stops at 128x128. Shared memory per config is
# stages * (BLOCK_M + 2 * BLOCK_N) * BLOCK_K bytes: at most 144 KiB (128x128x128, 3 stages), within sm_80's 164 KiB
# and sm_90's 227 KiB.
GATED_GEMM_CONFIGS = [
    _gemm_config(128, 128, 128, 8, 3),
    _gemm_config(128, 128, 64, 8, 4),
    _gemm_config(128, 64, 128, 4, 4),
    _gemm_config(64, 128, 128, 4, 3),
    _gemm_config(64, 64, 128, 4, 4),
    _gemm_config(32, 64, 128, 4, 4),
]

_quantized_gated_linear_kernel_tuned = triton.autotune(
    configs=GATED_GEMM_CONFIGS,
    key=["m_bucket", "N", "K", "ACTIVATION", "QUANT_OUT"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_quantized_gated_linear_kernel)


# ---------------------------------------------------------------- launcher
def quantized_gated_linear_triton(xq, x_scale, w_gate, w_gate_scale, w_up, w_up_scale, activation, out_scale,
                                  out_dtype):
    check_output(out_scale, out_dtype, OP)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"{OP}: the Triton kernel has no {activation!r} epilogue; it has {tuple(ACTIVATION_CODES)}")
    _check_shapes(xq, w_gate, w_up)
    lead, k = xq.shape[:-1], xq.shape[-1]
    n = w_gate.shape[0]
    out = torch.empty((*lead, n), dtype=out_dtype, device=xq.device)
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    if out.numel() == 0:
        return out
    xs, stride_xs = row_scale_operand(x_scale, m, f"{OP} x_scale")
    wgs, stride_wgs = row_scale_operand(w_gate_scale, n, f"{OP} w_gate_scale")
    wus, stride_wus = row_scale_operand(w_up_scale, n, f"{OP} w_up_scale")
    if out_scale is not None:
        os_, stride_os = row_scale_operand(out_scale, n, f"{OP} out_scale")
    else:
        os_, stride_os = wgs, 0  # never read: QUANT_OUT is False
    args = (
        x2, w_gate, w_up, xs, wgs, wus, os_, out,
        m, n, k, triton.next_power_of_2(m),
        x2.stride(0), x2.stride(1), w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1),
        stride_xs, stride_wgs, stride_wus, stride_os,
    )
    flags = dict(ACTIVATION=ACTIVATION_CODES[activation], QUANT_OUT=out_scale is not None)
    # enable_fp_fusion=False: each fp32 multiply rounds where the reference's separate ops round.
    with device_guard(xq):
        if interpreting():
            cfg = INTERPRETER_CONFIG
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            _quantized_gated_linear_kernel[grid](*args, **flags, **cfg, enable_fp_fusion=False)
        else:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            _quantized_gated_linear_kernel_tuned[grid](*args, **flags, enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------- registration
def _triton_takes(xq, x_scale, w_gate, w_gate_scale, w_up, w_up_scale, activation, out_scale, out_dtype) -> bool:
    """All three operands INT8, or all FP8 (E4M3 / E5M2, mixed too; sm_89+); a known epilogue; a float, INT8 or FP8
    output."""
    operands_ok = (xq.dtype == w_gate.dtype == w_up.dtype == torch.int8) or (
        all(t.dtype in FP8_DTYPES for t in (xq, w_gate, w_up)) and triton_takes_format(xq.dtype, xq.device))
    output_ok = out_scale is None or triton_takes_format(out_dtype, xq.device)
    return operands_ok and output_ok and activation in ACTIVATION_CODES


# No `cpu=`: on CPU tensors the reference (two torch._int_mm calls) is the fast path; see the module docstring.
# CPU: the two GEMMs of quantized_linear's CPU kernel, the up branch's float output multiplied into the gate's
# epilogue (int8_cpu.py); opaque under Inductor like quantized_linear.
dispatch.register(OP, dispatch.KernelSpec(
    reference=quantized_gated_linear_ref, triton=quantized_gated_linear_triton, triton_applies=_triton_takes,
    cpu=int8_cpu.quantized_gated_linear, cpu_applies=int8_cpu.gated_linear_takes, cpu_available=int8_cpu.available,
    cpu_kernel_beats_inductor=True))
