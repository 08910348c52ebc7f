"""insert_qdq: put zqhero.quantize / dequantize nodes around every site the mode turns INT8, honouring overrides.

Schemes follow from the graph: a GEMM input produced by a memory-bound, row-reducing LayerNorm gets TWQ
(quantize_per_token, later fused into LN^quant); a GEMM input produced by another GEMM or attention (through GeLU or
head-merging layout ops) gets FWQ (static per-feature scale, later folded into the GEMM's weights); attention operands
get SQ (V gets FWQ when its layout is a plain head split); embedding tables get static INT8. Weights of GEMMs stay float
here: fold_scales still has to scale them. Postcondition: the graph runs and computes a fake-quantized model.
"""

from __future__ import annotations

import fnmatch
import operator

import torch
import torch.fx as fx

from zqhero_fx.errors import ConfigError
from zqhero_fx.kernels.quantize import MIN_SCALE, QMAX, quantize_per_token_ref
from zqhero_fx.modes import QuantConfig
from zqhero_fx.passes._graph import (
    ATTENTION,
    EMBEDDING,
    GELU,
    LAYER_NORM,
    LINEAR,
    MATMUL,
    add_constant,
    aten,
    is_float_tensor,
    is_op,
    module_path,
    param_of,
    through_layout,
    val,
    weight_module_path,
    zq,
)

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Precisions:
    """Per-module precision from override globs (the last matching glob wins); remembers which globs matched."""

    def __init__(self, overrides: dict[str, str]):
        self.overrides = overrides
        self.matched: set[str] = set()

    def __call__(self, path: str) -> str:
        chosen = "int8"
        for pattern, precision in self.overrides.items():
            if path and fnmatch.fnmatchcase(path, pattern):
                chosen = precision
                self.matched.add(pattern)
        return chosen

    def check_all_matched(self, all_paths: set[str]) -> None:
        for pattern in self.overrides:
            if pattern not in self.matched and not any(fnmatch.fnmatchcase(p, pattern) for p in all_paths):
                examples = ", ".join(sorted(p for p in all_paths if p)[:4])
                raise ConfigError(
                    f"override {pattern!r} matches no module in the graph (module paths look like: {examples})"
                )


def static_scale(value_range: torch.Tensor, per_feature: bool) -> torch.Tensor:
    r = value_range.float() if per_feature else value_range.float().amax().reshape(1)
    return (r / QMAX).clamp_min(MIN_SCALE)


def _call(gm, target, args, kwargs=None, *, after=None, before=None):
    ctx = gm.graph.inserting_after(after) if after is not None else gm.graph.inserting_before(before)
    with ctx:
        return gm.graph.call_function(target, tuple(args), kwargs or {})


def _replace_input(user: fx.Node, old: fx.Node, new: fx.Node) -> None:
    user.replace_input_with(old, new)


def _is_head_merge(producer: fx.Node, chain: list[fx.Node], consumer_input: fx.Node) -> bool:
    """[B, H, S, D] -transpose(1, 2)-> [B, S, H, D] -reshape-> [B, S, H*D]: feature h*D+d is (h, d)."""
    p, x = val(producer), val(consumer_input)
    if p is None or x is None or p.dim() != 4 or x.dim() != 3 or not chain:
        return False
    transposes = [n for n in chain if is_op(n, aten.transpose.int)]
    others_ok = all(is_op(n, aten.transpose.int, aten.contiguous.default, aten.reshape.default, aten.view.default,
                          aten.clone.default, aten._unsafe_view.default) for n in chain)
    return (others_ok and len(transposes) == 1 and {d % 4 for d in transposes[0].args[1:3]} == {1, 2}
            and str(x.shape[-1]) == str(p.shape[1] * p.shape[3]))


