"""torch.compile(model, backend="zqhero"): the HERO pipeline on every graph Dynamo captures.

    compiled = torch.compile(model, backend="zqhero", options={"mode": "M3", "calibration": batches})
    compiled(**inputs)  # the first call feeds `batches` through the model, converts each graph, then answers

    be = zqhero_fx.backend(mode="M3", calibration=batches)  # the same backend as an object
    compiled = torch.compile(model, backend=be)
    be.calibrate(compiled)  # optional: calibrate now instead of on the first call

Per graph Dynamo hands over, the backend
  1. freezes it: parameter and buffer placeholders become get_attr constants named by their module path
     (`encoder.layer.0.attention.self.query.weight`), so scales fold into weights as they do after `trace`;
  2. returns a `CapturedGraph` that runs the float graph and records its inputs while it calibrates (on the
     calibration set, or on its own first `calibration_calls` real calls), then runs `convert` on what it recorded
     and swaps in the quantized graph, handed to Inductor (`inductor=True`) or run as is.
Modes without static scales (fp, M1) convert when Dynamo compiles. docs/backend.md has the whole story.

Caution: the calibration set is fed through the compiled model from inside its first call (a re-entrant call), and
batch/sequence dims of the model's inputs are marked dynamic when Dynamo starts compiling. Both need the compiled
model's entry on the Python stack; `_compile_entry` finds it in torch 2.13's `eval_frame.compile_wrapper` frame.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.fx.experimental._config
import torch.utils._pytree as pytree

from zqhero_fx import api
from zqhero_fx.capture import split_inputs
from zqhero_fx.errors import CalibrationError, CaptureError, ConfigError
from zqhero_fx.modes import QuantConfig, resolve_mode, resolve_overrides
from zqhero_fx.passes._graph import module_path, weight_module_path

log = logging.getLogger(__name__)

BACKEND_NAME = "zqhero"
DEFAULT_MODE = "M1"
DEFAULT_CALIBRATION_CALLS = 8
OPTIONS = ("mode", "calibration", "calibration_calls", "overrides", "inductor", "dump_dir", "dynamic")
DYNAMIC_DIMS = 2  # batch and sequence: the leading dims of every tensor input, as zqhero_fx.trace exports them


# ---------------------------------------------------------------- Dynamo graph -> canonical-input float graph
def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    return grapharg.source.name if grapharg is not None and grapharg.source is not None else ""


def _is_module_tensor(source: str, example) -> bool:
    return isinstance(example, torch.nn.Parameter) or "._parameters[" in source or "._buffers[" in source


def _is_module_scalar(node: fx.Node, source: str) -> bool:
    """A float attribute of a module (LayerNorm.eps, a dropout p) that `dynamic=True` passes as a 0-dim tensor."""
    grapharg = node.meta.get("grapharg")
    return bool(getattr(grapharg, "pass_arg_as_tensor", False)) and (
        source.startswith("L['self'].") or "._modules[" in source)


def module_path_of_source(source: str) -> str:
    """A Dynamo source as a module path: `L['self']._modules['layer']._modules['0']._parameters['weight']` ->
    `layer.0.weight`; other roots keep their name: `G['model']._modules['fc']._parameters['bias']` -> `model.fc.bias`."""
    path = re.sub(r"^L\['self'\]", "", source)
    path = re.sub(r"^[LG]\['([^']+)'\]", r"\1", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return re.sub(r"[^0-9A-Za-z_.]", "_", path).strip(".")


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


def freeze(gm: fx.GraphModule, example_inputs, names: dict[int, str] | None = None) -> tuple[fx.GraphModule, list[int]]:
    """A copy of a Dynamo graph whose parameters and buffers are get_attr constants, and the positions of the inputs
    that stay inputs.

    Dynamo (with inlined nn modules) passes every parameter as a placeholder. Here each one becomes a buffer named
    by its module path: `names` maps id(tensor) to the path in the compiled model, else the path comes from the
    placeholder's Dynamo source. Remaining placeholders get Dynamo's fake values (symbolic batch and sequence sizes)
    as node.meta["val"], which propagate_meta then keeps. The returned module takes `[args[i] for i in keep]`.
    """
    names = names or {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    root = torch.nn.Module()
    keep: list[int] = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise CaptureError(f"Dynamo graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs")
    first_use = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for index, (node, example) in enumerate(zip(placeholders, example_inputs)):
        source = _source_name(node)
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
            if "example_value" in node.meta:
                node.meta["val"] = node.meta["example_value"]
    graph.lint()
    return fx.GraphModule(root, graph, class_name="DynamoGraph"), keep


def _fake_mode(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if node.op == "placeholder" and isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


@contextlib.contextmanager
def _constants_allowed(gm: fx.GraphModule):
    """Dynamo's fake mode refuses real tensors; the frozen weights are real get_attr constants, as after `trace`."""
    mode = _fake_mode(gm)
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
    return [v.meta.get("example_value", v.meta.get("val")) if isinstance(v, fx.Node) else v for v in values]


