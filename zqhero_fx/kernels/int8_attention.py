"""INT8 attention core, flash-attention style: INT8 Q.K^T, online softmax, INT8 probabilities, INT8 P.V.

q [B, H, Sq, D], k and v [B, H, Sk, D] are int8 (any strides). Logits are acc * qk_scale, where qk_scale already holds
s_q * s_k * softmax_scale. The mask is additive (float) or boolean (True = attend); `is_causal` adds the causal mask.
Probabilities are quantized *before* normalisation: p_q = round(exp(s - rowmax) / p_scale) in [0, 127] (the static SQ
scale; 1/127 covers (0, 1] exactly), so a long, diffuse row keeps its resolution. Then out = (p_q . v) * p_scale / rowsum,
in units of v's int8 values. With `out_scale` (broadcasting against [B, H, Sq, D], e.g. [H, 1, D] per feature) the
output is requantized to INT8 as round(out / out_scale); otherwise cast to `out_dtype`. Rows with every key masked give 0.
"""

from __future__ import annotations

import torch

from zqhero_fx.kernels._select import wants_triton
from zqhero_fx.kernels.quantize import QMAX

DEFAULT_P_SCALE = 1.0 / QMAX


# ---------------------------------------------------------------- reference (the spec)
def attention_logits_mask(attn_mask, is_causal, sq, sk, device):
    """The additive float mask the reference applies (None when nothing is masked)."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask.float() if attn_mask.dtype != torch.bool else torch.zeros(
            attn_mask.shape, device=device
        ).masked_fill_(~attn_mask, float("-inf"))
    if is_causal:
        causal = torch.ones(sq, sk, dtype=torch.bool, device=device).tril_(sk - sq)
        causal = torch.zeros(sq, sk, device=device).masked_fill_(~causal, float("-inf"))
        mask = causal if mask is None else mask + causal
    return mask


def int8_attention_ref(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype):
    # float64 keeps the integer dot products exact for any head size and sequence length.
    logits = torch.matmul(q.double(), k.double().transpose(-1, -2)).float() * qk_scale
    mask = attention_logits_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        logits = logits + mask
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.exp(logits - row_max)
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    p_q = torch.round(unnormalised / p_scale).clamp_(0, QMAX)
    acc = torch.matmul(p_q.double(), v.double()).float()
    out = acc * p_scale / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    if out_scale is not None:
        return torch.round(out / out_scale.float()).clamp_(-QMAX, QMAX).to(torch.int8)
    return out.to(out_dtype)


# ---------------------------------------------------------------- Triton kernel and launcher
def int8_attention_triton(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype):
    raise NotImplementedError("Triton int8_attention: written under issue 3")


# ---------------------------------------------------------------- registration
@torch.library.custom_op("zqhero::int8_attention", mutates_args=())
def int8_attention(
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
    if wants_triton(q):
        return int8_attention_triton(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype)
    return int8_attention_ref(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype)


@int8_attention.register_fake
def _(q, k, v, attn_mask, qk_scale, p_scale, out_scale, is_causal, out_dtype):
    dtype = torch.int8 if out_scale is not None else out_dtype
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=dtype)