def _is_head_split(producer: fx.Node, chain: list[fx.Node], operand: fx.Node) -> bool:
    """[B, S, H*D] -view-> [B, S, H, D] -transpose(1, 2)-> [B, H, S, D]: the inverse of a head merge."""
    p, o = val(producer), val(operand)
    if p is None or o is None or p.dim() != 3 or o.dim() != 4 or not chain:
        return False
    transposes = [n for n in chain if is_op(n, aten.transpose.int)]
    others_ok = all(is_op(n, aten.transpose.int, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
                    for n in chain)
    return (others_ok and len(transposes) == 1 and is_op(chain[-1], aten.transpose.int)
            and {d % 4 for d in transposes[0].args[1:3]} == {1, 2} and str(p.shape[-1]) == str(o.shape[1] * o.shape[3]))


def input_scheme(linear: fx.Node) -> str | None:
    """TWQ when a memory-bound LayerNorm (a row reduction) produces the GEMM input; FWQ when a GEMM or attention
    (a compute-bound producer) does, directly, through GeLU, or through head-merging layout ops."""
    x = linear.args[0]
    producer, chain = through_layout(x)
    if is_op(producer, LAYER_NORM) and not chain and producer.meta.get("zq_bound") == "memory":
        return "twq"
    if is_op(producer, GELU) and is_op(producer.args[0], LINEAR, MATMUL) and not chain:
        return "fwq"
    if is_op(producer, ATTENTION) and _is_head_merge(producer, chain, x):
        return "fwq"
    if is_op(producer, LINEAR, MATMUL) and not chain:
        return "fwq"
    return None


class _Inserter:
    def __init__(self, gm: fx.GraphModule, config: QuantConfig, precisions: Precisions):
        self.gm, self.config, self.precision = gm, config, precisions
        self.twq: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}

    def const(self, hint, tensor, before):
        return add_constant(self.gm, hint, tensor, before=before)

    # -- TWQ: one quantize_per_token per LayerNorm, shared by all its INT8 consumers
    def twq_input(self, linear: fx.Node) -> None:
        ln = linear.args[0]
        if ln not in self.twq:
            qt = _call(self.gm, zq.quantize_per_token.default, (ln,), after=ln)
            xq = _call(self.gm, operator.getitem, (qt, 0), after=qt)
            sx = _call(self.gm, operator.getitem, (qt, 1), after=xq)
            self.twq[ln] = (xq, sx)
        xq, sx = self.twq[ln]
        deq = _call(self.gm, zq.dequantize.default, (xq, sx), before=linear)
        _replace_input(linear, ln, deq)
        linear.meta["zq_input_sample"] = ln.name
        linear.meta.update(zq_precision="int8", zq_scheme="twq")

    # -- FWQ: static per-feature scale on a GEMM input, quantized where the producer can emit it
    def fwq_input(self, linear: fx.Node) -> bool:
        x = linear.args[0]
        if "zq_range" not in x.meta:
            return False
        scale = static_scale(x.meta["zq_range"], per_feature=True)
        producer, chain = through_layout(x)
        s_in = self.const(f"{linear.name}_in_scale", scale, before=linear)
        if chain and is_op(producer, ATTENTION):
            # Quantize at the attention output, so the head-merging copy moves int8 instead of float.
            p = val(producer)
            per_head = scale.reshape(int(p.shape[1]), 1, int(p.shape[3]))
            s_prod = self.const(f"{producer.name}_out_scale", per_head, before=chain[0])
            q = _call(self.gm, zq.quantize.default, (producer, s_prod), after=s_prod)
            _replace_input(chain[0], producer, q)
            int8_input = x
        else:
            int8_input = _call(self.gm, zq.quantize.default, (x, s_in), before=linear)
        deq = _call(self.gm, zq.dequantize.default, (int8_input, s_in), before=linear)
        _replace_input(linear, x, deq)
        linear.meta["zq_input_sample"] = x.name
        linear.meta.update(zq_precision="int8", zq_scheme="fwq")
        return True

    # -- attention core: SQ on Q and K, FWQ (or SQ) on V
    def attention(self, attn: fx.Node) -> bool:
        operands = attn.args[:3]
        attn.meta["zq_operand_samples"] = [o.name for o in operands]
        found = [through_layout(o) for o in operands]
        if any("zq_range" not in p.meta for p, _ in found):
            return False
        for index, (operand, (producer, chain)) in enumerate(zip(operands, found)):
            per_feature = index == 2 and _is_head_split(producer, chain, operand)
            scale = static_scale(producer.meta["zq_range"], per_feature)
            first = chain[0] if chain else attn
            s_prod = self.const(f"{producer.name}_scale", scale, before=first)
            q = _call(self.gm, zq.quantize.default, (producer, s_prod), after=s_prod)
            _replace_input(first, producer, q)
            o = val(operand)
            s_op = (scale.reshape(int(o.shape[1]), 1, int(o.shape[3])) if per_feature else scale)
            s_node = self.const(f"{attn.name}_{'qkv'[index]}_scale", s_op, before=attn)
            deq = _call(self.gm, zq.dequantize.default, (attn.args[index], s_node), before=attn)
            _replace_input(attn, attn.args[index], deq)
        attn.meta.update(zq_precision="int8", zq_scheme="sq(q,k)+" + ("fwq" if _is_head_split(*found[2], operands[2]) else "sq") + "(v)+sq(p)")
        return True

    # -- static INT8 embedding tables
    def embedding(self, emb: fx.Node) -> None:
        table = param_of(self.gm, emb.args[0])
        if self.config.embedding_granularity == "row":
            tq, scale = quantize_per_token_ref(table)
        else:
            scale = (table.float().abs().amax() / QMAX).clamp_min(MIN_SCALE).reshape(1)
            tq = torch.round(table.float() / scale).clamp(-QMAX, QMAX).to(torch.int8)
        tq_node = self.const(f"{emb.name}_table_q", tq, before=emb)
        s_node = self.const(f"{emb.name}_table_scale", scale, before=emb)
        deq = _call(self.gm, zq.dequantize.default, (tq_node, s_node), {"out_dtype": table.dtype}, before=emb)
        _replace_input(emb, emb.args[0], deq)
        emb.meta.update(zq_precision="int8", zq_scheme="sq-row" if self.config.embedding_granularity == "row" else "sq")

    # -- FP16 / BF16 fallback: the module computes in that dtype, the rest of the graph does not notice
    def cast_float(self, node: fx.Node, dtype: torch.dtype, tensor_args: list[int]) -> None:
        for i in tensor_args:
            arg = node.args[i]
            if not isinstance(arg, fx.Node) or not is_float_tensor(arg):
                continue
            weight = param_of(self.gm, arg)
            if weight is not None:
                new = self.const(f"{arg.target}_{str(dtype).split('.')[-1]}", weight.to(dtype), before=node)
            else:
                new = _call(self.gm, aten._to_copy.default, (arg,), {"dtype": dtype}, before=node)
            args = list(node.args)
            args[i] = new
            node.args = tuple(args)
        back = _call(self.gm, aten._to_copy.default, (node,), {"dtype": val(node).dtype}, after=node)
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        node.meta.update(zq_precision=str(dtype).split(".")[-1].replace("float16", "fp16").replace("bfloat16", "bf16"),
                         zq_scheme="float")


