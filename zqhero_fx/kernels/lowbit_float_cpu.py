"""The CPU kernel of zqhero::packed_linear's float-unpack cases: FP6 E3M2 "4+2" weight-only (ZeroQuant(4+2)) and W4A8
(ZeroQuant-FP: FP8 x with FP4 E2M1 or INT4 codes and power-of-two group scales).

The weight is never expanded. The C++ (csrc/lowbit_float_cpu.cpp, AVX-512 F/BW) decodes one chunk of one weight row
at a time in registers (128 features for FP6, 64 for 4-bit codes): the packed bytes widen to 16- or 32-bit lanes,
shifts line each code up and a permute looks its value up in a table held in a register (FP6: the 32 bf16
magnitudes, the sign OR-ed in from the code's top bit; 4-bit: 16 float32 values, times the group's 2**e). The decoded
vectors hold the features in an order of the decoder's own, and x is permuted to match once per call. Few rows of x
(M < PANEL_ROWS_MIN: decode shapes, bound by decoding the weight) multiply the decoded vectors at once, as 16-lane
partial dot products over all of K; more rows go through a per-thread panel of 96 decoded rows x 256 features that
stays in cache, multiplied by x^T in 6-channel x 64-row register blocks, so each weight is decoded once per call.
Both run on ATen's thread pool, split over output channels.

Exactness: x is widened to float32 exactly (float32, bfloat16, float16 and FP8 all fit) and every decoded weight
(E3M2 / E2M1 / INT4 values times 2**e) is exact in float32, so each product is the one the reference's float32
matmul forms; only the order of the float32 summation differs from `packed_linear_ref`. Nothing is rounded to
bfloat16: on the machine this was written on (Xeon, AVX512-BF16) VDPBF16PS measured a quarter of FMA's instruction
rate, half its multiply rate, and bf16 tiles lost to float32 ones even where they are exact (bf16 and FP8 x).

The per-channel scale, x_scale, LoRC's side GEMM, bias, activation, residual and output quantization are the shared
`epilogue` of kernels/packed_linear.py on the kernel's float32 accumulator.

`takes` is False (the reference runs) for other operand kinds, tensors off the CPU, K not a multiple of 64 (the
decoder's step) and group sizes other than 16, 32 or multiples of 64; `available` is False where the CPU lacks
AVX-512 F/BW, the build fails (one warning says why and what to do) or ZQHERO_CPU_LOWBIT=0.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from zqhero_fx.errors import ConfigError
from zqhero_fx.formats import get_format
from zqhero_fx.kernels import vnni_cpu
from zqhero_fx.kernels.packed_linear import check_operands, epilogue
from zqhero_fx.kernels.quantized_linear import check_output

CPP_PATH = Path(__file__).resolve().parent / "csrc" / "lowbit_float_cpu.cpp"  # package data (pyproject.toml)
CPP_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
FORMAT_IDS = {"fp6_e3m2": 0, "fp4_e2m1": 1, "int4": 2}  # the C++ enum Format
FLOAT_X = (torch.float32, torch.bfloat16, torch.float16)  # weight-only FP6 activations
FP8_X = (torch.float8_e4m3fn, torch.float8_e5m2)  # W4A8 activations
FEATURE_STEP = 64  # K must be a multiple (the decoders take whole 64- or 128-feature chunks; FP6 pads the last)
# Rows from which decoding each weight once into a cached panel beats decoding it per 8-row block in registers.
PANEL_ROWS_MIN = 12


def extension_name() -> str:
    """A hash of the .cpp, its headers and the flags, so that an edited source never loads a stale build."""
    digest = vnni_cpu.source_digest([CPP_PATH, *vnni_cpu.SHARED_HEADERS], CPP_FLAGS + LD_FLAGS)
    return f"zqhero_lowbit_float_cpu_{digest}"


# ---------------------------------------------------------------- CPU features
@functools.cache
def _cpu_flags() -> frozenset[str]:
    return frozenset(vnni_cpu._cpuinfo()[0])


def cpu_supports_kernel() -> bool:
    """AVX-512 F and BW: what the kernel is compiled for."""
    return {"avx512f", "avx512bw"} <= _cpu_flags()


# ---------------------------------------------------------------- building
def _build_hint(error: BaseException) -> str:
    hint = vnni_cpu._build_hint(error)
    if hint.startswith("a compiler with"):  # vnni_cpu's catch-all names its own instruction set
        return ("a compiler with AVX-512 support (GCC >= 7 or Clang >= 5) is needed; the compiler output "
                "is in the message above, and the build directory under TORCH_EXTENSIONS_DIR "
                f"({os.environ.get('TORCH_EXTENSIONS_DIR') or '~/.cache/torch_extensions'})")
    return hint


@functools.cache
def extension():
    """The compiled module, or None (with one warning saying why) where it cannot be used here."""
    if os.environ.get("ZQHERO_CPU_LOWBIT", "1").strip() == "0" or not cpu_supports_kernel():
        return None
    return vnni_cpu.build_extension(
        extension_name(), CPP_PATH, CPP_FLAGS, LD_FLAGS, "FP6 / FP4 CPU GEMM kernel",
        "packed_linear runs its PyTorch reference on the CPU instead (slower, and it expands the whole weight)",
        "ZQHERO_CPU_LOWBIT", hint=_build_hint)


def available() -> bool:
    """AVX-512 F/BW present and the extension built (never raises)."""
    try:
        return extension() is not None
    except Exception:  # e.g. an unreadable source file: the reference still runs
        return False


# ---------------------------------------------------------------- the op
def _operands_taken(x, x_scale, w_codes, w_format, group_size, w_group_scale, group_scale_kind, w_group_zero) -> bool:
    """The operand kinds this kernel computes (shapes are check_operands' business)."""
    name = get_format(w_format).name
    if w_group_zero is not None or not isinstance(x, torch.Tensor):
        return False
    if name == "fp6_e3m2":
        return x.dtype in FLOAT_X and x_scale is None and group_scale_kind == "none"
    if name in ("fp4_e2m1", "int4"):
        return (x.dtype in FP8_X and x_scale is not None and group_scale_kind == "exponent"
                and isinstance(w_group_scale, torch.Tensor) and w_group_scale.dtype == torch.int8
                and (group_size in (16, 32) or group_size % FEATURE_STEP == 0))  # 0: one group of K features per row
    return False


def takes(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero, lorc,
          bias, residual, out_scale, activation, out_dtype) -> bool:
    try:
        if not _operands_taken(x, x_scale, w_codes, w_format, group_size, w_group_scale, group_scale_kind,
                               w_group_zero):
            return False
        check_output(out_scale, out_dtype, "packed_linear")
        check_operands(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind,
                       w_group_zero, lorc)
    except (ValueError, ConfigError):  # malformed operands: the reference raises the error that names them
        return False
    tensors = [x, x_scale, *w_codes, w_scale, w_group_scale, *lorc, bias, residual, out_scale]
    k = x.shape[-1]
    return k > 0 and k % FEATURE_STEP == 0 and all(t.device.type == "cpu" for t in tensors if t is not None)


def run(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero, lorc,
        bias, residual, out_scale, activation, out_dtype):
    check_output(out_scale, out_dtype, "packed_linear")
    check_operands(x, x_scale, w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero,
                   lorc)
    fmt = get_format(w_format)
    k = x.shape[-1]
    hi = w_codes[1].contiguous() if fmt.bits == 6 else None
    exponent = w_group_scale.contiguous() if group_scale_kind == "exponent" else None
    group_features = (group_size or k) if exponent is not None else k  # FP6 has no groups
    acc = extension().lowbit_float_gemm(x.reshape(-1, k).float().contiguous(), w_codes[0].contiguous(), hi, exponent,
                                        group_features, FORMAT_IDS[fmt.name], PANEL_ROWS_MIN)
    return epilogue(acc, x, x_scale, w_scale, lorc, bias, residual, out_scale, activation, out_dtype)
