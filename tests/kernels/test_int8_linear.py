"""int8_linear: INT8 GEMM with the fused epilogue, against the reference (torch._int_mm + separate ops)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.kernel_checks import (
    DEVICES,
    FLOAT_DTYPES,
    assert_float_close,
    assert_int8_close,
    random_activations,
    random_int8,
    run_reference,
    run_triton,
)
from zqhero_fx.kernels import int8_linear as LIN

# (M, K, N): one row, tails in every dimension, more K blocks than one, and a BERT FFN-like slice.
SHAPES = [(1, 16, 8), (5, 33, 17), (37, 96, 130), (64, 200, 70), (96, 768, 64)]


def make_inputs(
    m, k, n, seed, *, lead=None, x_scale="token", w_scale="channel", bias=True, residual=False,
    out_scale=None, activation="none", out_dtype=torch.float32, outliers=False,
):
    g = torch.Generator().manual_seed(seed)
    lead = lead or (m,)
    xq = random_int8((*lead, k), g)
    wq = random_int8((n, k), g)
    if outliers:  # saturating rows: every product at the INT8 extremes
        xq.view(-1, k)[0] = 127
        wq[0] = -127
    xs = torch.rand((*lead, 1), generator=g) * 0.02 + 1e-3 if x_scale == "token" else torch.rand(1, generator=g) * 0.02
    ws = torch.rand(n if w_scale == "channel" else 1, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    r = random_activations((*lead, n), out_dtype, g) if residual else None
    if out_scale == "channel":
        os_ = torch.rand(n, generator=g) * 0.02 + 0.005
    elif out_scale == "scalar":
        os_ = torch.rand(1, generator=g) * 0.02 + 0.005
    else:
        os_ = None
    return (xq, xs, wq, ws, b, r, os_, activation, out_dtype)


def check(args, device):
    out = run_triton("int8_linear", device, *args)
    ref = run_reference("int8_linear", *args)
    activation, out_dtype = args[7], args[8]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if activation == "none":
        # The epilogue repeats the reference's fp32 operations in its order (and the GPU build does not contract
        # them into FMAs): bit-exact, float or INT8.
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
    elif out.dtype == torch.int8:
        assert_int8_close(out, ref)
    else:
        assert_float_close(out, ref, out_dtype)
    return out


# Epilogue variants: each flag on and off somewhere; the requantized and residual forms as the compiler emits them.
EPILOGUES = [
    dict(),
    dict(bias=False, x_scale="scalar"),
    dict(activation="gelu", out_scale="channel"),
    dict(activation="gelu_tanh", out_dtype=torch.float16),
    dict(residual=True, out_dtype=torch.float16),
    dict(residual=True, out_dtype=torch.bfloat16, w_scale="scalar"),
    dict(out_scale="scalar", bias=False),
    dict(activation="gelu", residual=True, out_scale="channel", outliers=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_linear_matches_reference(device, shape, epilogue):
    check(make_inputs(*shape, seed=1, **epilogue), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_int8_linear_out_dtypes_with_batch_dims(device, out_dtype):
    # [B, S, K] input, as the compiler emits it; output [B, S, N].
    args = make_inputs(0, 48, 40, seed=2, lead=(3, 7), residual=True, out_dtype=out_dtype)
    assert check(args, device).shape == (3, 7, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_int8_linear_saturates_requantized_output(device):
    args = make_inputs(8, 64, 16, seed=3, out_scale="scalar", outliers=True)
    args = (*args[:6], torch.tensor([1e-4]), *args[7:])  # a tiny out_scale: nearly everything saturates
    out = check(args, device)
    assert (out == 127).any() and (out == -127).any()
    assert out.min() >= -127


@pytest.mark.parametrize("device", DEVICES)
def test_int8_linear_strided_operands(device):
    # The weight stored transposed ([K, N] contiguous, viewed as [N, K]) and x a column slice: read through strides.
    g = torch.Generator().manual_seed(4)
    xq = random_int8((20, 100), g)[:, 3:67]
    wq = random_int8((64, 48), g).t()
    args = (xq, torch.rand(20, 1, generator=g), wq, torch.rand(48, generator=g), None, None, None, "none",
            torch.float32)
    assert not wq.is_contiguous()
    check(args, device)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=10)
@given(
    m=st.integers(1, 70), k=st.integers(1, 160), n=st.integers(1, 90),
    activation=st.sampled_from(list(LIN.ACTIVATIONS)), bias=st.booleans(), residual=st.booleans(),
    out_scale=st.sampled_from([None, "channel", "scalar"]), x_scale=st.sampled_from(["token", "scalar"]),
    out_dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**31 - 1),
)
def test_int8_linear_hypothesis(device, m, k, n, activation, bias, residual, out_scale, x_scale, out_dtype, seed):
    check(
        make_inputs(m, k, n, seed, bias=bias, residual=residual, out_scale=out_scale, x_scale=x_scale,
                    activation=activation, out_dtype=out_dtype),
        device,
    )


def test_int8_linear_rejects_unknown_activation():
    args = make_inputs(4, 16, 8, seed=0, activation="relu")
    with pytest.raises(ValueError, match="unknown activation"):
        LIN.int8_linear_triton(*args)


def test_autotune_space_is_bounded_and_valid():
    # A bounded list, each tile legal for INT8 MMAs (M multiple of 16, K multiple of 32) and the pruner never
    # returning nothing.
    assert 0 < len(LIN.GEMM_CONFIGS) <= 10
    for config in LIN.GEMM_CONFIGS:
        assert config.kwargs["BLOCK_M"] % 16 == 0 and config.kwargs["BLOCK_K"] % 32 == 0
    for m_bucket in (1, 16, 64, 4096):
        kept = LIN._prune_gemm_configs(LIN.GEMM_CONFIGS, {"m_bucket": m_bucket})
        assert kept and all(c.kwargs["BLOCK_M"] <= max(32, 2 * m_bucket) for c in kept)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_reference_gemm_is_exact_for_tiny_k(k):
    # torch._int_mm on CPU gets K == 1 wrong; the reference must not inherit that.
    g = torch.Generator().manual_seed(k)
    a, b = random_int8((5, k), g), random_int8((7, k), g)
    assert torch.equal(LIN.int8_matmul_ref(a, b), a.int() @ b.int().t())
