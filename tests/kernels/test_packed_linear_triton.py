"""packed_linear's Triton kernel (codes unpacked in registers inside the GEMM) against packed_linear_ref, for its three
operand shapes: A8W4 (DGQ), W4A8 (ZeroQuant-FP) and FP6 weight-only (ZeroQuant(4+2)).

Tolerances:
  * A8W4 accumulates INT8 x INT8 in INT32, exactly like the reference, and the epilogue repeats the reference's fp32
    operations in order; LoRC's side term is the reference's own torch expression (computed on the same device under
    the interpreter). So the output is bit-exact, float or quantized, for the activations the kernel computes like
    torch (none, relu); exp / erf / tanh may move the last bit (FLOAT_TOL, one INT8 / FP8 step).
  * The float paths (FP8 or float x) multiply exactly (the decoded weights are exact in the operand type, and the
    products are exact in fp32) but sum in fp32 in another order than torch's matmul: each sum may differ by at most
    (K - 1) * 2**-24 of the sum of |products| per side, bounded here by 2**-22 * K * sum|x_k * w_k| after the scales
    (the bound quantized_linear's FP8 tests use), on top of FLOAT_TOL for the output cast and the activation.
    Quantized outputs may then move by one step where a value sits at a rounding boundary (assert_quantized_close).

Runs under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU); the `cuda` variants compile for a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_checks import (
    DEVICES,
    FLOAT_TOL,
    assert_codes_equal,
    assert_quantized_close,
    random_activations,
    random_fp8,
    random_int8,
    run_reference,
    run_triton,
    small_int_fp8,
)
from zqhero_fx import weights
from zqhero_fx.kernels import packed_linear_triton as PLT
from zqhero_fx.kernels.quantized_linear import _prune_gemm_configs

OP = "packed_linear"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EXACT_ACTIVATIONS = ("none", "relu")
LORC_RANK = 4


# ---------------------------------------------------------------- operands
def weight_a8w4(g, n, k, group_size):
    """DGQ: unsigned INT4 codes, zero points, integer group scales bounded so that S2 * (v - z) stays in INT8."""
    groups = k // group_size if group_size else 1
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    zero = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=g)
    scale = torch.randint(1, 127 // 15 + 1, (n, groups), dtype=torch.int8, generator=g)
    return [weights.pack_nibbles(codes)], "int4", group_size, scale, "integer", zero


def weight_w4(g, n, k, group_size, w_format="fp4_e2m1", kind="exponent"):
    """ZeroQuant-FP: INT4 (every two's-complement code, -8 included) / FP4 / FP6 codes with power-of-two group scales
    2**e, e in [-9, 0], or none."""
    groups = k // group_size if group_size else 1
    if w_format == "fp6_e3m2":
        codes = weights.pack_fp6(torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=g))
    else:
        codes = [weights.pack_nibbles(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g))]
    exponent = torch.randint(-9, 1, (n, groups), dtype=torch.int8, generator=g) if kind == "exponent" else None
    return codes, w_format, group_size, exponent, kind, None


def weight_fp6(g, n, k):
    """ZeroQuant(4+2): FP6 E3M2 codes (every code, both zeros and the subnormals), one scale per channel."""
    return weight_w4(g, n, k, 0, "fp6_e3m2", "none")


def lorc_factors(g, n, k):
    """LoRC's INT8 factors [b [r, K], b_scale [r], a [N, r], a_scale [N]], a small correction."""
    return [random_int8((LORC_RANK, k), g), torch.rand(LORC_RANK, generator=g) * 0.01,
            random_int8((n, LORC_RANK), g), torch.rand(n, generator=g) * 0.01]


def make_args(x, x_scale, weight, n, g, *, bias=True, residual=False, lorc=False, activation="none",
              out_dtype=torch.float32, out_q=None, out_scale="channel"):
    """packed_linear's 15 arguments. `out_q` (int8 / float8): a requantized output, its scale ([N] or [1]) chosen from
    the float output so that the codes span most of the format."""
    codes, w_format, group_size, group_scale, kind, zero = weight
    k = x.shape[-1]
    w_scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    r = random_activations((*x.shape[:-1], n), out_dtype, g) if residual else None
    lorc_ops = lorc_factors(g, n, k) if lorc else []
    args = [x, x_scale, codes, w_format, group_size, w_scale, group_scale, kind, zero, lorc_ops, b, r, None,
            activation, out_dtype]
    if out_q is not None:
        y = run_reference(OP, *args).float().reshape(-1, n).abs()
        top = 127.0 if out_q == torch.int8 else torch.finfo(out_q).max
        per_channel = y.amax(0) if out_scale == "channel" else y.amax().reshape(1)
        args[12], args[14] = (per_channel / top * 1.2).clamp_min(1e-3), out_q
    return tuple(args)


def a8w4_args(m, n, k, group_size, seed, *, lead=None, x_scale="token", **epilogue):
    g = torch.Generator().manual_seed(seed)
    lead = lead or (m,)
    x = random_int8((*lead, k), g)
    xs = torch.rand((*lead, 1), generator=g) * 0.02 + 1e-3 if x_scale == "token" else torch.rand(1, generator=g) * 0.02
    return make_args(x, xs, weight_a8w4(g, n, k, group_size), n, g, **epilogue)


def w4a8_args(m, n, k, group_size, seed, *, x_dtype=E4M3, w_format="fp4_e2m1", lead=None, integer_x=False,
              **epilogue):
    """`integer_x`: x holds integers in [-8, 8], so that the fp32 sums are exact in any order where the weights'
    dynamic range allows (see test_w4a8_exact_sums_are_bit_exact)."""
    g = torch.Generator().manual_seed(seed)
    lead = lead or (m,)
    x = small_int_fp8((*lead, k), x_dtype, g) if integer_x else random_fp8((*lead, k), x_dtype, g, 4.0)
    xs = torch.rand((*lead, 1), generator=g) * 0.02 + 1e-3
    return make_args(x, xs, weight_w4(g, n, k, group_size, w_format), n, g, **epilogue)


def fp6_args(m, n, k, seed, *, x_dtype=torch.float16, lead=None, integer_x=False, **epilogue):
    g = torch.Generator().manual_seed(seed)
    lead = lead or (m,)
    if integer_x:
        x = torch.randint(-8, 9, (*lead, k), generator=g).to(x_dtype)
    else:
        x = random_activations((*lead, k), x_dtype, g)
    return make_args(x, None, weight_fp6(g, n, k), n, g, **epilogue)


# ---------------------------------------------------------------- checks
def summation_bound(args) -> torch.Tensor:
    """2**-22 * K * sum_k |x_k w_k| in output units: how far two fp32 summation orders of the same exact products
    can be apart (see the module docstring)."""
    x, x_scale, codes, w_format, group_size, w_scale, group_scale, kind, zero = args[:9]
    k, n = x.shape[-1], w_scale.shape[0]
    w = weights.expand(codes, w_format, group_size, group_scale, kind, zero)
    magnitude = x.float().abs().reshape(-1, k) @ w.abs().t() * w_scale.abs()
    if x_scale is not None:
        magnitude = magnitude * x_scale.float().abs().reshape(-1, 1)
    return (2.0**-22 * k * magnitude).reshape(*x.shape[:-1], n)


def check(args, device, *, exact_sums):
    """The kernel against the reference; `exact_sums`: the accumulator is the reference's bit for bit (INT32)."""
    out = run_triton(OP, device, *args)
    ref = run_reference(OP, *args)
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    activation, lorc = args[13], args[9]
    # On a GPU LoRC's side GEMM is cuBLAS's, not the CPU reference's: its sums round differently.
    exact_sums = exact_sums and not (lorc and device == "cuda")
    if exact_sums and activation in EXACT_ACTIVATIONS:
        assert_codes_equal(out, ref)
    elif out.dtype in (torch.int8, E4M3, E5M2):
        assert_quantized_close(out, ref)
    else:
        tol = FLOAT_TOL[out.dtype]
        bound = tol["atol"] + tol["rtol"] * ref.float().abs()
        if not exact_sums:
            bound = bound + summation_bound(args)
        diff = (out.float() - ref.float()).abs()
        assert torch.all(diff <= bound), float((diff - bound).max())
    return out


# ---------------------------------------------------------------- A8W4 (DGQ)
# (M, N, K, group_size): one row, odd sizes, several K tiles; groups of whole tiles (32, 64 with the interpreter's
# 32-deep tile), one per row (0), and smaller than the tile or not a power of two (16, 48, 10: per-column groups,
# the last with a K tail of 16).
A8W4_SHAPES = [(1, 40, 64, 32), (3, 96, 192, 64), (33, 40, 192, 0), (3, 40, 64, 16), (33, 96, 192, 48),
               (3, 40, 80, 10)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", A8W4_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_a8w4_is_bit_exact(device, shape):
    check(a8w4_args(*shape, seed=1), device, exact_sums=True)


EPILOGUES = [
    dict(residual=True, out_dtype=torch.float16),
    dict(residual=True, out_dtype=torch.bfloat16, bias=False),
    dict(activation="relu", out_q=torch.int8),
    dict(activation="gelu", out_q=torch.int8, out_scale="scalar"),
    dict(activation="none", out_q=E4M3),
    dict(activation="silu", residual=True),
    dict(lorc=True),
    dict(lorc=True, activation="quick_gelu", out_q=torch.int8),
    dict(lorc=True, activation="gelu_tanh", residual=True, out_dtype=torch.float16),
]


def epilogue_id(e):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in e.items())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=epilogue_id)
def test_a8w4_epilogues(device, epilogue):
    check(a8w4_args(33, 40, 64, 32, seed=2, **epilogue), device, exact_sums=True)


