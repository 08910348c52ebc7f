"""The A8W4 (DGQ) CPU kernel of zqhero::packed_linear: int8 activations against unsigned INT4 codes with a zero point
and integer group scales, whose weight S2 * (code - z) is INT8 (weights.py; the quantizer bounds it to [-127, 127]),
on AVX-512 VNNI.

The weight is taken as stored (row-major [N, K/2] nibbles, no prepacking) and never expanded to a full-size INT8 copy;
the C++ (csrc/a8w4_cpu.cpp) has two paths:

* decode (M <= 4 rows of x): the codes go straight into the dot products. vpmaddubsw multiplies the unpacked codes
  (u8) by x (s8), vpdpwssd scales the pair sums by their group's S2 and accumulates; sum_g S2 z sum_{k in g} x takes
  the zero point out at the end. Where the weight comes from memory (a model's decode step) this reads half the bytes
  of the INT8 GEMM; where it sits in cache the unpacking costs more than INT8's one instruction per 64 weights.
* prefill (more rows): blocks of 64 output channels x up to 2048 features are expanded to INT8 (plus 128, vpdpbusd's
  unsigned operand) in a per-thread buffer that stays in cache, with one 16-byte lookup table per (row, group)
  applied by vpshufb, and multiplied in 6 x 64 register tiles with vpdpbusd; the +128 comes back out as 128 * sum_k x.

Both accumulate exactly in int32 and run on ATen's thread pool, split over output channels. The accumulator goes
through packed_linear's shared epilogue (scales, LoRC, bias, activation, residual, output), so the result is bit-exact
to packed_linear_ref.

The extension is built on first use with torch.utils.cpp_extension under a name that hashes its source (the build
helpers of vnni_cpu.py). `available()` is False where the CPU lacks AVX-512 VNNI, ZQHERO_CPU_VNNI=0, or the build
failed (one warning says why); packed_linear then runs its reference. `takes` is False for other operand kinds,
tensors off the CPU, groups that are not a multiple of 16 features (a vector lane of 16 features holds one group) and K
past what int32 sums hold exactly.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from zqhero_fx.kernels import vnni_cpu
from zqhero_fx.kernels.packed_linear import check_operands, epilogue
from zqhero_fx.kernels.quantized_linear import check_output

CPP_PATH = Path(__file__).resolve().parent / "csrc" / "a8w4_cpu.cpp"  # shipped as package data (pyproject.toml)
CPP_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"]  # -fopenmp: ATen's parallel_for
LD_FLAGS = ["-fopenmp"]
GROUP_MULTIPLE = 16  # features per vector lane, which share one group's scale and zero point


def extension_name() -> str:
    """A hash of the .cpp and flags, so that an edited source never loads a stale build."""
    digest = vnni_cpu.source_digest([CPP_PATH, *vnni_cpu.SHARED_HEADERS], CPP_FLAGS + LD_FLAGS)
    return f"zqhero_a8w4_cpu_{digest}"


@functools.cache
def extension():
    """The compiled module, or None (with one warning saying why) where it cannot be used here."""
    if os.environ.get("ZQHERO_CPU_VNNI", "1").strip() == "0" or not vnni_cpu.cpu_has_vnni():
        return None
    return vnni_cpu.build_extension(
        extension_name(), CPP_PATH, CPP_FLAGS, LD_FLAGS, "A8W4 AVX-512 VNNI CPU kernel",
        "A8W4 packed_linear runs its PyTorch reference on the CPU instead (slower, and it expands the whole weight)",
        "ZQHERO_CPU_VNNI")


def available() -> bool:
    """AVX-512 VNNI present and the extension built (never raises)."""
    try:
        return extension() is not None
    except Exception:  # noqa: BLE001 - a kernel that cannot load is simply not available
        return False


def _group_features(group_size: int, k: int) -> int:
    return group_size or k


def takes(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero, lorc,
          bias, residual, out_scale, activation, out_dtype) -> bool:
    """int8 x with an x_scale, one INT4 code stream with a uint8 zero point and int8 "integer" group scales, all on the
    CPU; groups a multiple of 16 features; K short enough for exact int32 sums. (Called twice per op call, on the
    decode path too: cheap checks only.)"""
    if w_format != "int4" or group_scale_kind != "integer" or x_scale is None or w_group_zero is None \
            or w_group_scale is None or len(w_codes) != 1:
        return False
    codes = w_codes[0]
    if x.dtype != torch.int8 or codes.dtype != torch.uint8 or w_group_zero.dtype != torch.uint8 \
            or w_group_scale.dtype != torch.int8:
        return False
    if not (x.is_cpu and codes.is_cpu and w_group_zero.is_cpu and w_group_scale.is_cpu):
        return False
    k = x.shape[-1]
    features = _group_features(group_size, k)
    return 0 < k <= vnni_cpu.MAX_TERMS and features % GROUP_MULTIPLE == 0 and k % features == 0


def run(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero, lorc, bias,
        residual, out_scale, activation, out_dtype):
    check_output(out_scale, out_dtype, "packed_linear")
    check_operands(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero,
                   lorc)
    k = x.shape[-1]
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    acc = extension().a8w4_gemm(rows.contiguous(), w_codes[0].contiguous(), w_group_zero.contiguous(),
                                w_group_scale.contiguous(), _group_features(group_size, k))
    return epilogue(acc, x, x_scale, w_scale, lorc, bias, residual, out_scale, activation, out_dtype)
