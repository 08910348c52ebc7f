"""convert: the whole HERO pipeline on a captured graph. It deep-copies its input once and never touches the original."""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.fx as fx

from zqhero_fx.capture import flatten_inputs
from zqhero_fx.errors import CalibrationError, CaptureError, ZqheroError
from zqhero_fx.modes import QuantConfig, resolve_mode, resolve_overrides
from zqhero_fx.pipeline import build_pipeline, run_pipeline


def _calibration_batches(gm: fx.GraphModule, calibration, config: QuantConfig) -> list:
    if calibration is None:
        if config.needs_calibration:
            raise CalibrationError(f"mode {config.name} needs calibration data for its static scales: pass "
                                   "calibration=[batch, ...] with batches in the same form as the example inputs")
        return []
    if isinstance(calibration, (torch.Tensor, dict)):
        raise CalibrationError("calibration must be an iterable of batches (e.g. a list of dicts or tuples), "
                               "not a single batch: wrap it in a list")
    try:
        batches = [flatten_inputs(gm, batch, what=f"calibration batch {i}") for i, batch in enumerate(calibration)]
    except TypeError as error:
        raise CalibrationError(f"calibration is not iterable: {error}") from error
    except CaptureError as error:
        raise CalibrationError(str(error)) from error
    if not batches and config.needs_calibration:
        raise CalibrationError(f"mode {config.name} needs calibration data, but the calibration iterable was empty")
    return batches


def convert(traced_module: fx.GraphModule, mode, *, calibration=None, overrides=None, dump_dir=None,
            example_inputs=None) -> fx.GraphModule:
    """Quantize a captured model with ZeroQuant-HERO and return a new GraphModule.

    Args:
        traced_module: from `zqhero_fx.trace(model, inputs)` or `torch.fx.symbolic_trace(model)`; not modified.
        mode: "fp", "M1", "M2", "M3" (see docs/modes.md) or a `QuantConfig`.
        calibration: iterable of batches shaped like the example inputs; required by M2 and M3.
        overrides: {module-path glob: "fp32" | "fp16" | "bf16" | "int8"}; the named modules stay floating point.
        dump_dir: write per-pass graph code, SVG pictures and an SQNR report there (also $ZQHERO_DUMP_DIR).
        example_inputs: shapes for a symbolic_trace graph when no calibration is given.

    Returns:
        A GraphModule whose INT8 parts are `torch.ops.zqhero.*` ops; it accepts other batch sizes and sequence lengths.

    Example:
        >>> gm = zqhero_fx.trace(model, {"input_ids": ids, "attention_mask": mask})
        >>> q = zqhero_fx.convert(gm, "M3", calibration=[{"input_ids": i, "attention_mask": m} for i, m in batches])
        >>> q(input_ids=ids, attention_mask=mask).last_hidden_state
        # q.code now reads, per layer:  layer_norm_quant -> int8_linear (QKV, INT8 out) -> int8_attention -> ...
    """
    config = resolve_mode(mode)
    overrides = resolve_overrides(overrides)
    if not isinstance(traced_module, fx.GraphModule):
        raise CaptureError(f"convert takes a GraphModule, got {type(traced_module).__name__}: capture the model first "
                           "with zqhero_fx.trace(model, example_inputs)")
    with warnings.catch_warnings():  # torch's own pytree spec copy warns about a deprecated isinstance check
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(traced_module)
    gm.meta = {k: v for k, v in traced_module.meta.items() if k != "zqhero"}
    batches = _calibration_batches(gm, calibration, config)
    example = example_inputs if example_inputs is not None else gm.meta.get("zqhero_example_inputs")
    flat_example = flatten_inputs(gm, example, "example_inputs") if example is not None else (
        batches[0] if batches else None)
    gm.meta["zqhero"] = {"config": config, "flat_example": flat_example}

    dump_dir = dump_dir or os.environ.get("ZQHERO_DUMP_DIR") or None
    dumper = None
    if dump_dir:
        from zqhero_fx.dump import Dumper

        dumper = Dumper(dump_dir)
    with torch.no_grad():
        gm = run_pipeline(gm, build_pipeline(config, batches, overrides), dumper=dumper)
        if dumper is not None and batches:
            dumper.write_error_report(traced_module, gm, batches[0])
    state = gm.meta["zqhero"]
    for transient in ("samples", "graph_view", "flat_example"):
        state.pop(transient, None)
    return gm


def ops_histogram(gm: fx.GraphModule) -> dict[str, int]:
    """How many of each op the graph calls: the quick structural check used by tests and dumps."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            key = str(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = ["convert", "ops_histogram", "ZqheroError"]