@pytest.mark.parametrize("device", DEVICES)
def test_a8w4_batch_dims_and_scalar_x_scale(device):
    out = check(a8w4_args(0, 40, 64, 16, seed=3, lead=(2, 5), x_scale="scalar", residual=True, lorc=True), device,
                exact_sums=True)
    assert out.shape == (2, 5, 40)


# ---------------------------------------------------------------- W4A8 (ZeroQuant-FP)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("w_format", ["fp4_e2m1", "int4", "fp6_e3m2"])
@pytest.mark.parametrize("shape", [(1, 40, 64, 32), (33, 96, 192, 64)], ids=lambda s: "x".join(map(str, s)))
def test_w4a8_formats(device, x_dtype, w_format, shape):
    check(w4a8_args(*shape, seed=4, x_dtype=x_dtype, w_format=w_format), device, exact_sums=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("w_format", ["fp4_e2m1", "int4"])
def test_w4a8_exact_sums_are_bit_exact(device, x_dtype, w_format):
    # Integer x in [-8, 8] times codes * 2**e (e >= -9): every product is a multiple of 2**-10 below 2**6, so with
    # K = 64 every partial sum is exact in fp32 and the output bit-exact. This also pins the E5M2 weight operand:
    # FP4's 0.5 * 2**-9 and 1.5 * 2**-9 would round in E4M3.
    args = w4a8_args(33, 40, 64, 32, seed=12, x_dtype=x_dtype, w_format=w_format, integer_x=True)
    assert (args[6] == -9).any()
    check(args, device, exact_sums=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", [
    dict(out_q=E4M3), dict(out_q=E5M2, out_scale="scalar"), dict(out_q=torch.int8, activation="gelu"),
    dict(activation="gelu_tanh", out_dtype=torch.float16), dict(residual=True, out_dtype=torch.bfloat16),
    dict(lorc=True, residual=True), dict(lorc=True, out_q=E4M3, activation="relu"),
], ids=epilogue_id)
def test_w4a8_epilogues(device, epilogue):
    check(w4a8_args(33, 40, 64, 32, seed=5, **epilogue), device, exact_sums=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [0, 16, 48], ids=lambda s: f"group{s}")
