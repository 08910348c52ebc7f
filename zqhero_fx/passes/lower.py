"""lower: replace quantize/dequantize + op patterns with the fused zqhero ops. Each rule (passes/_rules.py) pairs a
traced pattern function, whose parameters are the named captures, with a builder of the replacement; rules are named
by the rewrite they perform and tried in table order, longest variants first. GEMM weights are quantized here, after
fold_scales has scaled them: 8-bit formats per output channel (quantized_linear), 4-/6-bit formats packed by the
config's WeightScheme (packed_linear; weight_quant.py), also at weight-only sites where activations stay float. Precondition: fold_scales ran.
Unmatched quantize/dequantize nodes stay and run as standalone (memory-bound) zqhero ops.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from zqhero_fx.formats import Scheme, get_format, is_quantized_dtype
from zqhero_fx.modes import QuantConfig
from zqhero_fx.passes._graph import (
    add_constant,
    attention_scale,
    aten,
    eliminate_dead_code,
    is_op,
    param_of,
    val,
    zq,
)
from zqhero_fx.passes._rules import Match, Rule, apply_rules
from zqhero_fx.passes.insert_qdq import WEIGHT_ONLY
from zqhero_fx.passes.state import FLOAT_PRECISIONS, copy_state, peek, state
from zqhero_fx.weight_quant import quantize_weight

ACTIVATION_OPS = {"gelu": aten.gelu.default, "relu": aten.relu.default, "silu": aten.silu.default}
QUICK_GELU = 1.702
MAX_TABLES = 4  # tables embedding_norm_quant gathers in one pass (its Triton signature is fixed)


# ---------------------------------------------------------------- patterns (what each rule matches, traced)
# The trailing parameters of each pattern select its optional parts; every rule variant binds them.
def _pattern_norm_quant(x, residual, shape, weight, bias, eps, cudnn, dtype, kind, residual_add):
    summed = aten.add.Tensor(x, residual) if residual_add else x
    if kind == "layer":
        normed = aten.layer_norm.default(summed, shape, weight, bias, eps, cudnn)
    else:
        normed = aten.rms_norm.default(summed, shape, weight, eps)
    quantized = zq.quantize_per_token.default(normed, dtype)
    return (quantized, normed, summed) if residual_add else (quantized, normed)


def _pattern_quantized_linear(xq, x_scale, deq_dtype, weight, bias, approximate, coefficient, out_scale, out_dtype,
                              act, quant):
    y = aten.linear.default(zq.dequantize.default(xq, x_scale, deq_dtype), weight, bias)
    if act == "gelu":
        y = aten.gelu.default(y, approximate=approximate)
    elif act == "quick_gelu":
        y = aten.mul.Tensor(y, aten.sigmoid.default(aten.mul.Tensor(y, coefficient)))
    elif act != "none":
        y = ACTIVATION_OPS[act](y)
    return zq.quantize.default(y, out_scale, out_dtype) if quant else y


def _pattern_quantized_attention(q, k, v, q_scale, k_scale, v_scale, q_dtype, k_dtype, v_dtype, mask, dropout,
                                 causal, scale, gqa, out_scale, out_dtype, quant):
    deq = zq.dequantize.default
    out = aten.scaled_dot_product_attention.default(
        deq(q, q_scale, q_dtype), deq(k, k_scale, k_dtype), deq(v, v_scale, v_dtype), attn_mask=mask,
        dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=gqa)
    return zq.quantize.default(out, out_scale, out_dtype) if quant else out


def _pattern_quantized_gated_linear(x, x_scale, w_gate, s_gate, w_up, s_up, activation, dtype, out_scale, out_dtype,
                                    gate_first, quant):
    linear = zq.quantized_linear.default
    gate = linear(x, x_scale, w_gate, s_gate, None, None, None, activation, dtype)
    up = linear(x, x_scale, w_up, s_up, None, None, None, "none", dtype)
    product = aten.mul.Tensor(gate, up) if gate_first else aten.mul.Tensor(up, gate)
    return zq.quantize.default(product, out_scale, out_dtype) if quant else product


def _pattern_rotary_quantize(x, cos_h, sin_h, dim_a, start_a, end_a, dim_b, start_b, end_b, cat_dim, scale, dtype):
    """Hugging Face's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin (cos/sin unsqueezed over the heads, and
    shared by q and k, so they are captures)."""
    first = aten.slice.Tensor(x, dim_a, start_a, end_a)
    second = aten.slice.Tensor(x, dim_b, start_b, end_b)
    rotated = aten.cat.default([aten.neg.default(second), first], cat_dim)
    y = aten.add.Tensor(aten.mul.Tensor(x, cos_h), aten.mul.Tensor(rotated, sin_h))
    return zq.quantize.default(y, scale, dtype)


def _pattern_quantized_embedding(table_q, scale, out_dtype, indices, padding_idx, scale_grad, sparse):
    return aten.embedding.default(zq.dequantize.default(table_q, scale, out_dtype), indices, padding_idx, scale_grad,
                                  sparse)


def _pattern_embedding_norm_quant(i0, i1, i2, i3, t0, t1, t2, t3, s0, s1, s2, s3, o0, o1, o2, o3, weight, bias, eps,
                                  emit_normed, emit_sum, kind, dtype, tables, fused_residual):
    leaves = [zq.quantized_embedding.default(i, t, s, o)
              for i, t, s, o in list(zip((i0, i1, i2, i3), (t0, t1, t2, t3), (s0, s1, s2, s3), (o0, o1, o2, o3)))[:tables]]
    terms = leaves[:-1] if fused_residual else leaves
    x = terms[0]
    for term in terms[1:]:
        x = aten.add.Tensor(x, term)
    residual = leaves[-1] if fused_residual else None
    return zq.norm_quant.default(x, residual, weight, bias, eps, emit_normed, emit_sum, kind, dtype)


# ---------------------------------------------------------------- builders
def _adopt(old: fx.Node, new: fx.Node, source: fx.Node, **state_changes) -> None:
    """Swap `old` for `new`, which takes `old`'s value and `source`'s provenance and pass state."""
    new.meta["val"] = old.meta.get("val")
    for key in ("nn_module_stack", "stack_trace"):
        if key in source.meta:
            new.meta[key] = source.meta[key]
    copy_state(source, new, **state_changes)
    old.replace_all_uses_with(new)


def _replace(old: fx.Node, new: fx.Node, origin: fx.Node, scale=None, state_from: fx.Node | None = None) -> None:
    """Swap `old` for `new`; `origin` is the float node whose value `new` reproduces (times `scale` if quantized)."""
    _adopt(old, new, state_from or origin, origin=origin.name, origin_scale=scale)


def _is_unit(gm, scale) -> bool:
    t = param_of(gm, scale)
    return t is not None and t.numel() == 1 and float(t.reshape(-1)[0]) == 1.0


def _weight_format(config: QuantConfig, site: fx.Node):
    precision = state(site).precision
    if precision is None or precision in FLOAT_PRECISIONS or precision == config.activation_format:
        return config.weights
    return get_format(precision)


def build_norm_quant(gm: fx.GraphModule, m: Match) -> bool:
    """quantize_per_token(norm(x [+ r])) => zqhero.norm_quant(x, r): one pass over each row."""
    quant, normed = m.returned[:2]
    summed = m.returned[2] if len(m.returned) > 2 else None
    weight, shape = m["weight"], m["shape"]
    record = peek(normed)
    if weight is None or len(shape) != 1 or (record is not None and record.precision in FLOAT_PRECISIONS):
        return False
    x, residual = (m["x"], m["residual"]) if summed is not None else (m["x"], None)
    if residual is not None and not (isinstance(x, fx.Node) and isinstance(residual, fx.Node)
                                     and val(x) is not None and val(residual) is not None
                                     and val(x).shape == val(residual).shape):
        return False  # a broadcasting add is not a residual stream: the no-residual variant takes the norm alone
    kind = m.variant["kind"]
    bias = m.get("bias") if kind == "layer" else None
    eps = m["eps"] if m["eps"] is not None else torch.finfo(val(normed).dtype).eps
    other_normed = [u for u in normed.users if u is not quant]
    other_sum = [u for u in summed.users if u is not normed] if summed is not None else []
    # Right after the norm: its other users (a residual stream, export's checks) all come later in the graph.
    with gm.graph.inserting_after(normed):
        fused = gm.graph.call_function(zq.norm_quant.default, (
            x, residual, weight, bias, float(eps), bool(other_normed), bool(other_sum), kind, m["dtype"]))
    _replace(quant, fused, normed)
    state(fused).scheme = Scheme.TWQ
    for index, old, users in ((2, normed, other_normed), (3, summed, other_sum)):
        if users:
            with gm.graph.inserting_after(fused):
                item = gm.graph.call_function(operator.getitem, (fused, index))
            item.meta["val"] = old.meta.get("val")
            for user in users:
                user.replace_input_with(old, item)
    return True


def _activation(m: Match) -> str | None:
    act = m.variant["act"]
    if act == "gelu":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.get("approximate") or "none")
    if act == "quick_gelu":
        c = m.get("coefficient")
        return act if isinstance(c, (int, float)) and abs(c - QUICK_GELU) < 1e-6 else None
    return act


def build_quantized_linear(gm: fx.GraphModule, m: Match, config: QuantConfig) -> bool:
    """[quant](act(linear(dequant(x_q, s_x), W, b))) => zqhero.quantized_linear(x_q, s_x, W_q, s_w, b, act, ...)."""
    linear = m.nodes[aten.linear.default]
    weight = param_of(gm, m["weight"])
    activation = _activation(m)
    xq = m["xq"]
    if weight is None or weight.dim() != 2 or activation is None or val(xq) is None \
            or not is_quantized_dtype(val(xq).dtype):
        return False
    last = m.output
    out_scale = m.get("out_scale") if m.variant["quant"] else None
    if out_scale is not None and param_of(gm, out_scale) is None:
        return False  # a dynamic output scale has no fused form
    fmt = _weight_format(config, linear)
    out_dtype = m["out_dtype"] if out_scale is not None else val(last).dtype
    if fmt.bits < 8:
        operands = _packed_weight(gm, linear, weight, config)
        with gm.graph.inserting_before(last):
            fused = gm.graph.call_function(zq.packed_linear.default, (
                xq, m["x_scale"], *operands, m["bias"], None, out_scale, activation, out_dtype))
    else:
        wq, w_scale = fmt.quantize_per_channel(weight.float())
        wq_node = add_constant(gm, f"{linear.name}_weight_q", wq, before=linear)
        ws_node = add_constant(gm, f"{linear.name}_weight_scale", w_scale, before=linear)
        with gm.graph.inserting_before(last):
            fused = gm.graph.call_function(zq.quantized_linear.default, (
                xq, m["x_scale"], wq_node, ws_node, m["bias"], None, out_scale, activation, out_dtype))
    origin = last.args[0] if out_scale is not None else last
    scale = (peek(last).prefold_scale if peek(last) and peek(last).prefold_scale is not None
             else param_of(gm, out_scale)) if out_scale is not None else None
    _replace(last, fused, origin, scale=scale, state_from=linear)
    return True


def _packed_weight(gm: fx.GraphModule, linear: fx.Node, weight: torch.Tensor, config: QuantConfig) -> tuple:
    """Quantize a GEMM weight into config's packed scheme; its tensors become constants. DGQ's grid search measures
    output error (and GPTQ rounds) on the GEMM's calibration input, where that input is what the GEMM sees (per-token sites; a static
    FWQ site's weight was rescaled by fold_scales, so it falls back to the weight error)."""
    record = state(linear)
    sample = gram = None
    if record.scheme is not Scheme.FWQ and record.input_sample is not None:
        sample = gm.meta.get("zqhero", {}).get("samples", {}).get(record.input_sample)
        gram = gm.meta.get("zqhero", {}).get("grams", {}).get(record.input_sample)
    packed = quantize_weight(weight.float(), config.weight_scheme, sample,
                             name=f"GEMM {record.module_path or linear.name}", gram=gram)

    def const(hint, t):
        return None if t is None else add_constant(gm, f"{linear.name}_{hint}", t, before=linear)

    codes = [const(f"weight_codes{i}", c) for i, c in enumerate(packed.w_codes)]
    lorc = [const(f"lorc_{part}", t) for part, t in zip(("b", "b_scale", "a", "a_scale"), packed.lorc)]
    return (codes, packed.w_format, packed.group_size, const("weight_scale", packed.w_scale),
            const("weight_group_scale", packed.w_group_scale), packed.group_scale_kind,
            const("weight_group_zero", packed.w_group_zero), lorc)


