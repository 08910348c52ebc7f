"""Capturing a model as a GraphModule (torch.export underneath) and turning user inputs into the graph's flat inputs."""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._pytree import tree_flatten_spec
from torch.fx.graph import _PyTreeCodeGen

from zqhero_fx.errors import CaptureError


def split_inputs(inputs, what: str = "example inputs", error=CaptureError) -> tuple[tuple, dict]:
    """(args, kwargs) of one batch given as a tuple of positional args, a dict of keyword args, or one tensor."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    raise error(f"{what} must be a tuple of positional args, a dict of keyword args or a tensor, "
                f"got {type(inputs).__name__}")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Capture in eval mode (dropout off) and put every submodule's training flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _dynamic_shapes(model, args, kwargs):
    """Batch and sequence dims of every tensor input may vary; export decides what really can."""
    def spec(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return {d: torch.export.Dim.AUTO for d in range(min(x.dim(), 2))}
        return None

    def specs(tree):
        return pytree.tree_map(spec, tree, is_leaf=lambda x: isinstance(x, torch.Tensor))

    if not kwargs:
        return tuple(specs(a) for a in args)
    if not args:
        return {k: specs(v) for k, v in kwargs.items()}
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    return {k: specs(v) for k, v in bound.arguments.items()}


def trace(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """Capture `model` (any nn.Module, Hugging Face models included) as a GraphModule with torch.export.

    `example_inputs` is a tuple of positional args or a dict of keyword args. Batch and sequence dims are exported as
    dynamic, so the converted model accepts other sizes; use examples with batch and sequence > 1 (export specialises
    a size-1 dim). The returned module takes the same arguments and returns the same structure as the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"trace takes an nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs)
    dynamic = _dynamic_shapes(model, args, kwargs)
    try:
        with _eval_mode(model), torch.no_grad():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as error:
        raise CaptureError(f"could not capture {type(model).__name__} with torch.export: {type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}. Models with data-dependent Python "
                           "control flow need torch.compile(model, backend='zqhero') instead, which splits them "
                           "into graphs") from error
    gm = program.module()
    for node in list(gm.graph.nodes):  # the guard call checks inputs against export's assumptions; shapes vary here
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    gm.meta["zqhero_example_inputs"] = example_inputs
    return gm


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def flatten_inputs(gm: fx.GraphModule, inputs, what: str = "input") -> list:
    """The flat list of placeholder values for one batch given as a tuple, a dict, or a single tensor."""
    args, kwargs = split_inputs(inputs, what)
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info.in_spec is not None:
        try:
            flat = list(tree_flatten_spec((args, kwargs), codegen.pytree_info.in_spec))
        except Exception as error:
            raise CaptureError(f"{what} does not have the structure the model was captured with "
                               f"({codegen.pytree_info.in_spec}): {error}") from error
    else:
        names = [p.target for p in placeholders(gm)]
        if kwargs:
            missing = [n for n in names if n not in kwargs]
            if missing:
                raise CaptureError(f"{what} lacks inputs {missing} (the graph takes {names})")
            flat = list(args) + [kwargs[n] for n in names[len(args):]]
        else:
            flat = list(args)
        if len(flat) != len(names):
            raise CaptureError(f"{what} has {len(flat)} values but the graph takes {len(names)}: {names}")
    for node, value in zip(placeholders(gm), flat):
        expected = node.meta.get("val")
        if isinstance(expected, torch.Tensor):
            if not isinstance(value, torch.Tensor):
                raise CaptureError(f"{what}: '{node.target}' must be a tensor, got {type(value).__name__}")
            if value.dtype != expected.dtype:
                raise CaptureError(f"{what}: '{node.target}' has dtype {value.dtype}, the model was captured with "
                                   f"{expected.dtype}")
            if value.device.type != expected.device.type:
                raise CaptureError(f"{what}: '{node.target}' is on {value.device}, the model was captured on "
                                   f"{expected.device}")
    return flat
