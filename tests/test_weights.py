"""The packed weight layouts (zqhero_fx/weights.py) and their quantizers (zqhero_fx/weight_quant.py)."""

import pytest
import torch

from zqhero_fx import weights
from zqhero_fx.errors import ConfigError
from zqhero_fx.formats import FP4_E2M1, FP6_E3M2, FP8_E4M3, INT4, INT8, get_format
from zqhero_fx.weight_quant import E_MIN, WeightScheme, ceil_log2, low_rank_compensation, quantize_weight


def _weight(n=48, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 12  # an outlier input channel, as LLM weights have
    return w


def _sqnr(a, b):
    return float(10 * torch.log10(a.square().sum() / (a - b).square().sum()))


# ---------------------------------------------------------------- layouts
def test_fp6_streams_round_trip_every_code_and_have_4_plus_2_bits():
    codes = torch.arange(64, dtype=torch.uint8).repeat(3, 2)  # [3, 128]: every 6-bit code
    lo4, hi2 = weights.pack_fp6(codes)
    assert lo4.shape == (3, 64) and hi2.shape == (3, 32)  # 4 + 2 bits per weight
    assert torch.equal(weights.unpack_fp6(lo4, hi2), codes)
    assert torch.equal(weights.unpack_nibbles(lo4), codes & 0x0F)


def test_fp6_packing_needs_k_multiple_of_4():
    with pytest.raises(ConfigError, match="multiple of 4"):
        weights.pack_fp6(torch.zeros(2, 6, dtype=torch.uint8))


def test_code_values_decode_each_layout():
    w = _weight()
    q, scale = FP6_E3M2.quantize_per_channel(w)
    values = weights.code_values(weights.pack_fp6(q), "fp6")
    assert torch.equal(values, FP6_E3M2._decode(q))
    unsigned = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    zero = torch.tensor([[3, 8]] * 4, dtype=torch.uint8)
    values = weights.code_values([weights.pack_nibbles(unsigned)], "int4", zero, 16)
    assert torch.equal(values, unsigned.float() - zero.float().repeat_interleave(16, 1))


def test_group_factor_kinds_and_errors():
    e = torch.tensor([[0, -3]], dtype=torch.int8)
    assert torch.equal(weights.group_factor(e, "exponent", 2, 4), torch.tensor([[1.0, 1.0, 0.125, 0.125]]))
    assert torch.equal(weights.group_factor(e.abs(), "integer", 2, 4), torch.tensor([[0.0, 0.0, 3.0, 3.0]]))
    with pytest.raises(ConfigError, match="group_scale_kind"):
        weights.group_factor(e, "real", 2, 4)
    with pytest.raises(ConfigError, match="do not cover"):
        weights.group_factor(e, "exponent", 3, 4)


# ---------------------------------------------------------------- quantizers
def test_fp6_per_channel_matches_the_format_reference_and_stores_6_bits():
    w = _weight()
    packed = quantize_weight(w, WeightScheme("fp6"))
    q, scale = FP6_E3M2.quantize_per_channel(w)
    assert torch.equal(packed.dequantize(), FP6_E3M2.dequantize(q, scale[:, None]))
    code_bits = 8 * sum(c.numel() for c in packed.w_codes) / w.numel()
    assert code_bits == 6
    assert _sqnr(w, packed.dequantize()) > 20


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "int4"])
@pytest.mark.parametrize("constraint", ["power_of_two", "power_of_two_ratio"])
def test_power_of_two_group_scales_convert_to_fp8_exactly(fmt, constraint):
    w = _weight()
    packed = quantize_weight(w, WeightScheme(fmt, 32, constraint))
    exponent = packed.w_group_scale.int()
    assert packed.group_scale_kind == "exponent"
    assert exponent.max() <= 0 and exponent.min() >= E_MIN[fmt]
    if constraint == "power_of_two":  # every group scale (row scale x 2**e) is itself a power of two
        mantissa, _ = torch.frexp(packed.w_scale)
        assert torch.all(mantissa == 0.5)
    expanded = weights.expand(*packed.operands()[:3], packed.w_group_scale, "exponent", None)
    assert torch.equal(expanded.to(torch.float8_e4m3fn).float(), expanded)  # the 4-bit -> FP8 shift is exact
    # No clipping: every weight lies within its group's range (rounding the scale up never saturates).
    group_scale = packed.w_scale[:, None] * torch.exp2(exponent.float())
    reach = (group_scale * get_format(fmt).max_value).repeat_interleave(32, 1)
    assert torch.all(w.abs() <= reach * (1 + 1e-6))
    assert _sqnr(w, packed.dequantize()) > 12


