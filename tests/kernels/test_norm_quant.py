"""norm_quant: residual add + LayerNorm / RMSNorm + per-token INT8 or FP8 in one pass, against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.kernel_checks import (
    DEVICES,
    FLOAT_DTYPES,
    FP8_DTYPE_LIST,
    FP8_DTYPES,
    assert_float_close,
    assert_quantized_close,
    random_activations,
    run_reference,
    run_triton,
)
from zqhero_fx.kernels import norm_quant as L
from zqhero_fx.kernels.quantize import MIN_SCALE

SHAPES = [(1, 1), (1, 768), (3, 5), (2, 7, 33), (130, 96), (64, 768)]


def make_inputs(shape, dtype, seed, residual=True, bias=True, kind="normal", residual_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = random_activations(shape, dtype, g, kind, 2.0)
    r = random_activations(shape, residual_dtype or dtype, g) if residual else None
    w = torch.rand(shape[-1], generator=g) + 0.5
    b = torch.randn(shape[-1], generator=g) * 0.1 if bias else None
    return x, r, w, b


def check(out, ref, dtype):
    """INT8 or FP8 outputs (compared in code units: one step on a small fraction), scale, normed and summed."""
    q, scale, normed, summed = out
    q_ref, scale_ref, normed_ref, summed_ref = ref
    assert_quantized_close(q, q_ref)
    assert scale.shape == scale_ref.shape and scale.dtype == torch.float32
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    assert normed.shape == normed_ref.shape and normed.dtype == normed_ref.dtype
    if normed.numel():
        assert_float_close(normed, normed_ref, dtype)
    # The sum is plain elementwise addition, rounded once to its dtype: bit-exact.
    assert summed.shape == summed_ref.shape and summed.dtype == summed_ref.dtype
    assert torch.equal(summed, summed_ref)


# ---------------------------------------------------------------- reference semantics
def test_reference_is_layer_norm_then_per_token_quantization():
    x, r, w, b = make_inputs((4, 48), torch.float32, 0)
    q, scale, normed, summed = L.norm_quant_ref(x, r, w, b, 1e-5, True, True)
    expected = F.layer_norm(x + r, (48,), w, b, 1e-5)
    torch.testing.assert_close(normed, expected)
    torch.testing.assert_close(scale, expected.abs().amax(-1, keepdim=True) / 127)
    assert torch.equal(summed, x + r)
    assert torch.all((q.float() * scale - expected).abs() <= scale / 2 * (1 + 1e-5))


def test_reference_emit_sum_without_residual_returns_a_copy():
    # A custom op may not return one of its inputs: the sum of x alone must be a new tensor.
    x, _, w, _ = make_inputs((2, 8), torch.float32, 0, residual=False)
    summed = torch.ops.zqhero.norm_quant(x, None, w, None, 1e-5, False, True)[3]
    assert torch.equal(summed, x) and summed.data_ptr() != x.data_ptr()


# ---------------------------------------------------------------- Triton vs reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_norm_quant_all_outputs(device, shape, dtype):
    x, r, w, b = make_inputs(shape, dtype, 1, kind="outliers")
    args = (x, r, w, b, 1e-5, True, True)
    check(run_triton("norm_quant", device, *args), run_reference("norm_quant", *args), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "residual, bias, emit_normed, emit_sum", list(itertools.product([False, True], repeat=4))
)
def test_norm_quant_flags(device, residual, bias, emit_normed, emit_sum):
    x, r, w, b = make_inputs((9, 70), torch.float16, 2, residual=residual, bias=bias)
    args = (x, r, w, b, 1e-12, emit_normed, emit_sum)
    out = run_triton("norm_quant", device, *args)
    check(out, run_reference("norm_quant", *args), torch.float16)
    assert out[2].numel() == (x.numel() if emit_normed else 0)
    assert out[3].numel() == (x.numel() if emit_sum else 0)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_quant_mixed_dtype_residual(device):
    # fp16 activations into an fp32 residual stream: the sum promotes to fp32, as x + residual does.
    x, r, w, b = make_inputs((6, 40), torch.float16, 3, residual_dtype=torch.float32)
    args = (x, r, w, b, 1e-5, True, True)
    out = run_triton("norm_quant", device, *args)
    assert out[3].dtype == torch.float32
    check(out, run_reference("norm_quant", *args), torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_quant_zero_rows_are_safe(device):
    # x + r = 0 on some rows: variance 0, so the normed row is the bias; with no bias it is 0 and quantizes to 0.
    x, r, w, _ = make_inputs((5, 32), torch.float32, 4)
    x[1::2] = 0
    r[1::2] = 0
    q, scale, normed, _ = run_triton("norm_quant", device, x, r, w, None, 1e-5, True, False)
    assert torch.all(q[1::2] == 0) and torch.all(scale[1::2] == MIN_SCALE)
    assert not torch.isnan(normed).any() and not torch.isnan(scale).any()
    check(
        (q, scale, normed, torch.empty(0)),
        run_reference("norm_quant", x, r, w, None, 1e-5, True, False),
        torch.float32,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_norm_quant_strided_inputs(device):
    # x as a slice of a wider buffer (row stride != hidden), residual as a transposed view.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 100, generator=g)[:, 10:74]
    r = torch.randn(64, 12, generator=g).t()
    w = torch.rand(64, generator=g) + 0.5
    args = (x, r, w, None, 1e-5, True, True)
    check(run_triton("norm_quant", device, *args), run_reference("norm_quant", *args), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=12)
@given(
    lead=st.lists(st.integers(1, 12), min_size=1, max_size=2), hidden=st.integers(1, 300),
    dtype=st.sampled_from(FLOAT_DTYPES), residual=st.booleans(), bias=st.booleans(),
    kind=st.sampled_from(["normal", "outliers", "wide"]), seed=st.integers(0, 2**31 - 1),
)
def test_norm_quant_hypothesis(device, lead, hidden, dtype, residual, bias, kind, seed):
    x, r, w, b = make_inputs((*lead, hidden), dtype, seed, residual, bias, kind)
    args = (x, r, w, b, 1e-5, True, True)
    check(run_triton("norm_quant", device, *args), run_reference("norm_quant", *args), dtype)


def test_norm_quant_rejects_rows_too_wide_for_registers():
    x = torch.zeros(1, L.MAX_FUSED_BYTES // 4 + 1)
    with pytest.raises(ValueError, match="exceed"):
        L.norm_quant_triton(x, None, torch.ones(x.shape[-1]), None, 1e-5, False, False)


# ---------------------------------------------------------------- FP8 outputs (E4M3, E5M2), LayerNorm and RMSNorm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 33, 17), (2, 7, 33), (64, 768)])
def test_norm_quant_fp8_all_outputs(device, shape, dtype, kind, fp8):
    x, r, w, b = make_inputs(shape, dtype, 1, kind="outliers")
    args = (x, r, w, b, 1e-5, True, True, kind, fp8)
    out = run_triton("norm_quant", device, *args)
    assert out[0].dtype == fp8
    check(out, run_reference("norm_quant", *args), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_quant_fp8_zero_rows_and_flags(device, kind, fp8):
    x, r, w, _ = make_inputs((5, 32), torch.float32, 4)
    x[1::2] = 0
    r[1::2] = 0
    args = (x, r, w, None, 1e-5, True, False, kind, fp8)
    q, scale, normed, summed = run_triton("norm_quant", device, *args)
    assert torch.all(q[1::2].float() == 0) and torch.all(scale[1::2] == MIN_SCALE)
    assert not torch.isnan(normed).any() and not torch.isnan(q.float()).any()
    check((q, scale, normed, summed), run_reference("norm_quant", *args), torch.float32)
    # No residual, no bias, nothing emitted; the absmax element lands on +-max exactly.
    x, _, w, _ = make_inputs((9, 70), torch.float16, 2, residual=False)
    args = (x, None, w, None, 1e-12, False, False, kind, fp8)
    out = run_triton("norm_quant", device, *args)
    check(out, run_reference("norm_quant", *args), torch.float16)
    assert torch.all(out[0].float().abs().amax(-1) == torch.finfo(fp8).max)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=6)
@given(
    lead=st.lists(st.integers(1, 12), min_size=1, max_size=2), hidden=st.integers(1, 300),
    dtype=st.sampled_from(FLOAT_DTYPES), residual=st.booleans(), bias=st.booleans(),
    kind=st.sampled_from(["layer", "rms"]), fp8=st.sampled_from(FP8_DTYPE_LIST),
    inputs=st.sampled_from(["normal", "outliers", "wide"]), seed=st.integers(0, 2**31 - 1),
)
def test_norm_quant_fp8_hypothesis(device, lead, hidden, dtype, residual, bias, kind, fp8, inputs, seed):
    x, r, w, b = make_inputs((*lead, hidden), dtype, seed, residual, bias, inputs)
    args = (x, r, w, b, 1e-5, True, True, kind, fp8)
    check(run_triton("norm_quant", device, *args), run_reference("norm_quant", *args), dtype)