def build_weight_only_linear(gm: fx.GraphModule, m: Match, config: QuantConfig) -> bool:
    """linear(x, W, b) at a weight-only site => zqhero.packed_linear(x, W packed, b): activations stay float."""
    linear = m.output
    weight = param_of(gm, m["weight"])
    record = peek(linear)
    if record is None or record.scheme != WEIGHT_ONLY or weight is None or weight.dim() != 2 \
            or val(m["x"]) is None or not val(m["x"]).is_floating_point():
        return False
    operands = _packed_weight(gm, linear, weight, config)
    with gm.graph.inserting_before(linear):
        fused = gm.graph.call_function(zq.packed_linear.default, (
            m["x"], None, *operands, m["bias"], None, None, "none", val(linear).dtype))
    _adopt(linear, fused, linear)
    return True


def _pattern_weight_only_linear(x, weight, bias):
    return aten.linear.default(x, weight, bias)


def build_quantized_gated_linear(gm: fx.GraphModule, m: Match) -> bool:
    """[quant](act(gate(x)) * up(x)), both quantized_linear on one input => zqhero.quantized_gated_linear: one
    kernel reads x once and writes the product (in the format, for an FWQ down_proj) instead of two float outputs."""
    gate_node = m.nodes[zq.quantized_linear.default]
    if not (isinstance(m["activation"], str) and val(m["w_gate"]) is not None and val(m["w_up"]) is not None
            and val(m["w_gate"]).shape == val(m["w_up"]).shape):
        return False
    last = m.output
    out_scale = m.get("out_scale") if m.variant["quant"] else None
    if out_scale is not None and param_of(gm, out_scale) is None:
        return False
    out_dtype = m["out_dtype"] if out_scale is not None else val(last).dtype
    with gm.graph.inserting_before(last):
        fused = gm.graph.call_function(zq.quantized_gated_linear.default, (
            m["x"], m["x_scale"], m["w_gate"], m["s_gate"], m["w_up"], m["s_up"], m["activation"], out_scale,
            out_dtype))
    _adopt(last, fused, gate_node)
    return True


