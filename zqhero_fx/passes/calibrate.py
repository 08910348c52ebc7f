"""calibrate: run the float graph on the calibration inputs (an fx Interpreter with observers) and record, for every
tensor that feeds or leaves a GEMM or attention node, its per-feature range (absmax, or a percentile of |x| averaged over
batches) in state(node).range (float32 [last dim]). Keeps a few rows of the first batch in gm.meta for the fold
checks and the error report, and with `grams` every GEMM input's XᵀX over all batches (GPTQ rounding). NaN/Inf activations raise CalibrationError naming the node and the batch.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from zqhero_fx.errors import CalibrationError
from zqhero_fx.passes._graph import ATTENTION, LINEAR, MATMUL, is_float_tensor, is_op, module_path, through_layout
from zqhero_fx.passes.state import state as node_state

SAMPLE_ROWS = 64  # rows kept per observed tensor for the fold checks
PERCENTILE_MAX_ROWS = 1 << 14  # rows of one batch a percentile looks at (torch.quantile's input limit)


def observed_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Outputs of GEMM/attention nodes and the producers of their inputs (looking through layout ops)."""
    chosen: dict[fx.Node, None] = {}
    for node in gm.graph.nodes:
        if not is_op(node, LINEAR, MATMUL, ATTENTION):
            continue
        chosen[node] = None
        operands = [node.args[0]] if is_op(node, LINEAR) else list(node.args[:3] if is_op(node, ATTENTION) else node.args[:2])
        for operand in operands:
            if isinstance(operand, fx.Node):
                chosen[operand] = None
                chosen[through_layout(operand)[0]] = None
    return [n for n in chosen if is_float_tensor(n) and n.op != "get_attr"]


def _feature_range(x: torch.Tensor, method: str, percentile: float) -> torch.Tensor:
    rows = x.detach().float().abs().reshape(-1, x.shape[-1]) if x.dim() else x.detach().float().abs().reshape(1, 1)
    if method == "absmax" or rows.shape[0] == 1:
        return rows.amax(dim=0)
    if rows.shape[0] > PERCENTILE_MAX_ROWS:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:PERCENTILE_MAX_ROWS]]
    return torch.quantile(rows, percentile / 100.0, dim=0)


class _Observer(fx.Interpreter):
    def __init__(self, gm, watch, method, percentile, gram_watch=()):
        super().__init__(gm)
        self.watch, self.method, self.percentile = watch, method, percentile
        self.gram_watch = set(gram_watch)
        self.ranges: dict[str, torch.Tensor] = {}
        self.batches: dict[str, int] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}

        self.batch_index = 0

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.watch and isinstance(out, torch.Tensor):
            r = _feature_range(out, self.method, self.percentile)
            # A max over |x| propagates NaN and Inf, so checking the small per-feature vector checks the tensor.
            if not torch.isfinite(r).all():
                bad = "NaN" if torch.isnan(out).any() else "Inf"
                where = f" (module {module_path(n)})" if module_path(n) else ""
                raise CalibrationError(
                    f"calibration batch {self.batch_index}: node {n.name}{where} produced {bad} activations; "
                    "check the calibration inputs (and the model in floating point) before quantizing"
                )
            if self.method == "absmax":
                self.ranges[n.name] = torch.maximum(self.ranges[n.name], r) if n.name in self.ranges else r
            else:  # running mean of per-batch percentiles
                self.ranges[n.name] = self.ranges.get(n.name, 0) + r
                self.batches[n.name] = self.batches.get(n.name, 0) + 1
            if n.name in self.gram_watch:
                rows = out.detach().float().reshape(-1, out.shape[-1])
                self.grams[n.name] = self.grams.get(n.name, 0) + rows.t() @ rows
            if self.batch_index == 0:
                self.samples[n.name] = out.detach()[:1].clone() if out.dim() >= 3 else out.detach()[:SAMPLE_ROWS].clone()
        return out


def run_observed(gm: fx.GraphModule, batches, watch, method="absmax", percentile=99.99, desc="calibrating",
                 gram_watch=()):
    observer = _Observer(gm, set(watch), method, percentile, gram_watch)
    count = 0
    with torch.no_grad():
        for i, flat in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False, disable=None)):
            observer.batch_index = i
            observer.run(*flat)
            count += 1
    if method == "percentile":
        observer.ranges = {k: v / observer.batches[k] for k, v in observer.ranges.items()}
    return observer, count


def calibrate(gm: fx.GraphModule, batches: list, method: str = "absmax", percentile: float = 99.99,
              grams: bool = False) -> fx.GraphModule:
    state = gm.meta.setdefault("zqhero", {})
    if not batches:
        state["samples"] = {}
        return gm
    watch = observed_nodes(gm)
    # GPTQ's H = XᵀX of every GEMM input, summed over all calibration tokens (a sample of rows is too few: H must
    # have full rank K)
    gram_watch = [n.args[0].name for n in gm.graph.nodes if is_op(n, LINEAR) and isinstance(n.args[0], fx.Node)] \
        if grams else []
    observer, count = run_observed(gm, batches, [n.name for n in watch], method, percentile, gram_watch=gram_watch)
    state["grams"] = observer.grams
    for node in watch:
        if node.name in observer.ranges:
            node_state(node).range = observer.ranges[node.name]

    state["samples"] = observer.samples
    state["calibration_batches"] = count
    return gm
