"""quantize_per_token / quantize / dequantize: reference properties, and the Triton kernels bit-exact against them,
INT8 and FP8 (E4M3, E5M2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.kernel_checks import (
    DEVICES,
    FLOAT_DTYPES,
    FP8_DTYPE_LIST,
    FP8_DTYPES,
    assert_codes_equal,
    random_activations,
    random_fp8_codes,
    random_int8,
    run_reference,
    run_triton,
)
from zqhero_fx import formats
from zqhero_fx.kernels import _triton_common
from zqhero_fx.kernels import quantize as Q

SHAPES = [(1, 1), (3, 5), (2, 7, 33), (130, 768), (4, 1000)]
KINDS = ["normal", "outliers", "zero_rows", "wide"]


# ---------------------------------------------------------------- reference properties
@settings(deadline=None, max_examples=40)
@given(
    rows=st.integers(1, 6), cols=st.integers(1, 70), kind=st.sampled_from(KINDS),
    scale=st.sampled_from([1e-6, 1.0, 1e4]), seed=st.integers(0, 2**31 - 1),
)
def test_reference_per_token_round_trip_within_half_a_step(rows, cols, kind, scale, seed):
    x = random_activations((rows, cols), torch.float32, torch.Generator().manual_seed(seed), kind, scale)
    q, s = Q.quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and s.shape == (rows, 1) and s.dtype == torch.float32
    assert torch.all(q.abs() <= 127)
    error = (Q.dequantize_ref(q, s) - x).abs()
    # Half a quantization step, plus the float rounding of x / s and of q * s.
    assert torch.all(error <= s / 2 * (1 + 1e-5) + x.abs() * 1e-6)
    # The absmax element maps to +-127: the full INT8 range is used, unless the row is so small that its scale sits
    # on the MIN_SCALE floor.
    above_floor = x.abs().amax(-1) / 127 > Q.MIN_SCALE
    assert torch.all(q.abs().amax(-1)[above_floor] == 127)


def test_reference_static_quantize_saturates_at_127():
    x = torch.tensor([[-1000.0, -127.6, -127.4, -0.3, 0.0, 0.6, 127.4, 127.6, 1e30]])
    q = Q.quantize_ref(x, torch.tensor([1.0]))
    assert q.tolist() == [[-127, -127, -127, 0, 0, 1, 127, 127, 127]]


def test_reference_zero_range_is_safe():
    # All-zero rows get the floor scale and quantize to 0; a zero static scale (a channel that never varied in
    # calibration) is floored instead of dividing by zero.
    x = torch.zeros(3, 8)
    q, s = Q.quantize_per_token_ref(x)
    assert torch.all(q == 0) and torch.all(s == Q.MIN_SCALE)
    assert torch.all(Q.dequantize_ref(q, s) == 0)
    scale = torch.tensor([0.0, 1.0] * 4)
    q = Q.quantize_ref(x, scale)
    assert torch.all(q == 0)
    assert not torch.isnan(Q.dequantize_ref(q, scale)).any()


def test_reference_rounds_ties_to_even():
    # absmax 127 gives scale 1, so x / scale are exact halves.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.0]])
    q, s = Q.quantize_per_token_ref(x)
    assert s.item() == 1.0
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 126, 127]]


def test_triton_constants_mirror_the_reference():
    assert _triton_common.QMAX_F.value == Q.QMAX
    assert _triton_common.MIN_SCALE_F.value == Q.MIN_SCALE


# ---------------------------------------------------------------- Triton vs reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_per_token_bit_exact(device, shape, dtype):
    x = random_activations(shape, dtype, torch.Generator().manual_seed(1), "outliers", 3.0)
    q, s = run_triton("quantize_per_token", device, x)
    q_ref, s_ref = run_reference("quantize_per_token", x)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_per_token_ties_saturation_and_zero_rows(device):
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.0], [0.0] * 8, [-3e38, 1e-38, 0, 0, 0, 0, 0, 3e38]])
    q, s = run_triton("quantize_per_token", device, x)
    q_ref, s_ref = run_reference("quantize_per_token", x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q[0].tolist() == [0, 2, 2, 0, -2, -2, 126, 127]
    assert torch.all(q[1] == 0) and torch.all(s[1] == Q.MIN_SCALE)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_per_token_two_sweep_path(device, monkeypatch):
    # Rows wider than MAX_FUSED_COLS take the absmax-then-quantize sweeps; shrink the limit to test it cheaply.
    monkeypatch.setattr(Q, "MAX_FUSED_COLS", 64)
    x = random_activations((5, 300), torch.float16, torch.Generator().manual_seed(2), "outliers")
    q, s = run_triton("quantize_per_token", device, x)
    q_ref, s_ref = run_reference("quantize_per_token", x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_per_token_strided_input(device):
    # A transposed view: rows are not contiguous; the kernel reads through the strides.
    x = random_activations((40, 24), torch.float32, torch.Generator().manual_seed(3)).t()
    q, s = run_triton("quantize_per_token", device, x)
    q_ref, s_ref = run_reference("quantize_per_token", x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=12)
@given(
    lead=st.lists(st.integers(1, 9), min_size=0, max_size=2), cols=st.integers(1, 300),
    kind=st.sampled_from(KINDS), dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**31 - 1),
)
def test_quantize_per_token_hypothesis(device, lead, cols, kind, dtype, seed):
    x = random_activations((*lead, cols), dtype, torch.Generator().manual_seed(seed), kind, 2.0)
    q, s = run_triton("quantize_per_token", device, x)
    q_ref, s_ref = run_reference("quantize_per_token", x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def _static_scale(kind, shape, generator):
    """Static scales of every supported broadcast form."""
    if kind == "scalar":
        return torch.rand(1, generator=generator) * 0.05 + 1e-3
    if kind == "per_feature":
        s = torch.rand(shape[-1], generator=generator) * 0.05 + 1e-3
        s[0] = 0.0  # a zero-range channel
        return s
    if kind == "per_token":
        return torch.rand((*shape[:-1], 1), generator=generator) * 0.05 + 1e-3
    if kind == "middle_broadcast":  # [B, 1, D] against [B, S, D]: not flattenable, materialised by the launcher
        return torch.rand((shape[0], 1, shape[-1]), generator=generator) * 0.05 + 1e-3
    raise ValueError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_kind", ["scalar", "per_feature", "per_token", "middle_broadcast"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_static_bit_exact(device, scale_kind, dtype):
    g = torch.Generator().manual_seed(4)
    shape = (3, 37, 70)
    x = random_activations(shape, dtype, g, "outliers")  # outliers saturate at +-127
    scale = _static_scale(scale_kind, shape, g)
    q = run_triton("quantize", device, x, scale)
    q_ref = run_reference("quantize", x, scale)
    assert torch.equal(q, q_ref)
    assert (q.abs() == 127).any(), "the test should exercise saturation"


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=10)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 200),
    scale_kind=st.sampled_from(["scalar", "per_feature", "per_token"]), kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_static_hypothesis(device, rows, cols, scale_kind, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = random_activations((rows, cols), torch.float32, g, kind)
    scale = _static_scale(scale_kind, (rows, cols), g)
    assert torch.equal(run_triton("quantize", device, x, scale), run_reference("quantize", x, scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "q_shape, scale_shape",
    [((5, 33), (5, 1)), ((2, 7, 64), (64,)), ((2, 7, 64), (1,)), ((1, 1), (1,)), ((4, 9), (3, 4, 1))],
    ids=["per_token", "per_feature", "scalar", "single", "scale_broadcasts_q"],
)
def test_dequantize_bit_exact(device, out_dtype, q_shape, scale_shape):
    g = torch.Generator().manual_seed(5)
    q = random_int8(q_shape, g)
    scale = torch.rand(scale_shape, generator=g) * 0.1
    out = run_triton("dequantize", device, q, scale, out_dtype)
    ref = run_reference("dequantize", q, scale, out_dtype)
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    x = torch.empty(0, 16)
    q, s = run_triton("quantize_per_token", device, x)
    assert q.shape == (0, 16) and s.shape == (0, 1)
    assert run_triton("quantize", device, x, torch.ones(1)).shape == (0, 16)
    assert run_triton("dequantize", device, q, torch.ones(1), torch.float16).shape == (0, 16)


# ---------------------------------------------------------------- FP8 (E4M3, E5M2): the same kernels, bit-exact
def _fp8_grid_probes(dtype) -> torch.Tensor:
    """Every grid value and every midpoint between neighbours, each also one fp32 ulp either side, both signs, plus
    values past max, fp32 subnormals and the zeros: where a wrong rounding would show."""
    grid = formats.format_of_dtype(dtype).grid()
    mids = (grid[1:] + grid[:-1]) / 2
    points = torch.cat((grid, mids))
    probes = [points, torch.nextafter(points, torch.tensor(float("inf"))), torch.nextafter(points, torch.tensor(-1e30))]
    max_value = grid.max().item()
    extra = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, max_value * 1.01, -max_value * 1.01, 3e38, -3e38,
                          float("inf"), float("-inf"), 31.96, 16.5, 17.0, 19.0])
    return torch.cat((*probes, extra))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_fp8_rounding_is_bit_exact_at_every_boundary(device, fp8):
    # Static quantize with scale 1 is round_to_fp8_grid alone: ties to even at every midpoint (normal and subnormal),
    # carries into the next binade (31.96 -> 32 in E4M3, which the interpreter's own cast gets wrong), saturation,
    # the sign of zero.
    x = _fp8_grid_probes(fp8)
    q = run_triton("quantize", device, x, torch.ones(1), fp8)
    assert_codes_equal(q, run_reference("quantize", x, torch.ones(1), fp8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_fp8_nan_keeps_torchs_code(device, fp8):
    # NaN (either sign) is stored as 0x7F with its sign, as torch's cast does, on the GPU and in the interpreter.
    x = torch.tensor([float("nan"), 1.0, -float("nan"), -2.0])
    assert_codes_equal(run_triton("quantize", device, x, torch.ones(1), fp8),
                       run_reference("quantize", x, torch.ones(1), fp8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_fp8_codes_load_exactly(device, fp8):
    # Every finite code widened to fp32 (dequantize with scale 1): the interpreter's fp8 loads are exact. NaN / inf
    # codes are left out: the interpreter decodes them as finite numbers (the GPU does not).
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8)
    codes = codes[codes.float().isfinite()].reshape(1, -1)
    out = run_triton("dequantize", device, codes, torch.ones(1), torch.float32)
    assert_codes_equal(out, codes.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 33, 17), (2, 7, 33), (130, 768)])
def test_quantize_per_token_fp8_bit_exact(device, shape, dtype, fp8):
    x = random_activations(shape, dtype, torch.Generator().manual_seed(1), "outliers", 3.0)
    q, s = run_triton("quantize_per_token", device, x, fp8)
    q_ref, s_ref = run_reference("quantize_per_token", x, fp8)
    assert_codes_equal(q, q_ref)
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_quantize_per_token_fp8_saturation_zero_rows_and_tiny_values(device, fp8):
    max_value = formats.format_of_dtype(fp8).max_value
    x = torch.tensor([
        [max_value, 31.96, 17.0, 19.0, -0.0, 1e-3, -2.0**-10, 3 * 2.0**-10],  # scale 1: ties, carries, subnormals
        [0.0] * 8,  # all zero: the floor scale, codes 0
        [-3e38, 1e-38, 0, 0, 0, 0, 0, 3e38],  # huge values: scale 3e38 / max, tiny ones underflow to +-0
        [1e-30, -1e-30, 5e-31, 0, 0, 0, 0, 0],  # a row on the MIN_SCALE floor
    ])
    q, s = run_triton("quantize_per_token", device, x, fp8)
    q_ref, s_ref = run_reference("quantize_per_token", x, fp8)
    assert_codes_equal(q, q_ref)
    assert torch.equal(s, s_ref)
    assert s[0].item() == 1.0 and q[0, 0].float().item() == max_value
    assert torch.all(q[1].float() == 0) and torch.all(s[1] == Q.MIN_SCALE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_quantize_per_token_fp8_two_sweep_path(device, fp8, monkeypatch):
    monkeypatch.setattr(Q, "MAX_FUSED_COLS", 64)
    x = random_activations((5, 300), torch.float16, torch.Generator().manual_seed(2), "outliers")
    q, s = run_triton("quantize_per_token", device, x, fp8)
    q_ref, s_ref = run_reference("quantize_per_token", x, fp8)
    assert_codes_equal(q, q_ref)
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("scale_kind", ["scalar", "per_feature", "per_token", "middle_broadcast"])
def test_quantize_static_fp8_bit_exact(device, scale_kind, fp8):
    g = torch.Generator().manual_seed(4)
    shape = (3, 37, 70)
    scale = _static_scale(scale_kind, shape, g)
    # Outliers saturate at +-max; 'wide' values reach the subnormals.
    max_value = formats.format_of_dtype(fp8).max_value
    x = random_activations(shape, torch.float32, g, "wide") * (max_value * 0.002)
    x[0, 0, :5] = torch.tensor([1e9, -1e9, 0.0, -0.0, 1e-20])
    q = run_triton("quantize", device, x, scale, fp8)
    assert_codes_equal(q, run_reference("quantize", x, scale, fp8))
    assert (q.float().abs() == max_value).any(), "the test should exercise saturation"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "q_shape, scale_shape",
    [((5, 33), (5, 1)), ((2, 7, 64), (64,)), ((1, 1), (1,)), ((4, 9), (3, 4, 1))],
    ids=["per_token", "per_feature", "single", "scale_broadcasts_q"],
)
def test_dequantize_fp8_bit_exact(device, out_dtype, q_shape, scale_shape, fp8):
    g = torch.Generator().manual_seed(5)
    q = random_fp8_codes(q_shape, fp8, g)
    scale = torch.rand(scale_shape, generator=g) * 0.1
    out = run_triton("dequantize", device, q, scale, out_dtype)
    ref = run_reference("dequantize", q, scale, out_dtype)
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=8)
@given(
    lead=st.lists(st.integers(1, 9), min_size=0, max_size=2), cols=st.integers(1, 300),
    kind=st.sampled_from(KINDS), dtype=st.sampled_from(FLOAT_DTYPES), fp8=st.sampled_from(FP8_DTYPE_LIST),
    scale_kind=st.sampled_from(["scalar", "per_feature", "per_token"]), seed=st.integers(0, 2**31 - 1),
)
def test_quantize_fp8_hypothesis(device, lead, cols, kind, dtype, fp8, scale_kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = random_activations((*lead, cols), dtype, g, kind, 2.0)
    q, s = run_triton("quantize_per_token", device, x, fp8)
    q_ref, s_ref = run_reference("quantize_per_token", x, fp8)
    assert_codes_equal(q, q_ref)
    assert torch.equal(s, s_ref)
    scale = _static_scale(scale_kind, x.shape if x.dim() else (1,), g)
    assert_codes_equal(run_triton("quantize", device, x, scale, fp8), run_reference("quantize", x, scale, fp8))
    assert torch.equal(run_triton("dequantize", device, q, s, dtype), run_reference("dequantize", q, s, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_fp8_empty_inputs(device, fp8):
    x = torch.empty(0, 16)
    q, s = run_triton("quantize_per_token", device, x, fp8)
    assert q.shape == (0, 16) and q.dtype == fp8 and s.shape == (0, 1)
    assert run_triton("quantize", device, x, torch.ones(1), fp8).dtype == fp8
    assert run_triton("dequantize", device, q, torch.ones(1), torch.float16).shape == (0, 16)


def test_fp8_triton_constants_mirror_the_formats():
    assert _triton_common.FP8_E4M3_MAX_F.value == formats.FP8_E4M3.max_value
    assert _triton_common.FP8_E5M2_MAX_F.value == formats.FP8_E5M2.max_value
    for fmt, tl_dtype in ((formats.FP8_E4M3, _triton_common.tl.float8e4nv),
                          (formats.FP8_E5M2, _triton_common.tl.float8e5)):
        assert _triton_common.format_max(tl_dtype) == fmt.max_value
        assert _triton_common.fp8_mantissa_bits(tl_dtype) == fmt.mantissa_bits
        assert _triton_common.fp8_min_normal(tl_dtype) == 2.0 ** (1 - fmt.exponent_bias)
        assert _triton_common.fp8_subnormal_quantum(tl_dtype) == 2.0 ** (1 - fmt.exponent_bias - fmt.mantissa_bits)


def test_fp8_goes_to_triton_and_unknown_formats_do_not():
    from zqhero_fx import dispatch

    spec = dispatch.KERNELS["quantize"]
    x = torch.randn(2, 3)
    for fp8 in FP8_DTYPE_LIST:
        assert spec.triton_applies(x, torch.ones(1), fp8)
        assert dispatch.KERNELS["dequantize"].triton_applies(x.to(fp8), torch.ones(1), torch.float32)
    assert not spec.triton_applies(x, torch.ones(1), torch.uint8)  # sub-byte formats: the reference
