"""canonicalize: one spelling of the graph whatever the front end (torch.export aten graphs, symbolic_trace and Dynamo
torch-level graphs): linear, matmul, layer_norm, softmax, gelu, embedding, add and attention become the aten ops named
in passes/_graph.py, parameters become get_attr nodes, eval-mode dropout disappears, and the eager attention chain
matmul(q, kᵀ) [·scale] [+mask] → softmax → matmul(·, v) becomes one scaled_dot_product_attention node.
Needs node.meta["val"]; ops it does not know stay as they are (and stay in floating point).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from zqhero_fx.passes._graph import (
    ADD,
    ATTENTION,
    EMBEDDING,
    GELU,
    LAYER_NORM,
    LINEAR,
    MATMUL,
    SOFTMAX,
    aten,
    eliminate_dead_code,
    fetch_attr,
    is_float_tensor,
    is_op,
    val,
)

_LINEAR_FNS = {F.linear, torch._C._nn.linear}
_LAYER_NORM_FNS = {F.layer_norm, torch.layer_norm}
_GELU_FNS = {F.gelu, torch._C._nn.gelu}
_SOFTMAX_FNS = {F.softmax, torch.softmax, torch.Tensor.softmax}
_MATMUL_FNS = {torch.matmul, operator.matmul, torch.Tensor.matmul}
_ADD_FNS = {operator.add, torch.add, torch.Tensor.add}
_EMBEDDING_FNS = {F.embedding}
_DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_ATTENTION_FNS = {F.scaled_dot_product_attention}


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _weight(gm: fx.GraphModule, owner: str, name: str, before: fx.Node) -> fx.Node | None:
    if getattr(fetch_attr(gm, owner), name) is None:
        return None
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{owner}.{name}" if owner else name)


def _module_call(gm: fx.GraphModule, node: fx.Node):
    """(target, args, kwargs) of the canonical call replacing a call_module node, None to keep it, 'identity'."""
    mod = fetch_attr(gm, node.target)
    x = node.args[0] if node.args else None
    if isinstance(mod, nn.Linear):
        return LINEAR, (x, _weight(gm, node.target, "weight", node), _weight(gm, node.target, "bias", node)), {}
    if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
        w, b = _weight(gm, node.target, "weight", node), _weight(gm, node.target, "bias", node)
        return LAYER_NORM, (x, list(mod.normalized_shape), w, b, mod.eps, False), {}
    if isinstance(mod, nn.Embedding) and mod.max_norm is None:
        pad = -1 if mod.padding_idx is None else mod.padding_idx
        return EMBEDDING, (_weight(gm, node.target, "weight", node), x, pad), {}
    if isinstance(mod, nn.GELU):
        return GELU, (x,), {"approximate": mod.approximate}
    if isinstance(mod, nn.Softmax) and mod.dim is not None:
        return SOFTMAX, (x, mod.dim), {}
    if isinstance(mod, nn.Identity) or (isinstance(mod, nn.Dropout) and not mod.training):
        return "identity"
    return None


_LAYOUT_METHODS = {"view": aten.view.default, "reshape": aten.reshape.default, "permute": aten.permute.default}


def _shape_args(node: fx.Node, start: int) -> list:
    rest = list(node.args[start:])
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest


def _layout_call(node: fx.Node):
    """x.view(...), x.reshape(...), x.permute(...), x.transpose(a, b), x.contiguous() in their aten spelling."""
    fn, name = node.target, node.target if node.op == "call_method" else None
    x = node.args[0] if node.args else None
    if not is_float_tensor(x) and val(x) is None:
        return None
    if name in _LAYOUT_METHODS or fn in (torch.reshape, torch.permute):
        target = _LAYOUT_METHODS.get(name) or (aten.reshape.default if fn is torch.reshape else aten.permute.default)
        return target, (x, _shape_args(node, 1)), {}
    if (name == "transpose" or fn is torch.transpose) and len(node.args) == 3:
        return aten.transpose.int, tuple(node.args), {}
    if name == "contiguous" and len(node.args) == 1 and not node.kwargs:
        return aten.contiguous.default, (x,), {}
    return None


def _function_call(node: fx.Node):
    """(target, args, kwargs) of the canonical call replacing a torch-level call, None to keep it, 'identity'."""
    fn, name = node.target, node.target if node.op == "call_method" else None
    x = node.args[0] if node.args else None
    if fn in _LINEAR_FNS:
        return LINEAR, (x, _arg(node, 1, "weight"), _arg(node, 2, "bias")), {}
    if fn in _LAYER_NORM_FNS:
        return LAYER_NORM, (x, list(_arg(node, 1, "normalized_shape")), _arg(node, 2, "weight"),
                            _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5), False), {}
    if fn in _GELU_FNS:
        return GELU, (x,), {"approximate": _arg(node, 1, "approximate", "none")}
    if (fn in _SOFTMAX_FNS or name == "softmax") and _arg(node, 2, "dtype") is None:
        dim = _arg(node, 1, "dim")
        return (SOFTMAX, (x, dim), {}) if isinstance(dim, int) else None
    if fn in _MATMUL_FNS or name == "matmul":
        return MATMUL, (x, _arg(node, 1, "other")), {}
    if (fn in _ADD_FNS or name == "add") and is_float_tensor(x) and is_float_tensor(node.args[1] if len(node.args) > 1 else None):
        if _arg(node, 2, "alpha", 1) == 1:
            return ADD, (x, node.args[1]), {}
        return None
    if fn in _EMBEDDING_FNS and _arg(node, 3, "max_norm") is None:
        return EMBEDDING, (_arg(node, 1, "weight"), x, _arg(node, 2, "padding_idx", None) or -1), {}
    if fn in _DROPOUT_FNS or name == "dropout":
        return "identity" if not _arg(node, 2, "training", False) else None
    if fn in _ATTENTION_FNS:
        return ATTENTION, (x, _arg(node, 1, "key"), _arg(node, 2, "value")), {
            "attn_mask": _arg(node, 3, "attn_mask"), "dropout_p": _arg(node, 4, "dropout_p", 0.0),
            "is_causal": _arg(node, 5, "is_causal", False), "scale": _arg(node, 6, "scale")}
    if is_op(node, aten.dropout.default) and not _arg(node, 2, "train", False):
        return "identity"
    if is_op(node, ATTENTION):
        # One argument layout for attention, whatever the front end wrote.
        return ATTENTION, tuple(node.args[:3]), {
            "attn_mask": _arg(node, 3, "attn_mask"), "dropout_p": _arg(node, 4, "dropout_p", 0.0),
            "is_causal": _arg(node, 5, "is_causal", False), "scale": _arg(node, 6, "scale")}
    if is_op(node, aten._softmax.default) and not node.args[2]:
        return SOFTMAX, (x, node.args[1]), {}
    return _layout_call(node)


def _rewrite_calls(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            call = _module_call(gm, node)
        elif node.op in ("call_function", "call_method"):
            call = _function_call(node)
        else:
            continue
        if call is None or (call != "identity" and call[0] is node.target and call[1] == tuple(node.args)
                            and call[2] == dict(node.kwargs)):
            continue
        if call == "identity":
            node.replace_all_uses_with(node.args[0])
        else:
            target, args, kwargs = call
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(target, args, kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _scale_constant(node: fx.Node):
    """(scores, factor) when node multiplies / divides the attention scores by a Python number."""
    if node.op != "call_function" or len(node.args) != 2 or not isinstance(node.args[1], (int, float)):
        return None
    if node.target in (aten.mul.Tensor, aten.mul.Scalar, operator.mul, torch.mul):
        return node.args[0], float(node.args[1])
    if node.target in (aten.div.Tensor, aten.div.Scalar, operator.truediv, torch.div):
        return node.args[0], 1.0 / float(node.args[1])
    return None


def _key_before_transpose(kt: fx.Node):
    """k when kt is k transposed over its last two dims, else None."""
    if is_op(kt, aten.transpose.int) and val(kt) is not None:
        nd = val(kt).dim()
        dims = {d % nd for d in kt.args[1:3]}
        if dims == {nd - 1, nd - 2}:
            return kt.args[0]
    return None


def _fuse_eager_attention(gm: fx.GraphModule) -> None:
    for softmax in list(gm.graph.nodes):
        if not is_op(softmax, SOFTMAX) or softmax.args[1] not in (-1, getattr(val(softmax), "ndim", 0) - 1):
            continue
        if len(softmax.users) != 1:
            continue
        pv = next(iter(softmax.users))
        if not is_op(pv, MATMUL) or pv.args[0] is not softmax:
            continue
        scores, mask = softmax.args[0], None
        if is_op(scores, ADD) and len(scores.users) == 1:
            scores, mask = scores.args
        scale = 1.0
        scaled = _scale_constant(scores) if len(scores.users) == 1 else None
        if scaled is not None:
            scores, scale = scaled
        if not is_op(scores, MATMUL) or len(scores.users) != 1:
            continue
        q, kt = scores.args
        k = _key_before_transpose(kt)
        v = pv.args[1]
        if k is None or val(q) is None or val(q).dim() < 3 or not val(q).dtype.is_floating_point:
            continue
        with gm.graph.inserting_before(pv):
            attn = gm.graph.call_function(ATTENTION, (q, k, v), {
                "attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": scale})
        attn.meta = dict(pv.meta)
        attn.meta["zq_fused_from"] = "eager attention"
        pv.replace_all_uses_with(attn)
        for dead in (pv, softmax):
            gm.graph.erase_node(dead)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    _rewrite_calls(gm)
    eliminate_dead_code(gm)
    _fuse_eager_attention(gm)
    return gm

