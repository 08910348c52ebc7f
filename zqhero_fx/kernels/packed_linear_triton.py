"""zqhero::packed_linear's Triton kernel: a GEMM that unpacks the sub-byte weight codes in registers inside its main
loop (never a dequantised weight in global memory), with quantized_linear's epilogue.

Per K step a program loads its x tile and the packed bytes of its [BLOCK_N, BLOCK_K] weight tile, splits the bytes
into codes (`tl.interleave`, so the byte loads stay contiguous and vectorised), decodes them to f * (v - z) (the
weight without its per-channel scale, weights.expand's value) in the dot's operand type, and feeds tl.dot. The three
operand shapes of packed_linear.py are specialisations of the one kernel (constexpr CODE / FACTOR and the operands'
element types):

* A8W4 (DGQ): int8 x, unsigned INT4 codes, zero points, integer group scales: S2 * (code - z) is built in int32 and
  narrowed to an INT8 tile, and tl.dot accumulates INT8 x INT8 in INT32, exactly as the reference's torch._int_mm.
  The reference raises when |S2 * (v - z)| > 127; the kernel cannot check that without reading the whole weight (or
  a host sync), so it relies on the quantizer's bound, and an out-of-range product wraps.
* W4A8 (ZeroQuant-FP): float8 x (E4M3 or E5M2), INT4 (two's complement) / FP4 E2M1 / FP6 E3M2 codes, power-of-two
  group scales 2**e. The weight tile is E5M2 whatever x's format: every value m * 2**j with |m| <= 8 and j >= -16 is
  exact in E5M2, which covers INT4 and FP4 codes times 2**e for e >= -15 and FP6 codes (quantum 2**-4) for e >= -12
  (E4M3 would lose FP4's 0.5 * 2**-9 and FP6 below 2**-5). The products are exact in fp32 and accumulate in fp32,
  each K tile's partial sum promoted into the fp32 accumulator (max_num_imprecise_acc, as quantized_linear does).
* Weight-only (ZeroQuant(4+2)): float16 / bfloat16 / float32 x, FP6 E3M2 "4+2" codes (and also INT4 / FP4 codes,
  optionally with power-of-two group scales or INT4 zero points), decoded into x's own float type, in which they are
  exact; tl.dot accumulates in fp32 (float32 x: input_precision "ieee", not TF32, to stay the reference's fp32 GEMM).

Decoding: a float code's exponent and mantissa fields are placed at the top of an fp16 bit pattern and the exponent
bias difference is multiplied back in (FP6-LLM's trick: E3M2 * 2**12, E2M1 * 2**14); fp16's own subnormals cover the
formats' subnormals, so no case split is needed, and the power of two is built from its bits (with the group's
exponent e folded in), never by an approximate exp2. INT4 codes are sign-extended (v ^ 8) - 8 or have their zero
subtracted.

Groups: any group_size that divides K. When it is a multiple of BLOCK_K (or 0: one group per row) a K tile lies in one
group and its factors are one [BLOCK_N] load per step; otherwise (groups smaller than the tile, e.g. 16 or 32 under a
128-deep tile) each column's group is gathered, [BLOCK_N, BLOCK_K] byte loads that hit L1. The autotuner's configs
include 32-deep tiles, so 32-column groups also have a one-load-per-step candidate, and it picks what measures fastest.

LoRC: the thin side GEMM x · Bᵀ · Aᵀ (rank r) is computed outside the kernel with torch, in the reference's
expression (weights.lorc_side), and added to the scaled accumulator in the epilogue before the bias and activation
(HAS_SIDE), as the reference does.

The epilogue repeats quantized_linear's operation order (acc * x_scale * w_scale, + side, + bias, activation,
+ residual, cast or requantize, no FMA contraction), so a float output is bit-identical to the reference's wherever
the accumulator is (A8W4; the float paths when their fp32 sums happen to be exact) and the activation is none / relu.

Verified only under TRITON_INTERPRET=1 (no GPU was available): the decoding, grouping, masking and epilogue are
checked against packed_linear_ref by tests/kernels/test_packed_linear_triton.py, which also has a `cuda` variant
(marked gpu) of every kernel case. Under the interpreter a bfloat16 activation's dot runs on operands widened to fp32
(BF16_DOT_IN_FP32: the interpreter's tl.dot multiplies bf16's raw uint16 storage), so the GPU's bf16 tl.dot is the
one operation of that path the interpreter does not run. Not verified: that the kernel compiles for sm_89 / sm_90
(tl.interleave of the unpacked codes, an E5M2 B operand built in registers, mixed E4M3 x E5M2 dots), the autotune
space, and its speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zqhero_fx.formats import get_format
from zqhero_fx.kernels._triton_common import (
    grouped_tile,
    ACTIVATION_CODES,
    FP8_DTYPES,
    MIN_SCALE_F,
    accumulator_dtype,
    as_rows,
    cast_rne,
    device_guard,
    epilogue_activation,
    interpreting,
    is_fp8,
    quantize_to,
    row_scale_operand,
    triton_takes_format,
)
from zqhero_fx.kernels.packed_linear import check_operands, lorc_side_term
from zqhero_fx.kernels.quantized_linear import INTERPRETER_CONFIG, _gemm_config, _prune_gemm_configs, check_output

OP = "packed_linear"

# How a code decodes to v - z (constexpr CODE).
CODE_INT4 = tl.constexpr(0)  # two's-complement nibbles, -8..7
CODE_UINT4_ZERO = tl.constexpr(1)  # unsigned nibbles 0..15 minus the group's zero point (DGQ)
CODE_FP4_E2M1 = tl.constexpr(2)
CODE_FP6_E3M2 = tl.constexpr(3)  # two streams, 4 + 2 bits
# The group factor f (constexpr FACTOR), by group_scale_kind.
FACTOR_CODES = {"none": 0, "integer": 1, "exponent": 2}
FACTOR_INTEGER = tl.constexpr(FACTOR_CODES["integer"])
FACTOR_EXPONENT = tl.constexpr(FACTOR_CODES["exponent"])

FLOAT_ACTIVATIONS = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------- device functions
@triton.constexpr_function
def weight_operand_dtype(x_dtype):
    """The dot's weight operand type for activations of x_dtype: INT8 (DGQ's INT8 weight) for INT8, E5M2 for either
    FP8 (exact for every decoded value, see the module docstring), else the activation's own float type."""
    if x_dtype == tl.int8:
        return tl.int8
    if x_dtype == tl.float8e4nv or x_dtype == tl.float8e5:
        return tl.float8e5
    return x_dtype