def build_rotary_quantize(gm: fx.GraphModule, m: Match) -> bool:
    """quantize(x * cos + rotate_half(x) * sin) => zqhero.rotary_quantize(x, cos, sin): one pass over q or k, and
    the attention (and a KV cache) read the format. Only the full-width rotation of [B, H, T, D] x: the slices must
    be its two halves along the last dim, cos/sin broadcast over the heads."""
    x, cos_h, sin_h = m["x"], m["cos_h"], m["sin_h"]
    if not all(isinstance(t, fx.Node) and val(t) is not None and val(t).dim() == 4 and val(t).shape[1] == 1
               for t in (cos_h, sin_h)):
        return False
    last = m.output

    def per_token(t):  # [B, 1, T, D] -> [B, T, D]: the unsqueeze's input when there is one
        if is_op(t, aten.unsqueeze.default) and t.args[1] == 1:
            return t.args[0]
        with gm.graph.inserting_before(last):
            squeezed = gm.graph.call_function(aten.squeeze.dim, (t, 1))
        squeezed.meta["val"] = val(t).squeeze(1)
        return squeezed

    xv, cv, sv = val(x), val(cos_h)[:, 0], val(sin_h)[:, 0]
    if xv is None or cv is None or sv is None or xv.dim() != 4 or cv.dim() != 3 or sv.shape != cv.shape:
        return False
    last_dim = {3, -1}
    half = xv.shape[-1] // 2
    halves = (m["dim_a"] in last_dim and m["dim_b"] in last_dim and m["cat_dim"] in last_dim
              and m["start_a"] == 0 and m["end_a"] == half and m["start_b"] == half and m["end_b"] >= xv.shape[-1])
    if not halves or cv.shape[-1] != xv.shape[-1]:
        return False
    scale = m["scale"]
    if param_of(gm, scale) is None or param_of(gm, scale).numel() != 1:
        return False
    cos, sin = per_token(cos_h), per_token(sin_h)
    with gm.graph.inserting_before(last):
        fused = gm.graph.call_function(zq.rotary_quantize.default, (x, cos, sin, scale, m["dtype"]))
    _adopt(last, fused, last)
    return True