def _dynamic_output_dims(gm: fx.GraphModule) -> list[tuple[int, list[int]]]:
    """(output index, its symbolic dims) for every tensor output: the dims to keep dynamic across a graph break."""
    dims = []
    for i, example in enumerate(_output_examples(gm)):
        if isinstance(example, torch.Tensor):
            symbolic = [d for d, size in enumerate(example.shape) if isinstance(size, torch.SymInt)]
            if symbolic:
                dims.append((i, symbolic))
    return dims


def _output_kinds(gm: fx.GraphModule) -> list:
    """Per output: ("tensor", rank, dtype) or the Python type of a non-tensor, for comparing recompiles' outputs."""
    return [("tensor", e.dim(), e.dtype) if isinstance(e, torch.Tensor) else type(e).__name__
            for e in _output_examples(gm)]


_SIZE_SOURCE = re.compile(r"(.*)\.size\(\)\[(\d+)\]")


def _input_builder(mine: list[str], theirs: list[str]) -> Callable[[list], list] | None:
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


def _same_values(a, b) -> bool:
    a, b = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or \
                    not torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True):
                return False
        elif x != y:
            return False
    return True


def _mark_dynamic(tree) -> None:
    """maybe_mark_dynamic the batch and sequence dims of every tensor in `tree`."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(leaf, list(range(min(leaf.dim(), DYNAMIC_DIMS))))


def _snapshot(values: list) -> list:
    return [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values]


# ---------------------------------------------------------------- one captured graph
class CapturedGraph:
    """What the backend returns to Dynamo for one graph: runs it float while recording inputs, then quantized.

    Attributes:
        index: order in which Dynamo handed the graphs to this backend.
        dynamo_graph: the GraphModule as Dynamo handed it (parameters as placeholders).
        float_graph: the frozen float graph (`freeze`) that `convert` receives.
        quantized_graph: the GraphModule `convert` returned, None until converted.
        calibrated_on: how many recorded batches the conversion used (0 for fp / M1).
        source: "calibration set" or "first calls": what the recorded batches were; for a graph that runs the
            quantized graph of a sibling (see `delegate`), "sibling <compile id>".
        delegate: the CapturedGraph whose quantized graph this one runs, or None.
    """

    def __init__(self, backend: "ZqheroBackend", index: int, gm: fx.GraphModule, example_inputs, names):
        self.backend, self.index = backend, index
        self.dynamo_graph = gm
        self.compile_id = str(gm.meta.get("dynamo_compile_id", index))
        self.float_graph, self.keep = freeze(gm, example_inputs, names)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.input_sources = [_source_name(placeholders[i]) for i in self.keep]
        self.quantized_graph: fx.GraphModule | None = None
        self.calibrated_on, self.source, self.delegate = 0, None, None
        self.recorded: list[list] = []
        self._run: Callable | None = None
        self._tried_delegation = False
        self._output_dims = _dynamic_output_dims(gm)
        self._output_kinds = _output_kinds(gm)

    @property
    def frame(self) -> str:
        """Dynamo's frame id: recompiles of the same code share it (compile ids "3/0", "3/1", ...)."""
        return self.compile_id.split("/")[0]

    @property
    def converted(self) -> bool:
        return self._run is not None

    def __call__(self, *args):
        inputs = [args[i] for i in self.keep]
        out = self._run(*inputs) if self._run is not None else self.backend._run_unconverted(self, inputs)
        if self.backend.dynamic:  # a graph break's resume frame then traces these dims as dynamic too
            for i, dims in self._output_dims:
                if i < len(out) and isinstance(out[i], torch.Tensor):
                    torch._dynamo.maybe_mark_dynamic(out[i], dims)
        return out

    def run_float(self, inputs: list):
        return self.float_graph(*inputs)

    def try_delegation(self, inputs: list, out) -> bool:
        """Run a calibrated sibling's quantized graph from now on, if one computes what this graph does.

        A sibling is another graph of the same frame (a recompile: other shape specialisations, grad mode) that
        takes the same inputs, or more general ones derivable from them (a size of one of them), and returns
        outputs of the same kinds. Checked once, on this call's inputs: the sibling's float graph must reproduce
        `out`, this graph's float result. Used for graphs that saw no calibration batch, e.g. one Dynamo compiled
        for the very first call before the calibration set was fed.
        """
        self._tried_delegation = True
        for sibling in reversed(self.backend.graphs):
            if sibling is self or sibling.frame != self.frame or sibling.delegate is not None or not sibling.converted:
                continue
            build = _input_builder(self.input_sources, sibling.input_sources)
            if build is None or sibling._output_kinds != self._output_kinds:
                continue
            with torch.no_grad():
                if not _same_values(out, sibling.run_float(build(inputs))):
                    continue
            quantized = sibling.quantized_graph
            self._run = lambda *xs: quantized(*build(list(xs)))
            self.delegate, self.source = sibling, f"sibling {sibling.compile_id}"
            self.quantized_graph, self.calibrated_on, self.recorded = quantized, sibling.calibrated_on, []
            return True
        return False

    def convert(self, batches: list, source: str | None) -> None:
        backend = self.backend
        dump_dir = backend.dump_dir or os.environ.get("ZQHERO_DUMP_DIR") or None
        with _constants_allowed(self.float_graph), torch.no_grad():
            quantized = api.convert(self.float_graph, backend.config, calibration=batches or None,
                                    overrides=backend._overrides_for(self),
                                    dump_dir=os.path.join(dump_dir, f"graph_{self.index}") if dump_dir else None)
            run = backend._compile(quantized)
        self.quantized_graph, self.calibrated_on, self.source = quantized, len(batches), source
        self.recorded = []
        self._run = run
        for listener in list(backend._listeners):
            listener(quantized)

    def __repr__(self) -> str:
        state = f"quantized on {self.calibrated_on} batches ({self.source})" if self.converted and self.source \
            else "quantized" if self.converted else f"calibrating ({len(self.recorded)} recorded)"
        return f"CapturedGraph({self.index}, {self.compile_id}, {state})"


