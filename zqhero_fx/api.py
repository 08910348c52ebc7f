"""convert: the whole HERO pipeline on a captured graph. It deep-copies its input once and never touches the original."""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import warnings

import torch
import torch.fx as fx

from zqhero_fx import dispatch
from zqhero_fx.capture import flatten_inputs, guard_token_ids
from zqhero_fx.errors import CalibrationError, CaptureError, ConfigError, CoverageError, ZqheroError
from zqhero_fx.modes import QuantConfig, resolve_mode, resolve_overrides
from zqhero_fx.pipeline import build_pipeline, run_pipeline


def _calibration_batches(gm: fx.GraphModule, calibration, config: QuantConfig) -> list:
    if calibration is None:
        if config.needs_calibration:
            raise CalibrationError(f"mode {config.name} needs calibration data for its static scales: pass "
                                   "calibration=[batch, ...] with batches in the same form as the example inputs")
        if config.smoothing_for("zqhero_decoder" in gm.meta) is not None:
            raise CalibrationError(f"mode {config.name} smooths a decoder's activation outliers into its weights "
                                   "(QuantConfig.smoothing), which needs their ranges: pass calibration=[{'input_ids': "
                                   "ids}, ...], or convert with MODES['M1'].replace(smoothing=None)")
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


def check_device_runs(config: QuantConfig, device: torch.device) -> None:
    """Refuse a format the device has no arithmetic for: FP8 needs an sm_89+ GPU (Ada, Hopper); on the CPU every
    8-bit format runs (FP8 through the PyTorch reference, see docs/kernels.md)."""
    if config.weight_only or config.activations.kind != "float" or dispatch.fp8_runs_on(device):
        return
    major, minor = torch.cuda.get_device_capability(device)
    raise ConfigError(f"mode {config.name} computes in {config.activation_format}, which needs an sm_89 or newer "
                      f"GPU (Ada, Hopper); {device} is sm_{major}{minor}: use an INT8 mode there")


def _device_of(gm: fx.GraphModule) -> torch.device:
    tensor = next(itertools.chain(gm.parameters(), gm.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class CoverageWarning(UserWarning):
    """A quantizing mode left GEMMs in floating point (the warning says how many and why)."""


def report_coverage(gm: fx.GraphModule, config: QuantConfig, strict: bool) -> None:
    """Warn (or raise, with `strict`) when a quantizing mode leaves GEMMs float or finds nothing to quantize."""
    coverage = gm.meta.get("zqhero", {}).get("coverage")
    if coverage is None or not config.quantizes:
        return
    float_gemms = coverage.float_gemms(unexpected_only=True)
    if not coverage.sites:
        message = coverage.summary()
    elif float_gemms:
        message = (f"{coverage.summary()}. The report lists every site: "
                   "zqhero_fx.coverage_of(q).table()")
    else:
        return
    if strict:
        raise CoverageError(message)
    warnings.warn(message, CoverageWarning, stacklevel=3)


def convert(traced_module: fx.GraphModule, mode, *, calibration=None, overrides=None, dump_dir=None,
            example_inputs=None, strict: bool = False) -> fx.GraphModule:
    """Quantize a captured model with ZeroQuant-HERO and return a new GraphModule.

    Args:
        traced_module: from `zqhero_fx.trace(model, inputs)` or `torch.fx.symbolic_trace(model)`; not modified.
        mode: "fp", "M1", "M2", "M3", "M1-fp8" ... (see docs/modes.md) or a `QuantConfig`.
        calibration: iterable of batches shaped like the example inputs; required by M2 and M3.
        overrides: {module-path glob: "fp32" | "fp16" | "bf16" | a format name}; float names keep the modules float.
        dump_dir: write per-pass graph code, SVG pictures and an SQNR report there (also $ZQHERO_DUMP_DIR).
        example_inputs: shapes for a symbolic_trace graph when no calibration is given.
        strict: raise CoverageError instead of warning when a quantizing mode leaves GEMMs float.

    Returns:
        A GraphModule whose quantized parts are `torch.ops.zqhero.*` ops; it accepts other batch sizes and sequence
        lengths. `zqhero_fx.coverage_of(q)` is its coverage report (every GEMM / attention / embedding site, its
        format and scheme, and why it stays float when it does). Called with token ids that are not an integer
        tensor, it raises InputError naming the input.

    Example:
        >>> gm = zqhero_fx.trace(model, {"input_ids": ids, "attention_mask": mask})
        >>> q = zqhero_fx.convert(gm, "M3", calibration=[{"input_ids": i, "attention_mask": m} for i, m in batches])
        >>> q(input_ids=ids, attention_mask=mask).last_hidden_state
        # q.code now reads, per layer:  norm_quant -> quantized_linear (QKV, INT8 out) -> quantized_attention -> ...
    """
    config = resolve_mode(mode)
    overrides = resolve_overrides(overrides)
    if not isinstance(traced_module, fx.GraphModule):
        raise CaptureError(f"convert takes a GraphModule, got {type(traced_module).__name__}: capture the model first "
                           "with zqhero_fx.trace(model, example_inputs)")
    check_device_runs(config, _device_of(traced_module))
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
        gm = run_pipeline(gm, build_pipeline(config, batches, overrides, "zqhero_decoder" in gm.meta),
                          dumper=dumper)
        record_kernels(gm)
        if dumper is not None:
            dumper.write_coverage(gm)
            if batches:
                dumper.write_error_report(traced_module, gm, batches[0])
    state = gm.meta["zqhero"]
    for transient in ("samples", "graph_view", "flat_example"):
        state.pop(transient, None)
    guard_token_ids(gm)
    report_coverage(gm, config, strict)
    return gm


def record_kernels(gm: fx.GraphModule) -> None:
    """Name, in the coverage report, the kernels that will run the quantized ops: on the CPU, the INT8 GEMM and
    instruction set chosen for this host (building or loading the CPU kernels now rather than on the first call);
    on a GPU, Triton."""
    coverage = gm.meta.get("zqhero", {}).get("coverage")
    if coverage is None or not coverage.sites:
        return
    tensors = [*gm.parameters(), *gm.buffers()]
    if dispatch.kernel_choice() == "reference":
        coverage.kernels = "PyTorch references (ZQHERO_KERNELS=reference)"
    elif dispatch.kernel_choice() == "triton" or (tensors and all(t.device.type == "cuda" for t in tensors)):
        coverage.kernels = "Triton"
    else:
        from zqhero_fx.kernels import int8_cpu

        coverage.kernels = f"CPU: {int8_cpu.describe()}"


def coverage_of(gm: fx.GraphModule):
    """The coverage report `convert` wrote for a converted model (zqhero_fx.coverage.Coverage)."""
    coverage = gm.meta.get("zqhero", {}).get("coverage")
    if coverage is None:
        raise ZqheroError("this module carries no coverage report: it was not made by zqhero_fx.convert")
    return coverage


def ops_histogram(gm: fx.GraphModule) -> dict[str, int]:
    """How many of each op the graph calls: the quick structural check used by tests and dumps."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            target = node.target
            # plain Python functions (the token-id check) by name: their str() carries an address that changes per run
            key = target.__qualname__ if inspect.isfunction(target) else str(target)
            counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = ["convert", "coverage_of", "ops_histogram", "CoverageWarning", "ZqheroError"]