def test_w4a8_group_sizes_and_batch_dims(device, group_size):
    out = check(w4a8_args(0, 40, 192, group_size, seed=6, lead=(3, 2), w_format="int4", residual=True), device,
                exact_sums=False)
    assert out.shape == (3, 2, 40)


# ---------------------------------------------------------------- FP6 weight-only (ZeroQuant(4+2))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 40, 64), (33, 96, 192), (3, 40, 200)], ids=lambda s: "x".join(map(str, s)))
def test_fp6_weight_only(device, x_dtype, shape):
    # 200: a K tail (6.25 tiles of 32) through both code streams.
    check(fp6_args(*shape, seed=7, x_dtype=x_dtype, out_dtype=x_dtype), device, exact_sums=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fp6_exact_sums_are_bit_exact(device, x_dtype):
    # Integer x in [-8, 8] times E3M2 values (multiples of 2**-4 up to 28): with K = 192 every partial sum is an exact
    # fp32, so the decoding (every code, subnormals and -0 included) is checked bit for bit.
    check(fp6_args(33, 40, 192, seed=13, x_dtype=x_dtype, integer_x=True), device, exact_sums=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", [
    dict(out_dtype=torch.float32, activation="gelu", residual=True), dict(out_q=torch.int8, activation="silu"),
    dict(out_q=E4M3, out_scale="scalar"), dict(lorc=True, out_dtype=torch.float16),
    dict(lorc=True, lead=(2, 3, 5), residual=True, out_dtype=torch.bfloat16, x_dtype=torch.bfloat16),
], ids=epilogue_id)
def test_fp6_epilogues(device, epilogue):
    check(fp6_args(33, 40, 64, seed=8, **epilogue), device, exact_sums=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_format, group_size, zero", [("fp4_e2m1", 16, False), ("int4", 32, True)],
                         ids=["fp4-exponent-group16", "uint4-zero-exponent"])
