"""The A8W4 (DGQ) CPU kernel of zqhero::packed_linear: bit-exact to packed_linear_ref (the INT8 accumulation is exact
and the epilogue is the shared one) on decode (M <= 4) and prefill shapes, every group layout and epilogue, and the
one dispatch picks for these operands on the CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zqhero_fx import dispatch, weights
from zqhero_fx.formats import FP8_E4M3
from zqhero_fx.kernels import a8w4_cpu as A8W4
from zqhero_fx.kernels import packed_linear, vnni_cpu
from zqhero_fx.kernels.packed_linear import packed_linear_ref

needs_kernel = pytest.mark.skipif(not A8W4.available(), reason="no AVX-512 VNNI on this CPU, or the build failed")

ACTIVATIONS = ["none", "gelu", "gelu_tanh", "relu", "silu", "quick_gelu"]


def dgq_weight(n, k, group_size, g, *, wide=False, zero_high=15):
    """Random DGQ operands: codes 0..15, zero points 0..zero_high, integer scales S2 >= 1 with |S2 (q - z)| <= 127.
    wide: scales up to 127 with the codes clamped to the zero point's reach (as the quantizer does), so S2 * q can
    leave INT8 where S2 (q - z) does not."""
    groups = k // (group_size or k)
    zero = torch.randint(0, zero_high + 1, (n, groups), generator=g, dtype=torch.uint8)
    if wide:  # capped where z > 15, so that some code lies within z's reach
        scale = torch.minimum(torch.randint(1, 128, (n, groups), generator=g), 127 // (zero.int() - 15).clamp(min=1))
    else:
        span = torch.maximum(zero.int(), 15 - zero.int()).clamp(min=1)  # |q - z| at most, any code q
        scale = 1 + (torch.rand(n, groups, generator=g) * (127 // span)).int()
    codes = torch.randint(0, 16, (n, k), generator=g)
    reach = 127 // scale
    low = weights.per_column((zero.int() - reach).clamp(min=0), group_size, k)
    high = weights.per_column((zero.int() + reach).clamp(max=15), group_size, k)
    codes = torch.minimum(torch.maximum(codes, low), high)
    return weights.pack_nibbles(codes.to(torch.uint8)), scale.to(torch.int8), zero


def operands(m, k, n, group_size, seed, *, lead=None, x_scale="token", bias=True, residual=False,
             out_dtype=torch.float32, out_scale=None, activation="none", lorc_rank=0, wide=False, zero_high=15,
             x_extreme=None):
    """packed_linear's 15 arguments for an A8W4 GEMM."""
    g = torch.Generator().manual_seed(seed)
    lead = lead or (m,)
    codes, scale, zero = dgq_weight(n, k, group_size, g, wide=wide, zero_high=zero_high)
    x = torch.randint(-128, 128, (*lead, k), generator=g, dtype=torch.int8)
    if x_extreme is not None:
        x.fill_(x_extreme)
    xs = torch.rand((*lead, 1), generator=g) * 0.01 + 1e-4 if x_scale == "token" else torch.rand(1, generator=g) * 0.01
    ws = torch.rand(n, generator=g) * 0.01 + 1e-4
    lorc = []
    if lorc_rank:
        lorc = [torch.randint(-127, 128, (lorc_rank, k), generator=g, dtype=torch.int8),
                torch.rand(lorc_rank, generator=g) * 1e-3,
                torch.randint(-127, 128, (n, lorc_rank), generator=g, dtype=torch.int8),
                torch.rand(n, generator=g) * 1e-3]
    b = torch.randn(n, generator=g) if bias else None
    residual_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    r = torch.randn((*lead, n), generator=g).to(residual_dtype) if residual else None
    os_ = None
    if out_scale == "channel":
        os_ = torch.rand(n, generator=g) * 0.02 + 0.01
    elif out_scale == "scalar":
        os_ = torch.rand(1, generator=g) * 0.02 + 0.01
    return (x, xs, [codes], "int4", group_size, ws, scale, "integer", zero, lorc, b, r, os_, activation, out_dtype)


def assert_exact(args):
    expected = packed_linear_ref(*args)
    got = A8W4.run(*args)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                       expected.view(torch.uint8) if expected.dtype.itemsize == 1 else expected)


def group_sizes(k):
    return [gs for gs in (16, 32, 64, 128) if k % gs == 0]


