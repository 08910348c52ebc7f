"""The frozen float graph `convert` receives, from torch.export (`trace`) or from a graph Dynamo hands the backend
(`freeze_dynamo_graph`), and turning user inputs into a graph's flat inputs.

Both give a GraphModule whose weights are get_attr constants named by module path
(`encoder.layer.0.attention.self.query.weight`) and whose inputs carry fake values with symbolic batch and sequence
sizes, so scales fold into weights and `overrides` globs match the same way whichever way the model was captured.
Dynamo's graph meta is read through zqhero_fx._dynamo_compat.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import operator
from typing import Callable
import re

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._pytree import tree_flatten_spec
from torch.fx.graph import _PyTreeCodeGen

from zqhero_fx import _dynamo_compat as dynamo
from zqhero_fx.errors import CaptureError, InputError


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


def trace(model: torch.nn.Module, example_inputs, *, max_cache_len: int | None = None,
          max_batch: int | None = None) -> fx.GraphModule:
    """Capture `model` (any nn.Module, Hugging Face models included) as a GraphModule with torch.export.

    `example_inputs` is a tuple of positional args or a dict of keyword args. Batch and sequence dims are exported as
    dynamic, so the converted model accepts other sizes; use examples with batch and sequence > 1 (export specialises
    a size-1 dim). The returned module takes the same arguments and returns the same structure as the model.

    A Hugging Face `*ForCausalLM` with its cache on (the default) is captured as a decoder step graph with the KV cache
    as inputs, for sequences of up to `max_cache_len` tokens and batches of up to `max_batch`
    (zqhero_fx/decoder.py; run it with `zqhero_fx.generate` or `zqhero_fx.decoder.prefill_logits`).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"trace takes an nn.Module, got {type(model).__name__}")
    from zqhero_fx import decoder

    if decoder.is_causal_lm_with_cache(model):
        return decoder.trace_decoder(model, example_inputs, max_cache_len=max_cache_len, max_batch=max_batch)
    if max_cache_len is not None or max_batch is not None:
        raise CaptureError(f"max_cache_len and max_batch are for causal LMs with a KV cache; {type(model).__name__} "
                           "is captured without one")
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
    gm = exported_module(program)
    gm.meta["zqhero_example_inputs"] = example_inputs
    return gm


