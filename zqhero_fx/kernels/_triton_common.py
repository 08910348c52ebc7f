"""Pieces shared by the zqhero Triton kernels: exact INT8 and FP8 rounding, GeLU, and launcher helpers.

The device functions here reproduce the reference's arithmetic operation by operation where that is cheap (round half
to even like `torch.round`, IEEE division through `div_rn`), so that the Triton interpreter reproduces the references
bit for bit wherever the reference's float math is itself deterministic.

Formats: a kernel learns its quantized format from the element type of the pointer it reads or writes (tl.int8,
tl.float8e4nv = torch.float8_e4m3fn, tl.float8e5 = torch.float8_e5m2), a compile-time constant, so each format is its
own specialisation of one kernel. `quantize_value(v, DTYPE)` is the one place that rounds onto a format's grid.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from zqhero_fx.dispatch import fp8_runs_on

# Globals a @triton.jit function reads must be tl.constexpr instances. QMAX_F / MIN_SCALE_F mirror quantize.QMAX
# and quantize.MIN_SCALE (a test pins them together; importing quantize here would be circular).
QMAX_F = tl.constexpr(127.0)
FP8_E4M3_MAX_F = tl.constexpr(448.0)  # formats.FP8_E4M3.max_value
FP8_E5M2_MAX_F = tl.constexpr(57344.0)  # formats.FP8_E5M2.max_value
MIN_SCALE_F = tl.constexpr(1e-8)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2), as torch's erf GeLU uses it
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi), as torch's tanh GeLU uses it
GELU_TANH_COEFF = tl.constexpr(0.044715)
RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23, see round_half_even

# Activation codes: a tl.constexpr in the GEMM epilogue, so each activation compiles to its own specialisation.
ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4, "quick_gelu": 5}


# torch dtype of a quantized operand -> its Triton element type (what `ptr.dtype.element_ty` says inside a kernel).
TL_QUANT_DTYPES = {torch.int8: tl.int8, torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def interpreting() -> bool:
    """True when `triton.jit` kernels run in the numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(t: torch.Tensor):
    """Launch on `t`'s GPU even when it is not the current device (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def as_rows(t: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int, int]:
    """View `t`, broadcast to `shape`, as a 2-D [rows, shape[-1]] operand: (tensor, stride_row, stride_col).

    Broadcast dimensions keep stride 0, so a [D] per-feature scale, a [1] scalar, a [..., 1] per-row scale or a full
    tensor all become a zero-copy strided view. Only a broadcast pattern that cannot be flattened into one row stride
    (say [B, 1, D] against [B, S, D]) is materialised, which is correct and rare.
    """
    if len(shape) == 0:
        shape = torch.Size((1,))
        t = t.reshape(1)
    cols = shape[-1]
    expanded = t.expand(shape)
    try:
        flat = expanded.view(-1, cols)
    except RuntimeError:
        flat = expanded.reshape(-1, cols)
    return flat, flat.stride(0), flat.stride(1)


def triton_takes_format(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the Triton kernels take quantized operands (or outputs) of this dtype on this device."""
    if dtype == torch.int8:
        return True
    return dtype in FP8_DTYPES and fp8_runs_on(device)