# ---------------------------------------------------------------- shapes and group layouts
@needs_kernel
@pytest.mark.parametrize("k,group_size", [(k, gs) for k in (64, 192, 576, 1536) for gs in group_sizes(k)])
@pytest.mark.parametrize("n", [40, 576])
@pytest.mark.parametrize("m", [1, 3, 17, 130])  # decode (M <= 4) and prefill, with row tails of the register tiles
def test_bit_exact_to_the_reference(m, k, n, group_size):
    assert_exact(operands(m, k, n, group_size, seed=m * 7 + k + n + group_size))


@needs_kernel
@pytest.mark.parametrize("m", [2, 4, 5, 6, 7, 8, 9])  # every decode tile shape; prefill row tails
@pytest.mark.parametrize("k,group_size", [(48, 16), (80, 16), (144, 48), (576, 0), (1040, 16), (1280, 80), (2112, 48),
                                          (4096, 64)])
def test_tails_and_uneven_groups(m, k, group_size):
    """K not a multiple of 64 or 128 (partial chunks), groups of 48 and 80 features (a chunk's lanes span groups at
    uneven offsets), one group per row (group_size 0), K in two prefill blocks (2112, 4096), N not a multiple of any
    tile."""
    assert_exact(operands(m, k, 37, group_size, seed=m + k + group_size))


@needs_kernel
@pytest.mark.parametrize("m", [1, 4, 8, 12, 130])
def test_wide_scales_and_high_zero_points(m):
    """S2 up to 127 with the codes clamped to their zero point's reach (S2 * code alone leaves INT8, so the decode
    path's int32 partial sums wrap before the zero point comes off), and zero points past 15 (S2 (q - z) is then
    negative throughout but still INT8)."""
    assert_exact(operands(m, 576, 70, 64, seed=1 + m, wide=True))
    assert_exact(operands(m, 192, 70, 32, seed=2 + m, zero_high=100, wide=True))


