"""zqhero::packed_linear: a GEMM on sub-byte packed weights (weights.py has the layouts) with quantized_linear's
epilogue. Three operand shapes, one op:

* A8W4 (DGQ): int8 x, unsigned INT4 codes with a zero point and "integer" group scales: f * (v - z) is an INT8 weight,
  so the GEMM is one exact INT8 x INT8 -> INT32 product with a per-row (x_scale) x per-column (w_scale) epilogue.
* W4A8 (ZeroQuant-FP): float8 x, INT4 / FP4 E2M1 codes with "exponent" (power-of-two) group scales: f * v is an
  exact FP8 value, the products are exact in fp32 and accumulate in fp32.
* weight-only (ZeroQuant(4+2)): float x (x_scale None), FP6 E3M2 4+2 codes with one scale per channel.

LoRC's low-rank correction, when given, adds x · Bᵀ · Aᵀ before the bias and activation.

This file holds the reference (the spec: it expands the whole weight, which no kernel may do) and the registration;
the kernels live beside it: kernels/packed_linear_triton.py (CUDA, tested under TRITON_INTERPRET=1) and the CPU
kernels kernels/a8w4_cpu.py (VNNI, INT4 -> INT8 inside the GEMM) and kernels/lowbit_float_cpu.py (FP6 / FP4 tiles
unpacked in cache).
"""

from __future__ import annotations

import threading

import torch

from zqhero_fx import dispatch, weights
from zqhero_fx.formats import get_format
from zqhero_fx.kernels.quantized_linear import check_output, int8_matmul_ref, linear_epilogue_ref


def check_operands(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero,
                   lorc) -> None:
    """Shapes and kinds the layouts require; every kernel calls this first."""
    fmt = get_format(w_format)
    n, k = w_scale.shape[0], x.shape[-1]
    expected = weights.stream_shapes(fmt, n, k)
    got = [tuple(c.shape) for c in w_codes]
    if got != [tuple(s) for s in expected] or any(c.dtype != torch.uint8 for c in w_codes):
        raise ValueError(f"packed_linear: a {fmt.name} weight [N={n}, K={k}] is stored as uint8 streams {expected}, "
                         f"got {got} ({[str(c.dtype) for c in w_codes]})")
    if group_size < 0 or (group_size and k % group_size):
        raise ValueError(f"packed_linear: group_size={group_size} must divide K={k} (0: one group per row)")
    groups = k // group_size if group_size else 1
    for name, t in (("w_group_scale", w_group_scale), ("w_group_zero", w_group_zero)):
        if t is not None and tuple(t.shape) != (n, groups):
            raise ValueError(f"packed_linear: {name} must be [N, K / group_size] = {[n, groups]}, got {list(t.shape)}")
    quantized_x = x.dtype == torch.int8 or (x.dtype.is_floating_point and x.element_size() == 1)
    if quantized_x != (x_scale is not None):
        raise ValueError(f"packed_linear: x is {x.dtype}: quantized activations (int8 / float8) come with an "
                         "x_scale, float ones (weight-only) without")
    if x.dtype == torch.int8 and group_scale_kind == "exponent":
        raise ValueError("packed_linear: int8 activations need integer group scales (an INT8 weight), not power-of-two "
                         "ones")
    if lorc and len(lorc) != 4:
        raise ValueError(f"packed_linear: lorc is [b, b_scale, a, a_scale], got {len(lorc)} tensors")


def lorc_side_term(x2: torch.Tensor, x_scale: torch.Tensor | None, lorc) -> torch.Tensor:
    """LoRC's side GEMM on x [M, K] (quantized with x_scale, or float): x·Bᵀ·Aᵀ [M, N] in real units, float32."""
    x_real = x2.float() * x_scale.float().reshape(-1, 1) if x_scale is not None else x2.float()
    return weights.lorc_side(x_real, lorc)


