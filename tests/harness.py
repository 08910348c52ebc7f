"""Test helpers for torch.compile backends (after vLLM's tests/compile/backend.py::TestBackend).

    rec = RecordingBackend(zqhero_fx.backend(mode="M3", calibration=batches))
    compiled = torch.compile(model, backend=rec)
    compiled(**inputs)
    rec.check_before_ops([torch._C._nn.linear])                  # what Dynamo handed over
    rec.check_after_ops([torch.ops.zqhero.quantized_linear.default])  # what the backend produced
    assert rec.compiles == 1                                     # one graph, whatever the shapes since

`RecordingBackend()` without an inner backend runs each graph as it is: a plain compile counter.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from typing import Callable, Iterable

import torch
import torch.fx as fx


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph structure (nodes, targets, args; node.meta shallow-copied) that later rewrites of `gm` do not
    touch. Tensors held by the module are shared, not copied."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)


def op_matches(node: fx.Node, op) -> bool:
    """`op` is an OpOverload, an OpOverloadPacket (any overload), a Python callable, or a method name string."""
    if node.op == "call_method":
        return node.target == op
    if node.op != "call_function":
        return False
    if isinstance(op, torch._ops.OpOverloadPacket):
        return getattr(node.target, "overloadpacket", None) is op
    return node.target is op or node.target == op


def count_ops(graphs: Iterable[fx.GraphModule], op) -> int:
    return sum(op_matches(node, op) for gm in graphs for node in gm.graph.nodes)


def op_histogram(graphs: Iterable[fx.GraphModule]) -> Counter:
    return Counter(str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


class RecordingBackend:
    """A torch.compile backend that records what it is given and what the backend it wraps produces.

    Args:
        inner: the backend under test, or None to run every graph as Dynamo captured it. Produced graphs are
            collected when the inner backend reports them through `add_graph_listener(fn)` (fn(GraphModule) for each
            graph it produces, possibly later than the compile: zqhero converts after calibration); otherwise the
            GraphModule an inner backend returns, if it returns one.

    Attributes:
        graphs_before: a snapshot of every graph Dynamo handed over, in order; len() is the number of compiles.
        graphs_after: a snapshot of every graph the inner backend produced.
        example_inputs: the example inputs of each compile.
    """

    def __init__(self, inner: Callable | None = None):
        self.inner = inner  # zqhero_fx.backend follows `.inner` to find the backend it serves
        self.graphs_before: list[fx.GraphModule] = []
        self.graphs_after: list[fx.GraphModule] = []
        self.example_inputs: list[list] = []
        self._reports = hasattr(inner, "add_graph_listener")
        if self._reports:
            inner.add_graph_listener(lambda gm: self.graphs_after.append(snapshot(gm)))

    def __call__(self, gm: fx.GraphModule, example_inputs):
        self.graphs_before.append(snapshot(gm))
        self.example_inputs.append(list(example_inputs))
        if self.inner is None:
            self.graphs_after.append(snapshot(gm))
            return gm.forward
        compiled = self.inner(gm, example_inputs)
        if not self._reports and isinstance(compiled, fx.GraphModule):
            self.graphs_after.append(snapshot(compiled))
        return compiled

    @property
    def compiles(self) -> int:
        return len(self.graphs_before)

    def check_before_ops(self, ops, fully_replaced: bool = False) -> None:
        """Each op occurs in the graphs Dynamo handed over; with fully_replaced, none is left in the produced ones."""
        assert self.graphs_before, "the backend was never called"
        for op in ops:
            assert count_ops(self.graphs_before, op) > 0, f"{op} not in the captured graphs"
            if fully_replaced:
                left = count_ops(self.graphs_after, op)
                assert left == 0, f"{op} still occurs {left} times in the produced graphs"

    def check_after_ops(self, ops, *, graph: int | None = None) -> None:
        """Each op occurs in the produced graphs (or in produced graph number `graph`)."""
        assert self.graphs_after, "the backend produced no graph (yet)"
        graphs = self.graphs_after if graph is None else [self.graphs_after[graph]]
        for op in ops:
            assert count_ops(graphs, op) > 0, f"{op} not in the produced graphs: {dict(op_histogram(graphs))}"

    def check_absent_ops(self, ops) -> None:
        """None of the ops occurs in the produced graphs."""
        for op in ops:
            left = count_ops(self.graphs_after, op)
            assert left == 0, f"{op} occurs {left} times in the produced graphs"


@contextlib.contextmanager
def inductor_code():
    """Collect the source of every module Inductor generates inside the block (unlike
    torch._inductor.utils.run_and_get_code, without resetting Dynamo first). Extern calls to custom ops appear
    in it as `torch.ops.<ns>.<op>.default(...)`; ops Inductor generated kernels for do not."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    sources: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", sources.append):
        yield sources
