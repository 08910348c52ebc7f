"""quantized_linear: INT8 and FP8 GEMMs with the fused epilogue, against the reference (torch._int_mm or an fp32
matmul, then separate ops)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.kernel_checks import (
    DEVICES,
    FLOAT_DTYPES,
    FLOAT_TOL,
    FP8_DTYPES,
    assert_codes_equal,
    assert_float_close,
    assert_int8_close,
    assert_quantized_close,
    random_activations,
    random_fp8,
    random_int8,
    run_reference,
    run_triton,
    small_int_fp8,
)
from zqhero_fx.kernels import quantized_linear as LIN

# (M, K, N): one row, tails in every dimension, more K blocks than one, and a BERT FFN-like slice.
SHAPES = [(1, 16, 8), (5, 33, 17), (37, 96, 130), (64, 200, 70), (96, 768, 64)]


def epilogue_operands(g, lead, n, *, x_scale, w_scale, bias, residual, out_scale, out_dtype, out_floor):
    """(x_scale, w_scale, bias, residual, out_scale) for an [*lead, N] output, drawn from `g` in that order."""
    xs = torch.rand((*lead, 1), generator=g) * 0.02 + 1e-3 if x_scale == "token" else torch.rand(1, generator=g) * 0.02
    ws = torch.rand(n if w_scale == "channel" else 1, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    r = random_activations((*lead, n), out_dtype, g) if residual else None
    if out_scale == "channel":
        os_ = torch.rand(n, generator=g) * 0.02 + out_floor
    elif out_scale == "scalar":
        os_ = torch.rand(1, generator=g) * 0.02 + out_floor
    else:
        os_ = None
    return xs, ws, b, r, os_


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
    xs, ws, b, r, os_ = epilogue_operands(g, lead, n, x_scale=x_scale, w_scale=w_scale, bias=bias, residual=residual,
                                          out_scale=out_scale, out_dtype=out_dtype, out_floor=0.005)
    # A requantized output is INT8; otherwise the float dtype asked for.
    return (xq, xs, wq, ws, b, r, os_, activation, torch.int8 if os_ is not None else out_dtype)


def check(args, device):
    out = run_triton("quantized_linear", device, *args)
    ref = run_reference("quantized_linear", *args)
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
    dict(activation="relu", out_scale="channel"),
    dict(activation="silu"),
    dict(activation="quick_gelu", out_dtype=torch.float16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantized_linear_matches_reference(device, shape, epilogue):
    check(make_inputs(*shape, seed=1, **epilogue), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_quantized_linear_out_dtypes_with_batch_dims(device, out_dtype):
    # [B, S, K] input, as the compiler emits it; output [B, S, N].
    args = make_inputs(0, 48, 40, seed=2, lead=(3, 7), residual=True, out_dtype=out_dtype)
    assert check(args, device).shape == (3, 7, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_linear_saturates_requantized_output(device):
    args = make_inputs(8, 64, 16, seed=3, out_scale="scalar", outliers=True)
    args = (*args[:6], torch.tensor([1e-4]), *args[7:])  # a tiny out_scale: nearly everything saturates
    out = check(args, device)
    assert (out == 127).any() and (out == -127).any()
    assert out.min() >= -127


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_linear_strided_operands(device):
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
def test_quantized_linear_hypothesis(device, m, k, n, activation, bias, residual, out_scale, x_scale, out_dtype, seed):
    check(
        make_inputs(m, k, n, seed, bias=bias, residual=residual, out_scale=out_scale, x_scale=x_scale,
                    activation=activation, out_dtype=out_dtype),
        device,
    )


def test_quantized_linear_rejects_unknown_activation():
    args = make_inputs(4, 16, 8, seed=0, activation="swish2")
    with pytest.raises(ValueError, match="no 'swish2' epilogue"):
        LIN.quantized_linear_triton(*args)


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


# ---------------------------------------------------------------- FP8 x FP8 (E4M3, E5M2), fp32 accumulation
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def make_fp8_inputs(
    m, k, n, seed, *, x_dtype=E4M3, w_dtype=E4M3, exact=True, lead=None, x_scale="token", bias=True,
    residual=False, out_scale=None, out_q=E4M3, activation="none", out_dtype=torch.float32, outliers=False,
):
    """FP8 operands. `exact`: small integer values, whose fp32 products and sums are exact in any order, so the
    kernel and the reference accumulate the same number and the epilogue can be compared bit for bit. Otherwise
    normal activations cast to FP8 (the accumulation then rounds in a different order). `out_q` is the requantized
    output's dtype (FP8 or INT8) when `out_scale` is given."""
    g = torch.Generator().manual_seed(seed)
    lead = lead or (m,)
    if exact:
        xq, wq = small_int_fp8((*lead, k), x_dtype, g), small_int_fp8((n, k), w_dtype, g)
    else:
        xq, wq = random_fp8((*lead, k), x_dtype, g, 100.0), random_fp8((n, k), w_dtype, g, 100.0)
    if outliers:  # saturating rows: every product at the same extreme
        xq.view(-1, k)[0] = 8.0
        wq[0] = -8.0
    xs, ws, b, r, os_ = epilogue_operands(g, lead, n, x_scale=x_scale, w_scale="channel", bias=bias,
                                          residual=residual, out_scale=out_scale, out_dtype=out_dtype, out_floor=0.001)
    return (xq, xs, wq, ws, b, r, os_, activation, out_q if os_ is not None else out_dtype)