@triton.constexpr_function
def float_code_bias_shift(CODE):
    """log2 of what a float code's fp16 bit pattern (see float_code_as_fp16) must be multiplied by: the difference of
    the exponent biases, fp16's 15 minus E2M1's 1 or E3M2's 3; 0 for integer codes."""
    if CODE == CODE_FP4_E2M1:
        return 14
    if CODE == CODE_FP6_E3M2:
        return 12
    return 0


@triton.jit
def nibbles(packed):
    """[R, C] bytes -> [R, 2C] codes 0..15: byte i's low nibble is element 2i, its high nibble 2i + 1."""
    return tl.interleave(packed & 0xF, packed >> 4)


@triton.jit
def two_bit_fields(packed):
    """[R, C] bytes -> [R, 4C] values 0..3: element 4i + j is bits 2j..2j+1 of byte i (FP6's hi2 stream)."""
    fields_0_2 = tl.interleave(packed & 0x3, (packed >> 4) & 0x3)
    fields_1_3 = tl.interleave((packed >> 2) & 0x3, packed >> 6)
    return tl.interleave(fields_0_2, fields_1_3)


@triton.jit
def float_code_as_fp16(codes, CODE: tl.constexpr):
    """FP4 E2M1 (s ee m) / FP6 E3M2 (s eee mm) codes -> fp16 whose value is the code's times 2**-bias_shift: the sign
    goes to bit 15 and the exponent and mantissa fields to the top of fp16's (the exponent's low bits, the mantissa's
    high bits). Field 0 reads as an fp16 subnormal, the format's own subnormal scaled alike."""
    codes = codes.to(tl.uint16)
    if CODE == CODE_FP4_E2M1:
        bits = ((codes & 0x8) << 12) | ((codes & 0x7) << 9)
    else:
        bits = ((codes & 0x20) << 10) | ((codes & 0x1F) << 8)
    return bits.to(tl.float16, bitcast=True)


