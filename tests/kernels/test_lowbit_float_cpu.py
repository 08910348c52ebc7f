"""lowbit_float_cpu: packed_linear's FP6 "4+2" weight-only and W4A8 (FP8 x FP4 / INT4, power-of-two group scales) CPU
kernel against packed_linear_ref.

Tolerance. Every decoded weight (E3M2 / E2M1 / INT4 code values times 2**e) and every activation widened to float32
(float32, bfloat16, float16, FP8) is exact in float32, so the kernel forms exactly the products the reference's float32
matmul forms; the two differ only in the order their float32 sums are taken. That error is at most about
K * 2**-24 * sum_k |x_k w_k| and in practice ~sqrt(K) * 2**-24 of it (<= 2e-6 of it at K = 1536 here), so the
accumulators are compared elementwise to 1e-5 of that magnitude, `magnitude` below. A single misdecoded code moves one
term by at least 1/16 of its size, on the order of 1/K of the magnitude (>= 4e-5 at K = 1536): caught. Where one
product per output makes the sum exact (one-hot x), the kernel must equal the reference bit for bit.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch

from tests.kernels.kernel_checks import assert_quantized_close
from zqhero_fx import dispatch, weights
from zqhero_fx.kernels import lowbit_float_cpu as LBF
from zqhero_fx.kernels import vnni_cpu
from zqhero_fx.kernels.packed_linear import packed_linear_ref

needs_kernel = pytest.mark.skipif(not LBF.available(),
                                  reason="no AVX-512 F/BW on this CPU, or the FP6 / FP4 kernel did not build")

SUM_ORDER_TOL = 1e-5  # of sum_k |x_k w_k| (module docstring)


# ---------------------------------------------------------------- operands
def fp6_operands(m, k, n, seed, *, x_dtype=torch.float32, lead=None, **epilogue):
    """Weight-only FP6: codes drawn from all 64 (subnormals, -0 and the largest included)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=g)
    x = torch.randn((*(lead or (m,)), k), generator=g).to(x_dtype)
    w_scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    return finish(g, [x, None, weights.pack_fp6(codes), "fp6_e3m2", 0, w_scale, None, "none", None], n, **epilogue)


def w4a8_operands(m, k, n, seed, *, w_format="fp4_e2m1", group_size=64, x_scale="token", x_dtype=torch.float8_e4m3fn,
                  lead=None, **epilogue):
    """W4A8: all 16 codes, group exponents in [-9, 0] (the quantizer's range), FP8 x over its whole range."""
    g = torch.Generator().manual_seed(seed)
    lead = lead or (m,)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    groups = k // group_size if group_size else 1
    exponent = torch.randint(-9, 1, (n, groups), dtype=torch.int8, generator=g)
    x = (torch.randn((*lead, k), generator=g) * 40).to(x_dtype)
    xs = torch.rand((*lead, 1) if x_scale == "token" else (1,), generator=g) * 0.02 + 1e-3
    w_scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    return finish(g, [x, xs, [weights.pack_nibbles(codes)], w_format, group_size, w_scale, exponent, "exponent", None],
                  n, **epilogue)


def finish(g, head, n, *, lorc_rank=0, bias=False, residual=False, out_scale=False, activation="none",
           out_dtype=torch.float32):
    """Appends lorc, bias, residual, out_scale, activation, out_dtype to the first nine operands."""
    x, k = head[0], head[0].shape[-1]
    lorc = []
    if lorc_rank:
        lorc = [torch.randint(-127, 128, (lorc_rank, k), dtype=torch.int8, generator=g),
                torch.rand(lorc_rank, generator=g) * 1e-3,
                torch.randint(-127, 128, (n, lorc_rank), dtype=torch.int8, generator=g),
                torch.rand(n, generator=g) * 1e-3]
    b = torch.randn(n, generator=g) if bias else None
    r = torch.randn((*x.shape[:-1], n), generator=g) if residual else None
    os_ = torch.rand(n, generator=g) * 0.02 + 0.005 if out_scale else None
    return [*head, lorc, b, r, os_, activation, out_dtype]


