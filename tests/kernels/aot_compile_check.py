"""Compile every zqhero Triton kernel for real NVIDIA targets (sm_80, sm_90) without a GPU.

The interpreter tests check what the kernels compute, but the interpreter accepts programs the GPU compiler rejects
(an INT8 or FP8 dot too small for the MMA, a layout the backend cannot lower, a tile that overflows shared memory).
FP8 specialisations are compiled for sm_90 only (FP8 needs sm_89+; the kernels refuse FP8 below it). This
script drives each launcher with CPU tensors, intercepts the launch, and runs Triton's own ahead-of-time pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin via the bundled ptxas) on the exact specialisation the JIT would build: same
signature, constexprs and alignment attributes. For autotuned kernels every config in the tuning list is compiled and
its shared memory checked against the architecture's per-block limit.

Run it with TRITON_INTERPRET unset (kernels must be JITFunctions):  python tests/kernels/aot_compile_check.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import zqhero_fx.kernels  # noqa: E402,F401
from zqhero_fx.kernels import (  # noqa: E402
    embedding_norm_quant,
    quantized_attention,
    quantized_linear,
    norm_quant,
    quantize,
    quantized_embedding,
)

# Opt-in shared memory per block (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}
# FP8 conversions and FP8 tensor-core dots need sm_89+; the FP8 launches are compiled only for those archs.
FP8_MIN_ARCH = 89
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def compile_for(jit_fn, args, kwargs, arch):
    """Specialise `jit_fn` for these launch arguments as the JIT would, then compile it for sm_<arch>."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(jit_fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