@triton.jit
def power_of_two(exponent):
    """2.0 ** exponent as fp32, exactly, from its bit pattern (exponent an integer in [-126, 127])."""
    return ((exponent.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def integer_code_value(codes, zero_ptrs, CODE: tl.constexpr):
    """INT4 codes -> v - z as int32: sign-extended two's complement, or unsigned minus the group's zero point."""
    if CODE == CODE_UINT4_ZERO:
        return codes.to(tl.int32) - tl.load(zero_ptrs).to(tl.int32)
    else:
        return (codes.to(tl.int32) ^ 8) - 8


@triton.jit
def weight_tile(codes, scale_ptrs, zero_ptrs, CODE: tl.constexpr, FACTOR: tl.constexpr, W_DTYPE: tl.constexpr):
    """Codes [BLOCK_N, BLOCK_K] -> f * (v - z) in the dot's operand type W_DTYPE, exactly (weights.expand's value).
    scale_ptrs / zero_ptrs address each element's group ([BLOCK_N, 1] when the tile lies in one group)."""
    if W_DTYPE == tl.int8:
        value = integer_code_value(codes, zero_ptrs, CODE)
        if FACTOR == FACTOR_INTEGER:
            value = value * tl.load(scale_ptrs).to(tl.int32)
        return value.to(tl.int8)  # |S2 * (v - z)| <= 127 is the quantizer's contract (module docstring)
    else:
        BIAS_SHIFT: tl.constexpr = float_code_bias_shift(CODE)
        if CODE == CODE_FP4_E2M1 or CODE == CODE_FP6_E3M2:
            value = float_code_as_fp16(codes, CODE).to(tl.float32)
        else:
            value = integer_code_value(codes, zero_ptrs, CODE).to(tl.float32)
        # One exact multiply by a power of two: the bias fix and the group's 2**e together.
        if FACTOR == FACTOR_EXPONENT:
            value = value * power_of_two(tl.load(scale_ptrs).to(tl.int32) + BIAS_SHIFT)
        elif BIAS_SHIFT != 0:
            value = value * (2.0**BIAS_SHIFT)
        return value.to(W_DTYPE)


@triton.jit
def column_groups(k_start, offs_k, K, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The group of each column of the K tile starting at k_start, as an offset into an [N, G] row: a scalar when the
    whole tile lies in one group (GROUP_SIZE 0 or a multiple of BLOCK_K), else [1, BLOCK_K] (columns past K are
    clamped onto the last group; their x is zero)."""
    if GROUP_SIZE == 0:
        return 0
    elif GROUP_SIZE % BLOCK_K == 0:
        return k_start // GROUP_SIZE
    else:
        return (tl.minimum(k_start + offs_k, K - 1) // GROUP_SIZE)[None, :]


@triton.jit
def accumulate(a, w, acc, BLOCK_K: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr):
    """acc += a @ w^T for the operand types the kernel builds (w [BLOCK_N, BLOCK_K] in a's weight operand type)."""
    X_DTYPE: tl.constexpr = a.dtype
    b = tl.trans(w)
    if BF16_DOT_IN_FP32:
        # Interpreter only: its tl.dot multiplies bf16's raw uint16 storage. Widening both operands is exact and the
        # products are exact in fp32, so this is the GPU's bf16 dot (fp32 accumulation) up to summation order.
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif is_fp8(X_DTYPE):
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
    elif X_DTYPE == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _packed_linear_kernel(
    x_ptr, lo_ptr, hi_ptr, gs_ptr, gz_ptr, xs_ptr, ws_ptr, side_ptr, bias_ptr, res_ptr, os_ptr, out_ptr,
    M, N, K,
    m_bucket,  # autotune key only: the next power of two of M, so a new batch size does not re-tune
    stride_xm, stride_xk, stride_lo, stride_hi, stride_g,
    stride_xs, stride_ws, stride_sm, stride_rm, stride_rn, stride_os,
    CODE: tl.constexpr, FACTOR: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_X_SCALE: tl.constexpr, HAS_SIDE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, QUANT_OUT: tl.constexpr, BF16_DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # weight tiles shared in L2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_lo = tl.arange(0, BLOCK_K // 2)
    offs_hi = tl.arange(0, BLOCK_K // 4)
    # Out-of-range rows / columns wrap onto valid ones for the loads (never stored): only the K tail is masked.
    rows_a = (offs_m % M).to(tl.int64)
    cols_b = (offs_n % N).to(tl.int64)
    a_ptrs = x_ptr + rows_a[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # The weight's code streams row by row ([N, K/2] nibbles, FP6's [N, K/4] 2-bit fields): [BLOCK_N, bytes] tiles,
    # contiguous along K.
    lo_ptrs = lo_ptr + cols_b[:, None] * stride_lo + offs_lo[None, :]
    hi_ptrs = hi_ptr + cols_b[:, None] * stride_hi + offs_hi[None, :]
    gs_rows = gs_ptr + cols_b[:, None] * stride_g
    gz_rows = gz_ptr + cols_b[:, None] * stride_g

    W_DTYPE: tl.constexpr = weight_operand_dtype(x_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=accumulator_dtype(x_ptr.dtype.element_ty))
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_start = k * BLOCK_K
        k_left = K - k_start  # K is even (FP6: a multiple of 4), so the byte masks cut at whole codes
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        codes = nibbles(tl.load(lo_ptrs, mask=offs_lo[None, :] < k_left // 2, other=0))
        if CODE == CODE_FP6_E3M2:
            codes = codes | (two_bit_fields(tl.load(hi_ptrs, mask=offs_hi[None, :] < k_left // 4, other=0)) << 4)
        groups = column_groups(k_start, offs_k, K, GROUP_SIZE, BLOCK_K)
        w = weight_tile(codes, gs_rows + groups, gz_rows + groups, CODE, FACTOR, W_DTYPE)
        acc = accumulate(a, w, acc, BLOCK_K, BF16_DOT_IN_FP32)
        a_ptrs += BLOCK_K * stride_xk
        lo_ptrs += BLOCK_K // 2
        hi_ptrs += BLOCK_K // 4

    # Epilogue, in the reference's operation order so that each fp32 rounding matches: acc * x_scale (per token, or
    # stride 0; weight-only x has none, and the reference's multiply by 1 is exact) * w_scale, + LoRC's side term.
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    rows_out = offs_m.to(tl.int64)
    y = acc.to(tl.float32)
    if HAS_X_SCALE:
        y = y * tl.load(xs_ptr + offs_m * stride_xs, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    y = y * tl.load(ws_ptr + offs_n * stride_ws, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SIDE:
        y = y + tl.load(side_ptr + rows_out[:, None] * stride_sm + offs_n[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = epilogue_activation(y, ACTIVATION)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows_out[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
        y = y + res.to(tl.float32)

    out_ptrs = out_ptr + rows_out[:, None] * N + offs_n[None, :]
    if QUANT_OUT:
        # The reference's quantize: y / max(out_scale, MIN_SCALE) with IEEE division, onto the output's grid.
        out_scale = tl.load(os_ptr + offs_n * stride_os, mask=n_mask, other=1.0).to(tl.float32)
        out_scale = tl.maximum(out_scale, MIN_SCALE_F)
        tl.store(out_ptrs, quantize_to(y, out_scale[None, :], out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


# H100 / H200 (and A100) tiles. The weight tile is built in registers from 0.5 (FP6: 0.75) byte per element, so the
# pipelined shared-memory stages hold the x tile and the packed bytes; 8-bit activations take 128-deep tiles like
# quantized_linear. 32-deep tiles give 32-column groups (ZeroQuant-FP's FP4 default) a one-load-per-step candidate;
# the 16-row tiles are for decoding (M of 1 to 16), where the weight bytes are the whole cost. Tiles that do not fit
# (float32 activations at 128x128x128) fail to compile with OutOfResources, which the autotuner skips.
PACKED_GEMM_CONFIGS = [
    _gemm_config(128, 128, 128, 8, 3),
    _gemm_config(128, 128, 64, 8, 4),
    _gemm_config(128, 64, 128, 4, 4),
    _gemm_config(64, 128, 128, 4, 4),
    _gemm_config(64, 64, 128, 4, 4),
    _gemm_config(64, 128, 32, 4, 5),
    _gemm_config(32, 64, 128, 4, 4),
    _gemm_config(16, 128, 128, 4, 4),
    _gemm_config(16, 64, 64, 4, 5),
]
# Under the interpreter one small tile: 32-deep, so 32- and 64-column groups take the one-group-per-tile path and
# 16-column (or odd-sized) groups the per-column one.
PACKED_INTERPRETER_CONFIG = {**INTERPRETER_CONFIG, "BLOCK_K": 32}

_packed_linear_kernel_tuned = triton.autotune(
    configs=PACKED_GEMM_CONFIGS,
    key=["m_bucket", "N", "K", "CODE", "FACTOR", "GROUP_SIZE", "HAS_X_SCALE", "HAS_SIDE", "HAS_BIAS", "HAS_RESIDUAL",
         "ACTIVATION", "QUANT_OUT"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_packed_linear_kernel)


# ---------------------------------------------------------------- operands
def _code_kind(w_format, w_group_zero) -> int | None:
    name = get_format(w_format).name
    if name == "int4":
        return CODE_UINT4_ZERO.value if w_group_zero is not None else CODE_INT4.value
    if w_group_zero is not None:
        return None  # a zero point goes with unsigned INT4 codes only (the reference raises)
    return {"fp4_e2m1": CODE_FP4_E2M1.value, "fp6_e3m2": CODE_FP6_E3M2.value}.get(name)


def refusal(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero, lorc,
            bias, residual, out_scale, activation, out_dtype) -> str | None:
    """Why the kernel does not take these operands, or None when it does."""
    if activation not in ACTIVATION_CODES:
        return f"no {activation!r} epilogue (it has {', '.join(ACTIVATION_CODES)})"
    if out_scale is not None and not triton_takes_format(out_dtype, x.device):
        return f"no {out_dtype} output on {x.device}"
    if group_scale_kind not in FACTOR_CODES or (group_scale_kind == "none") != (w_group_scale is None):
        return f"group_scale_kind={group_scale_kind!r} with{'out' if w_group_scale is None else ''} w_group_scale"
    code = _code_kind(w_format, w_group_zero)
    if code is None:
        return f"no decoder for {w_format!r} codes{' with a zero point' if w_group_zero is not None else ''}"
    if x.dtype == torch.int8:
        if code not in (CODE_INT4.value, CODE_UINT4_ZERO.value) or group_scale_kind == "exponent":
            return "int8 activations take INT4 codes with integer (or no) group scales, an INT8 weight"
    elif x.dtype in FP8_DTYPES:
        if not triton_takes_format(x.dtype, x.device):
            return f"{x.dtype} needs an sm_89+ GPU"
        if code == CODE_UINT4_ZERO.value or group_scale_kind == "integer":
            return "float8 activations take codes with power-of-two (or no) group scales and no zero point: the " \
                   "weight must be exact in E5M2"
    elif x.dtype in FLOAT_ACTIVATIONS:
        if group_scale_kind == "integer":
            return "float activations take power-of-two (or no) group scales"
    else:
        return f"no {x.dtype} activations"
    return None


def takes(*args) -> bool:
    """Whether the kernel takes packed_linear's operands (its 15 arguments, in order)."""
    return refusal(*args) is None


# ---------------------------------------------------------------- launcher
def run(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero, lorc,
        bias, residual, out_scale, activation, out_dtype):
    """packed_linear on the Triton kernel: what packed_linear_ref returns."""
    args = (x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero, lorc,
            bias, residual, out_scale, activation, out_dtype)
    check_output(out_scale, out_dtype, OP)
    check_operands(*args[:10])
    reason = refusal(*args)
    if reason is not None:
        raise ValueError(f"{OP}: the Triton kernel does not take these operands: {reason}")
    lead, k = x.shape[:-1], x.shape[-1]
    n = w_scale.shape[0]
    out = torch.empty((*lead, n), dtype=out_dtype, device=x.device)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if out.numel() == 0:
        return out
    lo = w_codes[0].contiguous()
    hi = w_codes[1].contiguous() if len(w_codes) == 2 else lo  # never read unless FP6
    ws, stride_ws = row_scale_operand(w_scale, n, f"{OP} w_scale")
    gs = w_group_scale.contiguous() if w_group_scale is not None else lo  # never read when FACTOR is "none"
    gz = w_group_zero.contiguous() if w_group_zero is not None else lo  # never read without a zero point
    stride_g = (k // group_size) if group_size else 1  # the [N, G] row length
    if x_scale is not None:
        xs, stride_xs = row_scale_operand(x_scale, m, f"{OP} x_scale")
    else:
        xs, stride_xs = ws, 0  # never read: HAS_X_SCALE is False
    side = lorc_side_term(x2, x_scale, lorc).contiguous() if lorc else None
    if residual is not None:
        r2, stride_rm, stride_rn = as_rows(residual, out.shape)
    else:
        r2, stride_rm, stride_rn = out, 0, 0  # never read: HAS_RESIDUAL is False
    if out_scale is not None:
        os_, stride_os = row_scale_operand(out_scale, n, f"{OP} out_scale")
    else:
        os_, stride_os = ws, 0  # never read: QUANT_OUT is False
    kernel_args = (
        x2, lo, hi, gs, gz, xs, ws, side if side is not None else ws, bias.contiguous() if bias is not None else ws,
        r2, os_, out,
        m, n, k, triton.next_power_of_2(m),
        x2.stride(0), x2.stride(1), lo.stride(0), hi.stride(0), stride_g,
        stride_xs, stride_ws, n, stride_rm, stride_rn, stride_os,
    )
    flags = dict(
        CODE=_code_kind(w_format, w_group_zero), FACTOR=FACTOR_CODES[group_scale_kind], GROUP_SIZE=group_size,
        HAS_X_SCALE=x_scale is not None, HAS_SIDE=side is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, ACTIVATION=ACTIVATION_CODES[activation],
        QUANT_OUT=out_scale is not None, BF16_DOT_IN_FP32=interpreting() and x.dtype == torch.bfloat16,
    )
    # enable_fp_fusion=False: no FMA contraction of the epilogue's multiply-adds, so each fp32 rounding happens where
    # the reference's separate ops round.
    with device_guard(x):
        if interpreting():
            cfg = PACKED_INTERPRETER_CONFIG
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            _packed_linear_kernel[grid](*kernel_args, **flags, **cfg, enable_fp_fusion=False)
        else:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            _packed_linear_kernel_tuned[grid](*kernel_args, **flags, enable_fp_fusion=False)
    return out