def build_quantized_attention(gm: fx.GraphModule, m: Match, config: QuantConfig) -> bool:
    """[quant](attention(dequant(q, 1), dequant(k, 1), dequant(v, 1))) => zqhero.quantized_attention(q, k, v, ...)."""
    attn = m.nodes[aten.scaled_dot_product_attention.default]
    if not all(_is_unit(gm, m[f"{t}_scale"]) for t in "qkv") or m["dropout"]:
        return False
    q, k, v = m["q"], m["k"], m["v"]
    if not all(val(t) is not None and is_quantized_dtype(val(t).dtype) for t in (q, k, v)):
        return False
    fmt = get_format(state(attn).precision) if state(attn).precision not in (None, *FLOAT_PRECISIONS) \
        else config.activations
    p_scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / fmt.max_value
    last = m.output
    out_scale = m.get("out_scale") if m.variant["quant"] else None
    if out_scale is not None and param_of(gm, out_scale) is None:
        return False
    out_dtype = m["out_dtype"] if out_scale is not None else val(attn).dtype
    with gm.graph.inserting_before(last):
        fused = gm.graph.call_function(zq.quantized_attention.default, (
            q, k, v, m["mask"], attention_scale(attn), float(p_scale), out_scale, bool(m["causal"]), out_dtype))
    _replace(last, fused, attn, scale=peek(last).prefold_scale if out_scale is not None and peek(last) else None,
             state_from=attn)
    return True