def exported_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a GraphModule without export's guard call, which checks inputs against the example's
    assumptions; the sizes we capture as symbolic do vary."""
    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    return gm


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def flatten_inputs(gm: fx.GraphModule, inputs, what: str = "input") -> list:
    """The flat list of placeholder values for one batch given as a tuple, a dict, or a single tensor. A decoder step
    graph also takes {"input_ids", "attention_mask"} alone: a prefill from an empty cache."""
    if "zqhero_decoder" in gm.meta:
        from zqhero_fx import decoder

        flat = decoder.complete_inputs(gm, inputs)
        if flat is not None:
            inputs = decoder.step_args(gm, flat)
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


# ---------------------------------------------------------------- token-id inputs of a converted graph
# The embedding kernels index their tables with whatever they are given; float ids end in a bare IndexError deep
# inside a kernel, so a converted graph checks the inputs it uses as indices itself, where it can name them.

TOKEN_ID_DTYPES = (torch.int64, torch.int32)  # what aten.embedding and the zqhero embedding kernels index with

# Ops that hand their first operand on unchanged in dtype, so an input reaching an embedding through them still is
# the token ids. A dtype conversion (`ids.long()`) is not among them: behind one, a float input would be fine.
_VIEW_OPS = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.select.int, torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.default,
    torch.ops.aten.clone.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default,
    torch.ops.aten.permute.default, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
    torch.ops.aten.flatten.using_ints, operator.getitem,
}
_VIEW_METHODS = {"view", "reshape", "expand", "unsqueeze", "squeeze", "contiguous", "clone", "detach", "flatten",
                 "permute", "transpose", "t"}


@fx.node.has_side_effect  # it returns nothing: without this, dead-code elimination would drop it from the graph
def check_token_ids(value, name: str) -> None:
    """Raise InputError unless `value` can index an embedding table. Converted graphs call this on each input they
    use as token ids (`guard_token_ids`)."""
    if isinstance(value, torch.Tensor) and value.dtype not in TOKEN_ID_DTYPES:
        raise InputError(f"'{name}' holds token ids (it indexes an embedding table), so it must be an integer tensor "
                         f"(torch.int64 or torch.int32), got dtype {value.dtype}: pass the ids as the tokenizer "
                         "returns them, without converting them to float")


def _embedding_indices(gm: fx.GraphModule, node: fx.Node) -> list:
    """The index operands of `node` when it is an embedding lookup, else []."""
    def operand(position: int, keyword: str):
        return node.args[position] if len(node.args) > position else node.kwargs.get(keyword)

    if node.op == "call_module":
        is_embedding = isinstance(gm.get_submodule(node.target), torch.nn.Embedding)
        return [operand(0, "input")] if is_embedding else []
    if node.op != "call_function":
        return []
    if node.target is torch.ops.aten.embedding.default:
        return [operand(1, "indices")]
    if node.target is torch.nn.functional.embedding:
        return [operand(0, "input")]
    if node.target is torch.ops.zqhero.quantized_embedding.default:
        return [operand(0, "indices")]
    if node.target is torch.ops.zqhero.embedding_norm_quant.default:
        return list(operand(0, "indices"))
    return []


def _is_view(node: fx.Node) -> bool:
    return bool(node.args) and (node.op == "call_function" and node.target in _VIEW_OPS
                                or node.op == "call_method" and node.target in _VIEW_METHODS)


def token_id_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The placeholders `gm` uses as embedding indices, directly or through views and slices."""
    found: dict[fx.Node, None] = {}
    for node in gm.graph.nodes:
        for index in _embedding_indices(gm, node):
            while isinstance(index, fx.Node) and _is_view(index):
                index = index.args[0]
            if isinstance(index, fx.Node) and index.op == "placeholder":
                found[index] = None
    return list(found)


def guard_token_ids(gm: fx.GraphModule) -> fx.GraphModule:
    """Make `gm` check the dtype of its token-id inputs on every call (`check_token_ids`), in place. The check is a
    node of the graph, so it survives deepcopy, save/load and torch.compile (where Dynamo settles it while tracing)."""
    checked = {n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is check_token_ids}
    for placeholder in token_id_inputs(gm):
        if placeholder not in checked:  # right after the input: a later placeholder may come after its embedding
            with gm.graph.inserting_after(placeholder):
                gm.graph.call_function(check_token_ids, (placeholder, placeholder.target))
    gm.recompile()
    return gm


# ---------------------------------------------------------------- a Dynamo graph -> the frozen float graph
_MISSING = object()


