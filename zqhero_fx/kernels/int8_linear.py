"""INT8 x INT8 -> INT32 GEMM with a fused epilogue.

y = act(acc * x_scale * w_scale + bias) (+ residual), then either cast to `out_dtype` or requantized to INT8 as
round(y / out_scale) for the next INT8 consumer. `xq` is [..., K] int8; `x_scale` is per token ([..., 1]) or a scalar
([1], the unit scale left after an FWQ fold); `wq` is [N, K] int8, K-major (the layout Hopper's INT8 MMA wants for B);
`w_scale` is [N]; `out_scale` is [N] (FWQ) or [1] (SQ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zqhero_fx.kernels._select import wants_triton
from zqhero_fx.kernels.quantize import QMAX

ACTIVATIONS = ("none", "gelu", "gelu_tanh")


# ---------------------------------------------------------------- reference (the spec)
def int8_matmul_ref(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    """Exact int32 a[M, K] @ b[N, K]^T. torch._int_mm runs oneDNN's INT8 GEMM on CPU."""
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
        return torch.round(y / out_scale.float()).clamp_(-QMAX, QMAX).to(torch.int8)
    return y.to(out_dtype)


# ---------------------------------------------------------------- Triton kernel and launcher
def int8_linear_triton(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype):
    raise NotImplementedError("Triton int8_linear: written under issue 3")


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