def row_scale_operand(scale: torch.Tensor, rows: int, what: str) -> tuple[torch.Tensor, int]:
    """A scale with one value per row or one for all rows, as (flat tensor, stride); stride 0 broadcasts a scalar."""
    flat = scale.reshape(-1)
    if flat.numel() == 1:
        return flat, 0
    if flat.numel() != rows:
        raise ValueError(f"{what} has {flat.numel()} values; expected 1 or {rows}")
    return flat, flat.stride(0)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row-tile, column-tile) in grouped order: GROUP_M row-tiles sweep the same column-tiles
    together, so the weight tiles they share are still in L2 when the next row-tile asks for them."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def round_half_even(x):
    """torch.round semantics (ties to even) for |x| < 2**22, in two adds that the GPU and the interpreter agree on.

    Adding 1.5 * 2**23 pushes the fraction bits out of the fp32 significand, and the hardware's round-to-nearest-even
    does the rounding; subtracting it back is exact. (floor(x + 0.5) would round ties up, and x + 0.5 itself rounds
    for x just below a half.) Neither MLIR nor LLVM reassociates float adds without fast-math flags, which Triton
    does not set; callers clamp first, so the range condition always holds.
    """
    return (x + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def saturate_round(x, lo, hi):
    """round(x) clamped to [lo, hi], as float. Clamping first is equivalent (rounding is monotone and lo, hi are
    integers), keeps `round_half_even` in range, and stops the compiler contracting a preceding multiply into the
    magic add as an FMA (which would skip the product's own rounding)."""
    return round_half_even(tl.minimum(tl.maximum(x, lo), hi))


@triton.constexpr_function
def format_max(dtype):
    """The largest magnitude a quantized element type holds, a compile-time constant: INT8 127, E4M3 448, E5M2 57344."""
    if dtype == tl.int8:
        return QMAX_F.value
    if dtype == tl.float8e4nv:
        return FP8_E4M3_MAX_F.value
    if dtype == tl.float8e5:
        return FP8_E5M2_MAX_F.value
    raise ValueError(f"no quantized format is stored as {dtype}")


@triton.constexpr_function
def fp8_mantissa_bits(dtype):
    return 3 if dtype == tl.float8e4nv else 2


@triton.constexpr_function
def fp8_min_normal(dtype):
    """The smallest normal value, 2**(1 - bias): E4M3 2**-6, E5M2 2**-14. Below it the grid is evenly spaced."""
    return 2.0**-6 if dtype == tl.float8e4nv else 2.0**-14


@triton.constexpr_function
def fp8_subnormal_quantum(dtype):
    """The spacing of the subnormals, 2**(1 - bias - mantissa_bits): E4M3 2**-9, E5M2 2**-16."""
    return 2.0**-9 if dtype == tl.float8e4nv else 2.0**-16


@triton.constexpr_function
def is_fp8(dtype):
    return dtype == tl.float8e4nv or dtype == tl.float8e5


@triton.constexpr_function
def accumulator_dtype(dtype):
    """tl.dot's accumulator for operands of this element type: exact INT32 for INT8, fp32 for FP8."""
    return tl.int32 if dtype == tl.int8 else tl.float32


@triton.jit
def round_to_fp8_grid(v, DTYPE: tl.constexpr):
    """fp32 `v` -> the nearest value of the FP8 format DTYPE (ties to even, subnormals included), saturated at
    +-max, as an fp32 that the cast to DTYPE then stores exactly. The sign of zero is kept; NaN is left to the caller
    (quantize_value), as the result for a NaN input differs between the GPU's min and the interpreter's.

    This is what torch's `v.clamp(-max, max).to(float8)` computes. The rounding is done here rather than by the cast
    because the interpreter's fp32 -> fp8 cast rounds wrongly at binade boundaries (31.96 -> 16.0 in E4M3); the GPU's
    cvt.rn.satfinite does round correctly, and the integer form costs a few integer ops per element there.
      * normals (|v| >= 2**(1 - bias)): round to nearest even on the fp32 bit pattern, keeping the format's mantissa
        bits, as `cast_rne` does for bf16 (a carry into the exponent is the correct next binade);
      * subnormals: round(|v| / quantum) * quantum with `round_half_even`; the quantum is a power of two, so the
        division (a multiplication by its inverse) and the product are exact.
    """
    MAX_VALUE: tl.constexpr = format_max(DTYPE)
    SHIFT: tl.constexpr = 23 - fp8_mantissa_bits(DTYPE)
    MIN_NORMAL: tl.constexpr = fp8_min_normal(DTYPE)
    QUANTUM: tl.constexpr = fp8_subnormal_quantum(DTYPE)
    INV_QUANTUM: tl.constexpr = 1.0 / QUANTUM
    HALF_MINUS_ONE: tl.constexpr = (1 << (SHIFT - 1)) - 1
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    magnitude = tl.minimum(tl.abs(v), MAX_VALUE)
    bits = magnitude.to(tl.uint32, bitcast=True)
    bits = bits + HALF_MINUS_ONE + ((bits >> SHIFT) & 1)
    normal = ((bits >> SHIFT) << SHIFT).to(tl.float32, bitcast=True)
    # Only used below MIN_NORMAL, where magnitude * INV_QUANTUM < 2**mantissa_bits: round_half_even's range holds.
    subnormal = round_half_even(magnitude * INV_QUANTUM) * QUANTUM
    magnitude = tl.where(magnitude < MIN_NORMAL, subnormal, normal)
    return (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quantize_value(v, DTYPE: tl.constexpr):
    """fp32 values already divided by their scale -> codes of the quantized element type DTYPE, rounded to nearest
    even and saturated: INT8 round(v).clamp(-127, 127); FP8 the format's nearest value (round_to_fp8_grid).

    FP8 NaN is stored as torch stores it, 0x7F with v's sign bit (both formats), from its bit pattern: the interpreter's
    cast would give 0x7C (448) in E4M3."""
    if DTYPE == tl.int8:
        return saturate_round(v, -QMAX_F, QMAX_F).to(tl.int8)
    else:
        nan_code = (((v.to(tl.uint32, bitcast=True) >> 24) & 0x80) | 0x7F).to(tl.uint8).to(DTYPE, bitcast=True)
        return tl.where(v != v, nan_code, round_to_fp8_grid(v, DTYPE).to(DTYPE))


@triton.jit
def quantize_to(x, scale, DTYPE: tl.constexpr):
    """The reference's quantize: x / scale with IEEE division (div_rn), rounded onto DTYPE's grid; bit-exact."""
    return quantize_value(tl.math.div_rn(x, scale), DTYPE)


@triton.jit
def quantize_by_reciprocal(x, inv_scale, DTYPE: tl.constexpr):
    """x * (1 / scale) onto DTYPE's grid: cheaper than an IEEE division per element, for ALU-heavy kernels whose
    input is not bit-exact against the reference anyway; differs from quantize_to(x, scale) by at most one grid step
    where x / scale sits within an ulp of a rounding boundary."""
    return quantize_value(x * inv_scale, DTYPE)


@triton.jit
def per_token_scale(absmax, DTYPE: tl.constexpr):
    """The reference's TWQ scale: max(absmax / max_value, MIN_SCALE), with IEEE division."""
    return tl.maximum(tl.math.div_rn(absmax, format_max(DTYPE)), MIN_SCALE_F)


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even, as torch's .to() does.

    bfloat16 is rounded with integer arithmetic on the fp32 bits: the interpreter's own fp32 -> bf16 cast truncates,
    and this form gives the same bits on the GPU (where it costs a few integer ops in an epilogue) and in the
    interpreter, so the tests check the code the GPU runs.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def gelu_erf(x):
    """torch.nn.functional.gelu(x) (erf form), in torch's operation order."""
    return x * 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))


@triton.jit
def gelu_tanh(x):
    """gelu(x, approximate='tanh'), with tanh(u) = 1 - 2 / (exp(2u) + 1): tl has no tanh that also runs in the
    interpreter. |u| is capped at 10, where fp32 tanh is already exactly +-1, so exp never overflows."""
    inner = SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x)
    inner = tl.minimum(tl.maximum(inner, -10.0), 10.0)
    tanh_inner = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    return 0.5 * x * (1.0 + tanh_inner)


@triton.jit
def epilogue_activation(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        y = gelu_erf(y)
    elif ACTIVATION == 2:
        y = gelu_tanh(y)
    elif ACTIVATION == 3:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == 4:
        y = y / (1.0 + tl.exp(-y))  # SiLU, as torch writes it: x * sigmoid(x) = x / (1 + exp(-x))
    elif ACTIVATION == 5:
        y = y / (1.0 + tl.exp(-1.702 * y))  # quick_gelu: x * sigmoid(1.702 x)
    return y