def module_path_of_source(source: str) -> str:
    """A Dynamo source as a module path: `L['self']._modules['layer']._modules['0']._parameters['weight']` ->
    `layer.0.weight`; other roots keep their name: `G['model']._modules['fc']._parameters['bias']` -> `model.fc.bias`."""
    path = re.sub(r"^L\['self'\]", "", source)
    path = re.sub(r"^[LG]\['([^']+)'\]", r"\1", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return re.sub(r"[^0-9A-Za-z_.]", "_", path).strip(".")


def _is_module_tensor(source: str, example) -> bool:
    return isinstance(example, torch.nn.Parameter) or "._parameters[" in source or "._buffers[" in source


def _is_module_scalar(node: fx.Node, source: str) -> bool:
    """A float attribute of a module (LayerNorm.eps, a dropout p) that `dynamic=True` passes as a 0-dim tensor."""
    return dynamo.passes_as_tensor(node) and (source.startswith("L['self'].") or "._modules[" in source)


def _register_constant(root: torch.nn.Module, path: str, tensor: torch.Tensor) -> str:
    """Store `tensor` as a buffer of `root` at `path`, creating the submodules on the way; a fresh flat name when the
    path is taken or not a valid attribute chain."""
    try:
        owner, _, leaf = path.rpartition(".")
        module = root
        for part in owner.split(".") if owner else []:
            if part not in module._modules:
                if hasattr(module, part):
                    raise KeyError(part)
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        if not leaf or hasattr(module, leaf):
            raise KeyError(leaf)
        module.register_buffer(leaf, tensor, persistent=True)
        return path
    except (KeyError, ValueError, TypeError):
        base, i = "_zq_const_" + re.sub(r"\W", "_", path), 0
        while hasattr(root, f"{base}_{i}"):
            i += 1
        root.register_buffer(f"{base}_{i}", tensor, persistent=True)
        return f"{base}_{i}"


def freeze_dynamo_graph(gm: fx.GraphModule, example_inputs, names: dict[int, str] | None = None
                        ) -> tuple[fx.GraphModule, list[int]]:
    """A copy of a Dynamo graph whose parameters and buffers are get_attr constants, and the positions of the inputs
    that stay inputs.

    Dynamo (with inlined nn modules) passes every parameter as a placeholder. Here each one becomes a buffer named
    by its module path: `names` maps id(tensor) to the path in the compiled model, else the path comes from the
    placeholder's Dynamo source. Float module attributes that `dynamic=True` passes as 0-dim tensors are folded back
    into numbers. Remaining placeholders get Dynamo's fake values (symbolic batch and sequence sizes) as
    node.meta["val"], which propagate_meta then keeps. The returned module takes `[args[i] for i in keep]`.
    Call it inside the backend call: Dynamo drops the placeholders' "grapharg" meta (their sources) once it returns.
    """
    names = names or {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    root = torch.nn.Module()
    keep: list[int] = []
    nodes = [n for n in graph.nodes if n.op == "placeholder"]
    if len(nodes) != len(example_inputs):
        raise CaptureError(f"Dynamo graph has {len(nodes)} inputs but {len(example_inputs)} example inputs")
    first_use = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for index, (node, example) in enumerate(zip(nodes, example_inputs)):
        source = dynamo.graph_arg_source(node)
        if isinstance(example, torch.Tensor) and _is_module_tensor(source, example):
            path = names.get(id(example)) or module_path_of_source(source) or node.name
            target = _register_constant(root, path, example.detach())
            with graph.inserting_before(first_use):
                constant = graph.get_attr(target)
            constant.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
            node.replace_all_uses_with(constant)
            graph.erase_node(node)
        elif isinstance(example, torch.Tensor) and example.dim() == 0 and _is_module_scalar(node, source):
            value = example.item()
            for user in list(node.users):
                if user.op == "call_method" and user.target == "item":
                    for consumer in list(user.users):
                        consumer.args = fx.node.map_arg(consumer.args, lambda n: value if n is user else n)
                        consumer.kwargs = fx.node.map_arg(consumer.kwargs, lambda n: value if n is user else n)
                    graph.erase_node(user)
            if node.users:
                target = _register_constant(root, module_path_of_source(source) or node.name, example.detach())
                with graph.inserting_before(first_use):
                    constant = graph.get_attr(target)
                node.replace_all_uses_with(constant)
            graph.erase_node(node)
        else:
            keep.append(index)
            value = dynamo.example_value(node, _MISSING)
            if value is not _MISSING:
                node.meta["val"] = value
    graph.lint()
    return fx.GraphModule(root, graph, class_name="DynamoGraph"), keep


freeze = freeze_dynamo_graph


def input_sources(gm: fx.GraphModule, keep: list[int] | None = None) -> list[str]:
    """The Dynamo source of each input of a Dynamo graph (of the inputs at positions `keep`, when given)."""
    sources = [dynamo.graph_arg_source(n) for n in placeholders(gm)]
    return sources if keep is None else [sources[i] for i in keep]


def tensor_names(module: torch.nn.Module) -> dict[int, str]:
    """id(tensor) -> its path in `module` for every parameter and buffer (the first path of a shared one): the
    `names` for freeze_dynamo_graph."""
    names: dict[int, str] = {}
    for name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), name)
    return names