# ---------------------------------------------------------------- the backend
@dataclass
class _Entry:
    call: Callable  # the compiled model: a fresh Dynamo wrapper of the same function with the same callback
    module: torch.nn.Module | None  # the model itself, when an nn.Module was compiled


class ZqheroBackend:
    """A torch.compile backend that quantizes every captured graph with ZeroQuant-HERO.

    Args:
        mode: "fp", "M1", "M2", "M3" or a QuantConfig (default "M1").
        calibration: batches for the model (each a tuple of args, a dict of kwargs or a tensor). Fed through the
            compiled model on its first call (or by `calibrate`); every graph is calibrated on the activations it sees.
        calibration_calls: without a calibration set, a graph needing static scales runs float for its first N calls,
            recording them, then converts (also for graphs Dynamo compiles after the calibration set was fed).
        overrides: {module-path glob: "fp32" | "fp16" | "bf16" | "int8"}, as in `convert`.
        inductor: hand the converted graph to Inductor (zqhero ops stay extern calls); False runs it as a GraphModule.
        dump_dir: per-graph dumps in `dump_dir/graph_<i>/` (also $ZQHERO_DUMP_DIR).
        dynamic: mark the batch and sequence dims of the model's tensor inputs dynamic, so other sizes reuse the graph.

    Example:
        >>> be = zqhero_fx.backend(mode="M3", calibration=[{"input_ids": i, "attention_mask": m} for i, m in batches])
        >>> compiled = torch.compile(model, backend=be)
        >>> compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        >>> be.graphs[0].quantized_graph.code  # layer_norm_quant -> int8_linear -> int8_attention -> ...
    """

    def __init__(self, mode=DEFAULT_MODE, *, calibration=None, calibration_calls: int = DEFAULT_CALIBRATION_CALLS,
                 overrides=None, inductor: bool = True, dump_dir=None, dynamic: bool = True):
        self.config: QuantConfig = resolve_mode(mode)
        self.overrides = resolve_overrides(overrides)
        if calibration is not None:
            if isinstance(calibration, (torch.Tensor, dict)):
                raise CalibrationError("calibration must be an iterable of batches (e.g. a list of dicts or tuples), "
                                       "not a single batch: wrap it in a list")
            try:
                calibration = list(calibration)
            except TypeError as error:
                raise CalibrationError(f"calibration is not iterable: {error}") from error
            if not calibration and self.config.needs_calibration:
                raise CalibrationError(f"mode {self.config.name} needs calibration data, but the calibration iterable "
                                       "was empty")
        if not isinstance(calibration_calls, int) or isinstance(calibration_calls, bool) or calibration_calls < 1:
            raise ConfigError(f"calibration_calls={calibration_calls!r}: must be a positive int")
        self.calibration = calibration
        self.calibration_calls = calibration_calls
        self.inductor, self.dump_dir, self.dynamic = bool(inductor), dump_dir, bool(dynamic)
        self.graphs: list[CapturedGraph] = []
        self._listeners: list[Callable[[fx.GraphModule], None]] = []
        self._names: dict[int, str] = {}
        self._named_modules: weakref.WeakSet = weakref.WeakSet()
        # "pending": a calibration set waits to be fed; "feeding": it is being fed; "ready": graphs calibrate alone
        self._state = "pending" if calibration and self.config.needs_calibration else "ready"
        _install_compile_hooks()

    # -- Dynamo's side
    def __call__(self, gm: fx.GraphModule, example_inputs) -> CapturedGraph:
        _install_compile_hooks()
        entry = _compile_entry(self)
        if entry is not None and entry.module is not None:
            self._learn_names(entry.module)
        graph = CapturedGraph(self, len(self.graphs), gm, list(example_inputs), self._names)
        self.graphs.append(graph)
        if not self.config.needs_calibration:
            graph.convert([], None)
        return graph

    def _compile(self, quantized: fx.GraphModule) -> Callable:
        from zqhero_fx.inductor import relayout_gemm_weights

        quantized = relayout_gemm_weights(quantized)  # CPU weights N-major for oneDNN
        if not self.inductor:
            return quantized.forward
        from torch._inductor.compile_fx import compile_fx

        # Dynamo's symbolic fake inputs keep the compiled code shape-generic; the zqhero custom ops (fake impls) stay
        # extern calls. The result is aot_module_simplified's forward, called unboxed: f(*args).
        # Not zqhero_fx.inductor's CPU decompositions (yet): with the dims this backend marks dynamic, Inductor turned
        # BERT-base's head count into a symbolic `12 // s52` and crashed (SIGFPE) in the generated code.
        fakes = [n.meta["val"] for n in quantized.graph.nodes if n.op == "placeholder"]
        return compile_fx(quantized, fakes)

    def _run_unconverted(self, graph: CapturedGraph, inputs: list):
        if self._state == "pending":
            self._calibrate_from_call_stack()
            if graph.converted:  # this graph saw the calibration set during the re-entrant calls
                return graph._run(*inputs)
        if self._state == "feeding":
            graph.recorded.append(_snapshot(inputs))
            return graph.run_float(inputs)
        snapshot = _snapshot(inputs)
        out = graph.run_float(inputs)
        if not graph._tried_delegation and not graph.recorded and graph.try_delegation(inputs, out):
            return graph._run(*inputs)
        graph.recorded.append(snapshot)
        if len(graph.recorded) >= self.calibration_calls:
            graph.convert(graph.recorded, "first calls")
        return out

    # -- calibration
    def calibrate(self, model: Callable) -> None:
        """Feed the calibration set through `model`, the torch.compile'd model, and convert every graph it ran.

        Each graph records the inputs it receives while the batches run (float), then converts with them. Graphs
        that saw no batch (compiled for other shapes, or on a branch the batches did not take) calibrate on their
        own first `calibration_calls` calls instead. Call it under the grad mode you will run inference in.
        """
        if self.calibration is None:
            raise CalibrationError("this backend has no calibration set: pass calibration=[batch, ...]")
        if not self.config.needs_calibration:
            return  # fp / M1: graphs converted when Dynamo compiled them
        if self._state == "feeding":
            raise CalibrationError("calibrate() called while the calibration set is being fed")
        _install_compile_hooks()
        self._state = "feeding"
        for graph in self.graphs:
            graph.recorded = []
        try:
            for i, batch in enumerate(self.calibration):
                args, kwargs = _split_batch(batch, i)
                if self.dynamic:
                    _mark_dynamic((args, kwargs))
                model(*args, **kwargs)
        except BaseException:
            self._state = "pending"
            raise
        self._state = "ready"
        fed = [g for g in self.graphs if not g.converted and g.recorded]
        if not fed and not any(g.source == "calibration set" for g in self.graphs):
            raise CalibrationError("the calibration batches ran no graph compiled by this backend: pass the model "
                                   "returned by torch.compile(model, backend=...)")
        for graph in fed:
            graph.convert(graph.recorded, "calibration set")

    def _calibrate_from_call_stack(self) -> None:
        entry = _compile_entry(self)
        if entry is None:
            self._state = "ready"
            raise CalibrationError("could not find the compiled model on the call stack to feed the calibration set "
                                   "through; call backend.calibrate(compiled_model) before the first call")
        if entry.module is not None:
            self._learn_names(entry.module)
        self.calibrate(entry.call)

    # -- helpers
    def _learn_names(self, module: torch.nn.Module) -> None:
        if module in self._named_modules:
            return
        self._named_modules.add(module)
        for name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(
                module.named_buffers(remove_duplicate=False)):
            self._names.setdefault(id(tensor), name)

    def _overrides_for(self, graph: CapturedGraph) -> dict[str, str]:
        """The override globs that name a module of this graph: after a graph break, one glob may only match modules
        of another graph, which is no error; a glob matching no module of any graph is."""
        if not self.overrides:
            return {}

        def paths(g: CapturedGraph) -> set[str]:  # as insert_qdq sees them: weight owners, then nn_module_stack
            return {weight_module_path(n.target) if n.op == "get_attr" else module_path(n)
                    for n in g.float_graph.graph.nodes}

        mine, everywhere = paths(graph), set().union(*(paths(g) for g in self.graphs))
        for pattern in self.overrides:
            if not any(fnmatch.fnmatchcase(p, pattern) for p in everywhere):
                examples = ", ".join(sorted(p for p in everywhere if p)[:4])
                raise ConfigError(f"override {pattern!r} matches no module in the compiled graphs "
                                  f"(module paths look like: {examples})")
        return {p: v for p, v in self.overrides.items() if any(fnmatch.fnmatchcase(m, p) for m in mine)}

    def reset(self) -> None:
        """Forget the captured graphs; torch._dynamo.reset() calls this. Dynamo compiles afresh on the next call,
        and a calibration set is fed again."""
        self.graphs = []
        if self.calibration and self.config.needs_calibration:
            self._state = "pending"

    def add_graph_listener(self, listener: Callable[[fx.GraphModule], None]) -> None:
        """Call `listener(quantized_graph)` each time a graph is converted (tests/harness.py records them so)."""
        self._listeners.append(listener)

    @staticmethod
    def of(compiled) -> "ZqheroBackend | None":
        """The ZqheroBackend behind a torch.compile'd model or function (None if it was compiled otherwise)."""
        ctx = getattr(compiled, "dynamo_ctx", None)  # torch.compile(module) -> OptimizedModule
        if ctx is not None:
            return _backend_of(getattr(ctx, "callback", None))
        cells = dict(zip(getattr(getattr(compiled, "__code__", None), "co_freevars", ()),
                         getattr(compiled, "__closure__", None) or ()))  # torch.compile(function)
        return _backend_of(cells["callback"].cell_contents) if "callback" in cells else None

    def __repr__(self) -> str:
        return (f"ZqheroBackend(mode={self.config.name}, calibration={len(self.calibration or [])} batches, "
                f"graphs={len(self.graphs)}, inductor={self.inductor})")


