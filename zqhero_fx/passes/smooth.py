"""smooth: migrate activation outliers from a norm's output into the weights of the GEMMs it feeds (SmoothQuant,
Xiao et al. 2023; or DGQ's percentile-clipping variant, which squeezes only the outlier channels).

A norm-fed GEMM quantizes its input per token (TWQ). A few input channels with large magnitudes set every token's
scale, so the other channels keep few levels. With a per-channel factor s_j

    y = W · norm(x)  =  (W · diag(s)) · (norm(x) / s)

and norm(x) / s is the same norm with weight γ / s (and bias β / s), so the division costs nothing at run time, and
W · diag(s) is quantized per output channel as before. s_j = max|X_j|^α / max|W_j|^(1-α) over the calibration
ranges of the norm's output X and the columns of every GEMM it feeds (α = `QuantConfig.smoothing`: 0.5 in the paper,
0.8 by default in decoders, where it measured best; None turns the pass off). With `smoothing="percentile"` (DGQ) s_j
= max|X_j| / b where max|X_j| exceeds b, the 99.5th-percentile channel's range, and 1 elsewhere. Applies where every user of the norm output is such a GEMM: a post-norm block (BERT)
also adds the norm output to a residual, which the division would change, so it is left alone; GEMMs whose result is
a model output (LM heads) and tensors shared with other nodes (tied or shared weights) are left alone too. Ranges and
samples are stale afterwards: the pipeline calibrates again.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from zqhero_fx.passes._graph import LAYER_NORM, LINEAR, RMS_NORM, is_op, param_of
from zqhero_fx.passes.state import state as node_state

MIN_FACTOR, MAX_FACTOR = 1e-2, 1e2  # keeps a channel that calibration never saw nonzero from blowing up the weights


def _norm_weight_and_bias(norm: fx.Node):
    """The get_attr nodes of a norm's elementwise weight and bias (None when absent)."""
    if is_op(norm, LAYER_NORM):
        weight = norm.args[2] if len(norm.args) > 2 else norm.kwargs.get("weight")
        bias = norm.args[3] if len(norm.args) > 3 else norm.kwargs.get("bias")
        return weight, bias
    weight = norm.args[2] if len(norm.args) > 2 else norm.kwargs.get("weight")
    return weight, None


def _uses(gm: fx.GraphModule) -> dict[int, int]:
    """How many get_attr nodes read each tensor storage (tied and shared weights read one storage twice)."""
    counts: dict[int, int] = {}
    for node in gm.graph.nodes:
        tensor = param_of(gm, node)
        if tensor is not None:
            counts[tensor.untyped_storage().data_ptr()] = counts.get(tensor.untyped_storage().data_ptr(), 0) + 1
    return counts


def _owned(gm, node, uses) -> torch.Tensor | None:
    tensor = param_of(gm, node)
    if tensor is None or uses.get(tensor.untyped_storage().data_ptr(), 0) != 1:
        return None
    return tensor


def percentile_clip_factor(x_range: torch.Tensor) -> torch.Tensor:
    """DGQ's smoothing (ilur98/DGQ smooth_ln_fcs): channels whose range exceeds the channel at rank C - floor(0.005 C +
    1.5) of the sorted ranges (about the 99.5th percentile) are divided down to it; all others keep factor 1."""
    channels = x_range.numel()
    baseline = x_range.sort().values[max(0, channels - int(0.005 * channels + 1.5))].clamp(min=1e-5)
    return torch.where(x_range > baseline, x_range / baseline, torch.ones_like(x_range))


def smooth(gm: fx.GraphModule, alpha: float | str | None) -> fx.GraphModule:
    if alpha is None:
        return gm
    uses = _uses(gm)
    smoothed = 0
    for norm in list(gm.graph.nodes):
        if not is_op(norm, LAYER_NORM, RMS_NORM) or not norm.users:
            continue
        gemms = list(norm.users)
        if not all(is_op(g, LINEAR) and g.args[0] is norm for g in gemms):
            continue
        if any(u.op == "output" for g in gemms for u in g.users):
            continue
        x_range = node_state(norm).range if node_state(norm).range is not None else node_state(gemms[0]).range
        weight_node, bias_node = _norm_weight_and_bias(norm)
        gamma = _owned(gm, weight_node, uses)
        beta = _owned(gm, bias_node, uses) if bias_node is not None else None
        weights = [_owned(gm, g.args[1], uses) for g in gemms]
        if x_range is None or gamma is None or (bias_node is not None and beta is None) or any(
                w is None or w.dim() != 2 for w in weights):
            continue
        if alpha == "percentile":
            factor = percentile_clip_factor(x_range.float())
        else:
            w_range = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0).float()
            factor = (x_range.float().clamp(min=1e-5) ** alpha / w_range.clamp(min=1e-5) ** (1 - alpha))
        factor = factor.clamp(MIN_FACTOR, MAX_FACTOR)
        with torch.no_grad():
            gamma.div_(factor.to(gamma.dtype))
            if beta is not None:
                beta.div_(factor.to(beta.dtype))
            for w in weights:
                w.mul_(factor.to(w.dtype))
        smoothed += 1
    gm.meta.setdefault("zqhero", {})["smoothed_norms"] = smoothed
    return gm
