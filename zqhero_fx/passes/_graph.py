"""Small graph helpers shared by the passes: op tests, constants, module paths, the networkx view."""

from __future__ import annotations

import re

import networkx as nx
import torch
import torch.fx as fx

from zqhero_fx import ops  # noqa: F401  (registers torch.ops.zqhero.*, the IR the passes emit)

aten = torch.ops.aten
zq = torch.ops.zqhero

# The canonical spelling every front end is rewritten to (passes/canonicalize.py).
LINEAR = aten.linear.default
MATMUL = aten.matmul.default
LAYER_NORM = aten.layer_norm.default
RMS_NORM = aten.rms_norm.default
SOFTMAX = aten.softmax.int
GELU = aten.gelu.default
EMBEDDING = aten.embedding.default
ADD = aten.add.Tensor
ATTENTION = aten.scaled_dot_product_attention.default

# Ops that only move or relabel data: quantized values may flow through them unchanged.
LAYOUT_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.expand.default,  # GQA's repeat_kv: unsqueeze -> expand -> reshape
    aten.unsqueeze.default,
}


# Ops torch.fx calls impure only because they *may* draw random numbers (dropout inside attention); with
# dropout_p = 0 in inference graphs they are pure, so dead ones can go.
_SEEDED_BUT_PURE = {ATTENTION, aten.dropout.default}


def is_impure(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _SEEDED_BUT_PURE:
        return False
    return node.is_impure()


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)


def is_op(node: fx.Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def val(node) -> torch.Tensor | None:
    """The fake value propagate_meta recorded for a node (None for non-tensors or unknown)."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def is_float_tensor(node) -> bool:
    v = val(node)
    return v is not None and v.dtype.is_floating_point


def fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def param_of(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor behind a get_attr node (a weight or constant), else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = fetch_attr(gm, node.target)
        if isinstance(obj, torch.Tensor):
            return obj
    return None


def add_constant(gm: fx.GraphModule, hint: str, tensor: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """Register `tensor` as a buffer under a fresh `_zq_*` name and return a get_attr node placed before `before`."""
    base = "_zq_" + re.sub(r"[^0-9a-zA-Z_]", "_", hint).strip("_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor.detach().contiguous(), persistent=True)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = tensor
    return node


def attention_scale(attn: fx.Node) -> float:
    """The logit scale of an attention node: its `scale` argument, or SDPA's default 1/sqrt(head_dim)."""
    scale = attn.kwargs.get("scale")
    return float(scale) if scale is not None else float(val(attn.args[0]).shape[-1]) ** -0.5


def module_path(node: fx.Node) -> str:
    """The dotted path of the module a node came from: `encoder.layer.3.attention.self.query`.

    Parameters name their module reliably whatever the front end, so ops that own weights use them; other nodes use
    the innermost entry of torch.export / Dynamo's `nn_module_stack`.
    """
    record = node.meta.get("zq")
    if record is not None and record.module_path is not None:
        return record.module_path
    stack = node.meta.get("nn_module_stack")
    if stack:
        fqn = list(stack.values())[-1][0]
        return normalise_module_path(fqn)
    return ""


def normalise_module_path(fqn: str) -> str:
    """Turn Dynamo's `L['self'].encoder.layer[0]` / `L__self___encoder_layer_0` spellings into `encoder.layer.0`."""
    fqn = re.sub(r"^L\['self'\]", "", fqn)
    fqn = re.sub(r"\[(\d+)\]", r".\1", fqn)
    fqn = re.sub(r"\['([^']+)'\]", r".\1", fqn)
    fqn = re.sub(r"\._modules\.|\._parameters\.|\._buffers\.", ".", fqn)
    return fqn.strip(".")


def weight_module_path(target: str) -> str:
    """`encoder.layer.0.attention.self.query.weight` -> `encoder.layer.0.attention.self.query`."""
    return target.rsplit(".", 1)[0] if "." in target else ""


def graph_view(gm: fx.GraphModule) -> nx.DiGraph:
    """The dataflow graph as networkx: one vertex per node name, an edge per producer -> consumer use."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def through_layout(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk up from `node` through single-use layout ops; return the producer and the layout chain (top first)."""
    chain = []
    while is_op(node, *LAYOUT_OPS) and isinstance(node.args[0], fx.Node) and len(node.args[0].users) == 1:
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def single_layout_path_down(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """Walk down from `node` through layout ops that are each its only user; return the first non-layout consumer."""
    chain = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not is_op(user, *LAYOUT_OPS):
            return user, chain
        chain.append(user)
        node = user
    return None, chain
