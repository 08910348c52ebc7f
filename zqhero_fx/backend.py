"""torch.compile(model, backend="zqhero"): the HERO pipeline on every graph Dynamo captures.

    compiled = torch.compile(model, backend="zqhero", options={"mode": "M3", "calibration": batches})
    compiled(**inputs)  # the first call feeds `batches` through the model, converts each graph, then answers

    be = zqhero_fx.backend(mode="M3", calibration=batches)  # the same backend as an object
    compiled = torch.compile(model, backend=be)
    be.calibrate(compiled)  # optional: calibrate now instead of on the first call

Per graph Dynamo hands over, the backend
  1. freezes it (`capture.freeze_dynamo_graph`): parameter and buffer placeholders become get_attr constants named by
     their module path (`encoder.layer.0.attention.self.query.weight`), so scales fold into weights as after `trace`;
  2. returns a `CapturedGraph` that runs the float graph and records its inputs while it calibrates (on the
     calibration set, or on its own first `calibration_calls` real calls), then runs `convert` on what it recorded
     and swaps in the quantized graph, handed to Inductor (`inductor=True`) or run as is.
Modes without static scales (fp, M1) convert when Dynamo compiles. docs/backend.md has the whole story.

Feeding the calibration set from inside the first call, and marking the batch/sequence dims dynamic when Dynamo starts
compiling, need the compiled model's entry on the Python stack; that and every other read of Dynamo internals is in
zqhero_fx/_dynamo_compat.py, checked against the torch versions it names.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from zqhero_fx import _dynamo_compat as dynamo
from zqhero_fx import api
from zqhero_fx.capture import (constants_allowed, dynamic_output_dims, freeze, freeze_dynamo_graph, input_builder,
                               input_sources, module_path_examples, module_path_of_source, module_paths, output_kinds,
                               split_inputs, tensor_names)
from zqhero_fx.errors import CalibrationError, CaptureError, ConfigError
from zqhero_fx.modes import QuantConfig, resolve_mode, resolve_overrides

BACKEND_NAME = "zqhero"
DEFAULT_MODE = "M1"
DEFAULT_CALIBRATION_CALLS = 8
OPTIONS = ("mode", "calibration", "calibration_calls", "overrides", "inductor", "dump_dir", "dynamic")
DYNAMIC_DIMS = 2  # batch and sequence: the leading dims of every tensor input, as zqhero_fx.trace exports them


def _same_values(a, b) -> bool:
    """Whether two graph results agree: same structure, non-tensors equal, tensors close (a sibling's float graph)."""
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


def _snapshot(values: list) -> list:
    return [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values]


# ---------------------------------------------------------------- one captured graph
class CapturedGraph:
    """What the backend returns to Dynamo for one graph: runs it float while recording inputs, then quantized.

    Attributes:
        index: order in which Dynamo handed the graphs to this backend.
        dynamo_graph: the GraphModule as Dynamo handed it (parameters as placeholders).
        float_graph: the frozen float graph (`capture.freeze_dynamo_graph`) that `convert` receives.
        quantized_graph: the GraphModule `convert` returned, None until converted.
        calibrated_on: how many recorded batches the conversion used (0 for fp / M1).
        source: "calibration set" or "first calls": what the recorded batches were; for a graph that runs the
            quantized graph of a sibling (see `delegate`), "sibling <compile id>".
        delegate: the CapturedGraph whose quantized graph this one runs, or None.
    """

    def __init__(self, backend: "ZqheroBackend", index: int, gm: fx.GraphModule, example_inputs, names):
        self.backend, self.index = backend, index
        self.dynamo_graph = gm
        self.compile_id = dynamo.compile_id(gm, index)
        self.float_graph, self.keep = freeze_dynamo_graph(gm, example_inputs, names)
        self.input_sources = input_sources(gm, self.keep)
        self.quantized_graph: fx.GraphModule | None = None
        self.calibrated_on, self.source, self.delegate = 0, None, None
        self.recorded: list[list] = []
        self._run: Callable | None = None
        self._tried_delegation = False
        self._output_dims = dynamic_output_dims(gm)
        self._output_kinds = output_kinds(gm)

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
                    dynamo.maybe_mark_dynamic(out[i], dims)
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
            build = input_builder(self.input_sources, sibling.input_sources)
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
        with constants_allowed(self.float_graph), torch.no_grad():
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
        >>> be.graphs[0].quantized_graph.code  # norm_quant -> quantized_linear -> quantized_attention -> ...
    """

    def __init__(self, mode=DEFAULT_MODE, *, calibration=None, calibration_calls: int = DEFAULT_CALIBRATION_CALLS,
                 overrides=None, inductor: bool = True, dump_dir=None, dynamic: bool = True):
        dynamo.check_torch_version()
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
        try:
            entry = _compile_entry(self)
        except CalibrationError as error:  # the weights are then named from Dynamo's sources
            warnings.warn(str(error), RuntimeWarning)
            entry = None
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
                    dynamo.mark_dynamic((args, kwargs), DYNAMIC_DIMS)
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
        self._state = "ready"  # should the model not be found, graphs calibrate on their own first calls after this
        entry = _compile_entry(self)
        if entry is None:
            raise CalibrationError("could not find the compiled model on the call stack to feed the calibration set "
                                   "through; call backend.calibrate(compiled_model) before the first call")
        if entry.module is not None:
            self._learn_names(entry.module)
        self.calibrate(entry.recall())

    # -- helpers
    def _learn_names(self, module: torch.nn.Module) -> None:
        if module not in self._named_modules:
            self._named_modules.add(module)
            self._names = {**tensor_names(module), **self._names}

    def _overrides_for(self, graph: CapturedGraph) -> dict[str, str]:
        """The override globs that name a module of this graph: after a graph break, one glob may only match modules
        of another graph, which is no error; a glob matching no module of any graph is."""
        if not self.overrides:
            return {}

        mine, everywhere = module_paths(graph.float_graph), set().union(*(module_paths(g.float_graph)
                                                                          for g in self.graphs))
        for pattern in self.overrides:
            if not any(fnmatch.fnmatchcase(p, pattern) for p in everywhere):
                raise ConfigError(f"override {pattern!r} matches no module in the compiled graphs "
                                  f"(module paths look like: {module_path_examples(everywhere, pattern)})")
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
        return _backend_of(dynamo.callback_of(compiled))

    def __repr__(self) -> str:
        return (f"ZqheroBackend(mode={self.config.name}, calibration={len(self.calibration or [])} batches, "
                f"graphs={len(self.graphs)}, inductor={self.inductor})")


def _split_batch(batch, index: int) -> tuple[tuple, dict]:
    return split_inputs(batch, f"calibration batch {index}", CalibrationError)


# ---------------------------------------------------------------- finding the backend and the compiled model
def _backend_of(callback) -> ZqheroBackend | None:
    """The ZqheroBackend at the end of a Dynamo callback's chain of wrappers; None when the chain ends elsewhere."""
    try:
        for link in dynamo.callback_chain(callback):
            if isinstance(link, ZqheroBackend):
                return link
            compiler_fn, kwargs = dynamo.wrapped_compiler(link)
            if compiler_fn is zqhero_backend:  # torch.compile(backend="zqhero", options=...)
                return _backend_for_options(kwargs.get("options"), kwargs.get("mode"))
    except Exception:  # a foreign callback chain: not ours
        return None
    return None


def _compile_entry(backend: ZqheroBackend | None = None) -> dynamo.CompiledCall | None:
    """The innermost torch.compile'd call on the stack whose backend is `backend` (any ZqheroBackend if None)."""
    for call in dynamo.compiled_calls():
        owner = _backend_of(call.callback)
        if owner is not None and (backend is None or owner is backend) and call.ctx is not None and call.fn is not None:
            return call
    return None


def _wants_dynamic(call: dynamo.CompiledCall) -> bool:
    """At a compile's start: mark the compiled call's batch and sequence dims dynamic, so the first graph already
    accepts other sizes (and the calibration set runs through that same graph), and trace sizes size-obliviously, so
    a batch of one reuses that graph instead of compiling one specialised to 1."""
    backend = _backend_of(call.callback)
    return backend is not None and backend.dynamic and call.dynamic is not False


def _install_compile_hooks() -> None:
    dynamo.install_compile_hooks(_wants_dynamic, DYNAMIC_DIMS)


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


def _register() -> None:
    try:
        dynamo.register_backend(zqhero_backend, BACKEND_NAME)
        _install_compile_hooks()
    except CaptureError as error:  # `import zqhero_fx` keeps working for trace/convert; using the backend raises it
        warnings.warn(str(error), RuntimeWarning)


_register()

__all__ = ["ZqheroBackend", "CapturedGraph", "backend", "zqhero_backend", "freeze", "freeze_dynamo_graph",
           "module_path_of_source"]