def _split_batch(batch, index: int) -> tuple[tuple, dict]:
    return split_inputs(batch, f"calibration batch {index}", CalibrationError)


# ---------------------------------------------------------------- finding the compiled model from inside a call
def _unwrap(fn):
    """Follow wrappers down to a ZqheroBackend (Dynamo's callback chain, torch.compile's wrapper, `.inner` of test
    backends); None when the chain ends elsewhere."""
    seen = 0
    while fn is not None and seen < 16:
        seen += 1
        if isinstance(fn, ZqheroBackend):
            return fn
        if getattr(fn, "compiler_fn", None) is zqhero_backend:  # torch.compile(backend="zqhero", options=...)
            kwargs = getattr(fn, "kwargs", {})
            return _backend_for_options(kwargs.get("options"), kwargs.get("mode"))
        fn = (getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
              or getattr(fn, "inner", None))
    return None


def _backend_of(callback) -> ZqheroBackend | None:
    try:
        return _unwrap(callback)
    except Exception:  # a foreign callback chain: not ours
        return None


def _compile_wrapper_frames():
    from torch._dynamo import eval_frame

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "compile_wrapper" and frame.f_code.co_filename == eval_frame.__file__:
            yield frame
        frame = frame.f_back


def _compile_entry(backend: ZqheroBackend | None = None) -> _Entry | None:
    """The innermost torch.compile'd call on the stack whose backend is `backend` (any ZqheroBackend if None)."""
    for frame in _compile_wrapper_frames():
        local = frame.f_locals
        owner = _backend_of(local.get("callback"))
        if owner is None or (backend is not None and owner is not backend):
            continue
        ctx, fn = local.get("self"), local.get("fn")
        if ctx is None or fn is None:
            continue
        module = getattr(fn, "__self__", None)
        return _Entry(call=ctx(fn), module=module if isinstance(module, torch.nn.Module) else None)
    return None


