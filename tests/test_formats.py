"""Number formats: round-trip error bounds, saturation, zero handling, exact grids, packing, power-of-two scales,
per-group shapes, name lookup, and bit-exact agreement with the INT8 kernel formula and torch's float8 casts."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zqhero_fx.errors import ConfigError
from zqhero_fx.formats import (
    FORMATS,
    FP4_E2M1,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    INT4,
    INT8,
    MIN_SCALE,
    Format,
    Granularity,
    Scheme,
    format_of_dtype,
    get_format,
    is_quantized_dtype,
    round_to_float_grid,
)

ALL_FORMATS = list(FORMATS.values())
FLOAT_FORMATS = [f for f in ALL_FORMATS if f.kind == "float"]
FP8_FORMATS = [FP8_E4M3, FP8_E5M2]
PACKED_FORMATS = [INT4, FP4_E2M1]
by_name = pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
examples = settings(deadline=None, max_examples=40)

# Slack for the two float32 roundings (x / scale, then code * scale) around the format's own rounding error.
FLOAT32_SLACK = 4 * 2.0**-24


def even_length(values: torch.Tensor) -> torch.Tensor:
    """Append a zero when needed, so 4-bit formats can pack the last dim."""
    return values if values.shape[-1] % 2 == 0 else torch.cat((values, values.new_zeros(1)))


def min_normal(fmt: Format) -> float:
    return 2.0 ** (1 - fmt.exponent_bias)


def subnormal_step(fmt: Format) -> float:
    return 2.0 ** (1 - fmt.exponent_bias - fmt.mantissa_bits)


def round_trip(fmt: Format, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fmt.dequantize(fmt.quantize(x, scale), scale)


# ---------------------------------------------------------------- round-trip error
@by_name
@examples
@given(data=st.data())
def test_round_trip_error_is_half_a_step(fmt, data):
    codes = data.draw(st.lists(st.floats(-fmt.max_value, fmt.max_value, width=32), min_size=1, max_size=32))
    scale_value = data.draw(st.floats(1e-3, 1e3))
    scale = torch.tensor(scale_value, dtype=torch.float32)
    x = even_length(torch.tensor(codes, dtype=torch.float32) * scale)
    error = (x - round_trip(fmt, x, scale)).abs().double()
    in_code_units = x.abs().double() / scale.double()
    slack = FLOAT32_SLACK * (x.abs().double() + scale.double())
    if fmt.kind == "int":
        bound = scale.double() / 2
    else:
        normal = in_code_units >= min_normal(fmt)
        relative = 2.0 ** -(fmt.mantissa_bits + 1) * x.abs().double()
        absolute = subnormal_step(fmt) / 2 * scale.double()
        bound = torch.where(normal, relative, absolute)
    assert (error <= bound + slack).all(), (x, error, bound)


# ---------------------------------------------------------------- saturation
@by_name
@pytest.mark.parametrize("scale_value", [1.0, 0.37, 1e-6, 250.0])
def test_values_past_the_range_saturate(fmt, scale_value):
    scale = torch.tensor(scale_value)
    limit = fmt.max_value * scale
    x = torch.stack([limit * 1.5, -limit * 1.5, limit * 1e3, -limit * 1e3])
    x = torch.cat((x, torch.tensor([math.inf, -math.inf, 3e38, -3e38])))
    out = round_trip(fmt, x, scale)
    assert out.isfinite().all()
    expected = torch.tensor([1.0, -1.0] * 4) * (torch.tensor(fmt.max_value) * scale)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------- zeros
@by_name
def test_all_zero_inputs_give_zeros_and_finite_scales(fmt):
    zeros = torch.zeros(3, 64)
    q, scale = fmt.quantize_per_token(zeros)
    assert scale.isfinite().all() and (scale >= MIN_SCALE).all()
    assert torch.equal(fmt.dequantize(q, scale), zeros)

    w = torch.zeros(4, 64)
    w[0] = torch.linspace(-1, 1, 64)  # one live channel among zero-range ones
    q, scale = fmt.quantize_per_channel(w)
    assert scale.shape == (4,) and scale.isfinite().all()
    assert torch.equal(fmt.dequantize(q, scale[:, None])[1:], w[1:])

    q, scales = fmt.quantize_per_group(w, group_size=16)
    assert scales.isfinite().all()
    assert torch.equal(fmt.dequantize_per_group(q, scales, group_size=16)[1:], w[1:])


@by_name
def test_scale_for_zero_is_min_scale(fmt):
    assert fmt.scale_for(torch.zeros(2)).tolist() == [pytest.approx(MIN_SCALE)] * 2
    pow2 = fmt.replace(power_of_two_scales=True).scale_for(torch.zeros(1))
    assert pow2.isfinite().all() and pow2.item() >= MIN_SCALE


# ---------------------------------------------------------------- grids
@by_name
def test_grid_values_are_exactly_representable(fmt):
    grid = even_length(fmt.grid())
    one = torch.tensor(1.0)
    assert torch.equal(fmt.round_to_grid(grid), grid)
    assert torch.equal(round_trip(fmt, grid, one), grid)


@by_name
@examples
@given(data=st.data())
def test_random_grid_tensors_round_trip_exactly(fmt, data):
    grid = fmt.grid()
    rows = data.draw(st.integers(1, 4))
    cols = 2 * data.draw(st.integers(1, 8))
    index = torch.tensor(data.draw(st.lists(st.integers(0, len(grid) - 1), min_size=rows * cols, max_size=rows * cols)))
    scale = torch.tensor(2.0 ** data.draw(st.integers(-10, 10)))  # a power of two keeps x / scale exact
    x = grid[index].reshape(rows, cols) * scale
    assert torch.equal(round_trip(fmt, x, scale), x)


@pytest.mark.parametrize(
    "fmt, size, smallest_positive",
    [(INT8, 255, 1.0), (FP8_E4M3, 253, 2.0**-9), (FP8_E5M2, 247, 2.0**-16), (INT4, 15, 1.0), (FP4_E2M1, 15, 0.5),
     (FP6_E3M2, 63, 0.0625)],
    ids=lambda v: v.name if isinstance(v, Format) else None,
)
def test_grid_size_max_and_smallest_value(fmt, size, smallest_positive):
    grid = fmt.grid()
    assert grid.dtype == torch.float32 and len(grid) == size
    assert torch.equal(grid, grid.sort().values) and torch.equal(grid, -grid.flip(0))  # sorted and symmetric
    assert (grid == 0).sum() == 1 and not torch.signbit(grid[grid == 0]).any()
    assert grid.max().item() == fmt.max_value and grid.min().item() == -fmt.max_value
    assert grid[grid > 0].min().item() == smallest_positive


def test_named_maxima_and_fp4_magnitudes():
    assert [f.max_value for f in (INT8, FP8_E4M3, FP8_E5M2, INT4, FP4_E2M1, FP6_E3M2)] == [127, 448, 57344, 7, 6, 28]
    fp4 = FP4_E2M1.grid()
    assert fp4[fp4 >= 0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@by_name
def test_ties_round_to_even(fmt):
    positive = fmt.grid()[fmt.grid() >= 0]  # in code order: code k has value positive[k]
    midpoints = (positive[:-1] + positive[1:]) / 2
    even_neighbour = torch.where(torch.arange(len(midpoints)) % 2 == 0, positive[:-1], positive[1:])
    assert torch.equal(fmt.round_to_grid(midpoints), even_neighbour)
    assert torch.equal(fmt.round_to_grid(-midpoints), -even_neighbour)


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize(
    "fmt, values, expected_bytes",
    [(INT4, [3.0, -2.0], [0xE3]), (FP4_E2M1, [1.0, -0.5], [0x92]), (FP6_E3M2, [28.0, -0.0625], [31, 33])],
    ids=lambda v: v.name if isinstance(v, Format) else None,
)
def test_code_layout(fmt, values, expected_bytes):
    # Element 2i in the low nibble, 2i+1 in the high one; INT4 is two's complement; floats are sign | exp | mantissa.
    q = fmt.quantize(torch.tensor(values), torch.tensor(1.0))
    assert q.dtype == torch.uint8 and q.tolist() == expected_bytes


@pytest.mark.parametrize("fmt", PACKED_FORMATS, ids=lambda f: f.name)
@examples
@given(data=st.data())
def test_packed_formats_use_half_the_bytes(fmt, data):
    rows, cols = data.draw(st.integers(1, 5)), 2 * data.draw(st.integers(1, 16))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 1000))))
    q, scale = fmt.quantize_per_channel(w)
    q8, _ = INT8.quantize_per_channel(w)
    assert q.dtype == torch.uint8 and q.shape == (rows, cols // 2) and fmt.packed_per_byte == 2 and fmt.is_sub_byte
    assert q.nbytes * 2 == q8.nbytes
    assert fmt.dequantize(q, scale[:, None]).shape == (rows, cols)
    assert torch.equal(fmt.quantize(fmt.dequantize(q, scale[:, None]), scale[:, None]), q)


@pytest.mark.parametrize("fmt", PACKED_FORMATS, ids=lambda f: f.name)
def test_odd_last_dim_cannot_pack(fmt):
    with pytest.raises(ConfigError, match="even.*5"):
        fmt.quantize(torch.ones(3, 5), torch.tensor(1.0))


def test_fp6_keeps_one_code_per_byte():
    q = FP6_E3M2.quantize(torch.ones(2, 7), torch.tensor(1.0))
    assert q.dtype == torch.uint8 and q.shape == (2, 7) and q.max() < 64
    assert FP6_E3M2.packed_per_byte == 1 and FP6_E3M2.is_sub_byte and not INT8.is_sub_byte


def test_dequantize_rejects_codes_of_another_dtype():
    with pytest.raises(ConfigError, match="uint8"):
        INT4.dequantize(torch.zeros(4, dtype=torch.int8), torch.tensor(1.0))


# ---------------------------------------------------------------- power-of-two scales
@by_name
@examples
@given(absmax=st.one_of(st.floats(0, 1e6, width=32), st.integers(-20, 20).map(lambda e: 2.0**e)))
def test_power_of_two_scales_are_exact_powers_at_least_the_plain_scale(fmt, absmax):
    absmax = torch.tensor([absmax, absmax * 127.0, absmax * fmt.max_value])
    plain = fmt.scale_for(absmax)
    pow2 = fmt.replace(power_of_two_scales=True).scale_for(absmax)
    mantissa, _ = torch.frexp(pow2)
    assert (mantissa == 0.5).all()
    assert (pow2 >= plain).all() and (pow2 < 2 * plain).all()


# ---------------------------------------------------------------- per-group
def test_per_group_shapes():
    w = torch.randn(8, 128)
    q, scales = INT4.quantize_per_group(w)  # INT4's own group size, 64
    assert q.shape == (8, 64) and q.dtype == torch.uint8 and scales.shape == (8, 2)
    q, scales = FP4_E2M1.quantize_per_group(w)  # FP4's own group size, 32
    assert q.shape == (8, 64) and scales.shape == (8, 4)
    q, scales = INT8.quantize_per_group(w, group_size=16)
    assert q.shape == (8, 128) and q.dtype == torch.int8 and scales.shape == (8, 8)
    assert INT4.dequantize_per_group(*INT4.quantize_per_group(w)).shape == (8, 128)


@by_name
def test_per_group_scales_cover_their_groups(fmt):
    w = torch.randn(4, 96)
    w[:, :32] *= 100  # one loud group must not flatten the quiet ones
    q, scales = fmt.quantize_per_group(w, group_size=32)
    assert torch.equal(scales, fmt.scale_for(w.abs().reshape(4, 3, 32).amax(-1)))
    error = (w - fmt.dequantize_per_group(q, scales, group_size=32)).abs()
    step = 1.0 if fmt.kind == "int" else 2.0 ** -fmt.mantissa_bits * fmt.max_value
    assert (error <= scales.repeat_interleave(32, dim=1) * step / 2 * (1 + 1e-5)).all()


def test_odd_group_size_still_packs_along_k():
    w = torch.randn(2, 6)
    q, scales = INT4.quantize_per_group(w, group_size=3)
    assert q.shape == (2, 3) and scales.shape == (2, 2)
    assert INT4.dequantize_per_group(q, scales, group_size=3).shape == (2, 6)


def test_k_not_a_multiple_of_the_group_size():
    with pytest.raises(ConfigError, match="K=100.*k=64"):
        INT4.quantize_per_group(torch.randn(4, 100))
    with pytest.raises(ConfigError, match="group size"):
        INT8.quantize_per_group(torch.randn(4, 100))  # INT8 has no default group size
    with pytest.raises(ConfigError, match="K=64"):
        INT4.dequantize_per_group(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 3), group_size=32)


# ---------------------------------------------------------------- INT8: bit-exact with the kernels' formula
def int8_formula(x, scale):
    return torch.round(x.float() / scale.float().clamp_min(1e-8)).clamp(-127, 127).to(torch.int8)


@examples
@given(data=st.data())
def test_int8_matches_the_kernel_formula_bit_for_bit(data):
    rows, cols = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 40))
    seed = data.draw(st.integers(0, 10_000))
    magnitude = data.draw(st.sampled_from([1e-9, 1e-3, 1.0, 1e3]))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    x[0, 0] = 0.0

    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    q, s = INT8.quantize_per_token(x)
    assert torch.equal(s, scale) and torch.equal(q, int8_formula(x, scale))
    assert q.is_contiguous() and s.is_contiguous() and s.shape == (rows, 1)

    static = torch.rand(cols, generator=torch.Generator().manual_seed(seed)) * magnitude / 50  # saturates some
    static[0] = 0.0  # a zero scale falls back to MIN_SCALE
    assert torch.equal(INT8.quantize(x, static), int8_formula(x, static))
    assert torch.equal(INT8.scale_for(x.abs().amax(0)), (x.abs().amax(0).float() / 127).clamp_min(1e-8))
    assert torch.equal(INT8.dequantize(q, s, torch.float16), (q.float() * s).to(torch.float16))


def test_int8_outputs_are_contiguous_for_strided_inputs():
    x = torch.randn(8, 6).t()
    q, s = INT8.quantize_per_token(x)
    assert q.is_contiguous() and s.is_contiguous()
    assert INT8.quantize(x, torch.tensor(0.01)).is_contiguous()
    assert INT8.dequantize(q.t(), torch.tensor(0.5)).is_contiguous()


# ---------------------------------------------------------------- floats: agreement with torch's float8 casts
def spread_over_the_range(fmt: Format, n: int = 4096) -> torch.Tensor:
    """Values across every binade of the format, subnormals included, plus the ties between grid neighbours."""
    g = torch.Generator().manual_seed(0)
    lowest, highest = -fmt.exponent_bias - fmt.mantissa_bits - 1, int(math.log2(fmt.max_value))
    exponents = torch.randint(lowest, highest + 1, (n,), generator=g)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = torch.ldexp(torch.rand(n, generator=g) + 1.0, exponents) * signs
    grid = fmt.grid()
    midpoints = (grid[:-1] + grid[1:]) / 2
    return torch.cat((x.clamp(-fmt.max_value, fmt.max_value), midpoints, grid))


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=lambda f: f.name)
def test_fp8_matches_torchs_cast_in_range(fmt):
    x = spread_over_the_range(fmt)
    expected = x.to(fmt.storage_dtype)
    q = fmt.quantize(x, torch.tensor(1.0))
    assert q.dtype == fmt.storage_dtype
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(fmt.round_to_grid(x), expected.float())


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=lambda f: f.name)
def test_generic_float_rounding_matches_torchs_fp8_cast(fmt):
    # The fp4 / fp6 path, run with fp8 parameters, against torch's cast: checks binades, subnormals and ties.
    x = spread_over_the_range(fmt)
    rounded = round_to_float_grid(x, fmt.mantissa_bits, fmt.exponent_bias, fmt.max_value)
    assert torch.equal(rounded, x.to(fmt.storage_dtype).float())


@pytest.mark.parametrize("fmt", [FP4_E2M1, FP6_E3M2], ids=lambda f: f.name)
def test_sub_byte_float_rounding_picks_the_nearest_grid_value(fmt):
    x = spread_over_the_range(fmt)
    grid = fmt.grid()
    distance_to_chosen = (fmt.round_to_grid(x) - x).abs()
    distance_to_nearest = (x[:, None] - grid[None, :]).abs().amin(1)
    assert torch.equal(distance_to_chosen, distance_to_nearest)


def test_nan_handling():
    nan = torch.tensor([math.nan, 1.0])
    one = torch.tensor(1.0)
    for fmt in ALL_FORMATS:
        assert fmt.round_to_grid(nan)[0].isnan()
    for fmt in FP8_FORMATS:  # they have NaN codes
        assert fmt.dequantize(fmt.quantize(nan, one), one)[0].isnan()
    for fmt in (FP4_E2M1, FP6_E3M2):  # no NaN code: stored as 0
        assert fmt.dequantize(fmt.quantize(nan, one), one).tolist() == [0.0, 1.0]


def test_low_precision_inputs_and_output_dtype():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for fmt in ALL_FORMATS:
        q, scale = fmt.quantize_per_token(x)
        assert scale.dtype == torch.float32
        assert fmt.dequantize(q, scale, torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------- names, dtypes, data
def test_get_format_names_and_aliases():
    assert get_format(INT4) is INT4
    for name, fmt in FORMATS.items():
        assert get_format(name) is fmt and get_format(name.upper()) is fmt
    aliases = {"fp8": FP8_E4M3, "e4m3": FP8_E4M3, "E5M2": FP8_E5M2, "fp4": FP4_E2M1, "e2m1": FP4_E2M1,
               "fp6": FP6_E3M2, "e3m2": FP6_E3M2}
    for alias, fmt in aliases.items():
        assert get_format(alias) is fmt


def test_get_format_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="'int3'.*int8.*fp8_e4m3.*fp6_e3m2"):
        get_format("int3")
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        get_format(8)


def test_dtypes():
    assert format_of_dtype(torch.int8) is INT8
    assert format_of_dtype(torch.float8_e4m3fn) is FP8_E4M3
    assert format_of_dtype(torch.float8_e5m2) is FP8_E5M2
    with pytest.raises(ConfigError, match="uint8"):
        format_of_dtype(torch.uint8)
    assert is_quantized_dtype(torch.int8) and is_quantized_dtype(torch.float8_e4m3fn)
    assert is_quantized_dtype(torch.float8_e5m2)
    assert not any(is_quantized_dtype(d) for d in (torch.uint8, torch.float16, torch.bfloat16, torch.float32))


def test_formats_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        INT8.bits = 4
    assert INT4.replace(group_size=128).group_size == 128 and INT4.group_size == 64
    assert INT4.granularity is Granularity.PER_GROUP and FP6_E3M2.granularity is Granularity.PER_CHANNEL
    bad = [
        dict(group_size=0),
        dict(max_value=8.0),
        dict(storage_dtype=torch.int8),
        dict(rounding="stochastic"),
        dict(kind="complex"),
        dict(bits=5),
    ]
    for change in bad:
        with pytest.raises(ConfigError):
            INT4.replace(**change)
    with pytest.raises(ConfigError, match="group_size"):
        INT8.replace(granularity=Granularity.PER_GROUP)
    with pytest.raises(ConfigError, match="mantissa_bits"):
        FP4_E2M1.replace(mantissa_bits=2)


def test_schemes():
    assert str(Scheme.TWQ) == "twq" and Scheme("fwq") is Scheme.FWQ and f"{Scheme.SQ}" == "sq"
