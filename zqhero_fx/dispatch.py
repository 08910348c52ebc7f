"""The one place that decides which implementation of a zqhero op runs: its PyTorch reference, its Triton kernel or a
fast CPU kernel.

Kernel modules (zqhero_fx/kernels/) register a `KernelSpec` per op name; the op bodies in zqhero_fx/ops.py call
`run(name, *args)`, and Inductor's decompositions ask `decompositions()`. Selection:

  * `ZQHERO_KERNELS=auto|triton|reference` sets the default; `use_kernels("triton")` overrides it inside a block.
  * auto: CUDA tensors run the Triton kernel where it takes these operands (else the reference, with one warning);
    CPU tensors run the CPU kernel where it takes them, else the reference.
  * triton: the Triton kernel everywhere (on CPU tensors only under TRITON_INTERPRET=1, which is how this project tests
    its kernels); operands it cannot take (a format without a Triton kernel) raise a clear error.
  * reference: the PyTorch spec, always.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

CHOICES = ("auto", "triton", "reference")
_local = threading.local()


@dataclass(frozen=True)
class KernelSpec:
    """The implementations of one op. `*_applies(*args) -> bool` says whether that kernel takes these operands (dtypes
    say the format); a missing predicate means it takes everything."""

    reference: Callable
    triton: Callable | None = None
    triton_applies: Callable[..., bool] | None = None
    cpu: Callable | None = None
    cpu_applies: Callable[..., bool] | None = None
    # Whether the fast CPU kernel can run on this machine at all (instruction set, a built extension).
    cpu_available: Callable[[], bool] | None = None
    # The fast CPU kernel is one opaque call worth keeping under Inductor (not decomposed into the reference).
    cpu_kernel_beats_inductor: bool = False


KERNELS: dict[str, KernelSpec] = {}


def register(name: str, spec: KernelSpec) -> None:
    KERNELS[name] = spec


def _spec(name: str) -> KernelSpec:
    if name not in KERNELS:
        importlib.import_module("zqhero_fx.kernels")  # registers every op's kernels on first use
    return KERNELS[name]


def _validated(choice: str, source: str) -> str:
    if choice not in CHOICES:
        raise ValueError(f"{source}={choice!r} is not a kernel choice; use one of {', '.join(CHOICES)}")
    return choice


def kernel_choice() -> str:
    """The active choice: the innermost `use_kernels` block, else $ZQHERO_KERNELS, else 'auto'."""
    forced = getattr(_local, "choice", None)
    if forced is not None:
        return forced
    return _validated(os.environ.get("ZQHERO_KERNELS", "auto").strip().lower() or "auto", "ZQHERO_KERNELS")


@contextlib.contextmanager
def use_kernels(choice: str):
    """Run the zqhero ops in this block with `choice` ('auto', 'triton' or 'reference')."""
    previous = getattr(_local, "choice", None)
    _local.choice = _validated(choice, "use_kernels")
    try:
        yield
    finally:
        _local.choice = previous


def triton_usable(device: torch.device) -> bool:
    """True where a Triton launch can run: CUDA, or any device under the Triton interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp8_runs_on(device: torch.device) -> bool:
    """FP8 conversions and FP8 matmuls need an sm_89 or newer GPU (Ada, Hopper); the CPU (references) and the Triton
    interpreter take them anywhere."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _first_tensor(args) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("a zqhero op was called without tensor operands")


def _applies(predicate, args) -> bool:
    return predicate is None or bool(predicate(*args))


_warned: set[str] = set()


def select(name: str, *args) -> tuple[str, Callable]:
    """(implementation label, function) that `run(name, *args)` would call."""
    spec = _spec(name)
    choice = kernel_choice()
    device = _first_tensor(args).device
    if choice == "reference":
        return "reference", spec.reference
    if choice == "triton":
        if not triton_usable(device):
            raise RuntimeError("ZQHERO_KERNELS=triton on a CPU tensor needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before Python starts (or use 'auto'/'reference')")
        if spec.triton is None or not _applies(spec.triton_applies, args):
            dtypes = sorted({str(a.dtype if isinstance(a, torch.Tensor) else a).replace("torch.", "")
                             for a in args if isinstance(a, (torch.Tensor, torch.dtype))})
            raise NotImplementedError(f"zqhero::{name} has no Triton kernel for these operands (dtypes {dtypes}); "
                                      "run it with use_kernels('reference') or 'auto'")
        return "triton", spec.triton
    if device.type == "cuda":
        if spec.triton is not None and _applies(spec.triton_applies, args):
            return "triton", spec.triton
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"zqhero::{name}: no Triton kernel for these operand formats; running the PyTorch "
                          "reference on the GPU (correct, not fast)", RuntimeWarning, stacklevel=3)
        return "reference", spec.reference
    if device.type == "cpu" and spec.cpu is not None and (spec.cpu_available is None or spec.cpu_available()) \
            and _applies(spec.cpu_applies, args):
        return "cpu", spec.cpu
    return "reference", spec.reference


def run(name: str, *args):
    return select(name, *args)[1](*args)


def decompositions(keep_fast_cpu_kernels: bool = True) -> dict:
    """zqhero op overload -> its reference (pure, traceable PyTorch), for Inductor to fuse on the CPU.

    With `keep_fast_cpu_kernels`, ops whose hand-written CPU kernel beats Inductor's code for the reference stay
    opaque (one extern call each)."""
    importlib.import_module("zqhero_fx.kernels")
    table = {}
    for name, spec in KERNELS.items():
        if keep_fast_cpu_kernels and kernel_choice() == "auto" and spec.cpu_kernel_beats_inductor \
                and (spec.cpu_available is None or spec.cpu_available()):
            continue
        table[getattr(torch.ops.zqhero, name).default] = spec.reference
    return table


__all__ = ["KernelSpec", "KERNELS", "register", "select", "run", "decompositions", "kernel_choice", "use_kernels",
           "triton_usable", "fp8_runs_on", "CHOICES"]