def insert_qdq(gm: fx.GraphModule, config: QuantConfig, overrides: dict[str, str] | None = None) -> fx.GraphModule:
    precisions = Precisions(overrides or {})
    ins = _Inserter(gm, config, precisions)
    all_paths = set()
    for node in gm.graph.nodes:
        if is_op(node, LINEAR, LAYER_NORM, EMBEDDING):
            weight = node.args[0] if is_op(node, EMBEDDING) else node.args[1] if is_op(node, LINEAR) else node.args[2]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                node.meta["zq_module_path"] = weight_module_path(weight.target)
        all_paths.add(module_path(node))

    # Decide first, rewrite after: the rewrites change producers that input_scheme looks at.
    plan = []
    for node in list(gm.graph.nodes):
        if not is_float_tensor(node):
            continue
        path = module_path(node)
        if is_op(node, LINEAR) and param_of(gm, node.args[1]) is not None:
            plan.append(("linear", node, precisions(path), input_scheme(node)))
        elif is_op(node, ATTENTION) and not node.kwargs.get("dropout_p") and not node.kwargs.get("enable_gqa"):
            plan.append(("attention", node, precisions(path), None))
        elif is_op(node, EMBEDDING) and param_of(gm, node.args[0]) is not None:
            plan.append(("embedding", node, precisions(path), None))
        elif is_op(node, LAYER_NORM):
            node.meta["zq_precision"] = precisions(path)
    precisions.check_all_matched(all_paths)

    for kind, node, precision, scheme in plan:
        if precision in FLOAT_DTYPES:
            ins.cast_float(node, FLOAT_DTYPES[precision], {"linear": [0, 1, 2], "attention": [0, 1, 2],
                                                          "embedding": [0]}[kind])
            if kind == "attention" and is_float_tensor(node.kwargs.get("attn_mask")):
                mask = node.kwargs["attn_mask"]
                cast = _call(gm, aten._to_copy.default, (mask,), {"dtype": FLOAT_DTYPES[precision]}, before=node)
                node.update_kwarg("attn_mask", cast)
            continue
        if precision != "int8":
            node.meta.update(zq_precision=precision, zq_scheme="float")
            continue
        if kind == "linear" and scheme == "twq" and config.int8_ln_gemms:
            if node.args[0].meta.get("zq_precision", "int8") == "int8":
                ins.twq_input(node)
        elif kind == "linear" and scheme == "fwq" and config.int8_fwq_gemms:
            ins.fwq_input(node)
        elif kind == "attention" and config.int8_attention:
            ins.attention(node)
        elif kind == "embedding" and config.int8_embeddings:
            ins.embedding(node)
    return gm
