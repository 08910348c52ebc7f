"""INT8 x INT8 -> INT32 GEMM with a fused epilogue.

y = act(acc * x_scale * w_scale + bias) (+ residual), then either cast to `out_dtype` or requantized to INT8 as
round(y / out_scale) for the next INT8 consumer. `xq` is [..., K] int8; `x_scale` is per token ([..., 1]) or a scalar
([1], the unit scale left after an FWQ fold); `wq` is [N, K] int8, K-major (the layout Hopper's INT8 MMA wants for B);
`w_scale` is [N]; `out_scale` is [N] (FWQ) or [1] (SQ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zqhero_fx.kernels._select import wants_triton
from zqhero_fx.kernels._triton_common import (
    ACTIVATION_CODES,
    as_rows,
    cast_rne,
    device_guard,
    epilogue_activation,
    interpreting,
    quantize_int8,
    row_scale_operand,
)
from zqhero_fx.kernels.quantize import QMAX

ACTIVATIONS = ("none", "gelu", "gelu_tanh")


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
    raise ValueError(f"int8_linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def int8_linear_ref(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype):
    lead, k = xq.shape[:-1], xq.shape[-1]
    acc = int8_matmul_ref(xq.reshape(-1, k), wq)
    row_scale = x_scale.float().reshape(-1, 1) if x_scale.numel() != 1 else x_scale.float().reshape(1, 1)
    y = acc.float() * row_scale * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    y = apply_activation(y, activation).reshape(*lead, wq.shape[0])
    if residual is not None:
        y = y + residual.float()
    if out_scale is not None:
        return torch.round(y / out_scale.float()).clamp(-QMAX, QMAX).to(torch.int8)
    return y.to(out_dtype)


# ---------------------------------------------------------------- Triton kernel
@triton.jit
def _int8_linear_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, res_ptr, os_ptr, out_ptr,
    M, N, K,
    m_bucket,  # autotune key only: the next power of two of M, so a new batch size does not re-tune
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_xs, stride_ws, stride_rm, stride_rn, stride_os,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, QUANT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles sweep the same column-tiles together, so the weight tiles they share are
    # still in L2 when the next row-tile asks for them.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap onto valid ones for the loads (their results are never stored), so the main
    # loop masks only the K tail.
    rows_a = (offs_m % M).to(tl.int64)
    cols_b = (offs_n % N).to(tl.int64)
    a_ptrs = x_ptr + rows_a[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # B tile [BLOCK_K, BLOCK_N] read straight from the [N, K] K-major weight through its strides: no transposed copy,
    # and K-contiguous is the B layout Hopper's INT8 wgmma takes.
    b_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols_b[None, :] * stride_wn

    # INT8 x INT8 -> INT32 main loop: exact integer accumulation.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
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

    # Output: float in out_ptr's dtype, or requantized INT8 for the next INT8 consumer.
    out_ptrs = out_ptr + rows_out[:, None] * N + offs_n[None, :]
    if QUANT_OUT:
        out_scale = tl.load(os_ptr + offs_n * stride_os, mask=n_mask, other=1.0).to(tl.float32)
        tl.store(out_ptrs, quantize_int8(y, out_scale[None, :]), mask=mask)
    else:
        tl.store(out_ptrs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


def _gemm_config(block_m, block_n, block_k, num_warps, num_stages):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_warps=num_warps, num_stages=num_stages,
    )


# Bounded tuning space for A100 (mma.sync m16n8k32) and H100/H200 (wgmma): INT8 tiles are twice as deep in K as the
# FP16 ones for the same bytes. The largest (128x256x128, 3 stages) needs 144 KiB of shared memory, within both parts'
# limits; the small-M configs keep decode-like shapes from idling most of a 128-row tile.
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


_int8_linear_kernel_tuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["m_bucket", "N", "K", "HAS_BIAS", "HAS_RESIDUAL", "ACTIVATION", "QUANT_OUT"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_int8_linear_kernel)


# ---------------------------------------------------------------- launcher
def int8_linear_triton(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype):
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"int8_linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    lead, k = xq.shape[:-1], xq.shape[-1]
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise ValueError(f"int8_linear: xq has K={k} but wq is {tuple(wq.shape)}")
    out = torch.empty((*lead, n), dtype=torch.int8 if out_scale is not None else out_dtype, device=xq.device)
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    if out.numel() == 0:
        return out
    xs, stride_xs = row_scale_operand(x_scale, m, "int8_linear x_scale")
    ws, stride_ws = row_scale_operand(w_scale, n, "int8_linear w_scale")
    if residual is not None:
        r2, stride_rm, stride_rn = as_rows(residual, out.shape)
    else:
        r2, stride_rm, stride_rn = out, 0, 0  # never read: HAS_RESIDUAL is False
    if out_scale is not None:
        os_, stride_os = row_scale_operand(out_scale, n, "int8_linear out_scale")
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
            _int8_linear_kernel[grid](*args, **flags, **cfg, enable_fp_fusion=False)
        else:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            _int8_linear_kernel_tuned[grid](*args, **flags, enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------- registration
@torch.library.custom_op("zqhero::int8_linear", mutates_args=())
def int8_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if wants_triton(xq):
        return int8_linear_triton(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype)
    return int8_linear_ref(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype)


@int8_linear.register_fake
def _(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype):
    dtype = torch.int8 if out_scale is not None else out_dtype
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=dtype)
