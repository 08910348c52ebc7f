"""The INT8 CPU kernels of quantized_linear, norm_quant, quantize_per_token and quantize: which instruction set runs
them on this host, their build, and their launchers. The C++ is csrc/quantized_linear_cpu.cpp (GEMM + fused epilogue),
csrc/norm_quant_cpu.cpp and csrc/quantize_cpu.cpp; the registrations are beside the references (quantized_linear.py,
norm_quant.py, quantize.py).

One C++ source, two builds, chosen at run time from /proc/cpuinfo:

* AVX-512 (F/BW/VL/DQ/VNNI: Ice Lake and later Xeons, Zen 4/5): the GEMM is zqhero's own VNNI kernel, which applies
  the whole epilogue to each register tile, so neither an INT32 accumulator nor a float intermediate reaches memory.
* AMX-INT8 hosts (Sapphire Rapids and later) use the same build, but their GEMM is oneDNN's `torch._int_mm` (AMX tile
  instructions, several times VNNI's throughput) followed by the build's epilogue pass over the INT32 result.
* AVX2 + FMA (no AVX-512): `torch._int_mm` (oneDNN's AVX2 INT8 GEMM) and the AVX2 build's epilogue; correct, slower.

`ZQHERO_CPU_GEMM=zqhero|onednn` overrides the GEMM choice (`auto`, the default, is the above); `ZQHERO_CPU_INT8=0`
turns these kernels off (the ops run their PyTorch references). Every build goes through vnni_cpu.build_extension: on
the first run on a fresh machine it compiles (about a minute), later runs load it from TORCH_EXTENSIONS_DIR; a failed
build warns once, says how to fix it, and the ops stay correct on their references. `describe()` says which path
runs; the coverage report and the benchmarks print it.

Threads: the kernels split their work with ATen's parallel_for, i.e. torch's own OpenMP pool (the extension links the
libgomp torch already loaded: one pool, sized by torch.set_num_threads).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from zqhero_fx.kernels import vnni_cpu
from zqhero_fx.ops import ACTIVATIONS

ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}  # the C++ enum's order

CSRC = Path(__file__).resolve().parent / "csrc"
# package data (pyproject.toml)
SOURCES = [CSRC / "quantized_linear_cpu.cpp", CSRC / "norm_quant_cpu.cpp", CSRC / "quantize_cpu.cpp"]
HEADERS = [*vnni_cpu.SHARED_HEADERS, CSRC / "int8_store.h"]
# -ffp-contract=off: no fused multiply-adds, so each float rounding happens where the reference's separate ops round.
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
ISA_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma"},
             "avx2": {"avx2", "fma"}}
LD_FLAGS = ["-fopenmp"]
GEMM_CHOICES = ("auto", "zqhero", "onednn")


def cpu_flags() -> set[str]:
    return vnni_cpu._cpuinfo()[0]


def build_isa(flags: set[str] | None = None) -> str | None:
    """The widest build this CPU runs ('avx512' or 'avx2'), or None (no AVX2: the references run)."""
    flags = cpu_flags() if flags is None else flags
    return next((isa for isa in ("avx512", "avx2") if ISA_NEEDS[isa] <= flags), None)


def extension_name(isa: str) -> str:
    """A hash of the sources, header and flags: an edited source never loads a stale build."""
    digest = vnni_cpu.source_digest(SOURCES + HEADERS, COMMON_FLAGS + ISA_FLAGS[isa] + LD_FLAGS)
    return f"zqhero_int8_cpu_{isa}_{digest}"


def enabled() -> bool:
    return os.environ.get("ZQHERO_CPU_INT8", "1").strip() != "0"


@functools.cache
def extension(isa: str | None = None):
    """The compiled module for `isa` (default: this CPU's), or None (one warning says why) where it cannot be used."""
    isa = isa or build_isa()
    if not enabled() or isa is None:
        return None
    return vnni_cpu.build_extension(
        extension_name(isa), SOURCES, COMMON_FLAGS + ISA_FLAGS[isa], LD_FLAGS, f"INT8 CPU kernels ({isa} build)",
        "INT8 GEMMs and norms run their PyTorch references on the CPU instead (correct, several times slower)",
        "ZQHERO_CPU_INT8")


def available() -> bool:
    """A build for this CPU exists or builds (never raises)."""
    try:
        return extension() is not None
    except Exception:  # noqa: BLE001 - a kernel that cannot load is simply not available
        return False


def gemm_choice() -> str:
    choice = os.environ.get("ZQHERO_CPU_GEMM", "auto").strip().lower() or "auto"
    if choice not in GEMM_CHOICES:
        raise ValueError(f"ZQHERO_CPU_GEMM={choice!r} is not a GEMM choice; use one of {', '.join(GEMM_CHOICES)}")
    return choice


def gemm_path(flags: set[str] | None = None) -> str:
    """'zqhero' (the VNNI GEMM with the epilogue in registers) or 'onednn' (torch._int_mm, then the epilogue pass)."""
    flags = cpu_flags() if flags is None else flags
    choice = gemm_choice()
    isa = build_isa(flags)
    if isa != "avx512":
        return "onednn"  # the zqhero GEMM is AVX-512 VNNI code
    if choice != "auto":
        return choice
    return "onednn" if "amx_int8" in flags else "zqhero"


def describe() -> str:
    """One line: which INT8 GEMM and which epilogue/norm build run here (for reports and benchmark headers)."""
    flags = cpu_flags()
    isa = build_isa(flags)
    if not enabled():
        return "PyTorch references (ZQHERO_CPU_INT8=0)"
    if isa is None:
        return "PyTorch references (this CPU has no AVX2)"
    if not available():
        return f"PyTorch references (the {isa} build of the INT8 CPU kernels failed; see the warning)"
    onednn_isa = "AMX-INT8" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags else \
        "AVX-VNNI" if "avx_vnni" in flags else "AVX2"
    if gemm_path(flags) == "zqhero":
        return "INT8 GEMM: zqhero AVX-512 VNNI, epilogue fused in registers; norms: zqhero AVX-512"
    return f"INT8 GEMM: oneDNN ({onednn_isa}) + zqhero {isa.upper()} epilogue pass; norms: zqhero {isa.upper()}"


# ---------------------------------------------------------------- launchers
def _float_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def linear_takes(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype) -> bool:
    """INT8 x INT8 on the CPU with float32 scales, bias and residual, a float32 or INT8 output."""
    if not (xq.dtype == wq.dtype == torch.int8 and xq.is_cpu and wq.is_cpu and wq.dim() == 2):
        return False
    if activation not in ACTIVATION_CODES or x_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        return False
    if out_scale is None:
        if out_dtype != torch.float32:
            return False
    elif out_dtype != torch.int8 or out_scale.dtype != torch.float32 or out_scale.numel() not in (1, wq.shape[0]):
        return False
    m = xq.numel() // max(1, xq.shape[-1]) if xq.dim() else 1
    return (x_scale.numel() in (1, m) and w_scale.numel() == wq.shape[0]
            and (bias is None or (bias.dtype == torch.float32 and bias.numel() == wq.shape[0]))
            and (residual is None or (residual.dtype == torch.float32
                                      and tuple(residual.shape) == (*xq.shape[:-1], wq.shape[0])))
            and xq.shape[-1] <= vnni_cpu.MAX_TERMS and wq.shape[1] == xq.shape[-1])


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """The C++ reads scales and biases by their element count: any shape, but contiguous."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def quantized_linear(xq, x_scale, wq, w_scale, bias, residual, out_scale, activation, out_dtype):
    # linear_takes has checked the operands (dtypes, sizes, the out_scale / out_dtype pairing); this runs per call,
    # ~10 us of Python around a decode step's ~10 us GEMM, so it does no more than it must.
    k, n = xq.shape[-1], wq.shape[0]
    x2 = xq if xq.dim() == 2 and xq.is_contiguous() else xq.reshape(-1, k).contiguous()
    res = None if residual is None else residual.reshape(-1, n)
    if res is not None and res.stride(-1) != 1:
        res = res.contiguous()
    operands = (_contiguous(x_scale), _contiguous(w_scale), _contiguous(bias), res, _contiguous(out_scale),
                ACTIVATION_CODES[activation])
    if gemm_path() == "zqhero" and wq.stride(1) == 1 and k % 16 == 0:
        out = extension().quantized_linear(x2, operands[0], wq, *operands[1:])
    else:
        from zqhero_fx.kernels.quantized_linear import int8_matmul_ref

        out = extension().linear_epilogue(int8_matmul_ref(x2, wq), *operands)
    return out if xq.dim() == 2 else out.reshape(*xq.shape[:-1], n)


def norm_quant_takes(x, residual, weight, bias, eps, emit_normed, emit_sum, kind="layer", dtype=torch.int8) -> bool:
    """float32 rows on the CPU (residual, weight, bias float32 too), LayerNorm or RMSNorm, INT8 output."""
    return (dtype == torch.int8 and kind in ("layer", "rms") and x.dtype == torch.float32 and x.is_cpu and x.dim() >= 1
            and weight.dtype == torch.float32 and weight.numel() == x.shape[-1]
            and (residual is None or (residual.dtype == torch.float32 and residual.shape == x.shape))
            and (bias is None or (bias.dtype == torch.float32 and bias.numel() == x.shape[-1])))


def norm_quant(x, residual, weight, bias, eps, emit_normed, emit_sum, kind="layer", dtype=torch.int8):
    q, scale, normed, summed = extension().norm_quant(
        x.contiguous(), None if residual is None else residual.contiguous(), weight.reshape(-1).contiguous(),
        _float_vector(bias), float(eps), bool(emit_normed), bool(emit_sum), kind == "rms")
    return q, scale, normed, summed


def quantize_per_token_takes(x, dtype=torch.int8) -> bool:
    return dtype == torch.int8 and x.dtype == torch.float32 and x.is_cpu and x.dim() >= 1


def quantize_per_token(x, dtype=torch.int8):
    q, scale = extension().quantize_per_token(x.contiguous())
    return q, scale


def quantize_takes(x, scale, dtype=torch.int8) -> bool:
    """Static INT8 quantization of float32 rows with a float32 per-feature [D] or per-tensor scale."""
    return (dtype == torch.int8 and x.dtype == torch.float32 and x.is_cpu and x.dim() >= 1
            and scale.dtype == torch.float32 and scale.is_cpu
            and (scale.numel() == 1 or tuple(scale.shape) == (x.shape[-1],)))


def quantize(x, scale, dtype=torch.int8):
    return extension().quantize_static(x.contiguous(), scale.reshape(-1).contiguous())


def embedding_norm_quant_takes(indices, tables, scales, weight, bias, eps, emit_normed, dtype=torch.int8) -> bool:
    """INT8 (per-row or per-table scale) or float32 tables, integer indices, float32 LayerNorm operands, INT8 out."""
    if dtype != torch.int8 or weight.dtype != torch.float32 or not weight.is_cpu or \
            (bias is not None and bias.dtype != torch.float32) or not tables or \
            not (len(indices) == len(tables) == len(scales)):
        return False
    for index, table, scale in zip(indices, tables, scales):
        if not (table.is_cpu and index.is_cpu and table.dim() == 2) or index.is_floating_point() \
                or index.dtype == torch.bool:
            return False
        if table.dtype == torch.int8:
            if scale.dtype != torch.float32 or scale.numel() not in (1, table.shape[0]):
                return False
        elif table.dtype != torch.float32 or scale.numel() != 0:
            return False
    return True


def embedding_norm_quant(indices, tables, scales, weight, bias, eps, emit_normed, dtype=torch.int8):
    from zqhero_fx.kernels.embedding_norm_quant import _check_inputs

    shape, dim = _check_inputs(indices, tables, scales)
    tokens = [index.expand(shape).reshape(-1).to(torch.int64).contiguous() for index in indices]
    q, scale, normed = extension().embedding_norm_quant(
        tokens, [t.contiguous() for t in tables], [s.reshape(-1).float().contiguous() for s in scales],
        weight.reshape(-1).contiguous(), _float_vector(bias), float(eps), bool(emit_normed))
    if emit_normed:
        normed = normed.reshape(*shape, dim)
    return q.reshape(*shape, dim), scale.reshape(*shape, 1), normed


def gated_linear_takes(xq, x_scale, w_gate, w_gate_scale, w_up, w_up_scale, activation, out_scale, out_dtype) -> bool:
    """quantized_linear_takes for each branch (no bias, no residual), both weights alike."""
    return (w_up.shape == w_gate.shape and w_up.dtype == w_gate.dtype and w_up.is_cpu
            and w_up_scale.dtype == torch.float32 and w_up_scale.numel() == w_up.shape[0]
            and linear_takes(xq, x_scale, w_gate, w_gate_scale, None, None, out_scale, activation, out_dtype))


def quantized_gated_linear(xq, x_scale, w_gate, w_gate_scale, w_up, w_up_scale, activation, out_scale, out_dtype):
    from zqhero_fx.kernels.quantized_gated_linear import OP, _check_shapes
    from zqhero_fx.kernels.quantized_linear import check_output, int8_matmul_ref

    check_output(out_scale, out_dtype, OP)
    _check_shapes(xq, w_gate, w_up)
    lead, k, n = xq.shape[:-1], xq.shape[-1], w_gate.shape[0]
    x2 = xq.reshape(-1, k).contiguous()
    scales = (_float_vector(x_scale), w_gate_scale.contiguous(), w_up_scale.contiguous())
    ext = extension()
    if gemm_path() == "zqhero" and w_gate.stride(1) == 1 and w_up.stride(1) == 1 and k % 16 == 0:
        out = ext.quantized_gated_linear(x2, scales[0], w_gate, scales[1], w_up, scales[2], _float_vector(out_scale),
                                         ACTIVATION_CODES[activation])
    else:
        out = ext.gated_epilogue(int8_matmul_ref(x2, w_gate), int8_matmul_ref(x2, w_up), *scales,
                                 _float_vector(out_scale), ACTIVATION_CODES[activation])
    return out.reshape(*lead, n)
