"""clean_up: dead-code elimination, drop buffers no node reads any more (the float weights INT8 ones replaced), lint,
recompile. Postcondition: a plain, runnable GraphModule holding only what it uses."""

from __future__ import annotations

import torch.fx as fx

from zqhero_fx.passes._graph import eliminate_dead_code


def clean_up(gm: fx.GraphModule) -> fx.GraphModule:
    eliminate_dead_code(gm)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}  # these modules read their own tensors
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name not in used and not any(name.startswith(m + ".") for m in called):
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            delattr(module, leaf)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