def check_fp8(args, device, exact=True):
    out = run_triton("quantized_linear", device, *args)
    ref = run_reference("quantized_linear", *args)
    xq, xs, wq, ws, activation = args[0], args[1], args[2], args[3], args[7]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if exact and activation == "none":
        # Exact accumulation and the reference's epilogue order: bit-exact, float, INT8 or FP8.
        assert_codes_equal(out, ref)
    elif out.dtype in (torch.int8, E4M3, E5M2):
        assert_quantized_close(out, ref)
    else:
        # fp32 sums of the same exact products in another order: within K ulps of the sum of |products|.
        k = xq.shape[-1]
        magnitude = (xq.float().abs().reshape(-1, k) @ wq.float().abs().t()).reshape(out.shape)
        magnitude = magnitude * xs.float().abs().reshape(*xs.shape[:-1], 1) * ws.float().abs()
        diff = (out.float() - ref.float()).abs()
        tol = FLOAT_TOL[out.dtype]
        assert torch.all(diff <= tol["atol"] + tol["rtol"] * ref.float().abs() + 2.0**-22 * k * magnitude), \
            float(diff.max())
    return out


FP8_EPILOGUES = [
    dict(),
    dict(bias=False, x_scale="scalar"),
    dict(out_scale="channel"),  # requantized FP8 E4M3
    dict(out_scale="scalar", out_q=E5M2, bias=False),
    dict(out_scale="channel", out_q=torch.int8),  # FP8 in, INT8 out
    dict(residual=True, out_dtype=torch.float16),
    dict(residual=True, out_dtype=torch.bfloat16),
    dict(activation="gelu", out_scale="channel"),
    dict(activation="gelu_tanh", out_dtype=torch.float16),
    dict(activation="silu", residual=True, outliers=True),
    dict(activation="relu", out_scale="scalar"),
]
FP8_PAIRS = [(E4M3, E4M3), (E5M2, E5M2), (E4M3, E5M2)]  # (x, w); mixed formats run the same kernel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", FP8_EPILOGUES,
                         ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()) or "plain")
@pytest.mark.parametrize("shape", [(1, 16, 8), (5, 33, 17), (37, 96, 130)], ids=lambda s: "x".join(map(str, s)))
def test_quantized_linear_fp8_matches_reference(device, shape, epilogue):
    check_fp8(make_fp8_inputs(*shape, seed=1, **epilogue), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", FP8_PAIRS, ids=lambda p: "x".join(str(d).split("_")[-1] for d in p))
@pytest.mark.parametrize("exact", [True, False], ids=["exact_acc", "rounded_acc"])
def test_quantized_linear_fp8_formats(device, pair, exact):
    # E4M3 / E5M2 / mixed operands; general FP8 values (fp32 accumulation that rounds) as well as exact ones; an
    # FP8 and a float output, a K with several K tiles and a tail.
    x_dtype, w_dtype = pair
    for extra in (dict(out_scale="channel", out_q=x_dtype), dict(residual=True, out_dtype=torch.float32)):
        check_fp8(make_fp8_inputs(29, 200, 40, 2, x_dtype=x_dtype, w_dtype=w_dtype, exact=exact, **extra), device,
                  exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_q", FP8_DTYPES)
def test_quantized_linear_fp8_saturates_requantized_output(device, out_q):
    args = make_fp8_inputs(8, 64, 16, seed=3, out_scale="scalar", out_q=out_q, outliers=True)
    args = (*args[:6], torch.tensor([1e-6]), *args[7:])  # a tiny out_scale: nearly everything saturates
    out = check_fp8(args, device)
    max_value = torch.finfo(out_q).max
    assert (out.float() == max_value).any() and (out.float() == -max_value).any()
    assert out.float().isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_linear_fp8_batch_dims_and_strides(device):
    args = make_fp8_inputs(0, 48, 40, seed=4, lead=(3, 7), residual=True, out_dtype=torch.float16)
    assert check_fp8(args, device).shape == (3, 7, 40)
    g = torch.Generator().manual_seed(5)
    xq = small_int_fp8((20, 100), E4M3, g)[:, 3:67]
    wq = small_int_fp8((64, 48), E4M3, g).t()  # [N, K] viewed through a transposed [K, N] buffer
    check_fp8((xq, torch.rand(20, 1, generator=g), wq, torch.rand(48, generator=g), None, None, None, "none",
               torch.float32), device)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=6)
@given(
    m=st.integers(1, 50), k=st.integers(1, 140), n=st.integers(1, 70),
    activation=st.sampled_from(list(LIN.ACTIVATIONS)), bias=st.booleans(), residual=st.booleans(),
    out_scale=st.sampled_from([None, "channel", "scalar"]), out_q=st.sampled_from([E4M3, E5M2, torch.int8]),
    pair=st.sampled_from(FP8_PAIRS), exact=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_quantized_linear_fp8_hypothesis(device, m, k, n, activation, bias, residual, out_scale, out_q, pair, exact,
                                         seed):
    check_fp8(
        make_fp8_inputs(m, k, n, seed, x_dtype=pair[0], w_dtype=pair[1], exact=exact, bias=bias, residual=residual,
                        out_scale=out_scale, out_q=out_q, activation=activation),
        device, exact,
    )


def test_triton_takes_fp8_and_refuses_what_it_cannot():
    from zqhero_fx import dispatch

    takes = dispatch.KERNELS["quantized_linear"].triton_applies
    args = list(make_fp8_inputs(4, 16, 8, seed=0, out_scale="channel"))
    assert takes(*args)
    assert not takes(args[0], args[1], args[2].to(torch.float32).to(torch.int8), *args[3:])  # FP8 x INT8
    assert not takes(*args[:7], "swish2", args[8])
    assert not takes(*args[:8], torch.uint8)  # a sub-byte output format