def test_power_of_two_ratio_is_at_least_as_accurate_as_power_of_two():
    w = _weight(seed=1)
    ratio = quantize_weight(w, WeightScheme("fp4", 32, "power_of_two_ratio")).dequantize()
    plain = quantize_weight(w, WeightScheme("fp4", 32, "power_of_two")).dequantize()
    assert _sqnr(w, ratio) >= _sqnr(w, plain) - 0.05


def test_ceil_log2_is_exact_at_powers_of_two():
    v = torch.tensor([1.0, 2.0, 2.0000002, 0.5, 0.7, 3.0])
    assert ceil_log2(v).tolist() == [0, 1, 2, -1, 0, 2]


def test_dgq_integer_group_scales_expand_to_int8():
    w = _weight()
    packed = quantize_weight(w, WeightScheme("int4", 32, "integer", zero_point=True))
    assert packed.w_group_scale.dtype == torch.int8 and packed.w_group_scale.min() >= 1
    assert packed.w_group_zero.dtype == torch.uint8 and packed.w_group_zero.max() <= 15
    int8_weight = weights.expand(*packed.operands()[:3], packed.w_group_scale, "integer", packed.w_group_zero)
    assert int8_weight.abs().max() <= 127 and torch.equal(int8_weight, int8_weight.round())
    assert _sqnr(w, packed.dequantize()) > 14


def test_dgq_grid_search_lowers_output_error_on_calibration_activations():
    w = _weight(n=64, k=256, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 256, generator=g)
    x[:, 7] *= 30  # an activation outlier channel: the search should protect it
    plain = quantize_weight(w, WeightScheme("int4", 64, "integer", True)).dequantize()
    searched = quantize_weight(w, WeightScheme("int4", 64, "integer", True, "grid"), x).dequantize()
    assert _sqnr(x @ w.t(), x @ searched.t()) > _sqnr(x @ w.t(), x @ plain.t()) + 0.3


def test_lorc_reduces_the_error_and_stores_int8_factors():
    w = _weight(seed=4)
    scheme = WeightScheme("fp4", 32, "power_of_two_ratio")
    without = quantize_weight(w, scheme)
    with_lorc = quantize_weight(w, scheme.replace(lorc_rank=8))
    b, b_scale, a, a_scale = with_lorc.lorc
    assert b.shape == (8, 128) and a.shape == (48, 8) and b.dtype == a.dtype == torch.int8
    assert _sqnr(w, with_lorc.dequantize()) > _sqnr(w, without.dequantize()) + 0.1


def test_lorc_rank_larger_than_the_matrix_is_an_error():
    w = _weight(n=8, k=32)
    with pytest.raises(ConfigError, match="LoRC rank 9 is larger"):
        low_rank_compensation(w, torch.zeros_like(w), 9, "GEMM q_proj")


def test_group_size_that_does_not_divide_k_names_the_layer():
    with pytest.raises(ConfigError, match=r"GEMM model.layers.0.mlp.down_proj: K=576 .* multiple of the weight group "
                                          r"size 128.*32, 64"):
        quantize_weight(torch.zeros(8, 576), WeightScheme("fp4", 128, "power_of_two_ratio"),
                        name="GEMM model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("changes, message", [
    (dict(format="int8"), "4- or 6-bit"),
    (dict(format="fp4", group_size=24, group_scales="power_of_two"), "multiple of 16"),
    (dict(format="fp4", group_size=32, group_scales="none"), "needs group scales"),
    (dict(format="fp4", group_size=32, group_scales="integer"), "not INT4"),
    (dict(format="fp6", group_size=32, group_scales="power_of_two"), "not INT4/FP4"),
    (dict(format="fp4", group_size=32, group_scales="power_of_two", zero_point=True), "zero point"),
    (dict(format="fp4", group_size=32, group_scales="power_of_two", search="grid"), "grid"),
    (dict(format="fp6", lorc_rank=-1), "lorc_rank"),
])
def test_weight_scheme_rejects_combinations_that_make_no_sense(changes, message):
    with pytest.raises(ConfigError, match=message):
        WeightScheme(**changes)


def test_formats_used_here_have_the_documented_ranges():
    assert (FP4_E2M1.max_value, FP6_E3M2.max_value, INT4.max_value, INT8.max_value, FP8_E4M3.max_value) == \
        (6.0, 28.0, 7.0, 127.0, 448.0)
