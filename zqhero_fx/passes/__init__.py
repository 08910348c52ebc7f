"""The passes, one per file, each a plain function GraphModule -> GraphModule. See passes/README.md for the IR-wide
invariants and zqhero_fx/pipeline.py for their order."""

from zqhero_fx.passes.calibrate import calibrate
from zqhero_fx.passes.canonicalize import canonicalize
from zqhero_fx.passes.classify import classify
from zqhero_fx.passes.clean_up import clean_up
from zqhero_fx.passes.fold_scales import fold_scales
from zqhero_fx.passes.insert_qdq import insert_qdq
from zqhero_fx.passes.lower import lower
from zqhero_fx.passes.propagate_meta import propagate_meta
from zqhero_fx.passes.quantize_kv_cache import quantize_kv_cache
from zqhero_fx.passes.smooth import smooth

PASSES = {
    "canonicalize": canonicalize,
    "propagate_meta": propagate_meta,
    "classify": classify,
    "calibrate": calibrate,
    "smooth": smooth,
    "insert_qdq": insert_qdq,
    "fold_scales": fold_scales,
    "lower": lower,
    "quantize_kv_cache": quantize_kv_cache,
    "clean_up": clean_up,
}

__all__ = list(PASSES)
