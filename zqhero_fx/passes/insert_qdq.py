"""insert_qdq: put zqhero.quantize / dequantize nodes around every site the mode quantizes, honouring overrides, and
write the coverage report: every GEMM, attention and embedding site with its precision, format, scheme, and the reason
when it stays float.

Schemes follow from roles (passes/roles.py), not op identities: a GEMM input produced by a row-reducing norm gets TWQ
(quantize_per_token, later fused into Norm^quant); one produced by GEMMs or attention through pass-through ops gets FWQ
(static per-feature scale, later folded into the GEMM's weight); attention operands get SQ (V gets FWQ when its layout
is a plain head split); embedding tables get static per-row scales. The format comes from the config (or a per-module
override). Weights of GEMMs stay float here: fold_scales still has to scale them.
Needs state.bound (classify) and state.range (calibrate). Postcondition: the graph runs and computes a fake-quantized
model; gm.meta["zqhero"]["coverage"] holds the report.
"""

from __future__ import annotations

import fnmatch
import operator

import torch
import torch.fx as fx

from zqhero_fx.capture import module_path_examples
from zqhero_fx.coverage import Coverage
from zqhero_fx.errors import ConfigError
from zqhero_fx.formats import Format, Scheme, get_format
from zqhero_fx.modes import QuantConfig
from zqhero_fx.passes._graph import (
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
from zqhero_fx.passes.roles import Role, gemm_input_scheme, is_weight_gemm, norm_source, role
from zqhero_fx.passes.state import state

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_ONLY = "weight-only"  # the scheme of a GEMM whose activations stay float (lower packs its weight)


class Precisions:
    """Per-module precision from override globs (the last matching glob wins); remembers which globs matched."""

    def __init__(self, overrides: dict[str, str]):
        self.overrides = overrides
        self.matched: set[str] = set()

    def __call__(self, path: str) -> str | None:
        chosen = None
        for pattern, precision in self.overrides.items():
            if path and fnmatch.fnmatchcase(path, pattern):
                chosen = precision
                self.matched.add(pattern)
        return chosen

    def check_all_matched(self, all_paths: set[str]) -> None:
        for pattern in self.overrides:
            if pattern not in self.matched and not any(fnmatch.fnmatchcase(p, pattern) for p in all_paths):
                raise ConfigError(f"override {pattern!r} matches no module in the graph (module paths look like: "
                                  f"{module_path_examples(all_paths, pattern)})")


# Static scales come from calibration ranges that unseen inputs may exceed. A float format's relative precision is the
# same in every binade, so one binade of headroom (scale x 2) costs only its lowest subnormal binade and keeps values up
# to twice the calibrated range from saturating (measured on random models, FP8 E4M3: +1.4 dB CLIP text M3, +1.8 dB
# M2, +4 dB BERT M2, +0.7 dB Llama M3; 4x gains nothing more). An integer grid would lose a bit of resolution
# everywhere instead, so INT8 keeps absmax / 127.
FLOAT_STATIC_HEADROOM = 2.0


def static_scale(value_range: torch.Tensor, per_feature: bool, fmt: Format) -> torch.Tensor:
    r = value_range.float() if per_feature else value_range.float().amax().reshape(1)
    scale = fmt.scale_for(r)
    return scale * FLOAT_STATIC_HEADROOM if fmt.kind == "float" else scale


def _call(gm, target, args, kwargs=None, *, after=None, before=None):
    ctx = gm.graph.inserting_after(after) if after is not None else gm.graph.inserting_before(before)
    with ctx:
        return gm.graph.call_function(target, tuple(args), kwargs or {})


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


def output_heads(gm: fx.GraphModule) -> set[fx.Node]:
    """GEMMs whose result is a model output, reached through layout ops and casts only: an LM head, a classifier.
    Their error lands unfiltered in what the user reads (logits), so they stay float unless the config says so."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    heads = set()
    for node in gm.graph.nodes:
        if role(node) is not Role.GEMM:
            continue
        frontier, seen = [node], set()
        while frontier:
            n = frontier.pop()
            if n in seen:
                continue
            seen.add(n)
            if output in n.users:
                heads.add(node)
                break
            frontier += [u for u in n.users if role(u) is Role.LAYOUT or is_op(u, aten._to_copy.default)]
    return heads


class _Inserter:
    def __init__(self, gm: fx.GraphModule, config: QuantConfig):
        self.gm, self.config = gm, config
        self.twq: dict[tuple[fx.Node, torch.dtype], tuple[fx.Node, fx.Node]] = {}

    def const(self, hint, tensor, before):
        return add_constant(self.gm, hint, tensor, before=before)

    def per_token(self, x: fx.Node, dtype: torch.dtype) -> tuple[fx.Node, fx.Node]:
        """quantize_per_token(x) and its two outputs (values, scales), at the graph's current insertion point."""
        qt = self.gm.graph.call_function(zq.quantize_per_token.default, (x, dtype))
        return (self.gm.graph.call_function(operator.getitem, (qt, 0)),
                self.gm.graph.call_function(operator.getitem, (qt, 1)))

    def mark(self, node: fx.Node, fmt: Format, scheme) -> None:
        record = state(node)
        record.precision, record.scheme = fmt.name, scheme

    # -- TWQ: one quantize_per_token per norm, shared by all its quantized consumers of one format
    def twq_input(self, gemm: fx.Node, fmt: Format) -> None:
        x = gemm.args[0]
        norm, chain = norm_source(x)
        dtype = fmt.storage_dtype
        if chain:
            # Rows picked or reshaped after the norm (a pooler's [CLS] row, a flattened batch): quantize them here,
            # per token, as a standalone op.
            with self.gm.graph.inserting_before(gemm):
                xq, sx = self.per_token(x, dtype)
        else:
            if (norm, dtype) not in self.twq:
                with self.gm.graph.inserting_before(norm.next):  # right after the norm, in creation order
                    self.twq[(norm, dtype)] = self.per_token(norm, dtype)
            xq, sx = self.twq[(norm, dtype)]
        deq = _call(self.gm, zq.dequantize.default, (xq, sx), before=gemm)
        gemm.replace_input_with(x, deq)
        state(gemm).input_sample = x.name
        self.mark(gemm, fmt, Scheme.TWQ)

    # -- FWQ: static per-feature scale on a GEMM input, quantized where the producer can emit it
    def fwq_input(self, gemm: fx.Node, fmt: Format) -> bool:
        x = gemm.args[0]
        value_range = state(x).range
        if value_range is None:
            return False
        scale = static_scale(value_range, True, fmt)
        choice = self.config.fwq_activations
        if choice == "auto" and "zqhero_decoder" in self.gm.meta:
            choice = "per_token"  # LLM activations: see QuantConfig.fwq_activations
        if choice == "per_token":
            # LLM activations: a static per-feature scale from calibration text clips or starves other text's tokens
            # (massive activations, heavy-tailed SwiGLU products); a dynamic per-token scale, computed after the
            # producer, keeps them (docs/modes.md, "FWQ on decoders").
            with self.gm.graph.inserting_before(gemm):
                xq, sx = self.per_token(x, fmt.storage_dtype)
            deq = _call(self.gm, zq.dequantize.default, (xq, sx), before=gemm)
            gemm.replace_input_with(x, deq)
            state(gemm).input_sample = x.name
            self.mark(gemm, fmt, Scheme.TWQ)
            self.gm.meta["zqhero"].setdefault("fwq_per_token", []).append(module_path(gemm) or gemm.name)
            return True
        producer, chain = through_layout(x)
        s_in = self.const(f"{gemm.name}_in_scale", scale, before=gemm)
        if chain and role(producer) is Role.ATTENTION and _is_head_merge(producer, chain, x):
            # Quantize at the attention output, so the head-merging copy moves quantized values instead of float.
            p = val(producer)
            per_head = scale.reshape(int(p.shape[1]), 1, int(p.shape[3]))
            s_prod = self.const(f"{producer.name}_out_scale", per_head, before=chain[0])
            q = _call(self.gm, zq.quantize.default, (producer, s_prod, fmt.storage_dtype), after=s_prod)
            chain[0].replace_input_with(producer, q)
            quantized_input = x
        else:
            quantized_input = _call(self.gm, zq.quantize.default, (x, s_in, fmt.storage_dtype), before=gemm)
        deq = _call(self.gm, zq.dequantize.default, (quantized_input, s_in), before=gemm)
        gemm.replace_input_with(x, deq)
        state(gemm).input_sample = x.name
        self.mark(gemm, fmt, Scheme.FWQ)
        return True

    # -- attention core: SQ on Q and K, FWQ (or SQ) on V
    def attention(self, attn: fx.Node, fmt: Format) -> bool:
        operands = attn.args[:3]
        found = [through_layout(o) for o in operands]
        if any(state(p).range is None for p, _ in found):
            return False
        state(attn).operand_samples = [o.name for o in operands]
        v_per_feature = _is_head_split(*found[2], operands[2])
        for index, (operand, (producer, chain)) in enumerate(zip(operands, found)):
            per_feature = index == 2 and v_per_feature
            scale = static_scale(state(producer).range, per_feature, fmt)
            first = chain[0] if chain else attn
            s_prod = self.const(f"{producer.name}_scale", scale, before=first)
            q = _call(self.gm, zq.quantize.default, (producer, s_prod, fmt.storage_dtype), after=s_prod)
            first.replace_input_with(producer, q)
            o = val(operand)
            s_op = scale.reshape(int(o.shape[1]), 1, int(o.shape[3])) if per_feature else scale
            s_node = self.const(f"{attn.name}_{'qkv'[index]}_scale", s_op, before=attn)
            deq = _call(self.gm, zq.dequantize.default, (attn.args[index], s_node), before=attn)
            attn.replace_input_with(attn.args[index], deq)
        self.mark(attn, fmt, Scheme.SQ)
        state(attn).attention_schemes = f"sq(q,k)+{'fwq' if v_per_feature else 'sq'}(v)+sq(p)"
        return True

    # -- static quantized embedding tables
    def embedding(self, emb: fx.Node, fmt: Format) -> None:
        table = param_of(self.gm, emb.args[0])
        if self.config.embedding_granularity == "row":
            tq, scale = fmt.quantize_per_token(table)
        else:
            scale = fmt.scale_for(table.float().abs().amax()).reshape(1)
            tq = fmt.quantize(table, scale)
        tq_node = self.const(f"{emb.name}_table_q", tq, before=emb)
        s_node = self.const(f"{emb.name}_table_scale", scale, before=emb)
        deq = _call(self.gm, zq.dequantize.default, (tq_node, s_node), {"out_dtype": table.dtype}, before=emb)
        emb.replace_input_with(emb.args[0], deq)
        self.mark(emb, fmt, Scheme.SQ)

    # -- FP16 / BF16 fallback: the module computes in that dtype, the rest of the graph does not notice
    def cast_float(self, node: fx.Node, precision: str, tensor_args: list[int]) -> None:
        dtype = FLOAT_DTYPES[precision]
        for i in tensor_args:
            arg = node.args[i] if i < len(node.args) else None  # linear(x, w) without a bias has two args
            if not isinstance(arg, fx.Node) or not is_float_tensor(arg):
                continue
            weight = param_of(self.gm, arg)
            if weight is not None:
                new = self.const(f"{arg.target}_{precision}", weight.to(dtype), before=node)
            else:
                new = _call(self.gm, aten._to_copy.default, (arg,), {"dtype": dtype}, before=node)
            args = list(node.args)
            args[i] = new
            node.args = tuple(args)
        if role(node) is Role.ATTENTION and is_float_tensor(node.kwargs.get("attn_mask")):
            cast = _call(self.gm, aten._to_copy.default, (node.kwargs["attn_mask"],), {"dtype": dtype}, before=node)
            node.update_kwarg("attn_mask", cast)
        back = _call(self.gm, aten._to_copy.default, (node,), {"dtype": val(node).dtype}, after=node)
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        state(node).precision, state(node).scheme = precision, "float"


_TENSOR_ARGS = {"gemm": [0, 1, 2], "attention": [0, 1, 2], "embedding": [0]}


def _site_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if not is_float_tensor(node):
        return None
    if is_weight_gemm(gm, node):
        return "gemm"
    if role(node) is Role.ATTENTION:
        return "attention"
    if role(node) is Role.EMBEDDING and param_of(gm, node.args[0]) is not None:
        return "embedding"
    return None


def insert_qdq(gm: fx.GraphModule, config: QuantConfig, overrides: dict[str, str] | None = None) -> fx.GraphModule:
    precisions = Precisions(overrides or {})
    ins = _Inserter(gm, config)
    all_paths = set()
    for node in gm.graph.nodes:
        weight = {Role.EMBEDDING: 0, Role.GEMM: 1, Role.NORM: 2}.get(role(node))
        if weight is not None and len(node.args) > weight and isinstance(node.args[weight], fx.Node) \
                and node.args[weight].op == "get_attr":
            state(node).module_path = weight_module_path(node.args[weight].target)
        all_paths.add(module_path(node))

    # Decide first, rewrite after: the rewrites change producers that the scheme walk looks at.
    plan = []
    for node in list(gm.graph.nodes):
        kind = _site_kind(gm, node)
        if kind is not None:
            scheme = gemm_input_scheme(node) if kind == "gemm" else (None, "")
            plan.append((kind, node, precisions(module_path(node)), scheme))
        elif role(node) is Role.NORM:
            state(node).precision = precisions(module_path(node))
    precisions.check_all_matched(all_paths)
    heads = output_heads(gm)
    coverage = Coverage(mode=config.name, activation_format=config.activation_format,
                        weight_format=weight_description(config))

    for kind, node, override, (scheme, why) in plan:
        if override in FLOAT_DTYPES:
            if override != "fp32":
                ins.cast_float(node, override, _TENSOR_ARGS[kind])
            else:
                state(node).precision, state(node).scheme = "fp32", "float"
            coverage.add(node, kind, f"override {override}", by_design=True)
            continue
        fmt = get_format(override) if override else (config.weights if config.weight_only else config.activations)
        reason, by_design = _quantize_site(ins, config, kind, node, fmt, scheme, why, heads)
        coverage.add(node, kind, reason, by_design)
    gm.meta.setdefault("zqhero", {})["coverage"] = coverage
    return gm


def weight_description(config: QuantConfig) -> str:
    """The GEMM weights' format as the coverage report shows it: "int8", "fp4_e2m1/g64 pow2-ratio +lorc8", ..."""
    scheme = config.weight_scheme
    if scheme is None:
        return config.weight_format
    text = scheme.format + (f"/g{scheme.group_size}" if scheme.group_size else "/channel")
    text += {"integer": " int-scales", "power_of_two": " pow2", "power_of_two_ratio": " pow2-ratio"}.get(
        scheme.group_scales, "")
    text += " asym" if scheme.zero_point else ""
    text += " grid" if scheme.search == "grid" else ""
    return text + (f" +lorc{scheme.lorc_rank}" if scheme.lorc_rank else "")


def _quantize_site(ins: _Inserter, config: QuantConfig, kind, node, fmt, scheme, why, heads) -> tuple[str, bool]:
    """Quantize one site if the mode and the graph allow it. Returns (why it stays float, or '' when quantized;
    whether that is by design: the mode's definition, an override, the LM-head default)."""
    if not config.quantizes:
        return f"mode {config.name} keeps every site float", True
    if kind == "gemm":
        if node in heads and not config.quantize_heads:
            return "output head: its result is a model output (float by default; QuantConfig(quantize_heads=True))", \
                True
        if config.weight_only:
            # Only the weight is quantized (lower packs it): any GEMM with a weight qualifies, whatever feeds it.
            ins.mark(node, config.weights, WEIGHT_ONLY)
            state(node).input_sample = node.args[0].name  # GPTQ rounds on it
            return "", False
        if scheme is Scheme.TWQ:
            if not config.norm_fed_gemms:
                return f"norm-fed GEMM: mode {config.name} does not quantize them (TWQ)", True
            norm, _ = norm_source(node.args[0])
            if state(norm).precision in FLOAT_DTYPES:
                return f"its input norm {module_path(norm) or norm.name} is overridden to {state(norm).precision}", True
            ins.twq_input(node, fmt)
            return "", False
        if scheme is Scheme.FWQ:
            if not config.fwq_gemms:
                return f"GEMM fed by GEMMs/attention: mode {config.name} does not quantize them (FWQ, M2 and up)", True
            return ("", False) if ins.fwq_input(node, fmt) else ("no calibration range for its input", False)
        return why, False
    if kind == "attention":
        if not config.attention:
            return f"mode {config.name} keeps attention float (M3 quantizes it)", True
        if node.kwargs.get("dropout_p"):
            return "attention with dropout", False
        return ("", False) if ins.attention(node, fmt) else ("no calibration range for its Q/K/V producers", False)
    if not config.embeddings:
        return f"mode {config.name} keeps embedding tables float (M3 quantizes them)", True
    # Tables take the weight format when it is an 8-bit one; packed 4-/6-bit formats are GEMM-only (a gathered row
    # would have to be unpacked per token), so their tables use the activation format.
    table_format = config.weights if fmt.name == config.activation_format and config.weights.bits == 8 else fmt
    ins.embedding(node, table_format)
    return "", False
