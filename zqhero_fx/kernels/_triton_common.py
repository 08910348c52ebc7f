"""Pieces shared by the zqhero Triton kernels: exact INT8 rounding, GeLU, and launcher helpers.

The device functions here reproduce the reference's arithmetic operation by operation where that is cheap (round half
to even like `torch.round`, IEEE division through `div_rn`), so that the Triton interpreter reproduces the references
bit for bit wherever the reference's float math is itself deterministic.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Globals a @triton.jit function reads must be tl.constexpr instances. QMAX_F / MIN_SCALE_F mirror quantize.QMAX
# and quantize.MIN_SCALE (a test pins them together; importing quantize here would be circular).
QMAX_F = tl.constexpr(127.0)
MIN_SCALE_F = tl.constexpr(1e-8)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2), as torch's erf GeLU uses it
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi), as torch's tanh GeLU uses it
GELU_TANH_COEFF = tl.constexpr(0.044715)
RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23, see round_half_even

# Activation codes: a tl.constexpr in the GEMM epilogue, so each activation compiles to its own specialisation.
ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2}


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


def row_scale_operand(scale: torch.Tensor, rows: int, what: str) -> tuple[torch.Tensor, int]:
    """A scale with one value per row or one for all rows, as (flat tensor, stride); stride 0 broadcasts a scalar."""
    flat = scale.reshape(-1)
    if flat.numel() == 1:
        return flat, 0
    if flat.numel() != rows:
        raise ValueError(f"{what} has {flat.numel()} values; expected 1 or {rows}")
    return flat, flat.stride(0)


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


@triton.jit
def quantize_int8(x, scale):
    """The reference's round(x / scale).clamp(-127, 127) with IEEE division (div_rn), so it is bit-exact."""
    return saturate_round(tl.math.div_rn(x, scale), -QMAX_F, QMAX_F).to(tl.int8)


@triton.jit
def quantize_int8_by_reciprocal(x, inv_scale):
    """round(x * (1 / scale)): cheaper than an IEEE division per element, for ALU-heavy kernels whose input is not
    bit-exact against the reference anyway; differs from round(x / scale) by at most 1 where x / scale sits within
    an ulp of a half."""
    return saturate_round(x * inv_scale, -QMAX_F, QMAX_F).to(tl.int8)


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
    return y
