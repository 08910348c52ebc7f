"""Compile a converted model with Inductor.

On CPU every zqhero op is decomposed into its PyTorch reference before Inductor sees the graph: the INT8 GEMMs stay
oneDNN calls (aten._int_mm, VNNI/AMX where the CPU has them) while their epilogues (row x column scales, bias, GeLU,
requantization), LayerNorm^quant and the attention softmax become fused loops in Inductor's generated C++. That is what
makes the CPU path fast (benchmarks/bench_e2e.py). On CUDA, or with ZQHERO_KERNELS=triton, the ops stay opaque and run
their Triton kernels; Inductor fuses only the floating-point remainder around them.
"""

from __future__ import annotations

import os

import torch
import torch.fx as fx

from zqhero_fx.kernels import OPS, kernel_choice


def decompositions() -> dict:
    """zqhero op overload -> its reference implementation (pure, traceable PyTorch)."""
    return {getattr(torch.ops.zqhero, name).default: reference for name, reference in OPS.items()}


def _on_cpu(example_inputs) -> bool:
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    return all(t.device.type == "cpu" for t in tensors)


def inductor_backend(gm: fx.GraphModule, example_inputs):
    """A torch.compile backend: Inductor, with the zqhero ops decomposed when the graph runs on CPU."""
    # Inductor's C++ builder imports setuptools lazily; if stdlib distutils was imported first (by another library),
    # setuptools' distutils shim asserts. Keeping stdlib distutils avoids that whatever the import order.
    os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    if _on_cpu(example_inputs) and kernel_choice() != "triton":
        table.update(decompositions())
    return compile_fx(gm, example_inputs, decompositions=table)


def compile(gm: fx.GraphModule, *, dynamic: bool = True):
    """torch.compile a converted GraphModule with `inductor_backend`; shapes stay dynamic (no recompile per size)."""
    return torch.compile(gm, backend=inductor_backend, dynamic=dynamic)
