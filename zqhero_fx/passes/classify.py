"""classify: label every node memory-bound, compute-bound or free from its arithmetic intensity (FLOPs per byte moved,
from the shapes and dtypes in node.meta["val"]) against the chosen device's ridge point for that dtype.
Writes state.flops, .bytes, .bound (passes/state.py); the dumps show them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from zqhero_fx.formats import is_quantized_dtype
from zqhero_fx.passes._graph import ATTENTION, LAYOUT_OPS, LINEAR, MATMUL, aten, graph_view, is_op, val, zq
from zqhero_fx.passes.state import state


@dataclass(frozen=True)
class Device:
    name: str
    int8_tops: float  # dense INT8 tensor-core / VNNI peak, 1e12 ops/s
    fp16_tflops: float  # dense FP16/BF16 peak
    fp32_tflops: float
    bandwidth_tbs: float  # main-memory bandwidth, 1e12 B/s

    def ridge(self, dtype: torch.dtype) -> float:
        """FLOPs per byte above which a kernel in this dtype is compute-bound."""
        # 8-bit float formats run at the INT8 rate on the parts that have them (H100/H200 FP8 = INT8 dense peak).
        if is_quantized_dtype(dtype):
            return self.int8_tops / self.bandwidth_tbs
        peak = {torch.float16: self.fp16_tflops, torch.bfloat16: self.fp16_tflops}
        return peak.get(dtype, self.fp32_tflops) / self.bandwidth_tbs


# Datasheet dense peaks (shared/docs/perf.md §1.1). The CPU row is this 2-core AVX-512 machine, measured roughly:
# ~0.15 TFLOP/s FP32 sgemm, ~0.5 TOPS INT8 through oneDNN VNNI, ~15 GB/s stream bandwidth.
DEVICES = {
    "a100": Device("A100-80GB SXM", 624.0, 312.0, 19.5, 2.039),
    "h100": Device("H100 SXM", 1979.0, 989.0, 67.0, 3.35),
    "h200": Device("H200 SXM", 1979.0, 989.0, 67.0, 4.8),
    "cpu": Device("2-core x86-64 CPU", 0.5, 0.15, 0.15, 0.015),
}

FREE_OPS = LAYOUT_OPS | {aten.sym_size.int, aten.unsqueeze.default, aten.expand.default, aten.slice.Tensor,
                         aten.select.int, aten.squeeze.dim, aten._assert_tensor_metadata.default}


def _hint(size) -> int:
    if isinstance(size, torch.SymInt):
        try:
            return int(size.node.hint) if size.node.hint is not None else int(size.node.shape_env.size_hint(size.node.expr))
        except Exception:  # an unbacked size has no hint; count it as 1
            return 1
    return int(size)


def numel(t: torch.Tensor) -> int:
    return math.prod(_hint(s) for s in t.shape)


def nbytes(t) -> int:
    return numel(t) * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(node: fx.Node):
    return [val(a) for a in node.all_input_nodes if val(a) is not None]


def cost(node: fx.Node) -> tuple[int, int]:
    """(FLOPs, bytes moved) of one node, assuming each input is read and each output written once."""
    if node.op != "call_function" or node.target in FREE_OPS:
        return 0, 0
    outs = node.meta.get("val")
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs]) if isinstance(o, torch.Tensor)]
    moved = sum(nbytes(t) for t in _tensors(node)) + sum(nbytes(o) for o in outs)
    if is_op(node, LINEAR, zq.quantized_linear.default):
        x, w = val(node.args[0]), val(node.args[2] if is_op(node, zq.quantized_linear.default) else node.args[1])
        return 2 * numel(x) * _hint(w.shape[0]), moved
    if is_op(node, MATMUL) and outs:
        return 2 * numel(outs[0]) * _hint(val(node.args[0]).shape[-1]), moved
    if is_op(node, ATTENTION, zq.quantized_attention.default) and outs:
        q, k = val(node.args[0]), val(node.args[1])
        scores = numel(q) // _hint(q.shape[-1]) * _hint(k.shape[-2])
        # q.kᵀ and p.v are 2·D FLOPs per score each; softmax about 5 more. Flash-style: scores never reach memory.
        return scores * (4 * _hint(q.shape[-1]) + 5), moved
    elementwise = max((numel(o) for o in outs), default=0)
    return 5 * elementwise, moved


def _dtype(node: fx.Node) -> torch.dtype:
    if is_op(node, zq.quantized_linear.default, zq.quantized_attention.default):
        return val(node.args[0]).dtype
    ins = _tensors(node)
    return ins[0].dtype if ins else torch.float32


def classify(gm: fx.GraphModule, device: str = "cpu") -> fx.GraphModule:
    spec = DEVICES[device]
    for node in gm.graph.nodes:
        flops, moved = cost(node)
        record = state(node)
        record.flops, record.bytes = flops, moved
        if moved == 0:
            record.bound = "free"
        else:
            record.bound = "compute" if flops / moved >= spec.ridge(_dtype(node)) else "memory"
    gm.meta.setdefault("zqhero", {})["graph_view"] = graph_view(gm)
    return gm


def bound_summary(gm: fx.GraphModule) -> dict[str, dict[str, int]]:
    """FLOPs, bytes and node count per bound class: the roofline picture of the whole graph."""
    out: dict[str, dict[str, int]] = {}
    for node in gm.graph.nodes:
        record = node.meta.get("zq")
        if record is not None and record.bound:
            row = out.setdefault(record.bound, {"nodes": 0, "flops": 0, "bytes": 0})
            row["nodes"] += 1
            row["flops"] += record.flops
            row["bytes"] += record.bytes
    return out
