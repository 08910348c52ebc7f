"""lower: replace quantize/dequantize + op patterns with the fused zqhero ops. Each rule pairs a pattern, written as a
small Python function (traced in tests to prove the rule fires on it), with a matcher over the graph and a builder of
the replacement; rules are named by the rewrite they perform. GEMM weights are quantized here, per output channel,
after fold_scales has scaled them. Precondition: fold_scales ran. Unmatched quantize/dequantize nodes stay and run as
standalone (memory-bound) zqhero ops.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from zqhero_fx.kernels.quantize import quantize_weight_per_channel
from zqhero_fx.passes._graph import ADD, ATTENTION, EMBEDDING, GELU, LAYER_NORM, LINEAR, add_constant, attention_scale, aten, eliminate_dead_code, is_op, param_of, val, zq


# ---------------------------------------------------------------- patterns (what each rule looks for)
def _pattern_layer_norm_quant(x, residual, weight, bias):
    summed = aten.add.Tensor(x, residual)
    normed = aten.layer_norm.default(summed, [768], weight, bias, 1e-12, False)
    return zq.quantize_per_token.default(normed)


def _pattern_int8_linear(xq, x_scale, weight, bias, out_scale):
    y = aten.linear.default(zq.dequantize.default(xq, x_scale), weight, bias)
    return zq.quantize.default(aten.gelu.default(y), out_scale)


def _pattern_int8_attention(q, k, v, unit, mask, out_scale):
    deq = zq.dequantize.default
    out = aten.scaled_dot_product_attention.default(deq(q, unit), deq(k, unit), deq(v, unit), attn_mask=mask,
                                                    scale=0.125)
    return zq.quantize.default(out, out_scale)


def _pattern_quantized_embedding(table_q, scale, indices):
    return aten.embedding.default(zq.dequantize.default(table_q, scale), indices)


def _pattern_embedding_layer_norm_quant(ids_a, ids_b, table_a, table_b, scale_a, scale_b, weight, bias):
    summed = zq.quantized_embedding.default(ids_a, table_a, scale_a, torch.float32)
    residual = zq.quantized_embedding.default(ids_b, table_b, scale_b, torch.float32)
    return zq.layer_norm_quant.default(summed, residual, weight, bias, 1e-12, True, False)


# ---------------------------------------------------------------- matchers and replacements
def _single_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _replace(gm: fx.GraphModule, old: fx.Node, new: fx.Node, origin: fx.Node, scale=None, meta_from=None) -> None:
    """Swap `old` for `new`; `origin` is the float node whose value `new` reproduces (times `scale` if INT8)."""
    new.meta["val"] = old.meta.get("val")
    new.meta["zq_origin"] = origin.name
    if scale is not None:
        new.meta["zq_origin_scale"] = scale
    source = meta_from if meta_from is not None else origin
    for key in ("nn_module_stack", "zq_module_path", "zq_precision", "zq_scheme", "stack_trace"):
        if key in source.meta:
            new.meta[key] = source.meta[key]
    old.replace_all_uses_with(new)


def lower_layer_norm_quant(gm: fx.GraphModule, quant: fx.Node) -> bool:
    """quantize_per_token(layer_norm(add(x, r))) => zqhero.layer_norm_quant(x, r): one pass over each row."""
    if not is_op(quant, zq.quantize_per_token.default):
        return False
    ln = quant.args[0]
    if not is_op(ln, LAYER_NORM) or ln.meta.get("zq_precision", "int8") != "int8" or len(ln.args[1]) != 1:
        return False
    x, _, weight, bias, eps = ln.args[:5]
    if weight is None:
        return False
    residual, summed = None, None
    if is_op(x, ADD) and all(isinstance(a, fx.Node) for a in x.args) and val(x.args[0]) is not None \
            and val(x.args[1]) is not None and val(x.args[0]).shape == val(x.args[1]).shape:
        summed = x
        x, residual = summed.args
    other_ln_users = [u for u in ln.users if u is not quant]
    other_sum_users = [u for u in summed.users if u is not ln] if summed is not None else []
    with gm.graph.inserting_before(quant):
        fused = gm.graph.call_function(zq.layer_norm_quant.default,
                                       (x, residual, weight, bias, float(eps), bool(other_ln_users), bool(other_sum_users)))
    _replace(gm, quant, fused, ln)
    fused.meta["zq_precision"], fused.meta["zq_scheme"] = "int8", "twq"
    for index, old, users in ((2, ln, other_ln_users), (3, summed, other_sum_users)):
        if users:
            with gm.graph.inserting_after(fused):
                item = gm.graph.call_function(operator.getitem, (fused, index))
            item.meta["val"] = old.meta.get("val")
            for user in users:
                user.replace_input_with(old, item)
    return True


def lower_int8_linear(gm: fx.GraphModule, linear: fx.Node) -> bool:
    """linear(dequant(x_q, s_x), W) [→ gelu] [→ quant(·, t)] => zqhero.int8_linear(x_q, s_x, W_q, s_w, …)."""
    if not is_op(linear, LINEAR) or not is_op(linear.args[0], zq.dequantize.default):
        return False
    weight = param_of(gm, linear.args[1])
    if weight is None or weight.dim() != 2:
        return False
    deq = linear.args[0]
    xq, x_scale = deq.args[:2]
    bias = linear.args[2] if len(linear.args) > 2 else None
    last, activation, out_scale = linear, "none", None
    user = _single_user(linear)
    if is_op(user, GELU):
        approximate = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
        last, activation = user, "gelu" if approximate == "none" else "gelu_tanh"
        user = _single_user(user)
    if is_op(user, zq.quantize.default) and param_of(gm, user.args[1]) is not None:
        last, out_scale = user, user.args[1]
    elif activation != "none":  # a GeLU not followed by INT8 quantization stays a separate op
        last, activation = linear, "none"
    wq, w_scale = quantize_weight_per_channel(weight.float())
    wq_node = add_constant(gm, f"{linear.name}_weight_q", wq, before=linear)
    ws_node = add_constant(gm, f"{linear.name}_weight_scale", w_scale, before=linear)
    out_dtype = val(linear).dtype
    with gm.graph.inserting_before(last):
        fused = gm.graph.call_function(zq.int8_linear.default,
                                       (xq, x_scale, wq_node, ws_node, bias, None, out_scale, activation, out_dtype))
    origin = last.args[0] if last is not linear and is_op(last, zq.quantize.default) else last
    scale = last.meta.get("zq_prefold_scale", param_of(gm, out_scale)) if out_scale is not None else None
    _replace(gm, last, fused, origin, scale=scale, meta_from=linear)
    fused.meta["zq_precision"] = "int8"
    return True


def lower_int8_attention(gm: fx.GraphModule, attn: fx.Node, softmax_scale: float) -> bool:
    """quant(attn(dequant(q, 1), dequant(k, 1), dequant(v, 1)), r) => zqhero.int8_attention(q, k, v, …, r)."""
    if not is_op(attn, ATTENTION):
        return False
    deqs = attn.args[:3]
    if not all(is_op(d, zq.dequantize.default) and float(param_of(gm, d.args[1]).reshape(-1)[0]) == 1.0
               and param_of(gm, d.args[1]).numel() == 1 for d in deqs):
        return False
    q, k, v = (d.args[0] for d in deqs)
    last, out_scale = attn, None
    user = _single_user(attn)
    if is_op(user, zq.quantize.default) and param_of(gm, user.args[1]) is not None:
        last, out_scale = user, user.args[1]
    with gm.graph.inserting_before(last):
        fused = gm.graph.call_function(zq.int8_attention.default, (
            q, k, v, attn.kwargs.get("attn_mask"), attention_scale(attn), float(softmax_scale), out_scale,
            bool(attn.kwargs.get("is_causal", False)), val(attn).dtype))
    _replace(gm, last, fused, attn, scale=last.meta.get("zq_prefold_scale") if out_scale is not None else None)
    return True


def lower_quantized_embedding(gm: fx.GraphModule, emb: fx.Node) -> bool:
    """embedding(dequant(table_q, s), ids) => zqhero.quantized_embedding(ids, table_q, s)."""
    if not is_op(emb, EMBEDDING) or not is_op(emb.args[0], zq.dequantize.default):
        return False
    table_q, scale = emb.args[0].args[:2]
    if param_of(gm, table_q) is None or param_of(gm, table_q).dtype != torch.int8:
        return False
    with gm.graph.inserting_before(emb):
        fused = gm.graph.call_function(zq.quantized_embedding.default, (emb.args[1], table_q, scale, val(emb).dtype))
    _replace(gm, emb, fused, emb)
    return True


def _embedding_leaves(node, leaves: list) -> bool:
    """Flatten a single-use sum of quantized_embedding nodes into `leaves`, in addition order."""
    if is_op(node, zq.quantized_embedding.default) and len(node.users) == 1:
        leaves.append(node)
        return True
    if is_op(node, ADD) and len(node.users) == 1 and all(isinstance(a, fx.Node) for a in node.args):
        return _embedding_leaves(node.args[0], leaves) and _embedding_leaves(node.args[1], leaves)
    return False


def lower_embedding_layer_norm_quant(gm: fx.GraphModule, lnq: fx.Node) -> bool:
    """layer_norm_quant(Σ quantized_embedding(ids_i, T_i)) => zqhero.embedding_layer_norm_quant(ids, T): one pass."""
    from zqhero_fx.kernels.embedding_layer_norm_quant import MAX_TABLES

    if not is_op(lnq, zq.layer_norm_quant.default) or lnq.args[6]:  # the sum itself is needed elsewhere
        return False
    leaves: list[fx.Node] = []
    parts = [lnq.args[0]] + ([lnq.args[1]] if lnq.args[1] is not None else [])
    if not all(_embedding_leaves(part, leaves) for part in parts) or not 1 < len(leaves) <= MAX_TABLES:
        return False
    weight, bias, eps, emit_normed = lnq.args[2], lnq.args[3], lnq.args[4], lnq.args[5]
    with gm.graph.inserting_before(lnq):
        fused = gm.graph.call_function(zq.embedding_layer_norm_quant.default, (
            [leaf.args[0] for leaf in leaves], [leaf.args[1] for leaf in leaves], [leaf.args[2] for leaf in leaves],
            weight, bias, eps, emit_normed))
    fused.meta.update({k: lnq.meta[k] for k in ("zq_precision", "zq_scheme", "zq_module_path", "nn_module_stack")
                       if k in lnq.meta})
    fused.meta["zq_origin"] = lnq.meta.get("zq_origin")
    lnq.replace_all_uses_with(fused)  # outputs 0, 1, 2 (q, scale, normed) line up; output 3 was not emitted
    return True


@dataclass(frozen=True)
class Rule:
    name: str  # the rewrite, readable
    pattern: Callable  # a traceable example of what the rule matches
    lower: Callable  # (gm, node) -> bool: rewrite at node if it matches


RULES = (
    Rule("quantize_per_token(layer_norm(add(x, r))) => zqhero.layer_norm_quant(x, r)",
         _pattern_layer_norm_quant, lower_layer_norm_quant),
    Rule("quant(gelu(linear(dequant(x_q, s_x), W))) => zqhero.int8_linear(x_q, s_x, W_q, s_w, act, out_scale)",
         _pattern_int8_linear, lower_int8_linear),
    Rule("quant(attention(dequant(q), dequant(k), dequant(v))) => zqhero.int8_attention(q, k, v, out_scale)",
         _pattern_int8_attention, None),
    Rule("embedding(dequant(table_q, s), ids) => zqhero.quantized_embedding(ids, table_q, s)",
         _pattern_quantized_embedding, lower_quantized_embedding),
    Rule("layer_norm_quant(Σ quantized_embedding(ids_i, T_i)) => zqhero.embedding_layer_norm_quant(ids, T)",
         _pattern_embedding_layer_norm_quant, lower_embedding_layer_norm_quant),
)


def lower(gm: fx.GraphModule, softmax_scale: float = 1.0 / 127) -> fx.GraphModule:
    counts = {}
    for rule in RULES:
        apply = rule.lower or (lambda g, n: lower_int8_attention(g, n, softmax_scale))
        for node in list(gm.graph.nodes):
            if node.graph is gm.graph and apply(gm, node):
                counts[rule.name] = counts.get(rule.name, 0) + 1
        eliminate_dead_code(gm)
    gm.meta.setdefault("zqhero", {})["lowered"] = counts
    return gm
