"""quantize_per_token / quantize / dequantize: reference properties, and the Triton kernels bit-exact against them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.kernel_checks import (
    DEVICES,
    FLOAT_DTYPES,
    random_activations,
    random_int8,
    run_reference,
    run_triton,
)
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