# ---------------------------------------------------------------- reference (the spec)
def packed_linear_ref(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind,
                      w_group_zero, lorc, bias, residual, out_scale, activation, out_dtype):
    check_output(out_scale, out_dtype, "packed_linear")
    check_operands(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero,
                   lorc)
    w = weights.expand(w_codes, w_format, group_size, w_group_scale, group_scale_kind, w_group_zero).to(x.device)
    x2 = x.reshape(-1, x.shape[-1])
    if x.dtype == torch.int8:
        # f * (v - z) is an INT8 weight: the quantizer bounds |S2 * (q - z)| <= 127 (weight_quant.py; no
        # data-dependent check here, so that Inductor can trace this reference).
        acc = int8_matmul_ref(x2, w.to(torch.int8)).float()
    else:
        acc = x2.float() @ w.t()
    side = lorc_side_term(x2, x_scale, lorc) if lorc else None
    if x_scale is None:
        y_scale = torch.ones(1, device=x.device)
    else:
        y_scale = x_scale
    return _epilogue(acc, side, x.shape[:-1], y_scale, w_scale, bias, residual, out_scale, activation, out_dtype)


def _epilogue(acc, side, lead, x_scale, w_scale, bias, residual, out_scale, activation, out_dtype):
    """quantized_linear's epilogue with LoRC's side term added to the scaled accumulator (before bias and activation).
    """
    if side is None:
        return linear_epilogue_ref(acc, lead, x_scale, w_scale, bias, residual, out_scale, activation, out_dtype)
    row_scale = x_scale.float().reshape(-1, 1) if x_scale.numel() != 1 else x_scale.float().reshape(1, 1)
    scaled = acc * row_scale * w_scale.float() + side
    # The rest of the epilogue with unit scales: scaled * 1 * 1 is exact.
    ones = torch.ones(1, device=acc.device)
    return linear_epilogue_ref(scaled, lead, ones, ones, bias, residual, out_scale, activation, out_dtype)


def epilogue(acc, x, x_scale, w_scale, lorc, bias, residual, out_scale, activation, out_dtype):
    """The epilogue for kernels that produce the raw accumulator acc [M, N] (float32 or int32)."""
    x2 = x.reshape(-1, x.shape[-1])
    side = lorc_side_term(x2, x_scale, lorc) if lorc else None
    y_scale = x_scale if x_scale is not None else torch.ones(1, device=x.device)
    return _epilogue(acc.float(), side, x.shape[:-1], y_scale, w_scale, bias, residual, out_scale, activation,
                     out_dtype)


# ---------------------------------------------------------------- registration
# Each kernel module exposes takes(*args) -> bool, run(*args) and (CPU) available() -> bool; imported on first use so
# that a missing compiler or Triton build never breaks the reference.
def _cpu_kernel(*args):
    from zqhero_fx.kernels import a8w4_cpu, lowbit_float_cpu

    for kernel in (a8w4_cpu, lowbit_float_cpu):
        if kernel.available() and kernel.takes(*args):
            return kernel
    return None


# dispatch asks `_cpu_takes` and then calls `_cpu_run` with the same operands: remember the choice in between, so
# the operand checks run once per call (they cost as much as the GEMM itself at decode shapes).
_choice = threading.local()


def _cpu_takes(*args) -> bool:
    _choice.kernel, _choice.codes = _cpu_kernel(*args), args[2]
    return _choice.kernel is not None


def _cpu_run(*args):
    kernel = _choice.kernel if getattr(_choice, "codes", None) is args[2] else _cpu_kernel(*args)
    return kernel.run(*args)


def _triton_takes(*args) -> bool:
    from zqhero_fx.kernels import packed_linear_triton

    return packed_linear_triton.takes(*args)


def _triton_run(*args):
    from zqhero_fx.kernels import packed_linear_triton

    return packed_linear_triton.run(*args)


dispatch.register("packed_linear", dispatch.KernelSpec(
    reference=packed_linear_ref, triton=_triton_run, triton_applies=_triton_takes,
    cpu=_cpu_run, cpu_applies=_cpu_takes,
    # The reference expands the whole weight to float32; under Inductor the packed kernel stays one opaque call.
    cpu_kernel_beats_inductor=True))
