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

# Globals a @triton.jit function reads must be tl.constexpr. QMAX_F / MIN_SCALE_F mirror quantize.QMAX / MIN_SCALE
# (a test pins them together; importing quantize here would be circular).
QMAX_F: tl.constexpr = 127.0
MIN_SCALE_F: tl.constexpr = 1e-8
SQRT1_2: tl.constexpr = 0.7071067811865476  # 1/sqrt(2), as torch's erf GeLU uses it
SQRT_2_OVER_PI: tl.constexpr = 0.7978845608028654  # sqrt(2/pi), as torch's tanh GeLU uses it
GELU_TANH_COEFF: tl.constexpr = 0.044715

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
    """torch.round semantics (ties to even) from floor alone, so it runs identically on GPU and in the interpreter.

    floor(x + 0.5) is wrong twice over: ties go up, and x + 0.5 itself rounds for x just below a half (0.49999997 + 0.5
    rounds to 1.0). x - floor(x) is exact (Sterbenz), so comparing that fraction with 0.5 is exact too.
    """
    r = tl.floor(x)
    frac = x - r
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    round_up = (frac > 0.5) | ((frac == 0.5) & r_is_odd)
    return tl.where(round_up, r + 1.0, r)


@triton.jit
def saturate_round(x, lo, hi):
    """round(x) clamped to [lo, hi], as float. Clamping first is equivalent (rounding is monotone and lo, hi are
    integers) and keeps the value small enough for `round_half_even`'s float arithmetic to stay exact."""
    return round_half_even(tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def quantize_int8(x, scale):
    """The reference's round(x / scale).clamp(-127, 127) with IEEE division, so it is bit-exact."""
    return saturate_round(tl.math.div_rn(x, scale), -QMAX_F, QMAX_F).to(tl.int8)


@triton.jit
def gelu_erf(x):
    """torch.nn.functional.gelu(x) (erf form), in torch's operation order."""
    return x * 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))


@triton.jit
def gelu_tanh(x):
    """gelu(x, approximate='tanh'). tanh(u) = 1 - 2 / (exp(2u) + 1): tl has no tanh that also runs in the interpreter,
    and this form saturates cleanly (exp overflow gives 1, underflow gives -1)."""
    inner = SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x)
    tanh_inner = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    return 0.5 * x * (1.0 + tanh_inner)


@triton.jit
def apply_activation(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        y = gelu_erf(y)
    elif ACTIVATION == 2:
        y = gelu_tanh(y)
    return y
