"""quantized_gated_linear: the SwiGLU / GeGLU front (two quantized GEMMs, one product) against an independent float
computation, and the Triton kernel (two accumulators per program) against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.kernel_checks import (
    DEVICES,
    assert_codes_equal,
    assert_float_close,
    assert_quantized_close,
    random_int8,
    run_reference,
    run_triton,
    small_int_fp8,
)
from zqhero_fx import dispatch
from zqhero_fx.kernels import quantized_gated_linear as GL

OP = "quantized_gated_linear"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# Activations whose kernel form is bit-identical to torch's (no exp / erf / tanh).
EXACT_ACTIVATIONS = ("none", "relu")


def make_inputs(m, k, n, seed, *, lead=None, x_scale="token", activation="silu", out_scale=None,
                out_dtype=torch.float32, operands=torch.int8, out_q=None):
    """(x, x_scale, w_gate, w_gate_scale, w_up, w_up_scale, activation, out_scale, out_dtype). FP8 operands hold
    small integers, whose fp32 products and sums are exact in any order."""
    g = torch.Generator().manual_seed(seed)
    lead = lead or (m,)

    def values(shape):
        return random_int8(shape, g) if operands == torch.int8 else small_int_fp8(shape, operands, g)

    x, wg, wu = values((*lead, k)), values((n, k)), values((n, k))
    xs = torch.rand((*lead, 1), generator=g) * 0.02 + 1e-3 if x_scale == "token" else torch.rand(1, generator=g) * 0.02
    wgs = torch.rand(n, generator=g) * 0.02 + 1e-3
    wus = torch.rand(n, generator=g) * 0.02 + 1e-3
    if out_scale == "channel":
        os_ = torch.rand(n, generator=g) * 0.02 + 0.002
    elif out_scale == "scalar":
        os_ = torch.rand(1, generator=g) * 0.02 + 0.002
    else:
        os_ = None
    dtype = (out_q or torch.int8) if os_ is not None else out_dtype
    return (x, xs, wg, wgs, wu, wus, activation, os_, dtype)


def independent(args) -> torch.Tensor:
    """The op written from its definition in float64 with torch.nn.functional: dequantize x and both weights, two
    F.linear, the activation, the product (before any output cast or quantization)."""
    x, xs, wg, wgs, wu, wus, activation = args[:7]
    xd = x.double() * xs.double()
    gate = F.linear(xd, wg.double() * wgs.double()[:, None])
    up = F.linear(xd, wu.double() * wus.double()[:, None])
    act = {
        "none": lambda t: t, "silu": F.silu, "relu": F.relu, "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    }[activation]
    return act(gate) * up


def check(args, device):
    out = run_triton(OP, device, *args)
    ref = run_reference(OP, *args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if args[6] in EXACT_ACTIVATIONS:
        assert_codes_equal(out, ref)  # bit-exact: same fp32 operations in the same order
    elif out.dtype in (torch.int8, E4M3, E5M2):
        assert_quantized_close(out, ref)
    else:
        assert_float_close(out, ref)
    return out


# ---------------------------------------------------------------- the reference is the op's definition
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "none", "gelu", "relu", "quick_gelu"])
@pytest.mark.parametrize("operands", [torch.int8, E4M3], ids=["int8", "e4m3"])
def test_reference_matches_float_computation(activation, operands):
    args = make_inputs(9, 70, 33, seed=1, lead=(3, 3), activation=activation, operands=operands)
    ref = run_reference(OP, *args)
    assert ref.shape == (3, 3, 33) and ref.dtype == torch.float32
    expected = independent(args)
    # fp32 against float64; the absolute part covers the tails of the activations (fp32 tanh-GeLU of a very
    # negative gate cancels to 0, float64 keeps a tiny value).
    torch.testing.assert_close(ref.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("out_q", [torch.int8, E4M3])
def test_reference_quantizes_like_quantize(out_q):
    # The requantized output is zqhero::quantize of the float result with the same scale (per channel here).
    args = make_inputs(6, 64, 24, seed=2, out_scale="channel", out_q=out_q)
    ref = run_reference(OP, *args)
    float_args = (*args[:7], None, torch.float32)
    expected = torch.ops.zqhero.quantize(run_reference(OP, *float_args), args[7], out_q)
    assert_codes_equal(ref, expected)


def test_reference_rejects_bad_operands():
    args = make_inputs(4, 16, 8, seed=0)
    with pytest.raises(ValueError, match="w_gate .* and w_up .* must both be"):
        run_reference(OP, *args[:4], args[4][:5], *args[5:])
    with pytest.raises(ValueError, match="out_dtype must be a quantized dtype"):
        run_reference(OP, *args[:7], torch.rand(8), torch.float32)
    with pytest.raises(ValueError, match="unknown activation"):
        run_reference(OP, *args[:6], "swish2", *args[7:])


# ---------------------------------------------------------------- Triton vs the reference
# (M, K, N): one row; K and N off the 32x32x64 interpreter tile; several K tiles with a tail.
SHAPES = [(1, 16, 8), (5, 33, 17), (37, 100, 70), (3, 200, 45)]
EPILOGUES = [
    dict(activation="none"),
    dict(activation="none", out_scale="channel"),
    dict(activation="relu", out_scale="scalar", x_scale="scalar"),
    dict(activation="silu"),
    dict(activation="silu", out_scale="channel"),
    dict(activation="gelu_tanh", out_dtype=torch.bfloat16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_matches_reference(device, shape, epilogue):
    check(make_inputs(*shape, seed=3, **epilogue), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", [
    dict(activation="none"),
    dict(activation="none", out_scale="channel", out_q=E4M3),
    dict(activation="relu", out_scale="scalar", out_q=E5M2),
    dict(activation="none", out_scale="channel", out_q=torch.int8),
    dict(activation="silu", out_scale="channel", out_q=E4M3),
    dict(activation="gelu_tanh", out_dtype=torch.float16),
], ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("shape", [(5, 33, 17), (37, 100, 70)], ids=lambda s: "x".join(map(str, s)))
def test_fp8_e4m3_matches_reference(device, shape, epilogue):
    check(make_inputs(*shape, seed=4, operands=E4M3, **epilogue), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_batch_dims_and_half_outputs(device, out_dtype):
    args = make_inputs(0, 48, 40, seed=5, lead=(2, 7), activation="none", out_dtype=out_dtype)
    assert check(args, device).shape == (2, 7, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_operands(device):
    # x a column slice of a wider buffer (a transposed view too), the weights stored transposed ([K, N] buffers
    # viewed as [N, K]): all read through their strides.
    g = torch.Generator().manual_seed(6)
    x = random_int8((90, 20), g).t()[:, 3:67]
    wg = random_int8((64, 48), g).t()
    wu = random_int8((64, 48), g).t()
    assert not (x.is_contiguous() or wg.is_contiguous() or wu.is_contiguous())
    for activation, out_scale, dtype in (("none", None, torch.float32), ("silu", torch.rand(48, generator=g) * 0.01,
                                                                         torch.int8)):
        args = (x, torch.rand(20, 1, generator=g) * 0.01, wg, torch.rand(48, generator=g) * 0.01, wu,
                torch.rand(48, generator=g) * 0.01, activation, out_scale, dtype)
        check(args, device)


@pytest.mark.parametrize("device", DEVICES)
def test_weights_with_different_layouts(device):
    # w_gate K-major, w_up a transposed [K, N] buffer: each weight is read through its own strides.
    g = torch.Generator().manual_seed(9)
    wg, wu = random_int8((24, 40), g), random_int8((40, 24), g).t()
    args = (random_int8((7, 40), g), torch.rand(7, 1, generator=g) * 0.01, wg, torch.rand(24, generator=g) * 0.01,
            wu, torch.rand(24, generator=g) * 0.01, "none", None, torch.float32)
    check(args, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_q", [torch.int8, E4M3])
def test_zero_out_scale_is_floored_like_quantize(device, out_q):
    # out_scale 0 on some channels and an all-zero row of x: 0 / max(0, MIN_SCALE) = 0, not 0 / 0 = NaN.
    args = make_inputs(6, 32, 16, seed=10, activation="none", out_scale="channel", out_q=out_q)
    args[0][2] = 0
    args[7][::3] = 0.0
    out = check(args, device)
    assert (out[2].float() == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_saturates_requantized_output(device):
    args = make_inputs(8, 64, 16, seed=7, activation="none", out_scale="scalar")
    args = (*args[:7], torch.tensor([1e-5]), torch.int8)  # a tiny out_scale: nearly everything saturates
    out = check(args, device)
    assert (out == 127).any() and (out == -127).any() and out.min() >= -127


def test_triton_refuses_what_it_cannot_take():
    takes = dispatch.KERNELS[OP].triton_applies
    args = list(make_inputs(4, 16, 8, seed=0, out_scale="channel"))
    assert takes(*args)
    assert takes(*make_inputs(4, 16, 8, seed=0, operands=E4M3))
    assert not takes(args[0], args[1], args[2].float().to(E4M3), *args[3:])  # INT8 x with an FP8 gate weight
    assert not takes(*args[:6], "swish2", *args[7:])
    assert not takes(*args[:8], torch.uint8)
    with pytest.raises(ValueError, match="no 'swish2' epilogue"):
        GL.quantized_gated_linear_triton(*args[:6], "swish2", *args[7:])


def test_cpu_tensors_run_the_cpu_kernel_by_default():
    """auto on CPU: the INT8 CPU kernel (kernels/int8_cpu.py) where it builds, else the reference."""
    from zqhero_fx.kernels import int8_cpu

    args = make_inputs(3, 32, 16, seed=8)
    with dispatch.use_kernels("auto"):
        label, _ = dispatch.select(OP, *args)
        got = torch.ops.zqhero.quantized_gated_linear(*args)
    assert label == ("cpu" if int8_cpu.available() else "reference")
    assert_float_close(got, run_reference(OP, *args))  # float32 output; a silu epilogue (ATen's exp)
