"""fold_scales: move static scales out of the quantize/dequantize pairs and into weights and producers, where the
algebra allows it (shared/docs/papers.md §1.4), leaving unit-scale quantize/dequantize nodes behind:

  F1  linear(dequant(x_q, s), W)             => linear(dequant(x_q, 1), W·diag(s))          FWQ input into W's rows
  F2  quant(linear(x, W, b), t)              => quant(linear(x, W/t, b/t), 1)               output scale into producer
  F3  attn(dequant(q, s_q), dequant(k, s_k)) => attn(q_int, k_int, scale·s_q·s_k)           SQ into the logit scale
  F4  quant(attn(…, dequant(v, s_v)), r)     => quant(attn(…, v_int), r/s_v)                V's FWQ into the output

GeLU is not linear, so nothing folds through it (its quantize stays, for lower to fuse into FC1's epilogue).
Every fold is checked on the float calibration sample before it is kept: the folded float computation must match the
original to 1e-5 relative, or FoldError is raised.
"""

from __future__ import annotations


import torch
import torch.fx as fx
import torch.nn.functional as F

from zqhero_fx.errors import FoldError
from zqhero_fx.formats import Scheme
from zqhero_fx.passes._graph import ATTENTION, LINEAR, add_constant, attention_scale, aten, is_op, param_of, zq
from zqhero_fx.passes.state import is_quantized, state

FOLD_TOLERANCE = 1e-5
UNIT_SCALE = "_zq_unit_scale"


def _relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).norm() / reference.norm().clamp_min(1e-30))


def check_fold(name: str, node: fx.Node, before: torch.Tensor, after: torch.Tensor) -> None:
    error = _relative_error(before, after)
    if not error <= FOLD_TOLERANCE:
        raise FoldError(f"fold {name} at node {node.name}: the folded float graph differs by {error:.3g} relative "
                        f"(limit {FOLD_TOLERANCE:g}); refusing to quantize with it")


def _static_scale(gm, node) -> torch.Tensor | None:
    """The tensor of a static scale (a get_attr constant), None for a dynamic one (TWQ)."""
    return param_of(gm, node)


def _unit(gm: fx.GraphModule, before: fx.Node) -> fx.Node:
    """A get_attr of the graph's one shared unit scale (registered on first use)."""
    if not hasattr(gm, UNIT_SCALE):
        gm.register_buffer(UNIT_SCALE, torch.ones(1))
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(UNIT_SCALE)
    node.meta["val"] = getattr(gm, UNIT_SCALE)
    return node


def _set_weight(gm, linear: fx.Node, index: int, tensor: torch.Tensor, hint: str) -> None:
    node = add_constant(gm, f"{linear.name}_{hint}", tensor, before=linear)
    args = list(linear.args)
    args[index] = node
    linear.args = tuple(args)


def _sample(gm, name):
    return gm.meta.get("zqhero", {}).get("samples", {}).get(name)


def fold_input_scale(gm: fx.GraphModule, linear: fx.Node) -> bool:
    """F1: FWQ input scale into the rows of W (the K axis of an [N, K] weight)."""
    deq = linear.args[0]
    if not is_op(deq, zq.dequantize.default) or state(linear).scheme is not Scheme.FWQ:
        return False
    s = _static_scale(gm, deq.args[1])
    weight = param_of(gm, linear.args[1])
    if s is None or weight is None or s.numel() == 1 and float(s) == 1.0:
        return False
    bias = param_of(gm, linear.args[2]) if len(linear.args) > 2 else None
    folded = weight * s.reshape(1, -1).to(weight.dtype)
    x = _sample(gm, state(linear).input_sample)
    if x is not None:
        check_fold("F1 (FWQ input into W rows)", linear, F.linear(x, weight, bias), F.linear(x / s, folded, bias))
    _set_weight(gm, linear, 1, folded, "weight_fwq")
    deq.replace_input_with(deq.args[1], _unit(gm, deq))
    return True