def build_quantized_embedding(gm: fx.GraphModule, m: Match) -> bool:
    """embedding(dequant(table_q, s), ids) => zqhero.quantized_embedding(ids, table_q, s)."""
    table = param_of(gm, m["table_q"])
    if table is None or not is_quantized_dtype(table.dtype):
        return False
    emb = m.output
    with gm.graph.inserting_before(emb):
        fused = gm.graph.call_function(zq.quantized_embedding.default, (m["indices"], m["table_q"], m["scale"],
                                                                         val(emb).dtype))
    _replace(emb, fused, emb)
    return True


def build_embedding_norm_quant(gm: fx.GraphModule, m: Match) -> bool:
    """norm_quant(Σ quantized_embedding(ids_i, T_i)) => zqhero.embedding_norm_quant(ids, T): one pass."""
    if m["emit_sum"] or m["kind"] != "layer":
        return False  # the sum itself is needed elsewhere, or an RMSNorm: no fused kernel for it
    n = m.variant["tables"]
    lnq = m.output
    with gm.graph.inserting_before(lnq):
        fused = gm.graph.call_function(zq.embedding_norm_quant.default, (
            [m[f"i{i}"] for i in range(n)], [m[f"t{i}"] for i in range(n)], [m[f"s{i}"] for i in range(n)],
            m["weight"], m["bias"], m["eps"], m["emit_normed"], m["dtype"]))
    _adopt(lnq, fused, lnq)  # outputs 0, 1, 2 (q, scale, normed) line up; output 3 was not emitted
    return True


def rules(config: QuantConfig) -> tuple[Rule, ...]:
    """The rule table, in the order lower applies it (a rule's output may be a later rule's input)."""
    linear_variants = tuple({"act": act, "quant": quant} for quant in (True, False)
                            for act in ("gelu", "quick_gelu", "relu", "silu", "none"))
    return (
        Rule("quantize_per_token(norm(x [+ r])) => zqhero.norm_quant(x, r)",
             _pattern_norm_quant, build_norm_quant,
             tuple({"kind": kind, "residual_add": add} for add in (True, False) for kind in ("layer", "rms"))),
        Rule("[quant](act(linear(dequant(x_q, s_x), W))) => zqhero.quantized_linear(x_q, s_x, W_q, s_w, act, s_out)",
             _pattern_quantized_linear, lambda gm, m: build_quantized_linear(gm, m, config), linear_variants),
        Rule("linear(x, W) at a weight-only site => zqhero.packed_linear(x, W_packed)",
             _pattern_weight_only_linear, lambda gm, m: build_weight_only_linear(gm, m, config)),
        Rule("[quant](act(gate(x)) * up(x)) => zqhero.quantized_gated_linear(x, W_gate, W_up, act, s_out)",
             _pattern_quantized_gated_linear, build_quantized_gated_linear,
             tuple({"quant": quant, "gate_first": first} for quant in (True, False) for first in (True, False))),
        Rule("quantize(x * cos + rotate_half(x) * sin) => zqhero.rotary_quantize(x, cos, sin, s)",
             _pattern_rotary_quantize, build_rotary_quantize),
        Rule("[quant](attention(dequant(q), dequant(k), dequant(v))) => zqhero.quantized_attention(q, k, v, s_out)",
             _pattern_quantized_attention, lambda gm, m: build_quantized_attention(gm, m, config),
             ({"quant": True}, {"quant": False})),
        Rule("embedding(dequant(table_q, s), ids) => zqhero.quantized_embedding(ids, table_q, s)",
             _pattern_quantized_embedding, build_quantized_embedding),
        Rule("norm_quant(Σ quantized_embedding(ids_i, T_i)) => zqhero.embedding_norm_quant(ids, T)",
             _pattern_embedding_norm_quant, build_embedding_norm_quant,
             tuple({"tables": n, "fused_residual": fused} for n in range(MAX_TABLES, 1, -1) for fused in (True, False))),
    )


def lower(gm: fx.GraphModule, config: QuantConfig | None = None) -> fx.GraphModule:
    counts = apply_rules(gm, rules(config or QuantConfig()), eliminate_dead_code)
    gm.meta.setdefault("zqhero", {})["lowered"] = counts
    return gm
