"""Run the pipeline up to a named pass, so each pass test sees exactly the graph its pass receives."""

import copy

import torch

from zqhero_fx.api import _calibration_batches
from zqhero_fx.capture import flatten_inputs
from zqhero_fx.modes import resolve_mode
from zqhero_fx.passes.propagate_meta import propagate_meta
from zqhero_fx.pipeline import build_pipeline, check_invariants, run_pipeline


def pipeline_until(gm, mode, calibration, stop_before, overrides=None):
    """(graph before `stop_before`, the pass itself, flat calibration batches)."""
    gm = copy.deepcopy(gm)
    config = resolve_mode(mode)
    batches = _calibration_batches(gm, calibration, config) if calibration is not None else []
    gm.meta["zqhero"] = {"config": config, "flat_example": batches[0] if batches else None}
    passes = build_pipeline(config, batches, overrides or {}, "zqhero_decoder" in gm.meta)
    names = [name for name, _ in passes]
    index = names.index(stop_before)
    with torch.no_grad():
        gm = run_pipeline(gm, passes[:index])
    return gm, passes[index][1], batches


def apply(gm, pass_fn, name="pass"):
    """Run one pass the way the runner does: pass, clean-up, re-propagate, invariants."""
    from zqhero_fx.passes.clean_up import clean_up

    with torch.no_grad():
        gm = pass_fn(gm)
        clean_up(gm)
        propagate_meta(gm)
    check_invariants(gm, name)
    return gm


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def run_flat(gm, flat):
    with torch.no_grad():
        return torch.fx.Interpreter(gm).run(*flat)


__all__ = ["pipeline_until", "apply", "count", "run_flat", "flatten_inputs"]
