"""zqhero_fx: ZeroQuant-HERO W8A8 (INT8, FP8) for Transformers, as torch.fx passes with fused kernels.

    gm = zqhero_fx.trace(model, example_inputs)            # torch.export underneath
    q = zqhero_fx.convert(gm, "M3", calibration=batches)   # a plain GraphModule of torch.ops.zqhero.* ops
    zqhero_fx.save(q, "model.zq"); q2 = zqhero_fx.load("model.zq")
    torch.compile(model, backend="zqhero", options={"mode": "M3", "calibration": batches})
"""

from zqhero_fx import ops  # noqa: F401  (registers torch.ops.zqhero.*)
from zqhero_fx.api import CoverageWarning, convert, coverage_of, ops_histogram
from zqhero_fx.capture import trace
from zqhero_fx.decoder import generate
from zqhero_fx.errors import (
    CalibrationError,
    CaptureError,
    ConfigError,
    CoverageError,
    FoldError,
    InputError,
    PassError,
    SerializationError,
    ZqheroError,
)
from zqhero_fx.dispatch import use_kernels
from zqhero_fx.formats import FORMATS, Format, get_format
from zqhero_fx.modes import MODES, QuantConfig
from zqhero_fx.serialize import load, save
from zqhero_fx.inductor import compile
from zqhero_fx.backend import ZqheroBackend, backend

__all__ = [
    "trace", "convert", "generate", "coverage_of", "compile", "save", "load", "backend", "ZqheroBackend", "ops_histogram",
    "use_kernels", "MODES", "QuantConfig", "FORMATS", "Format", "get_format", "CoverageWarning",
    "ZqheroError", "CaptureError", "ConfigError", "CalibrationError", "CoverageError", "FoldError", "PassError",
    "InputError", "SerializationError",
]