class Recorder:
    """Stands in for a kernel object in its module: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, name, kernel):
        self.name, self.kernel, self.launches = name, kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def drive_launchers():
    """Call each launcher on representative inputs (BERT-like sizes, every flag both ways somewhere), INT8 and FP8."""
    g = torch.Generator().manual_seed(0)

    def i8(*shape):
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)

    def f8(*shape, dtype=E4M3):
        return torch.randn(shape, generator=g).to(dtype)

    x16 = torch.randn(64, 768, generator=g).half()
    quantize.quantize_per_token_triton(x16)
    quantize.quantize_per_token_triton(torch.randn(4, 40000, generator=g))  # two-sweep path
    quantize.quantize_triton(x16, torch.rand(768, generator=g))
    quantize.dequantize_triton(i8(64, 768), torch.rand(64, 1, generator=g), torch.bfloat16)

    w, b = torch.rand(768, generator=g), torch.rand(768, generator=g)
    norm_quant.norm_quant_triton(x16, x16, w, b, 1e-12, True, True)
    norm_quant.norm_quant_triton(x16.bfloat16(), None, w, None, 1e-5, False, False)

    xs, ws = torch.rand(64, 1, generator=g), torch.rand(3072, generator=g)
    # FFN1: gelu + requantize; FFN2: residual + fp16 out; QKV: plain fp32 out with a scalar x_scale.
    quantized_linear.quantized_linear_triton(i8(64, 768), xs, i8(3072, 768), ws, b.repeat(4), None, ws, "gelu",
                                             torch.int8)
    quantized_linear.quantized_linear_triton(
        i8(64, 3072), xs, i8(768, 3072), w, b, x16, None, "gelu_tanh", torch.float16
    )
    quantized_linear.quantized_linear_triton(i8(64, 768), xs[:1, 0], i8(2304, 768), ws[:2304], None, None, None, "none",
                                             torch.float32)

    for head_dim in (32, 64, 128):
        q, k, v = i8(2, 12, 384, head_dim), i8(2, 12, 384, head_dim), i8(2, 12, 384, head_dim)
        mask = torch.zeros(2, 1, 1, 384)
        quantized_attention.quantized_attention_triton(q, k, v, mask, 0.01, 1 / 127, None, False, torch.float16)
    q = i8(2, 12, 128, 64)
    quantized_attention.quantized_attention_triton(
        q, q, q, torch.ones(2, 1, 128, 128, dtype=torch.bool), 0.01, 1 / 127, torch.rand(12, 1, 64), True, torch.int8
    )

    quantized_embedding.quantized_embedding_triton(torch.randint(0, 100, (8, 128)), i8(100, 768),
                                                   torch.rand(100, 1), torch.float16)
    embedding_norm_quant.embedding_norm_quant_triton(
        [torch.randint(0, 100, (8, 128)), torch.zeros(8, 128, dtype=torch.long), torch.arange(128)[None]],
        [i8(100, 768), i8(2, 768), torch.randn(512, 768)],
        [torch.rand(100, 1), torch.rand(1), torch.empty(0)],
        w, b, 1e-12, True,
    )

    # FP8 specialisations (sm_89+ only: compiled for the requested archs >= 89). E4M3 everywhere, E5M2 where its
    # code path differs (rounding constants, the e5m2 cvt, a mixed E5M2 x E4M3 dot).
    quantize.quantize_per_token_triton(x16, E4M3)
    quantize.quantize_per_token_triton(torch.randn(4, 40000, generator=g), E5M2)
    quantize.quantize_triton(x16, torch.rand(768, generator=g), E4M3)
    quantize.dequantize_triton(f8(64, 768, dtype=E5M2), torch.rand(64, 1, generator=g), torch.bfloat16)
    norm_quant.norm_quant_triton(x16, x16, w, b, 1e-12, True, True, "layer", E4M3)
    norm_quant.norm_quant_triton(x16.bfloat16(), None, w, None, 1e-6, False, False, "rms", E5M2)
    quantized_linear.quantized_linear_triton(f8(64, 768), xs, f8(3072, 768), ws, b.repeat(4), None, ws, "gelu", E4M3)
    quantized_linear.quantized_linear_triton(
        f8(64, 3072, dtype=E5M2), xs, f8(768, 3072), w, b, x16, None, "none", torch.float16
    )
    for head_dim in (64, 128):
        q, k, v = f8(2, 12, 384, head_dim), f8(2, 12, 384, head_dim), f8(2, 12, 384, head_dim)
        quantized_attention.quantized_attention_triton(
            q, k, v, torch.zeros(2, 1, 1, 384), 0.01, 1 / 448, None, False, torch.float16
        )
    q = f8(2, 12, 128, 64)
    quantized_attention.quantized_attention_triton(
        q, q, q, None, 0.01, 1 / 448, torch.rand(12, 1, 64), True, E4M3
    )
    quantized_embedding.quantized_embedding_triton(torch.randint(0, 100, (8, 128)), f8(100, 768),
                                                   torch.rand(100, 1), torch.float16)
    embedding_norm_quant.embedding_norm_quant_triton(
        [torch.randint(0, 100, (8, 128)), torch.zeros(8, 128, dtype=torch.long), torch.arange(128)[None]],
        [f8(100, 768), f8(2, 768, dtype=E5M2), torch.randn(512, 768)],
        [torch.rand(100, 1), torch.rand(1), torch.empty(0)],
        w, b, 1e-12, True, E4M3,
    )


def uses_fp8(args) -> bool:
    """Whether a recorded launch has float8 operands (those compile for sm_89+ only)."""
    for a in args:
        if isinstance(a, (tuple, list)) and uses_fp8(a):
            return True
        if isinstance(a, torch.Tensor) and a.dtype in (E4M3, E5M2):
            return True
    return False


KERNELS = [
    (quantize, "_quantize_per_token_kernel"),
    (quantize, "_quantize_kernel"),
    (quantize, "_dequantize_kernel"),
    (norm_quant, "_norm_quant_kernel"),
    (quantized_linear, "_quantized_linear_kernel_tuned"),
    (quantized_attention, "_quantized_attention_kernel_tuned"),
    (quantized_embedding, "_quantized_embedding_kernel"),
    (embedding_norm_quant, "_embedding_norm_quant_kernel"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--all-configs", action="store_true", help="compile every autotune config for every launch")
    parser.add_argument("--quick", action="store_true", help="only the first autotune config of each launch")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    recorders = []
    for module, name in KERNELS:
        rec = Recorder(name, getattr(module, name))
        setattr(module, name, rec)
        recorders.append((module, rec))
    try:
        drive_launchers()
    finally:
        for module, rec in recorders:
            setattr(module, rec.name, rec.kernel)

    results, failures = [], []
    for _, rec in recorders:
        if not rec.launches:
            failures.append(f"{rec.name}: never launched by drive_launchers")
        for launch_no, (largs, lkwargs) in enumerate(rec.launches):
            if isinstance(rec.kernel, Autotuner):
                # Every config for the first launch (or all with --all-configs), the first config otherwise.
                every = args.all_configs or (launch_no == 0 and not args.quick)
                configs = rec.kernel.configs if every else rec.kernel.configs[:1]
                variants = [
                    (c, {**lkwargs, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
                    for c in configs
                ]
                jit_fn = rec.kernel.fn
            else:
                variants = [(None, lkwargs)]
                jit_fn = rec.kernel
            fp8 = uses_fp8(largs)
            for config, kwargs in variants:
                for arch in args.arch:
                    if fp8 and arch < FP8_MIN_ARCH:
                        continue
                    label = f"{rec.name}[{launch_no}] sm_{arch}" + (f" {config}" if config else "")
                    start = time.perf_counter()
                    try:
                        compiled = compile_for(jit_fn, largs, kwargs, arch)
                    except Exception as exc:  # report every failure, not just the first
                        failures.append(f"{label}: {type(exc).__name__}: {str(exc)[-1500:]}")
                        continue
                    shared = compiled.metadata.shared
                    if shared > SMEM_LIMIT[arch]:
                        failures.append(f"{label}: needs {shared} B shared memory > {SMEM_LIMIT[arch]}")
                    results.append({"kernel": label, "shared": shared, "seconds": time.perf_counter() - start})
                    print(f"ok  {label}  shared={shared}B  {time.perf_counter() - start:.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"compiled": results, "failures": failures}, f, indent=1)
    for failure in failures:
        print("FAIL", failure)
    print(f"{len(results)} compiled, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
