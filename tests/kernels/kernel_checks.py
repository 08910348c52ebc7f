"""Shared pieces of the kernel tests: where a Triton kernel can run, how to call it, and how close is close enough.

Every kernel test runs the zqhero op with `use_kernels("triton")` on a device and compares with the PyTorch reference
computed on CPU (the spec, and the only place `torch._int_mm` takes any shape).

  * "interp": CPU tensors through Triton's interpreter. Needs TRITON_INTERPRET=1 before the kernels are imported
    (tests/conftest.py sets it).
  * "cuda": the compiled kernels, marked `gpu`. Needs a CUDA device and TRITON_INTERPRET unset or 0, otherwise the
    "CUDA" run would be the interpreter again; on a GPU machine run `TRITON_INTERPRET=0 pytest -m gpu tests/kernels`.

Tolerances: quantized results (INT8 and FP8 codes) are bit-exact wherever the kernel does the reference's float
operations in the reference's order (quantize, dequantize, embeddings, the GEMM epilogue without an activation when the
accumulation is exact): `assert_codes_equal`. Where the float math cannot match bit for bit (LayerNorm statistics,
exp, erf, an fp32 FP8 accumulation in another order), a quantized output may move by one grid step where the value
sits within an ulp of a rounding boundary: `assert_int8_close` and `assert_fp8_close` (in code units: adjacent FP8
values differ by one) allow one step on a small fraction of elements, and FLOAT_TOL holds the per-dtype tolerances for
float outputs.

FP8 under the interpreter: loading a finite float8 code and widening it to fp32 is exact, but the interpreter decodes
the NaN / inf codes as finite numbers (E4M3 0x7F reads as 480), so inputs here hold finite codes only
(`random_fp8_codes`); the kernels round onto the FP8 grid themselves (`round_to_fp8_grid`), because the interpreter's
fp32 -> fp8 cast rounds wrongly at binade boundaries.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from zqhero_fx.kernels import REFERENCES as OPS, use_kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param(
        "cpu", id="interp",
        marks=pytest.mark.skipif(not INTERPRET, reason="the interpreter tests need TRITON_INTERPRET=1 at start-up"),
    ),
    pytest.param(
        "cuda", id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"),
            pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 would interpret the CUDA run too; use =0"),
        ],
    ),
]

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8_DTYPES = [
    pytest.param(torch.float8_e4m3fn, id="e4m3"),
    pytest.param(torch.float8_e5m2, id="e5m2"),
]
FP8_DTYPE_LIST = [torch.float8_e4m3fn, torch.float8_e5m2]

# Float outputs that are not bit-exact: one or two ulps of the output dtype, relative; the absolute part covers values
# near zero (LayerNorm outputs are O(1), attention outputs are in units of V's int8 values).
FLOAT_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

# Share of INT8 / FP8 outputs allowed to differ (by exactly one step) where the float math above them is not bit-exact.
INT8_OFF_BY_ONE_FRACTION = 1e-3
FP8_OFF_BY_ONE_FRACTION = 1e-3


def to(tree, device):
    """Move tensors (also inside lists and tuples) to `device`."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, (list, tuple)):
        return type(tree)(to(t, device) for t in tree)
    return tree


def run_triton(name: str, device: str, *args):
    """torch.ops.zqhero.<name> forced onto its Triton kernel, inputs on `device`, outputs back on CPU."""
    op = getattr(torch.ops.zqhero, name)
    with use_kernels("triton"):
        out = op(*to(args, device))
    return to(out, "cpu")


def run_reference(name: str, *args):
    """The op's PyTorch reference on CPU."""
    return OPS[name](*to(args, "cpu"))


def assert_int8_close(actual: torch.Tensor, expected: torch.Tensor, fraction: float = INT8_OFF_BY_ONE_FRACTION):
    """INT8 outputs equal except for +-1 steps on at most `fraction` of the elements (and at least 1 element)."""
    assert actual.dtype == expected.dtype == torch.int8
    assert actual.shape == expected.shape
    diff = (actual.int() - expected.int()).abs()
    max_diff = int(diff.max()) if diff.numel() else 0
    assert max_diff <= 1, f"int8 outputs differ by up to {max_diff}"
    off = int((diff > 0).sum())
    allowed = max(1, math.floor(fraction * diff.numel()))
    assert off <= allowed, f"{off} of {diff.numel()} int8 outputs are off by one (at most {allowed} allowed)"


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPE_LIST


def fp8_code_units(t: torch.Tensor) -> torch.Tensor:
    """FP8 codes as signed integers in value order: adjacent representable values differ by 1, +0 and -0 are both 0.

    A float8 byte is sign | magnitude, and for finite codes the magnitude bits count the grid in order."""
    codes = t.view(torch.uint8).int()
    magnitude = codes & 0x7F
    return torch.where(codes >= 0x80, -magnitude, magnitude)