_SIZE_OBLIVIOUS: list = []  # the config patch held open from a zqhero compile's start callback to its end callback


def _on_compile_start(_args=None) -> None:
    """Before Dynamo traces a frame for a zqhero backend: mark the compiled call's batch and sequence dims dynamic,
    so the first graph already accepts other sizes (and the calibration set runs through that same graph), and trace
    sizes size-obliviously, so a batch of one reuses that graph instead of compiling one specialised to 1."""
    try:
        for frame in _compile_wrapper_frames():
            backend = _backend_of(frame.f_locals.get("callback"))
            if backend is None:
                return
            ctx = frame.f_locals.get("self")
            if backend.dynamic and getattr(ctx, "_dynamic", None) is not False:
                _mark_dynamic((frame.f_locals.get("args"), frame.f_locals.get("kwargs")))
                patch = torch.fx.experimental._config.patch(backed_size_oblivious=True)
                patch.__enter__()
                _SIZE_OBLIVIOUS.append(patch)
            return
    except Exception:  # never break a compile from here
        log.debug("zqhero: could not mark the compiled call's inputs dynamic", exc_info=True)


def _on_compile_end(_args=None) -> None:
    while _SIZE_OBLIVIOUS:
        _SIZE_OBLIVIOUS.pop().__exit__(None, None, None)


