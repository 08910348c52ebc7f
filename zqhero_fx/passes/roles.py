"""Roles, not op identities: one table from canonical ops to what they mean for quantization.

  NORM          row-reducing norm (LayerNorm with or without bias, RMSNorm): a TWQ source, its per-token scale is free
  GEMM          a GEMM against a weight (linear; canonicalize turns addmm / matmul-with-a-weight into linear)
  ATTENTION     the attention core (scaled_dot_product_attention)
  EMBEDDING     a table lookup
  PASS_THROUGH  elementwise per feature (GeLU exact/tanh, quick_gelu, ReLU, SiLU, gated products, casts): an FWQ
                scale placed after it still folds into the next GEMM, and its quantize fuses into the producer
  LAYOUT        moves or relabels values without changing them (views, transposes, head merges and splits)

insert_qdq decides schemes by walking these roles (`gemm_input_scheme`); a new block type is, at most, a table entry
here plus a canonicalize rule for a new spelling.
"""

from __future__ import annotations

import enum
import operator

import torch
import torch.fx as fx

from zqhero_fx.formats import Scheme
from zqhero_fx.passes._graph import (
    ATTENTION,
    EMBEDDING,
    LAYER_NORM,
    LAYOUT_OPS,
    LINEAR,
    RMS_NORM,
    aten,
    is_op,
    param_of,
    val,
)


class Role(enum.Enum):
    NORM = "norm"
    GEMM = "gemm"
    ATTENTION = "attention"
    EMBEDDING = "embedding"
    PASS_THROUGH = "pass_through"
    LAYOUT = "layout"


NORM_KINDS = {LAYER_NORM: "layer", RMS_NORM: "rms"}

ROLES: dict = {
    LAYER_NORM: Role.NORM,
    RMS_NORM: Role.NORM,
    LINEAR: Role.GEMM,
    ATTENTION: Role.ATTENTION,
    EMBEDDING: Role.EMBEDDING,
    **{op: Role.LAYOUT for op in LAYOUT_OPS},
    **{op: Role.PASS_THROUGH for op in (
        aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
        aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.div.Tensor,
        aten.div.Scalar, aten.pow.Tensor_Scalar, aten.neg.default, aten.erf.default, aten._to_copy.default,
        aten.to.dtype, aten.type_as.default, aten.clone.default,
    )},
    # Feature slices of a fused projection (Phi-3's gate_up, ModernBERT's Wi, GPT-2's c_attn): values unchanged.
    **{op: Role.LAYOUT for op in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                                  aten.slice.Tensor, aten.select.int, operator.getitem)},
}

# Roles whose node is compute-bound by construction: an FWQ quantize after them fuses into their epilogue.
COMPUTE_ROLES = (Role.GEMM, Role.ATTENTION)
# Layout ops a per-token (row) scale survives: rows stay rows, the last (feature) dim is untouched.
ROW_PRESERVING = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
                  aten.clone.default, aten.alias.default, aten.select.int, aten.slice.Tensor}
MAX_WALK = 64  # nodes a scheme walk visits before giving up (keeps pathological graphs cheap)


def role(node) -> Role | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    try:
        return ROLES.get(node.target)
    except TypeError:  # an unhashable target
        return None


def describe(node) -> str:
    """How a reason names a producer: 'aten.cumsum', 'graph input input_ids', 'constant ...'."""
    if not isinstance(node, fx.Node):
        return f"constant {node!r}"
    if node.op == "placeholder":
        return f"graph input {node.target}"
    if node.op == "get_attr":
        return f"constant {node.target}"
    target = str(node.target).replace(".default", "")
    return target if target.startswith("aten.") or target.startswith("zqhero.") else f"{node.op} {target}"


def _last_dim_kept(node: fx.Node) -> bool:
    out, inp = val(node), val(node.args[0]) if node.args else None
    return out is not None and inp is not None and out.dim() >= 1 and inp.dim() >= 1 and \
        str(out.shape[-1]) == str(inp.shape[-1])


def _picks_rows(node: fx.Node) -> bool:
    """x[index] (a torch-level graph's getitem) that leaves the last dim whole: `hidden[:, 0]` picks [CLS] rows."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(val(node.args[0]), torch.Tensor)):
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return (len(index) < val(node.args[0]).dim() and Ellipsis not in index
            and all(isinstance(i, (int, slice)) for i in index))


def norm_source(x: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The norm that produces `x` through row-preserving layout ops, and that chain (top first); (None, []) when `x`
    is not a norm's rows."""
    chain = []
    node = x
    while role(node) is Role.LAYOUT:
        row_op = node.target in ROW_PRESERVING or _picks_rows(node)
        if not row_op or not _last_dim_kept(node) or not isinstance(node.args[0], fx.Node):
            return None, []
        if is_op(node, aten.select.int, aten.slice.Tensor):
            ndim = val(node.args[0]).dim()
            dim = node.args[1] if len(node.args) > 1 else 0
            if not isinstance(dim, int) or dim % ndim == ndim - 1:
                return None, []  # picks features, not rows
        chain.append(node)
        node = node.args[0]
    return (node, chain[::-1]) if role(node) is Role.NORM else (None, [])


def _carries_values(node: fx.Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return v.dim() > 0
    return isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v)  # split / chunk outputs


def compute_roots(x: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
    """Walk up from `x` through pass-through and layout ops to the nodes that produce it.

    Returns (compute-bound producers found, the first producer that is not one — None when every path ends in a GEMM
    or attention, or in scalar/constant operands of elementwise ops)."""
    roots: list[fx.Node] = []
    stack, seen = [x], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > MAX_WALK:
            return roots, node
        r = role(node)
        if r in COMPUTE_ROLES:
            roots.append(node)
        elif r in (Role.PASS_THROUGH, Role.LAYOUT):
            for a in node.all_input_nodes:
                if not _carries_values(a):
                    continue  # a size (view's shape arguments), not data
                if a.op == "get_attr" and r is Role.PASS_THROUGH:
                    continue  # a constant operand of an elementwise op (a bias, a scale)
                stack.append(a)
        else:
            return roots, node
    return roots, None


def gemm_input_scheme(gemm: fx.Node) -> tuple[Scheme | None, str]:
    """How a GEMM's input is quantized, from where it comes: (scheme, reason when None).

    TWQ when a row-reducing norm produces it (through row-preserving layout ops): the per-token scale comes free with
    the norm's reduction. FWQ when every path up through pass-through ops ends in a compute-bound producer (a GEMM,
    attention): the static per-feature scale folds into this GEMM's weight and the quantize into that producer."""
    x = gemm.args[0]
    if not isinstance(x, fx.Node):
        return None, "input is not a tensor node"
    norm, _ = norm_source(x)
    if norm is not None:
        return Scheme.TWQ, ""
    roots, blocker = compute_roots(x)
    if blocker is None and roots:
        return Scheme.FWQ, ""
    if blocker is not None:
        return None, f"input produced by {describe(blocker)}"
    return None, "input has no GEMM, attention or norm producer"


def is_weight_gemm(gm: fx.GraphModule, node: fx.Node) -> bool:
    weight = param_of(gm, node.args[1]) if role(node) is Role.GEMM else None
    return weight is not None and weight.dim() == 2


__all__ = ["Role", "ROLES", "NORM_KINDS", "role", "describe", "norm_source", "compute_roots", "gemm_input_scheme",
           "is_weight_gemm"]