def module_paths(gm: fx.GraphModule) -> set[str]:
    """The module paths in a frozen graph as insert_qdq sees them (weight owners, then nn_module_stack): what
    `overrides` globs match."""
    from zqhero_fx.passes._graph import module_path, weight_module_path

    return {weight_module_path(n.target) if n.op == "get_attr" else module_path(n) for n in gm.graph.nodes}


def module_path_examples(paths, pattern: str, count: int = 4) -> str:
    """A few of `paths` to show beside an override glob that matched none of them: the ones closest to the glob,
    then some spread over the model (so deep paths such as `encoder.layer.0.attention` show, not only the first
    names in sorted order). Names with a part starting with "_" are left out: they are capture internals (torch.export's
    `_empty_nn_module_stack_from_metadata_hook`, our `_zq_*` constants), never a module a user means."""
    public = sorted(p for p in paths if p and not any(part.startswith("_") for part in p.split(".")))
    closest = difflib.get_close_matches(pattern, public, n=count, cutoff=0.5)
    spread = public[len(public) // (2 * count)::max(1, len(public) // count)]
    return ", ".join(list(dict.fromkeys(closest + spread))[:count])


_SIZE_SOURCE = re.compile(r"(.*)\.size\(\)\[(\d+)\]")


def input_builder(mine: list[str], theirs: list[str]) -> Callable[[list], list] | None:
    """Build another graph's inputs from this graph's, matched by Dynamo source; a size input may be read off the
    tensor it belongs to. None unless every input of this graph is also one of the other graph's (else the other
    graph baked in something this one takes as an input)."""
    position = {source: i for i, source in enumerate(mine)}
    if not mine or "" in position or not set(position) <= set(theirs):
        return None
    getters = []
    for source in theirs:
        size = _SIZE_SOURCE.fullmatch(source)
        if source in position:
            getters.append((position[source], None))
        elif size and size.group(1) in position:
            getters.append((position[size.group(1)], int(size.group(2))))
        else:
            return None
    return lambda xs: [xs[i] if dim is None else xs[i].size(dim) for i, dim in getters]


@contextlib.contextmanager
def constants_allowed(gm: fx.GraphModule):
    """Dynamo's fake mode refuses real tensors; the frozen weights are real get_attr constants, as after `trace`."""
    mode = next((v.fake_mode for n in placeholders(gm) if isinstance(v := n.meta.get("val"), torch.Tensor)
                 and hasattr(v, "fake_mode")), None)
    if mode is None:
        yield
        return
    before = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        yield
    finally:
        mode.allow_non_fake_inputs = before


def _output_examples(gm: fx.GraphModule) -> list:
    """Dynamo's example value of each graph output (fake tensors, SymInts, constants)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    return [dynamo.example_value(v, v.meta.get("val")) if isinstance(v, fx.Node) else v for v in values]


def dynamic_output_dims(gm: fx.GraphModule) -> list[tuple[int, list[int]]]:
    """(output index, its symbolic dims) for every tensor output: the dims to keep dynamic across a graph break."""
    dims = []
    for i, example in enumerate(_output_examples(gm)):
        if isinstance(example, torch.Tensor):
            symbolic = [d for d, size in enumerate(example.shape) if isinstance(size, torch.SymInt)]
            if symbolic:
                dims.append((i, symbolic))
    return dims


def output_kinds(gm: fx.GraphModule) -> list:
    """Per output: ("tensor", rank, dtype) or the Python type of a non-tensor, for comparing recompiles' outputs."""
    return [("tensor", e.dim(), e.dtype) if isinstance(e, torch.Tensor) else type(e).__name__
            for e in _output_examples(gm)]