def accumulator_inputs(args):
    """(x as float32 [M, K], the weight f * v [N, K], the per-row and per-channel scales) of the operands."""
    x, x_scale, codes, fmt, group_size, w_scale, w_group_scale, kind, zero = args[:9]
    x2 = x.reshape(-1, x.shape[-1]).float()
    w = weights.expand(codes, fmt, group_size, w_group_scale, kind, zero)
    rows = x_scale.float().reshape(-1, 1) if x_scale is not None else torch.ones(1, 1)
    return x2, w, rows, w_scale.float()


def magnitude(args):
    """sum_k |x_k w_k| of every output, scaled as the output is (float64)."""
    x2, w, rows, cols = accumulator_inputs(args)
    return (x2.double().abs() @ w.double().abs().t()) * rows.double() * cols.double()


def assert_sum_order_close(got, args):
    expected = packed_linear_ref(*args)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    bound = SUM_ORDER_TOL * magnitude(args).reshape(got.shape) + 1e-30
    err = (got.double() - expected.double()).abs()
    assert bool((err <= bound).all()), f"max error / magnitude = {float((err / bound).max()) * SUM_ORDER_TOL:.2e}"


def group_sizes_of(k):
    return [g for g in (16, 32, 64, 128) if k % g == 0]


# ---------------------------------------------------------------- accuracy
M_ROWS = [1, 3, 17, 130]  # both the few-rows and the panel path, odd tails everywhere
K_FEATURES = [64, 192, 576, 1536]  # 576: FP6's last 128-feature chunk is half full
N_CHANNELS = [40, 200, 576]  # one partial 96-channel panel, two and a partial one, six whole ones


@needs_kernel
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", list(itertools.product(M_ROWS, K_FEATURES, N_CHANNELS)))
def test_fp6_weight_only(m, k, n, x_dtype):
    args = fp6_operands(m, k, n, seed=m * k + n, x_dtype=x_dtype)
    assert LBF.takes(*args)
    assert_sum_order_close(LBF.run(*args), args)


@needs_kernel
@pytest.mark.parametrize("m", [2, 31])
def test_fp6_float16_activations(m):
    args = fp6_operands(m, 192, 40, seed=m, x_dtype=torch.float16)
    assert_sum_order_close(LBF.run(*args), args)


W4A8_CASES = [(m, k, n, fmt, gs, "token" if (m + gs) % 2 else "scalar")
              for m, k, n in itertools.product(M_ROWS, K_FEATURES, N_CHANNELS)
              for fmt in ("fp4_e2m1", "int4") for gs in group_sizes_of(k)]


@needs_kernel
@pytest.mark.parametrize("m,k,n,w_format,group_size,x_scale", W4A8_CASES)
def test_w4a8(m, k, n, w_format, group_size, x_scale):
    args = w4a8_operands(m, k, n, seed=m + k + n + group_size, w_format=w_format, group_size=group_size,
                         x_scale=x_scale)
    assert LBF.takes(*args)
    assert_sum_order_close(LBF.run(*args), args)


@needs_kernel
@pytest.mark.parametrize("m", [1, 20])
def test_w4a8_one_group_per_row_and_e5m2(m):
    for group_size, x_dtype in ((0, torch.float8_e4m3fn), (64, torch.float8_e5m2), (192, torch.float8_e4m3fn)):
        args = w4a8_operands(m, 384, 72, seed=group_size + m, group_size=group_size, x_dtype=x_dtype)
        assert LBF.takes(*args)
        assert_sum_order_close(LBF.run(*args), args)


