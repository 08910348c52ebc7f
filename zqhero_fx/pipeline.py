"""The pass order, as data, and the one small runner that applies it.

The runner times each pass, notices whether it changed the graph, and if so cleans up (DCE, lint, recompile) and
re-propagates fake-tensor metadata; it checks that every node still has its metadata, writes dumps when asked, and on
failure names the pass and the ones before it. `ZQHERO_DISABLE_PASSES=a,b` skips passes, for bisecting.
"""

from __future__ import annotations

import functools
import os
import time

import torch.fx as fx

from zqhero_fx.errors import PassError, ZqheroError
from zqhero_fx.modes import QuantConfig
from zqhero_fx.passes import (calibrate, canonicalize, classify, clean_up, fold_scales, insert_qdq, lower,
                              propagate_meta, quantize_kv_cache, smooth)


def build_pipeline(config: QuantConfig, calibration: list, overrides: dict[str, str], decoder: bool = False):
    """(name, pass) pairs in order. Settings are bound here, never read from globals."""
    calibration_pass = functools.partial(calibrate, batches=calibration, method=config.calibration_method,
                                         percentile=config.percentile, grams=config.weight_rounding == "gptq")
    alpha = config.smoothing_for(decoder)
    smoothing = () if alpha is None else (
        ("smooth", functools.partial(smooth, alpha=alpha)),
        ("calibrate_smoothed", calibration_pass),  # ranges and samples of the smoothed graph
    )
    return (
        ("canonicalize", canonicalize),
        ("classify", functools.partial(classify, device=config.device)),
        ("calibrate", calibration_pass),
        *smoothing,
        ("insert_qdq", functools.partial(insert_qdq, config=config, overrides=overrides)),
        ("fold_scales", fold_scales),
        ("quantize_kv_cache", functools.partial(quantize_kv_cache, config=config)),
        ("lower", functools.partial(lower, config=config)),
        ("classify_lowered", functools.partial(classify, device=config.device)),
        ("clean_up", clean_up),
    )


def _signature(gm: fx.GraphModule) -> int:
    return hash(tuple((n.op, str(n.target), tuple(str(a) for a in n.args), tuple(sorted(
        (k, str(v)) for k, v in n.kwargs.items()))) for n in gm.graph.nodes))


def check_invariants(gm: fx.GraphModule, pass_name: str) -> None:
    gm.graph.lint()
    missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    if missing:
        raise PassError(f"after pass {pass_name}: nodes without propagated metadata: {missing[:5]}")


def run_pipeline(gm: fx.GraphModule, passes, *, dumper=None) -> fx.GraphModule:
    disabled = {p.strip() for p in os.environ.get("ZQHERO_DISABLE_PASSES", "").split(",") if p.strip()}
    timings = gm.meta.setdefault("zqhero", {}).setdefault("timings", {})
    done: list[str] = []
    start = time.perf_counter()
    propagate_meta(gm)
    timings["propagate_meta"] = time.perf_counter() - start
    if dumper is not None:
        dumper.write(gm, "input")
    for name, fn in passes:
        if name in disabled:
            continue
        start = time.perf_counter()
        before = _signature(gm)
        try:
            gm = fn(gm)
            if _signature(gm) != before:
                clean_up(gm)
                propagate_meta(gm)
            check_invariants(gm, name)
        except ZqheroError:
            raise
        except Exception as error:
            raise PassError(f"pass {name} failed (after {done or 'no other pass'}): "
                            f"{type(error).__name__}: {error}") from error
        timings[name] = time.perf_counter() - start
        done.append(name)
        if dumper is not None:
            dumper.write(gm, name)
    return gm
