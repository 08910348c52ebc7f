"""Which implementation a zqhero op runs: the PyTorch reference or the Triton kernel.

`ZQHERO_KERNELS=auto|triton|reference` sets the default; `use_kernels("triton")` overrides it in a block.
`auto` runs Triton on CUDA tensors and the reference on CPU. `triton` forces Triton everywhere: on CPU tensors that
only works under `TRITON_INTERPRET=1`, which is how this machine tests every kernel.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

CHOICES = ("auto", "triton", "reference")
_local = threading.local()


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


def wants_triton(tensor: torch.Tensor) -> bool:
    """Should the op whose main input is `tensor` run its Triton kernel?"""
    choice = kernel_choice()
    if choice == "reference":
        return False
    if choice == "auto":
        return tensor.device.type == "cuda"
    if not triton_usable(tensor.device):
        raise RuntimeError(
            "ZQHERO_KERNELS=triton on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before Python starts (or use 'auto'/'reference')"
        )
    return True
