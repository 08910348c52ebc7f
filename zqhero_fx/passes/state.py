"""Pass state, written down: everything a pass records about a node lives in one typed record, `node.meta["zq"]`.

Who writes and who reads each field is listed here and in passes/README.md; a pass reads only fields written by passes
before it in the pipeline. Records are per node: a rewrite that replaces a node copies the record (`copy_state`), and
a record that arrived by a shallow copy of node.meta (torch.fx copies meta shallowly when a graph is deep-copied) is
cloned the first time the new node writes to it, so two graphs never write into one record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from zqhero_fx.formats import Scheme
from zqhero_fx.modes import FLOAT_PRECISIONS

KEY = "zq"


@dataclass
class NodeState:
    # classify -> insert_qdq (schemes), dumps
    flops: int = 0
    bytes: int = 0
    bound: str | None = None  # "compute" | "memory" | "free"
    # calibrate -> insert_qdq (static scales)
    range: torch.Tensor | None = None  # float32 per-feature range (absmax or percentile of |x|)
    # insert_qdq -> fold_scales, lower, dumps, coverage
    module_path: str | None = None  # the owning module, from the node's weight when it has one
    precision: str | None = None  # a format name ("int8", "fp8_e4m3") or a float dtype ("fp32", "fp16", "bf16")
    scheme: Scheme | str | None = None  # Scheme for a quantized GEMM input; "float" for a float fallback
    attention_schemes: str | None = None  # e.g. "sq(q,k)+fwq(v)+sq(p)" for a quantized attention core
    input_sample: str | None = None  # the calibration sample a GEMM's fold is checked on
    operand_samples: list[str] = field(default_factory=list)  # ditto for the three attention operands
    # fold_scales -> lower (what a requantized output means in float units, for the error report)
    prefold_scale: torch.Tensor | None = None
    # lower -> dumps (error report): the float node a fused node reproduces, times origin_scale when quantized
    origin: str | None = None
    origin_scale: torch.Tensor | None = None
    owner: int = field(default=0, repr=False, compare=False)  # id() of the node this record belongs to


def state(node: fx.Node) -> NodeState:
    """The node's record, created empty on first access."""
    record = node.meta.get(KEY)
    if record is None:
        record = node.meta[KEY] = NodeState(owner=id(node))
    elif record.owner != id(node):  # shared with the node it was copied from: clone before writing
        record = node.meta[KEY] = dataclasses.replace(record, owner=id(node))
    return record


def peek(node: fx.Node) -> NodeState | None:
    """The node's record if a pass wrote one, without creating it."""
    return node.meta.get(KEY)


def is_quantized(node: fx.Node) -> bool:
    """insert_qdq quantized this site (its precision is a format name, not a float dtype)."""
    record = peek(node)
    return record is not None and record.precision is not None and record.precision not in FLOAT_PRECISIONS


def copy_state(source: fx.Node, target: fx.Node, **changes) -> NodeState:
    """Give `target` its own copy of `source`'s record (with `changes`)."""
    record = dataclasses.replace(peek(source) or NodeState(), owner=id(target), **changes)
    target.meta[KEY] = record
    return record


__all__ = ["NodeState", "state", "peek", "copy_state", "is_quantized", "KEY", "FLOAT_PRECISIONS"]