# ---------------------------------------------------------------- torch.compile(backend="zqhero", options=...)
_BY_OPTIONS: dict[tuple, tuple[Any, ZqheroBackend]] = {}


def _backend_for_options(options, mode=None) -> ZqheroBackend:
    """One ZqheroBackend per options dict (torch.compile passes the same dict for every graph of a model)."""
    key = (id(options), mode)
    if key not in _BY_OPTIONS:
        settings = dict(options or {})
        unknown = sorted(set(settings) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown zqhero option(s) {unknown}: known options are {list(OPTIONS)}")
        if mode is not None:
            if "mode" in settings:
                raise ConfigError("mode given twice: as torch.compile(mode=...) and in options")
            settings["mode"] = mode
        _BY_OPTIONS[key] = (options, ZqheroBackend(**settings))
    return _BY_OPTIONS[key][1]


def zqhero_backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode=None):
    """The registered `torch.compile(backend="zqhero")` function (also the `torch_dynamo_backends` entry point).

    torch.compile hands a non-Inductor backend its `options` dict as a keyword argument (and `mode`, when given instead
    of options); the same dict arrives for every graph of one compiled model, and maps to one ZqheroBackend.
    Options are the keyword arguments of `ZqheroBackend`: mode, calibration, calibration_calls, overrides, inductor,
    dump_dir, dynamic.
    """
    return _backend_for_options(options, mode)(gm, example_inputs)


