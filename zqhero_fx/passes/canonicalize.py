"""canonicalize: one spelling of the graph whatever the front end (torch.export aten graphs, symbolic_trace and Dynamo
torch-level graphs): linear, matmul, layer_norm, softmax, gelu, embedding, add and attention become the aten ops named
in passes/_graph.py, parameters become get_attr nodes, eval-mode dropout disappears, and the eager attention chain
matmul(q, kᵀ) [·scale] [+mask] → softmax → matmul(·, v) becomes one scaled_dot_product_attention node. Model-family
spellings become one op each: RMSNorm written out (Llama, Qwen2, Mistral, Phi-3, T5; Gemma's (1 + w)) becomes
aten.rms_norm, GPT-2's Conv1D addmm and matmul-with-a-weight become aten.linear, the tanh-GeLU polynomial
(GPT-2's gelu_new) becomes aten.gelu(approximate="tanh"), and attention on K/V heads repeated for GQA/MQA
(repeat_kv) becomes attention with enable_gqa on the unrepeated heads.
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
    RMS_NORM,
    SOFTMAX,
    aten,
    eliminate_dead_code,
    fetch_attr,
    is_float_tensor,
    is_op,
    param_of,
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
# Activations by any spelling (function, Tensor method name, module class) -> one aten op each.
_ACTIVATIONS = {
    aten.relu.default: ({F.relu, torch.relu}, "relu", nn.ReLU),
    aten.silu.default: ({F.silu}, None, nn.SiLU),
    aten.tanh.default: ({torch.tanh, F.tanh}, "tanh", nn.Tanh),
    aten.sigmoid.default: ({torch.sigmoid, F.sigmoid}, "sigmoid", nn.Sigmoid),
}


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
    for target, (_, _, module_class) in _ACTIVATIONS.items():
        if isinstance(mod, module_class) and not getattr(mod, "inplace", False):
            return target, (x,), {}
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
    for target, (fns, method, _) in _ACTIVATIONS.items():
        if (fn in fns or (method is not None and name == method)) and len(node.args) == 1 \
                and not _arg(node, 1, "inplace", False) and set(node.kwargs) <= {"inplace"}:
            return target, (x,), {}
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
            "is_causal": _arg(node, 5, "is_causal", False), "scale": _arg(node, 6, "scale"),
            "enable_gqa": _arg(node, 7, "enable_gqa", False)}
    if is_op(node, aten.dropout.default) and not _arg(node, 2, "train", False):
        return "identity"
    if is_op(node, ATTENTION):
        # One argument layout for attention, whatever the front end wrote.
        return ATTENTION, tuple(node.args[:3]), {
            "attn_mask": _arg(node, 3, "attn_mask"), "dropout_p": _arg(node, 4, "dropout_p", 0.0),
            "is_causal": _arg(node, 5, "is_causal", False), "scale": _arg(node, 6, "scale"),
            "enable_gqa": _arg(node, 7, "enable_gqa", False)}
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
        pv.replace_all_uses_with(attn)
        for dead in (pv, softmax):
            gm.graph.erase_node(dead)


def _unrepeated_kv(node: fx.Node) -> fx.Node | None:
    """x when `node` is Hugging Face's repeat_kv of x: x[:, :, None].expand(b, hkv, n, s, d).reshape(b, hkv*n, s, d)."""
    if not is_op(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = node.args[0]
    if not is_op(expand, aten.expand.default) or len(expand.users) != 1:
        return None
    inner = expand.args[0]
    if not is_op(inner, aten.unsqueeze.default) or inner.args[1] != 2 or len(inner.users) != 1:
        return None
    x = inner.args[0]
    x_val, out_val = val(x), val(node)
    if x_val is None or out_val is None or x_val.dim() != 4 or out_val.dim() != 4:
        return None
    b, hkv, s, d = x_val.shape
    same = [b, s, d] == [out_val.shape[0], out_val.shape[2], out_val.shape[3]]
    return x if same and hkv != out_val.shape[1] else None


def _grouped_attention(gm: fx.GraphModule) -> None:
    """Attention on repeated K/V heads (GQA/MQA spelled as repeat_kv) -> attention with enable_gqa on the Hkv heads,
    so kernels read each K/V head once and a KV cache keeps Hkv heads, never the H repeated ones."""
    for node in list(gm.graph.nodes):
        if not is_op(node, ATTENTION) or node.kwargs.get("enable_gqa"):
            continue
        k, v = _unrepeated_kv(node.args[1]), _unrepeated_kv(node.args[2])
        if k is None or v is None or val(k).shape[1] != val(v).shape[1]:
            continue
        node.args = (node.args[0], k, v, *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}


# ---------------------------------------------------------------- model-family spellings
_CASTS = (aten._to_copy.default, aten.to.dtype, aten.type_as.default)


def _drop_checks_and_noop_casts(gm: fx.GraphModule) -> None:
    """Export's dtype/device assertions (`_assert_tensor_metadata`) and casts to the dtype a value already has: they
    compute nothing, and as extra users they would hide every pattern behind them (RMSNorm's `.to(float32)`)."""
    for node in list(gm.graph.nodes):
        if is_op(node, aten._assert_tensor_metadata.default):
            gm.graph.erase_node(node)
        elif is_op(node, *_CASTS) and isinstance(node.args[0], fx.Node) and node.args[0].op != "placeholder":
            before, after = val(node.args[0]), val(node)
            output_user = any(u.op == "output" for u in node.users)
            if before is not None and after is not None and before.dtype == after.dtype \
                    and before.device == after.device and not output_user:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)


