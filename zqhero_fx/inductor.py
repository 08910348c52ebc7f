"""Compile a converted model with Inductor.

The converted module is already fast on its own: its zqhero ops call fused C++ kernels on the CPU and Triton kernels on
CUDA. Compiling adds Inductor's fusion of the floating-point glue around them. On CPU, ops with a fast C++ kernel
(`cpu_kernel_beats_inductor` in zqhero_fx/dispatch.py: the INT8 GEMMs with their epilogues, the norms, attention,
embeddings) stay one extern call each; the others (quantize, dequantize, ...) are decomposed into their PyTorch
references, which Inductor fuses with the float ops that produce or consume them. Where no C++ kernel builds, every op
is decomposed, and the INT8 GEMMs become oneDNN `_int_mm` calls with their epilogues in Inductor's generated C++.
On CUDA, or with ZQHERO_KERNELS=triton, the ops stay opaque and run their Triton kernels.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.fx as fx

from zqhero_fx import dispatch
from zqhero_fx.dispatch import kernel_choice
from zqhero_fx.kernels import int8_cpu


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
        table.update(dispatch.decompositions(keep_fast_cpu_kernels=True))
    return compile_fx(gm, example_inputs, decompositions=table)


def _detached(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy with its own parameter/buffer/submodule dicts (the tensors themselves are shared)."""
    clone = copy.copy(module)
    clone._parameters, clone._buffers, clone._modules = (dict(module._parameters), dict(module._buffers),
                                                         dict(module._modules))
    return clone


def _copy_path(root: torch.nn.Module, path: list[str]) -> torch.nn.Module:
    """Detach every submodule of (an already detached) `root` along `path`; returns the last one, safe to modify."""
    parent = root
    for name in path:
        child = _detached(parent._modules[name])
        parent._modules[name] = child
        parent = child
    return parent


def relayout_gemm_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose CPU INT8 GEMM weights are stored N-major (same [N, K] shape and values, strides (1, N)),
    where oneDNN runs them; `gm` itself where zqhero's VNNI GEMM or Triton does.

    The op's [N, K] K-major layout is what tensor cores want for B; oneDNN's `_int_mm` wants B = W^T as a contiguous
    [K, N] and runs BERT-base's 768x768 GEMMs ~25% slower on the strided view (0.94 vs 0.70 ms at M = 1024 on this
    machine's VNNI). Here W^T *is* contiguous, so the reference's `wq.t()` hands oneDNN its preferred layout with no
    per-call copy. The input module is not modified; tensors that are not GEMM weights are shared with it. With
    kernels forced to Triton (ZQHERO_KERNELS=triton) `gm` is returned as it is: those kernels want K-major weights.
    """
    if kernel_choice() == "triton" or (int8_cpu.available() and int8_cpu.gemm_path() == "zqhero"):
        return gm  # Triton, and zqhero's own VNNI GEMM, read the weight rows K-major as they are
    out = _detached(gm)
    done = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.zqhero.quantized_linear.default:
            continue
        weight = node.args[2]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or weight.target in done:
            continue
        *owner_path, name = weight.target.split(".")
        tensor = getattr(gm.get_submodule(".".join(owner_path)), name)
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.dim() != 2:
            continue
        owner = _copy_path(out, owner_path)
        relaid = tensor.t().contiguous().t()
        if name in owner._parameters:
            owner._parameters[name] = torch.nn.Parameter(relaid, requires_grad=False)
        elif name in owner._buffers:
            owner._buffers[name] = relaid
        else:
            object.__setattr__(owner, name, relaid)
        done.add(weight.target)
    return out


class NoGradModule(torch.nn.Module):
    """Runs `compiled` with autograd off, whatever the caller's grad mode, and otherwise behaves like it.

    The zqhero ops have no backward: called with grad enabled, AOTAutograd would trace a joint forward-backward
    graph and fail ("no autograd formula was registered"). Switching grad off here, outside the compiled region,
    leaves the compiled graph as a caller under torch.no_grad() gets it, so both share one compile."""

    def __init__(self, compiled: torch.nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            compiled = self.__dict__.get("_modules", {}).get("compiled")
            if compiled is None or name.startswith("__"):  # dunders (__deepcopy__...) must stay this module's own
                raise
            return getattr(compiled, name)  # meta, graph, code...: as torch.compile's module forwards them


def compile(gm: fx.GraphModule, *, dynamic: bool = True) -> NoGradModule:
    """torch.compile a converted GraphModule with `inductor_backend`; shapes stay dynamic (no recompile per size).
    The result is called like `gm` and always runs for inference (`NoGradModule`), with or without torch.no_grad().

    Where oneDNN runs the CPU GEMMs (AMX and AVX2 hosts, or no C++ kernels), the GEMM weights are re-laid out for it
    first (`relayout_gemm_weights`), so the compiled module holds its own N-major copy of them; `gm` itself is left as
    it was."""
    return NoGradModule(torch.compile(relayout_gemm_weights(gm), backend=inductor_backend, dynamic=dynamic))
