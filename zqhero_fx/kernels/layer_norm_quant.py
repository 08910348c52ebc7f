"""LN^quant: optional residual add + LayerNorm + per-token absmax + INT8 output + per-token scale, one pass per row.

TWQ is free here because LayerNorm already reduces over the row. Outputs: (q int8, scale fp32 [..., 1], normed, summed),
where `normed` (the float LayerNorm output, needed by a post-LN residual stream) and `summed` (x + residual, needed by a
pre-LN residual stream) are empty tensors unless asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zqhero_fx.kernels._select import wants_triton
from zqhero_fx.kernels.quantize import quantize_per_token_ref


# ---------------------------------------------------------------- reference (the spec)
def layer_norm_quant_ref(x, residual, weight, bias, eps, emit_normed, emit_sum):
    summed = x if residual is None else x + residual
    normed32 = F.layer_norm(
        summed.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps
    )
    q, scale = quantize_per_token_ref(normed32)
    empty = x.new_empty(0)
    return (
        q,
        scale,
        normed32.to(x.dtype) if emit_normed else empty,
        summed if emit_sum else empty,
    )


# ---------------------------------------------------------------- Triton kernel and launcher
def layer_norm_quant_triton(x, residual, weight, bias, eps, emit_normed, emit_sum):
    raise NotImplementedError("Triton layer_norm_quant: written under issue 3")


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
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
        x.new_empty(x.shape) if emit_normed else x.new_empty(0),
        x.new_empty(x.shape) if emit_sum else x.new_empty(0),
    )
