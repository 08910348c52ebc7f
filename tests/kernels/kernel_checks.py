"""Shared pieces of the kernel tests: where a Triton kernel can run, how to call it, and how close is close enough.

Every kernel test runs the zqhero op with `use_kernels("triton")` on a device and compares with the PyTorch reference
computed on CPU (the spec, and the only place `torch._int_mm` takes any shape).

  * "interp": CPU tensors through Triton's interpreter. Needs TRITON_INTERPRET=1 before the kernels are imported
    (tests/conftest.py sets it).
  * "cuda": the compiled kernels, marked `gpu`. Needs a CUDA device and TRITON_INTERPRET unset or 0, otherwise the
    "CUDA" run would be the interpreter again; on a GPU machine run `TRITON_INTERPRET=0 pytest -m gpu tests/kernels`.

Tolerances: integer results are bit-exact wherever the kernel does the reference's float operations in the reference's
order (quantize, dequantize, embeddings, the INT8 GEMM epilogue without GeLU). Where the float math cannot match
bit for bit (LayerNorm statistics, exp, erf), an INT8 output may move by one step where the value sits within an ulp
of a rounding boundary: `assert_int8_close` allows a difference of at most 1 on a small fraction of elements, and
FLOAT_TOL holds the per-dtype tolerances for float outputs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from zqhero_fx.kernels import OPS, use_kernels

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

# Float outputs that are not bit-exact: one or two ulps of the output dtype, relative; the absolute part covers values
# near zero (LayerNorm outputs are O(1), attention outputs are in units of V's int8 values).
FLOAT_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

# Share of INT8 outputs allowed to differ (by exactly 1) where the float math above them is not bit-exact.
INT8_OFF_BY_ONE_FRACTION = 1e-3


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
