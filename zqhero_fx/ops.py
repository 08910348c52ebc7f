"""The zqhero IR: `torch.ops.zqhero.*` schemas and fake implementations, independent of any number format.

The passes emit these ops and import this module, never the kernels. The operands' dtypes and scale shapes say the
format: int8 values with float32 scales are INT8, float8_e4m3fn values are FP8 E4M3, and so on (zqhero_fx/formats.py).
A scale broadcasts against its operand: [..., 1] per token (TWQ), [D] per feature (FWQ), [1] per tensor (SQ), [N] per
output channel for weights. Each op body asks zqhero_fx/dispatch.py which implementation runs (reference, Triton, CPU
kernel); the kernels register themselves there. Fake implementations give shapes and dtypes for tracing.

Output conventions: an op that may emit a quantized result takes `out_scale` (None for a float output) and
`out_dtype`, the dtype it returns: a quantized dtype (int8, float8_*) with `out_scale`, a float dtype without.
"""

from __future__ import annotations

import torch

from zqhero_fx import dispatch

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "silu", "quick_gelu")
NORM_KINDS = ("layer", "rms")


@torch.library.custom_op("zqhero::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """TWQ: values in `dtype` and a float32 scale of shape x.shape[:-1] + (1,), from each row's absmax."""
    return dispatch.run("quantize_per_token", x, dtype)


@quantize_per_token.register_fake
def _(x, dtype=torch.int8):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("zqhero::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Static quantization (FWQ with a per-feature scale, SQ with a scalar [1]); saturates at the format's range."""
    return dispatch.run("quantize", x, scale, dtype)


@quantize.register_fake
def _(x, scale, dtype=torch.int8):
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("zqhero::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dispatch.run("dequantize", q, scale, out_dtype)


@dequantize.register_fake
def _(q, scale, out_dtype=torch.float32):
    return q.new_empty(torch.broadcast_shapes(q.shape, scale.shape), dtype=out_dtype)


@torch.library.custom_op("zqhero::norm_quant", mutates_args=())
def norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    emit_normed: bool,
    emit_sum: bool,
    kind: str = "layer",
    dtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm^quant: optional residual add, LayerNorm or RMSNorm (`kind`), per-token quantization to `dtype` (TWQ is
    free here: the norm already reduces over the row). Returns (q, scale [..., 1], normed, summed); `normed` (the
    float norm output) and `summed` (x + residual) are empty unless asked for."""
    return dispatch.run("norm_quant", x, residual, weight, bias, eps, emit_normed, emit_sum, kind, dtype)


@norm_quant.register_fake
def _(x, residual, weight, bias, eps, emit_normed, emit_sum, kind="layer", dtype=torch.int8):
    # x + residual promotes (fp16 activations + an fp32 residual stream give an fp32 sum), as the reference does.
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return (
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
        x.new_empty(x.shape) if emit_normed else x.new_empty(0),
        x.new_empty(x.shape, dtype=sum_dtype) if emit_sum else x.new_empty(0),
    )


@torch.library.custom_op("zqhero::quantized_linear", mutates_args=())
def quantized_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y = act(x·wᵀ · x_scale · w_scale + bias) (+ residual), cast to `out_dtype` or quantized with `out_scale`.

    x [..., K] and w [N, K] are quantized values (their dtypes say the formats); x_scale is per token [..., 1] or a
    scalar [1]; w_scale is per output channel [N]; out_scale is [N] (FWQ) or [1] (SQ)."""
    return dispatch.run("quantized_linear", x, x_scale, w, w_scale, bias, residual, out_scale, activation, out_dtype)


@quantized_linear.register_fake
def _(x, x_scale, w, w_scale, bias, residual, out_scale, activation, out_dtype):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("zqhero::quantized_attention", mutates_args=())
def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    qk_scale: float,
    p_scale: float,
    out_scale: torch.Tensor | None,
    is_causal: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Attention core on quantized q [B, H, Sq, D], k, v [B, Hkv, Sk, D] (Hkv divides H: GQA/MQA): logits
    (q·kᵀ)·qk_scale (+ mask), probabilities quantized before normalisation with the static `p_scale`, quantized P·V,
    then cast to `out_dtype` or quantized with `out_scale` (broadcasting against the [B, H, Sq, Dv] output)."""
    return dispatch.run("quantized_attention", q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype)


@quantized_attention.register_fake
def _(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)


@torch.library.custom_op("zqhero::quantized_embedding", mutates_args=())
def quantized_embedding(
    indices: torch.Tensor, table_q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Gather quantized rows of a [V, D] table and dequantize them with their static scale ([V, 1] per row or [1])."""
    return dispatch.run("quantized_embedding", indices, table_q, scale, out_dtype)


@quantized_embedding.register_fake
def _(indices, table_q, scale, out_dtype):
    return table_q.new_empty((*indices.shape, table_q.shape[1]), dtype=out_dtype)


@torch.library.custom_op("zqhero::embedding_norm_quant", mutates_args=())
def embedding_norm_quant(
    indices: list[torch.Tensor],
    tables: list[torch.Tensor],
    scales: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    emit_normed: bool,
    dtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embedding^norm^quant: gather several tables (quantized, or float with an empty scale), sum, LayerNorm,
    per-token quantization, in one pass. Returns (q, scale [..., 1], normed or empty)."""
    return dispatch.run("embedding_norm_quant", indices, tables, scales, weight, bias, eps, emit_normed, dtype)


def _broadcast_shape(shapes) -> list:
    """Broadcast without comparing sizes: a literal 1 gives way to anything else. Comparing a symbolic batch size
    with 1 (as torch.broadcast_shapes does) can settle on 1 when the size first seen was 1."""
    ndim = max(len(s) for s in shapes)
    padded = [(1,) * (ndim - len(s)) + tuple(s) for s in shapes]
    return [next((d for d in dims if not (isinstance(d, int) and d == 1)), 1) for dims in zip(*padded)]


@embedding_norm_quant.register_fake
def _(indices, tables, scales, weight, bias, eps, emit_normed, dtype=torch.int8):
    shape = _broadcast_shape([i.shape for i in indices])
    dim = tables[0].shape[-1]
    normed = weight.new_empty((*shape, dim)) if emit_normed else weight.new_empty(0)
    return (weight.new_empty((*shape, dim), dtype=dtype), weight.new_empty((*shape, 1), dtype=torch.float32), normed)


@torch.library.custom_op("zqhero::quantized_gated_linear", mutates_args=())
def quantized_gated_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    w_gate: torch.Tensor,
    w_gate_scale: torch.Tensor,
    w_up: torch.Tensor,
    w_up_scale: torch.Tensor,
    activation: str,
    out_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The gated MLP front (SwiGLU with "silu", GeGLU with "gelu_tanh"): y = act(x·w_gateᵀ · x_scale · w_gate_scale)
    * (x·w_upᵀ · x_scale · w_up_scale), cast to `out_dtype` or quantized with `out_scale`, as quantized_linear does.

    x [..., K], w_gate and w_up [N, K] are quantized values; x_scale is per token [..., 1] or a scalar [1]; the weight
    scales are per output channel [N]; out_scale is [N] (FWQ) or [1] (SQ)."""
    return dispatch.run("quantized_gated_linear", x, x_scale, w_gate, w_gate_scale, w_up, w_up_scale, activation,
                        out_scale, out_dtype)


@quantized_gated_linear.register_fake
def _(x, x_scale, w_gate, w_gate_scale, w_up, w_up_scale, activation, out_scale, out_dtype):
    return x.new_empty((*x.shape[:-1], w_gate.shape[0]), dtype=out_dtype)


@torch.library.custom_op("zqhero::rotary_quantize", mutates_args=())
def rotary_quantize(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Rotary position embedding (Hugging Face's rotate_half form) on the first cos.shape[-1] features of x
    [B, H, T, D] (the rest pass through), then static quantization with a per-tensor scale [1] into `out_dtype`
    (int8, float8). cos and sin are [B, T, rotary_dim], [1, T, rotary_dim] or [T, rotary_dim], shared by the heads.
    The output is contiguous [B, H, T, D]."""
    return dispatch.run("rotary_quantize", x, cos, sin, scale, out_dtype)


@rotary_quantize.register_fake
def _(x, cos, sin, scale, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("zqhero::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    w_codes: list[torch.Tensor],
    w_format: str,
    group_size: int,
    w_scale: torch.Tensor,
    w_group_scale: torch.Tensor | None,
    group_scale_kind: str,
    w_group_zero: torch.Tensor | None,
    lorc: list[torch.Tensor],
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """A GEMM on sub-byte packed weights (zqhero_fx/weights.py has the layouts): W4A8 (ZeroQuant-FP), A8W4 (DGQ) and
    weight-only FP6 "4+2", one op whose operands say which.

    The weight [N, K] is w_scale[n] * f[n, g] * v[n, k], g = k // group_size: v the code values of `w_format` read from
    `w_codes` (4-bit: one [N, K/2] nibble stream; FP6: [lo4 [N, K/2], hi2 [N, K/4]]), minus w_group_zero[n, g] when
    given (then the 4-bit codes are unsigned 0..15); f the group factor by `group_scale_kind`: "none" (1), "integer"
    (w_group_scale, int8 >= 1: DGQ's integer group scales, so f * v is an INT8 weight) or "exponent" (2 ** w_group_scale:
    ZeroQuant-FP's power-of-two ratios, so f * v is an exact FP8 value). x is quantized ([..., K] int8 / float8 with a
    per-token or scalar x_scale) or float with x_scale None (weight-only). `lorc` is [] or LoRC's 8-bit factors
    [b int8 [r, K], b_scale [r], a int8 [N, r], a_scale [N]]: W += (a * a_scale) (b * b_scale), applied as a thin side
    GEMM. y = act(acc * x_scale * w_scale + x·(side) + bias) (+ residual), cast to `out_dtype` or quantized with
    `out_scale`, as quantized_linear does."""
    return dispatch.run("packed_linear", x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale,
                        group_scale_kind, w_group_zero, lorc, bias, residual, out_scale, activation, out_dtype)


@packed_linear.register_fake
def _(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero, lorc, bias,
      residual, out_scale, activation, out_dtype):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]), dtype=out_dtype)


OPS = {
    "quantize_per_token": quantize_per_token,
    "quantize": quantize,
    "dequantize": dequantize,
    "norm_quant": norm_quant,
    "quantized_linear": quantized_linear,
    "quantized_attention": quantized_attention,
    "quantized_embedding": quantized_embedding,
    "embedding_norm_quant": embedding_norm_quant,
    "quantized_gated_linear": quantized_gated_linear,
    "rotary_quantize": rotary_quantize,
    "packed_linear": packed_linear,
}

__all__ = ["OPS", "ACTIVATIONS", "NORM_KINDS", *OPS]