def fold_output_scale(gm: fx.GraphModule, quant: fx.Node) -> bool:
    """F2: a static output quantization scale t into the producing linear: W/t, b/t."""
    linear = quant.args[0]
    if not is_op(linear, LINEAR) or len(linear.users) != 1 or not is_quantized(linear):
        return False
    t = _static_scale(gm, quant.args[1])
    weight = param_of(gm, linear.args[1])
    if t is None or weight is None or (t.numel() == 1 and float(t) == 1.0):
        return False
    if t.numel() not in (1, weight.shape[0]):
        return False
    bias = param_of(gm, linear.args[2]) if len(linear.args) > 2 else None
    t_col = t.reshape(-1).to(weight.dtype)
    folded_w = weight / t_col.reshape(-1, 1)
    folded_b = None if bias is None else bias / t_col
    x = _sample(gm, state(linear).input_sample)
    if x is not None:
        check_fold("F2 (output scale into producer)", linear, F.linear(x, weight, bias) / t_col,
                   F.linear(x, folded_w, folded_b))
    _set_weight(gm, linear, 1, folded_w, "weight_out")
    if bias is not None:
        _set_weight(gm, linear, 2, folded_b, "bias_out")
    state(quant).prefold_scale = t
    quant.replace_input_with(quant.args[1], _unit(gm, quant))
    return True


def fold_attention_scales(gm: fx.GraphModule, attn: fx.Node) -> bool:
    """F3 + F4: Q/K scalars into the logit scale; V's per-feature scale into the output (quantize or multiply)."""
    if not is_quantized(attn) or not all(is_op(a, zq.dequantize.default) for a in attn.args[:3]):
        return False
    scales = [_static_scale(gm, a.args[1]) for a in attn.args[:3]]
    if any(s is None for s in scales) or scales[0].numel() != 1 or scales[1].numel() != 1:
        return False
    s_q, s_k, s_v = scales
    if float(s_q) == 1.0 and float(s_k) == 1.0 and s_v.numel() == 1 and float(s_v) == 1.0:
        return False
    softmax_scale = attention_scale(attn)
    new_scale = softmax_scale * float(s_q) * float(s_k)
    samples = [_sample(gm, n) for n in state(attn).operand_samples]
    if len(samples) == 3 and all(s is not None for s in samples):
        q, k, v = samples
        gqa = q.dim() == 4 and k.shape[-3] != q.shape[-3]  # grouped-query attention: fewer K/V heads
        before = F.scaled_dot_product_attention(q, k, v, scale=softmax_scale, enable_gqa=gqa)
        after = F.scaled_dot_product_attention(q / s_q, k / s_k, v / s_v, scale=new_scale, enable_gqa=gqa) * s_v
        check_fold("F3/F4 (Q, K, V scales through attention)", attn, before, after)
    attn.update_kwarg("scale", new_scale)
    for deq in attn.args[:3]:
        deq.replace_input_with(deq.args[1], _unit(gm, deq))
    users = list(attn.users)
    if len(users) == 1 and is_op(users[0], zq.quantize.default) and _static_scale(gm, users[0].args[1]) is not None:
        quant = users[0]
        r = _static_scale(gm, quant.args[1])
        state(quant).prefold_scale = r
        quant.replace_input_with(quant.args[1], add_constant(gm, f"{attn.name}_out_scale", r / s_v, before=quant))
    elif not (s_v.numel() == 1 and float(s_v) == 1.0):
        with gm.graph.inserting_after(attn):
            rescale = gm.graph.call_function(aten.mul.Tensor, (attn, add_constant(gm, f"{attn.name}_v_scale", s_v,
                                                                                   before=attn)))
        attn.replace_all_uses_with(rescale, delete_user_cb=lambda user: user is not rescale)
    return True


def fold_scales(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if is_op(node, LINEAR):
            fold_input_scale(gm, node)
    for node in list(gm.graph.nodes):
        if is_op(node, zq.quantize.default):
            fold_output_scale(gm, node)
        elif is_op(node, ATTENTION):
            fold_attention_scales(gm, node)
    return gm