zqhero_backend.reset = _BY_OPTIONS.clear  # torch._dynamo.reset() drops the backends made from options dicts


def backend(mode=DEFAULT_MODE, **options) -> ZqheroBackend:
    """`torch.compile(model, backend=zqhero_fx.backend(mode="M3", calibration=batches))`: the backend as an object,
    with `.calibrate(compiled_model)` and `.graphs` (see ZqheroBackend for the options)."""
    return ZqheroBackend(mode, **options)


def _install_compile_hooks() -> None:
    """(Re)install the compile start/end callbacks; torch._dynamo.reset() clears them, so every backend entry point
    calls this."""
    handler = torch._dynamo.callback_handler
    if _on_compile_start not in handler.start_callbacks:
        handler.register_start_callback(_on_compile_start)
    if _on_compile_end not in handler.end_callbacks:
        handler.register_end_callback(_on_compile_end)


def _register() -> None:
    from torch._dynamo.backends import registry

    if BACKEND_NAME not in registry._COMPILER_FNS and registry._BACKENDS.get(BACKEND_NAME) is None:
        # Skipped while torch loads us through the torch_dynamo_backends entry point: it registers the name itself.
        registry.register_backend(zqhero_backend, name=BACKEND_NAME)
    _install_compile_hooks()


_register()

__all__ = ["ZqheroBackend", "CapturedGraph", "backend", "zqhero_backend", "freeze", "module_path_of_source"]