def test_float_activations_with_4bit_codes(device, w_format, group_size, zero):
    # Weight-only with 4-bit codes: power-of-two group scales, and INT4 with zero points (exact in fp16 too).
    g = torch.Generator().manual_seed(9)
    n, k = 40, 64
    codes, w_format, group_size, exponent, kind, _ = weight_w4(g, n, k, group_size, w_format)
    zeros = torch.randint(0, 16, exponent.shape, dtype=torch.uint8, generator=g) if zero else None
    x = random_activations((5, k), torch.float16, g)
    check(make_args(x, None, (codes, w_format, group_size, exponent, kind, zeros), n, g, out_dtype=torch.float16),
          device, exact_sums=False)


# ---------------------------------------------------------------- what the kernel takes
def test_takes_the_three_shapes_and_refuses_the_rest():
    g = torch.Generator().manual_seed(10)
    a8w4, w4a8, fp6 = a8w4_args(3, 40, 64, 32, 0), w4a8_args(3, 40, 64, 32, 0), fp6_args(3, 40, 64, 0)
    assert PLT.takes(*a8w4) and PLT.takes(*w4a8) and PLT.takes(*fp6)

    def with_(args, **changes):
        names = ["x", "x_scale", "w_codes", "w_format", "group_size", "w_scale", "w_group_scale",
                 "group_scale_kind", "w_group_zero", "lorc", "bias", "residual", "out_scale", "activation",
                 "out_dtype"]
        return tuple(changes.get(name, value) for name, value in zip(names, args))

    fp4_codes = weight_w4(g, 40, 64, 32)
    refused = {
        "unknown activation": with_(a8w4, activation="swish2"),
        "int8 x, FP4 codes": with_(a8w4, w_codes=fp4_codes[0], w_format="fp4_e2m1", w_group_zero=None),
        "int8 x, FP6 codes": with_(a8w4, w_codes=fp6[2], w_format="fp6_e3m2", group_size=0, w_group_scale=None,
                                   group_scale_kind="none", w_group_zero=None),
        "fp8 x, zero point": with_(w4a8, w_format="int4", w_group_zero=a8w4[8]),
        "fp8 x, integer group scales": with_(w4a8, w_group_scale=a8w4[6], group_scale_kind="integer"),
        "float x, integer group scales": with_(fp6, group_size=32, w_group_scale=a8w4[6],
                                               group_scale_kind="integer"),
        "group scales without a kind": with_(fp6, group_size=32, w_group_scale=a8w4[6]),
        "a kind without group scales": with_(a8w4, w_group_scale=None),
        "FP4 codes with a zero point": with_(w4a8, w_group_zero=a8w4[8]),
        "int32 x": with_(fp6, x=fp6[0].to(torch.int32)),
        "a sub-byte output": with_(a8w4, out_scale=torch.ones(1), out_dtype=torch.uint8),
    }
    for what, args in refused.items():
        assert not PLT.takes(*args), what
    with pytest.raises(ValueError, match="does not take these operands: int8 activations take INT4"):
        PLT.run(*refused["int8 x, FP4 codes"])


def test_empty_batch_returns_an_empty_output():
    args = a8w4_args(0, 40, 64, 32, seed=11)
    out = PLT.run(*args)
    assert out.shape == (0, 40) and out.dtype == torch.float32


def test_autotune_space_is_bounded_and_valid():
    # A bounded list; every tile legal for 8-bit MMAs (M multiple of 16, K multiple of 32, so FP6's 2-bit stream
    # tiles are whole bytes too).
    assert 0 < len(PLT.PACKED_GEMM_CONFIGS) <= 10
    for config in PLT.PACKED_GEMM_CONFIGS:
        assert config.kwargs["BLOCK_M"] % 16 == 0 and config.kwargs["BLOCK_K"] % 32 == 0
    # Decoding (M = 1) keeps only short tiles, and a 16-row one among them.
    kept = _prune_gemm_configs(PLT.PACKED_GEMM_CONFIGS, {"m_bucket": 1})
    assert kept and all(c.kwargs["BLOCK_M"] <= 32 for c in kept) and any(c.kwargs["BLOCK_M"] == 16 for c in kept)