def assert_codes_equal(actual: torch.Tensor, expected: torch.Tensor):
    """Bit-exact: same dtype, shape and bytes (float8 compared as raw codes, so -0, NaN signs and payloads count)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if is_fp8(actual.dtype):
        a, e = actual.view(torch.uint8), expected.view(torch.uint8)
        mismatch = a != e
        assert not mismatch.any(), (
            f"{int(mismatch.sum())} of {a.numel()} fp8 codes differ, e.g. "
            f"{actual[mismatch][:5].float().tolist()} vs {expected[mismatch][:5].float().tolist()}"
        )
    else:
        assert torch.equal(actual, expected), (actual.float() - expected.float()).abs().max()


def assert_fp8_close(actual: torch.Tensor, expected: torch.Tensor, fraction: float = FP8_OFF_BY_ONE_FRACTION):
    """FP8 outputs equal except for one grid step (in code units) on at most `fraction` of the elements (and at least
    1 element); NaN where and only where the reference has NaN."""
    assert actual.dtype == expected.dtype and is_fp8(actual.dtype), (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape
    nan_a, nan_e = actual.float().isnan(), expected.float().isnan()
    assert torch.equal(nan_a, nan_e), "NaN in different places"
    diff = (fp8_code_units(actual) - fp8_code_units(expected)).abs()[~nan_e]
    max_diff = int(diff.max()) if diff.numel() else 0
    assert max_diff <= 1, f"fp8 outputs differ by up to {max_diff} grid steps"
    off = int((diff > 0).sum())
    allowed = max(1, math.floor(fraction * diff.numel()))
    assert off <= allowed, f"{off} of {diff.numel()} fp8 outputs are one grid step off (at most {allowed} allowed)"


def assert_quantized_close(actual: torch.Tensor, expected: torch.Tensor, fraction: float = INT8_OFF_BY_ONE_FRACTION):
    """assert_int8_close or assert_fp8_close, by dtype."""
    if actual.dtype == torch.int8:
        assert_int8_close(actual, expected, fraction)
    else:
        assert_fp8_close(actual, expected, fraction)


def assert_float_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **override):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    tol = {**FLOAT_TOL[dtype or actual.dtype], **override}
    torch.testing.assert_close(actual, expected, **tol)


def random_activations(shape, dtype, generator, kind: str = "normal", scale: float = 1.0) -> torch.Tensor:
    """Activations of a given character: 'normal', 'outliers' (a few features 50x larger, as in LLM/BERT
    activations), 'zero_rows' (some all-zero rows), or 'wide' (values spanning six orders of magnitude)."""
    x = torch.randn(shape, generator=generator) * scale
    if kind == "outliers" and x.numel():
        cols = torch.randint(0, shape[-1], (max(1, shape[-1] // 16),), generator=generator)
        x[..., cols] *= 50.0
    elif kind == "zero_rows" and x.numel():
        rows = x.reshape(-1, shape[-1])
        rows[:: max(1, rows.shape[0] // 3 + 1)] = 0.0
    elif kind == "wide":
        x = x * torch.exp(torch.empty(shape).uniform_(-7, 7, generator=generator))
    return x.to(dtype)


def random_int8(shape, generator, low: int = -127, high: int = 127) -> torch.Tensor:
    return torch.randint(low, high + 1, shape, dtype=torch.int8, generator=generator)


def random_fp8_codes(shape, dtype, generator) -> torch.Tensor:
    """Uniformly random finite float8 codes (every binade, subnormals, both zeros, +-max; no NaN / inf codes, which
    the interpreter decodes as finite numbers)."""
    codes = torch.randint(0, 256, shape, dtype=torch.int32, generator=generator).to(torch.uint8)
    values = codes.view(dtype)
    finite = values.float().isfinite()
    return torch.where(finite, values.float(), torch.zeros((), dtype=torch.float32)).to(dtype)


def random_fp8(shape, dtype, generator, scale: float = 1.0) -> torch.Tensor:
    """Normal activations scaled by `scale` and cast to float8 (saturating): what a quantized activation looks like."""
    max_value = torch.finfo(dtype).max
    return (torch.randn(shape, generator=generator) * scale).clamp(-max_value, max_value).to(dtype)


def small_int_fp8(shape, dtype, generator, bound: int = 8) -> torch.Tensor:
    """Integer values in [-bound, bound] as float8 (every integer up to 8 is exact in E5M2, up to 16 in E4M3): fp32
    sums of their products are exact in any order, so a GEMM on them is bit-exact."""
    return torch.randint(-bound, bound + 1, shape, generator=generator).float().to(dtype)