@needs_kernel
@pytest.mark.parametrize("m", [5, 64])  # the few-rows path, then the panel path
def test_every_code_decodes_exactly(m):
    """One-hot rows of x pick single weights: one product per output, so the sum is exact and must match bit for bit
    (every FP6 code incl. subnormals and -0; every FP4 / INT4 code under every exponent in [-9, 0])."""
    k = 128
    codes6 = (torch.arange(2 * 64 * k) % 64).reshape(2 * 64, k).to(torch.uint8)  # every code in every feature slot
    x = torch.zeros(m, k)
    x[torch.arange(m), (torch.arange(m) * 37) % k] = torch.linspace(-3, 3, m)
    fp6 = [x, None, weights.pack_fp6(codes6), "fp6_e3m2", 0, torch.ones(2 * 64), None, "none", None, [], None, None,
           None, "none", torch.float32]
    assert torch.equal(LBF.run(*fp6), packed_linear_ref(*fp6))
    codes4 = (torch.arange(10 * 16 * k) % 16).reshape(10 * 16, k).to(torch.uint8)
    exponent = (-(torch.arange(10 * 16) // 16)).to(torch.int8).reshape(-1, 1).repeat(1, k // 16)  # 0 .. -9
    x8 = x.to(torch.float8_e4m3fn)
    for fmt in ("fp4_e2m1", "int4"):
        w4 = [x8, torch.ones(1), [weights.pack_nibbles(codes4)], fmt, 16, torch.ones(10 * 16), exponent, "exponent",
              None, [], None, None, None, "none", torch.float32]
        assert torch.equal(LBF.run(*w4), packed_linear_ref(*w4))


# ---------------------------------------------------------------- the epilogue
@needs_kernel
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh", "relu", "silu", "quick_gelu"])
@pytest.mark.parametrize("m", [3, 17])
def test_epilogue_bias_activation_residual(m, activation):
    """The epilogue is the shared helper on the accumulator; |act'| <= 1.13 keeps the accumulator's bound (x 2)."""
    for args in (fp6_operands(m, 192, 40, seed=m, bias=True, residual=True, activation=activation),
                 w4a8_operands(m, 192, 40, seed=m, bias=True, residual=True, activation=activation)):
        expected = packed_linear_ref(*args)
        bound = 2 * SUM_ORDER_TOL * magnitude(args) + 1e-6 * expected.abs() + 1e-30
        assert bool(((LBF.run(*args).double() - expected.double()).abs() <= bound).all())


@needs_kernel
@pytest.mark.parametrize("m", [4, 130])
def test_lorc_and_output_dtypes(m):
    for make in (fp6_operands, w4a8_operands):
        args = make(m, 576, 40, seed=m, lorc_rank=8, bias=True)
        expected = packed_linear_ref(*args)  # LoRC's side GEMM is the shared helper's: only acc differs
        bound = SUM_ORDER_TOL * magnitude(args) + 1e-6 * expected.abs() + 1e-30
        assert bool(((LBF.run(*args).double() - expected.double()).abs() <= bound).all())
        bf16 = make(m, 576, 40, seed=m, out_dtype=torch.bfloat16)  # at most one bf16 step apart (2**-7 relative)
        torch.testing.assert_close(LBF.run(*bf16), packed_linear_ref(*bf16), rtol=2**-7, atol=1e-6)
        for out_dtype in (torch.int8, torch.float8_e4m3fn):  # a sum near a rounding edge may land one step over
            quantized = make(m, 576, 40, seed=m, out_scale=True, activation="gelu", out_dtype=out_dtype)
            assert_quantized_close(LBF.run(*quantized), packed_linear_ref(*quantized))


@needs_kernel
@pytest.mark.parametrize("lead", [(2, 3), (1, 17), (2, 0)])
def test_three_dimensional_x(lead):
    for args in (fp6_operands(0, 192, 40, seed=7, lead=lead, residual=True),
                 w4a8_operands(0, 192, 40, seed=7, lead=lead, residual=True)):
        got = LBF.run(*args)
        assert got.shape == (*lead, 40)
        assert_sum_order_close(got, args)


@needs_kernel
def test_non_contiguous_operands():
    args = fp6_operands(6, 256, 40, seed=3)
    x, lo, hi = args[0], *args[2]
    args[0] = torch.cat([x, x], dim=-1)[:, ::2]  # a strided view of the same values
    args[2] = [torch.cat([lo, lo], dim=0)[::2], hi.t().contiguous().t()]
    assert LBF.takes(*args)
    assert_sum_order_close(LBF.run(*args), args)


# ---------------------------------------------------------------- which operands it takes, dispatch
def test_takes_only_the_float_unpack_operands():
    fp6 = fp6_operands(3, 128, 8, seed=1)
    w4 = w4a8_operands(3, 128, 8, seed=2, group_size=32)
    assert LBF.takes(*fp6) and LBF.takes(*w4)
    x, xs, codes, fmt, gs, ws, exponent, kind, zero, *rest = w4
    g = torch.Generator().manual_seed(3)
    int8_dgq = (torch.randint(-127, 128, x.shape, dtype=torch.int8, generator=g), xs, codes, "int4", gs, ws,
                torch.ones_like(exponent), "integer", torch.full_like(exponent, 8, dtype=torch.uint8), *rest)
    float_x_4bit = (x.float(), None, codes, fmt, gs, ws, exponent, kind, zero, *rest)
    fp8_x_fp6 = (x, xs, *fp6[2:])
    integer_groups = (x, xs, codes, fmt, gs, ws, exponent, "integer", zero, *rest)
    with_zero = (x, xs, codes, "int4", gs, ws, exponent, kind, torch.zeros_like(exponent, dtype=torch.uint8), *rest)
    groups_of_48 = w4a8_operands(3, 192, 8, seed=4, group_size=48)
    groups_of_8 = (x, xs, codes, fmt, 8, ws, exponent.repeat(1, 4), kind, zero, *rest)
    k_of_96 = w4a8_operands(3, 96, 8, seed=5, group_size=32)  # not whole 64-feature chunks
    wrong_shape = (x, xs, [codes[0][:, :-1]], fmt, gs, ws, exponent, kind, zero, *rest)
    for other in (int8_dgq, float_x_4bit, fp8_x_fp6, integer_groups, with_zero, groups_of_48, groups_of_8, k_of_96,
                  wrong_shape):
        assert not LBF.takes(*other)


@needs_kernel
@pytest.mark.parametrize("m", [1, 130])
def test_dispatch_selects_the_cpu_kernel(m):
    from zqhero_fx.kernels import packed_linear

    for args in (fp6_operands(m, 576, 40, seed=9, activation="gelu"), w4a8_operands(m, 576, 40, seed=9, bias=True)):
        with dispatch.use_kernels("auto"):
            label, _ = dispatch.select("packed_linear", *args)
            got = torch.ops.zqhero.packed_linear(*args)
        assert label == "cpu" and packed_linear._cpu_kernel(*args) is LBF
        assert torch.equal(got, LBF.run(*args))


@needs_kernel
def test_empty_rows():
    assert LBF.run(*fp6_operands(0, 64, 40, seed=1)).shape == (0, 40)
    assert LBF.run(*w4a8_operands(0, 64, 40, seed=1)).shape == (0, 40)


# ---------------------------------------------------------------- the build
def test_source_is_package_data_and_named_by_its_hash(tmp_path, monkeypatch):
    assert LBF.CPP_PATH.is_file() and "PYBIND11_MODULE(TORCH_EXTENSION_NAME" in LBF.CPP_PATH.read_text()
    assert "kernels/csrc/*.cpp" in (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    name = LBF.extension_name()
    assert name.startswith("zqhero_lowbit_float_cpu_") and name.isidentifier() and name != vnni_cpu.extension_name()
    edited = tmp_path / "lowbit_float_cpu.cpp"
    edited.write_text(LBF.CPP_PATH.read_text() + "\n// edited\n")
    monkeypatch.setattr(LBF, "CPP_PATH", edited)
    assert LBF.extension_name() != name  # an edited .cpp never loads the stale cached build


@pytest.mark.skipif(not LBF.cpu_supports_kernel(), reason="the CPU lacks AVX-512 F/BW")
def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def no_compiler():
        raise OSError("no compiler here")

    monkeypatch.setattr(vnni_cpu, "_import_cpp_extension", no_compiler)
    LBF.extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not LBF.available() and not LBF.available()
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "FP6 / FP4" in messages[0] and "no compiler here" in messages[0]
        args = fp6_operands(3, 64, 8, seed=1)
        with dispatch.use_kernels("auto"):
            assert dispatch.select("packed_linear", *args)[0] == "reference"
    finally:
        LBF.extension.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("ZQHERO_CPU_LOWBIT", "0")
    LBF.extension.cache_clear()
    try:
        assert not LBF.available()
    finally:
        monkeypatch.delenv("ZQHERO_CPU_LOWBIT")
        LBF.extension.cache_clear()