@needs_kernel
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("x_extreme", [-128, 127])
@pytest.mark.parametrize("low_code", [0, 14])
def test_extreme_products_do_not_overflow(m, x_extreme, low_code):
    """x at -128 / 127 everywhere against weights at +-127 (S2 = 127, each code one off its zero point): the largest
    int32 sums (127 * 128 * 4096), the +128 shift on the expanded weight (bytes 1 and 255), and with codes 14 / 15 the
    largest vpmaddubsw pair sums (2 * 15 * 128)."""
    n, k, group_size = 33, 4096, 128
    args = list(operands(m, k, n, group_size, seed=3, x_extreme=x_extreme))
    zero = (low_code + torch.arange(n * (k // group_size)) % 2).reshape(n, -1).to(torch.uint8)
    # S2 (q - z) = +127 where z = low_code, -127 where z = low_code + 1
    codes = 2 * low_code + 1 - weights.per_column(zero.int(), group_size, k)
    args[2] = [weights.pack_nibbles(codes.to(torch.uint8))]
    args[6], args[8] = torch.full_like(zero, 127).view(torch.int8), zero
    assert weights.expand(args[2], "int4", group_size, args[6], "integer", zero).abs().eq(127).all()
    assert_exact(tuple(args))


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), k16=st.integers(1, 40), n=st.integers(1, 90), groups=st.integers(0, 6),
       seed=st.integers(0, 2**16))
def test_random_shapes(m, k16, n, groups, seed):
    k = 16 * k16
    # a group size that divides K and is a multiple of 16 (0: one group per row)
    group_size = 0 if groups == 0 else next((16 * d for d in range(groups, 0, -1) if k16 % d == 0), 16)
    assert_exact(operands(m, k, n, group_size, seed, bias=seed % 2 == 0))


# ---------------------------------------------------------------- the epilogue
@needs_kernel
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("x_scale", ["token", "scalar"])
def test_epilogue_scales_bias_activation(m, activation, x_scale):
    assert_exact(operands(m, 192, 48, 32, seed=5, x_scale=x_scale, activation=activation))
    assert_exact(operands(m, 192, 48, 32, seed=6, x_scale=x_scale, activation=activation, bias=False))


@needs_kernel
@pytest.mark.parametrize("m", [1, 20])
def test_epilogue_residual_lorc_and_outputs(m):
    assert_exact(operands(m, 576, 40, 64, seed=7, residual=True, activation="silu"))
    assert_exact(operands(m, 576, 40, 64, seed=8, lorc_rank=8, activation="gelu"))
    assert_exact(operands(m, 576, 40, 64, seed=9, lorc_rank=4, residual=True, x_scale="scalar"))
    assert_exact(operands(m, 576, 40, 64, seed=10, out_dtype=torch.bfloat16, residual=True))
    assert_exact(operands(m, 576, 40, 64, seed=11, out_dtype=torch.int8, out_scale="channel"))
    assert_exact(operands(m, 576, 40, 64, seed=12, out_dtype=torch.int8, out_scale="scalar", activation="relu"))
    assert_exact(operands(m, 576, 40, 64, seed=13, out_dtype=torch.float8_e4m3fn, out_scale="channel"))


@needs_kernel
@pytest.mark.parametrize("lead", [(2, 3), (1, 130), (4, 1)])
def test_three_dimensional_x(lead):
    args = operands(0, 192, 40, 64, seed=14, lead=lead, residual=True)
    assert_exact(args)
    assert A8W4.run(*args).shape == (*lead, 40)


@needs_kernel
def test_non_contiguous_operands():
    args = list(operands(5, 192, 40, 32, seed=15))
    args[0] = torch.cat([args[0], args[0]], dim=-1)[:, :192]  # rows with a stride of 384
    args[2] = [torch.cat([args[2][0], args[2][0]], dim=0)[::2]]
    assert not args[0].is_contiguous() and not args[2][0].is_contiguous()
    assert_exact(tuple(args))


@needs_kernel
def test_empty_rows():
    args = operands(0, 64, 40, 16, seed=16, lead=(0,))
    assert A8W4.run(*args).shape == (0, 40)


# ---------------------------------------------------------------- which operands it takes, dispatch
def test_takes_only_a8w4_operands():
    args = operands(3, 64, 8, 16, seed=17)
    assert A8W4.takes(*args)
    x, xs, codes, fmt, gs, ws, scale, kind, zero, *rest = args
    float_x = (x.float(), None, codes, fmt, gs, ws, scale, kind, zero, *rest)
    fp8_x = (*FP8_E4M3.quantize_per_token(x.float()), codes, fmt, gs, ws, scale, kind, zero, *rest)
    exponent = (x, xs, codes, fmt, gs, ws, scale, "exponent", None, *rest)
    no_zero = (x, xs, codes, fmt, gs, ws, scale, kind, None, *rest)
    fp4 = (x, xs, codes, "fp4_e2m1", gs, ws, scale, kind, zero, *rest)
    no_scales = (x, xs, codes, fmt, gs, ws, None, "none", None, *rest)
    groups_of_8 = (x, xs, codes, fmt, 8, ws, scale.repeat(1, 2), kind, zero.repeat(1, 2), *rest)
    for other in (float_x, fp8_x, exponent, no_zero, fp4, no_scales, groups_of_8):
        assert not A8W4.takes(*other)


@needs_kernel
@pytest.mark.parametrize("m", [1, 130])
def test_dispatch_selects_the_cpu_kernel(m):
    args = operands(m, 576, 40, 64, seed=18, activation="gelu")
    with dispatch.use_kernels("auto"):
        label, _ = dispatch.select("packed_linear", *args)
        got = torch.ops.zqhero.packed_linear(*args)
    assert label == "cpu" and packed_linear._cpu_kernel(*args) is A8W4
    assert torch.equal(got, packed_linear_ref(*args))


# ---------------------------------------------------------------- the build
def test_source_is_package_data_and_named_by_its_hash(tmp_path, monkeypatch):
    assert A8W4.CPP_PATH.is_file() and "PYBIND11_MODULE(TORCH_EXTENSION_NAME" in A8W4.CPP_PATH.read_text()
    assert "kernels/csrc/*.cpp" in (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    name = A8W4.extension_name()
    assert name.startswith("zqhero_a8w4_cpu_") and name.isidentifier() and name != vnni_cpu.extension_name()
    edited = tmp_path / "a8w4_cpu.cpp"
    edited.write_text(A8W4.CPP_PATH.read_text() + "\n// edited\n")
    monkeypatch.setattr(A8W4, "CPP_PATH", edited)
    assert A8W4.extension_name() != name  # an edited .cpp never loads the stale cached build


@pytest.mark.skipif(not vnni_cpu.cpu_has_vnni(), reason="the CPU lacks AVX-512 VNNI")
def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def no_compiler():
        raise OSError("no compiler here")

    monkeypatch.setattr(vnni_cpu, "_import_cpp_extension", no_compiler)
    A8W4.extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not A8W4.available() and not A8W4.available()
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "A8W4" in messages[0] and "no compiler here" in messages[0]
    finally:
        A8W4.extension.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("ZQHERO_CPU_VNNI", "0")
    A8W4.extension.cache_clear()
    try:
        assert not A8W4.available()
    finally:
        monkeypatch.delenv("ZQHERO_CPU_VNNI")
        A8W4.extension.cache_clear()
