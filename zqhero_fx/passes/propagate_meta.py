"""propagate_meta: run the graph on fake tensors and record each node's value (shape, dtype, device) in
node.meta["val"]. Placeholders keep the fake values torch.export gave them (symbolic batch and sequence sizes), or get
them from the example inputs stored by convert. The runner re-runs this after every pass that changes the graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from zqhero_fx.errors import CaptureError


def _placeholder_fakes(gm: fx.GraphModule):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    existing = [n.meta.get("val") for n in placeholders]
    fake_modes = {v.fake_mode for v in existing if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode")}
    if placeholders and len(fake_modes) == 1 and all(v is not None for v in existing):
        return fake_modes.pop(), existing
    example = gm.meta.get("zqhero", {}).get("flat_example")
    if example is None:
        if not placeholders:
            return FakeTensorMode(shape_env=ShapeEnv()), []
        raise CaptureError(
            "zqhero_fx needs example inputs to learn the graph's shapes: capture with zqhero_fx.trace(model, inputs), "
            "or pass calibration= (or example_inputs=) to convert"
        )
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example]
    return mode, fakes


def propagate_meta(gm: fx.GraphModule) -> fx.GraphModule:
    mode, inputs = _placeholder_fakes(gm)
    for node, fake in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs):
        node.meta["val"] = fake
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    return gm