def _uncast(node):
    """The value under float-to-float casts (`.to(float32)`, `.type_as(x)`), which change no value in an fp32 graph
    and only round in a half-precision one."""
    while is_op(node, *_CASTS) and isinstance(node.args[0], fx.Node) and is_float_tensor(node.args[0]):
        node = node.args[0]
    return node


def _scalar(node, value, tol=1e-6) -> bool:
    return isinstance(node, (int, float)) and abs(float(node) - value) <= tol * max(1.0, abs(value))


def _other(binary: fx.Node, this):
    a, b = binary.args[:2]
    return b if a is this else a if b is this else None


def _register_weight(gm: fx.GraphModule, like: str, suffix: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """A new constant beside the parameter it derives from (`<module>.<suffix>`), so module paths still name it."""
    owner_path, _, _ = like.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    name = suffix
    while hasattr(owner, name):
        name += "_"
    owner.register_buffer(name, tensor.detach().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
    node.meta["val"] = tensor
    return node


def _rms_core(rsqrt: fx.Node):
    """(x, eps, normed) for normed = x32 * rsqrt(mean(x32², -1, keepdim) + eps), x32 = x or a float cast of it."""
    add = rsqrt.args[0]
    if not is_op(add, aten.add.Tensor, aten.add.Scalar) or not isinstance(add.args[1], (int, float)):
        return None
    mean = add.args[0]
    if not is_op(mean, aten.mean.dim) or len(mean.args) < 3 or list(mean.args[1]) not in ([-1], [val(mean).dim() - 1]) \
            or not mean.args[2]:
        return None
    square = mean.args[0]
    if not is_op(square, aten.pow.Tensor_Scalar) or not _scalar(square.args[1], 2.0):
        return None
    x = _uncast(square.args[0])
    for user in rsqrt.users:
        if is_op(user, aten.mul.Tensor) and isinstance(_other(user, rsqrt), fx.Node) and _uncast(_other(user, rsqrt)) is x:
            return x, float(add.args[1]), user
    return None


def _rms_weight(gm: fx.GraphModule, factor):
    """(parameter node, its tensor, whether the model multiplies by 1 + w) for RMSNorm's scale factor, else None."""
    weight = _uncast(factor) if isinstance(factor, fx.Node) else None
    if param_of(gm, weight) is not None:
        return weight, param_of(gm, weight), False
    if is_op(factor, aten.add.Tensor, aten.add.Scalar):  # Gemma: x̂ · (1 + w)
        node = next((a for a in factor.args if isinstance(a, fx.Node)), None)
        if node is not None and _scalar(_other(factor, node), 1.0) and param_of(gm, _uncast(node)) is not None:
            return _uncast(node), param_of(gm, _uncast(node)), True
    return None


def _fuse_rms_norms(gm: fx.GraphModule) -> None:
    for rsqrt in [n for n in gm.graph.nodes if is_op(n, aten.rsqrt.default)]:
        core = _rms_core(rsqrt)
        if core is None:
            continue
        x, eps, normed = core
        out = normed
        while len(out.users) == 1 and is_op(next(iter(out.users)), *_CASTS):
            out = next(iter(out.users))
        if len(out.users) != 1:
            continue
        scale = next(iter(out.users))
        if not is_op(scale, aten.mul.Tensor):
            continue
        found = _rms_weight(gm, _other(scale, out))
        if found is None:
            continue
        weight_node, tensor, plus_one = found
        if tensor.dim() != 1 or val(x) is None or str(val(x).shape[-1]) != str(tensor.shape[0]):
            continue
        if plus_one:
            weight_node = _register_weight(gm, weight_node.target, "weight_plus_one", 1.0 + tensor.float(), rsqrt)
        with gm.graph.inserting_before(scale):
            fused = gm.graph.call_function(RMS_NORM, (x, [int(tensor.shape[0])], weight_node, eps))
        fused.meta = dict(scale.meta)
        scale.replace_all_uses_with(fused)


def _conv1d_as_linear(gm: fx.GraphModule) -> None:
    """addmm(b, x.view(-1, K), W[K, N]).view(*lead, N) => linear(x, Wᵀ, b): GPT-2's Conv1D, and any addmm or
    matmul against a 2-D weight, as one linear on the unflattened input."""
    for node in list(gm.graph.nodes):
        if is_op(node, aten.addmm.default) and len(node.args) == 3 and not node.kwargs:
            bias, x, w = node.args
        elif is_op(node, aten.mm.default, MATMUL) and len(node.args) == 2:
            bias, (x, w) = None, node.args
        else:
            continue
        weight = param_of(gm, w)
        if weight is None or weight.dim() != 2 or (bias is not None and param_of(gm, bias) is None):
            continue
        new_weight = _register_weight(gm, w.target, w.target.rpartition(".")[2] + "_nk", weight.t(), node)
        source, result = x, node
        if is_op(x, aten.view.default, aten.reshape.default) and len(node.users) == 1:
            flat_user = next(iter(node.users))
            if is_op(flat_user, aten.view.default, aten.reshape.default) and val(x.args[0]) is not None \
                    and val(flat_user) is not None \
                    and [str(d) for d in val(flat_user).shape[:-1]] == [str(d) for d in val(x.args[0]).shape[:-1]]:
                source, result = x.args[0], flat_user
        with gm.graph.inserting_before(result):
            linear = gm.graph.call_function(LINEAR, (source, new_weight, bias))
        linear.meta = dict(result.meta)
        result.replace_all_uses_with(linear)


def _tanh_gelus(gm: fx.GraphModule) -> None:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) => gelu(x, approximate="tanh")."""
    for tanh in [n for n in gm.graph.nodes if is_op(n, aten.tanh.default)]:
        inner = tanh.args[0]
        if not is_op(inner, aten.mul.Tensor) or not _scalar(inner.args[1], 0.7978845608028654, 1e-4):
            continue
        poly = inner.args[0]
        if not is_op(poly, aten.add.Tensor):
            continue
        x = next((a for a in poly.args if isinstance(a, fx.Node) and not is_op(a, aten.mul.Tensor)), None)
        cube = _other(poly, x) if x is not None else None
        if not is_op(cube, aten.mul.Tensor) or not _scalar(cube.args[1], 0.044715, 1e-4) \
                or not is_op(cube.args[0], aten.pow.Tensor_Scalar) or cube.args[0].args[0] is not x \
                or not _scalar(cube.args[0].args[1], 3.0) or len(tanh.users) != 1:
            continue
        one_plus = next(iter(tanh.users))
        if not is_op(one_plus, aten.add.Tensor, aten.add.Scalar) or not _scalar(_other(one_plus, tanh), 1.0) \
                or len(one_plus.users) != 1:
            continue
        out = next(iter(one_plus.users))
        half_x = _other(out, one_plus) if is_op(out, aten.mul.Tensor) else None
        if not (is_op(half_x, aten.mul.Tensor) and half_x.args[0] is x and _scalar(half_x.args[1], 0.5)):
            continue
        with gm.graph.inserting_before(out):
            gelu = gm.graph.call_function(GELU, (x,), {"approximate": "tanh"})
        gelu.meta = dict(out.meta)
        out.replace_all_uses_with(gelu)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    _rewrite_calls(gm)
    eliminate_dead_code(gm)
    _drop_checks_and_noop_casts(gm)  # first: a same-dtype cast after softmax would hide the eager attention chain
    _fuse_eager_attention(gm)
    _grouped_attention(gm)
    _fuse_rms_norms(gm)
    _conv1d_as_linear(gm)
    _tanh_gelus(gm)
    eliminate_dead_code(gm)
    return gm

