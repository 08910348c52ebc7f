"""Every read of torch._dynamo internals the zqhero backend makes, in one place, each against one torch version.

The backend (zqhero_fx/backend.py) and the graph freezing (zqhero_fx/capture.py) call only these functions. Each
docstring names the torch internal it relies on; these were checked against the torch versions in `CHECKED_TORCH`.
On another major.minor, `check_torch_version` warns once (RuntimeWarning). When an internal is not what a function
expects, it raises a CaptureError or CalibrationError naming that internal, not an AttributeError from deep inside.
Nothing here depends on zqhero: callers pass in what identifies their backend.

    compiled_calls()           eval_frame's compile_wrapper frames on the Python stack (first-call calibration, dims)
    callback_of(compiled)      the Dynamo callback behind a torch.compile'd module or function
    callback_chain(callback)   the wrappers from a Dynamo callback down to the user's backend
    install_compile_hooks()    compile start/end callbacks: dynamic batch/sequence dims, size-oblivious tracing
    register_backend()         the name in torch._dynamo's backend registry
    graph_arg_source(node) ... Dynamo's placeholder meta: GraphArg source and flags, example values, compile id
"""

from __future__ import annotations

import logging
import re
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from zqhero_fx.errors import CalibrationError, CaptureError

log = logging.getLogger(__name__)

CHECKED_TORCH = ("2.13",)  # the torch major.minor versions every function here was checked against
_WARNED: set[str] = set()  # torch versions check_torch_version already warned about


def _torch_minor(version: str) -> str:
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return f"{match.group(1)}.{match.group(2)}" if match else str(version)


def check_torch_version() -> bool:
    """True on a checked torch version; otherwise warn once per version (RuntimeWarning) and return False."""
    version = str(torch.__version__)
    if _torch_minor(version) in CHECKED_TORCH:
        return True
    if version not in _WARNED:
        _WARNED.add(version)
        warnings.warn(
            f"zqhero_fx's torch.compile backend reads torch._dynamo internals checked against torch "
            f"{', '.join(CHECKED_TORCH)}, not torch {version}. What may break: calibrating on the first call (finding "
            "the compiled model on the call stack; call backend.calibrate(compiled) instead), marking batch and "
            "sequence dims dynamic (more recompiles), naming frozen weights (overrides may not match), and registering "
            "the name 'zqhero'. zqhero_fx.trace / convert do not depend on these; see zqhero_fx/_dynamo_compat.py.",
            RuntimeWarning, stacklevel=3)
    return False


def _changed(internal: str, detail: str, error: type = CaptureError, hint: str = ""):
    """The error a function raises when a Dynamo internal is not what it expects."""
    return error(f"torch {torch.__version__}: {internal} {detail}; zqhero_fx's backend relies on it as in torch "
                 f"{', '.join(CHECKED_TORCH)} (zqhero_fx/_dynamo_compat.py).{' ' + hint if hint else ''}")


# ---------------------------------------------------------------- the compiled call on the Python stack
@dataclass
class CompiledCall:
    """One running call of a torch.compile'd module or function: the locals of its `compile_wrapper` frame."""

    ctx: Any  # the _TorchDynamoContext (`self`): calling ctx(fn) makes a fresh wrapper with the same callback
    fn: Any  # the compiled function: `Module.forward` (bound) for torch.compile(module)
    callback: Any  # the Dynamo callback the call runs under (leads to the backend, see callback_chain)
    args: Any
    kwargs: Any

    @property
    def module(self) -> torch.nn.Module | None:
        """The compiled nn.Module, when one was compiled (fn is its bound forward)."""
        owner = getattr(self.fn, "__self__", None)
        return owner if isinstance(owner, torch.nn.Module) else None

    @property
    def dynamic(self) -> bool | None:
        """torch.compile(dynamic=...) of this call: `_TorchDynamoContext._dynamic` (None when not given)."""
        return getattr(self.ctx, "_dynamic", None)

    def recall(self) -> Callable:
        """The compiled model as a callable: `ctx(fn)`, a fresh Dynamo wrapper of the same function and callback."""
        return self.ctx(self.fn)


_WRAPPER_CODE: list = []  # the compile_wrapper code object, found once


def _compile_wrapper_code() -> types.CodeType:
    """The code of `torch._dynamo.eval_frame._TorchDynamoContext.__call__.<locals>.compile_wrapper`, the function
    torch.compile's wrapper runs for every call: (*args, **kwargs) closing over `self`, `fn` and `callback`."""
    if not _WRAPPER_CODE:
        from torch._dynamo import eval_frame

        call = getattr(getattr(eval_frame, "_TorchDynamoContext", None), "__call__", None)
        code = next((c for c in getattr(getattr(call, "__code__", None), "co_consts", ())
                     if isinstance(c, types.CodeType) and c.co_name == "compile_wrapper"), None)
        if code is None:
            raise _changed("torch._dynamo.eval_frame._TorchDynamoContext.__call__", "defines no compile_wrapper",
                           CalibrationError, "Call backend.calibrate(compiled_model) before the first call.")
        missing = {"self", "fn", "callback"} - set(code.co_freevars) or {"args", "kwargs"} - set(code.co_varnames)
        if missing:
            raise _changed("torch._dynamo.eval_frame compile_wrapper", f"has no {sorted(missing)} locals",
                           CalibrationError, "Call backend.calibrate(compiled_model) before the first call.")
        _WRAPPER_CODE.append(code)
    return _WRAPPER_CODE[0]


def compiled_calls() -> Iterator[CompiledCall]:
    """The torch.compile'd calls running on the Python stack, innermost first.

    Relies on torch._dynamo.eval_frame: every call of a compiled module or function runs through the closure
    `_TorchDynamoContext.__call__.<locals>.compile_wrapper(*args, **kwargs)`, whose frame holds `self` (the context),
    `fn` and `callback`. Raises CalibrationError when eval_frame no longer has that function.
    """
    code = _compile_wrapper_code()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == code.co_name and frame.f_code.co_filename == code.co_filename:
            local = frame.f_locals
            yield CompiledCall(local.get("self"), local.get("fn"), local.get("callback"), local.get("args"),
                               local.get("kwargs"))
        frame = frame.f_back


# ---------------------------------------------------------------- from a compiled model to its backend
def callback_of(compiled) -> Any:
    """The Dynamo callback behind a torch.compile'd model or function, None if it is neither.

    Relies on `OptimizedModule.dynamo_ctx.callback` (torch.compile(module)) and on the `callback` closure cell of
    the function torch.compile(function) returns (eval_frame's compile_wrapper)."""
    ctx = getattr(compiled, "dynamo_ctx", None)
    if ctx is not None:
        if not hasattr(ctx, "callback"):
            raise _changed("OptimizedModule.dynamo_ctx", "has no `callback`")
        return ctx.callback
    code = getattr(compiled, "__code__", None)
    cells = dict(zip(getattr(code, "co_freevars", ()), getattr(compiled, "__closure__", None) or ()))
    return cells["callback"].cell_contents if "callback" in cells else None


def callback_chain(callback, depth: int = 16) -> Iterator[Any]:
    """The callback, then each thing it wraps, down to the user's backend.

    Relies on `_torchdynamo_orig_backend` (convert_frame's catch-errors and stance wrappers) and on
    `_TorchCompileWrapper.compiler_fn` (torch.compile's wrapper of a non-Inductor backend, see `wrapped_compiler`);
    also follows `.inner`, the convention of wrapper backends such as tests/harness.RecordingBackend."""
    link = callback
    for _ in range(depth):
        if link is None:
            return
        yield link
        link = (getattr(link, "_torchdynamo_orig_backend", None) or getattr(link, "compiler_fn", None)
                or getattr(link, "inner", None))


def wrapped_compiler(link) -> tuple[Callable | None, dict]:
    """(compiler_fn, kwargs) of torch.compile's `_TorchCompileWrapper`: the backend function and the `options=` /
    `mode=` it passes as keyword arguments; (None, {}) for anything else."""
    return getattr(link, "compiler_fn", None), getattr(link, "kwargs", None) or {}


# ---------------------------------------------------------------- compile start / end
_SIZE_OBLIVIOUS: list = []  # the config patch held open from a compile's start callback to its end callback
_HOOK_POLICY: list = []  # [(wants_dynamic(CompiledCall) -> bool, ndims)], set by install_compile_hooks


def mark_dynamic(tree, ndims: int) -> None:
    """`torch._dynamo.maybe_mark_dynamic` the leading `ndims` dims of every tensor in `tree`."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            maybe_mark_dynamic(leaf, list(range(min(leaf.dim(), ndims))))


def maybe_mark_dynamic(tensor: torch.Tensor, dims: list[int]) -> None:
    """`torch._dynamo.maybe_mark_dynamic(tensor, dims)`: a hint that Dynamo may trace those dims as symbolic."""
    mark = getattr(torch._dynamo, "maybe_mark_dynamic", None)
    if mark is None:
        raise _changed("torch._dynamo.maybe_mark_dynamic", "does not exist")
    mark(tensor, dims)


def size_oblivious():
    """A config patch (enter/exit) that traces sizes size-obliviously: `torch.fx.experimental._config`'s
    `backed_size_oblivious`, so a size-1 dim does not specialise the graph."""
    import torch.fx.experimental._config as fx_config

    if not hasattr(fx_config, "backed_size_oblivious"):
        raise _changed("torch.fx.experimental._config", "has no backed_size_oblivious")
    return fx_config.patch(backed_size_oblivious=True)


def _on_compile_start(_args=None) -> None:
    """Before Dynamo traces a frame: if the innermost compiled call wants dynamic dims (the policy given to
    install_compile_hooks), mark its inputs' leading dims dynamic and trace sizes size-obliviously until the end."""
    try:
        call = next(compiled_calls(), None)
        if call is None or not _HOOK_POLICY:
            return
        wants_dynamic, ndims = _HOOK_POLICY[0]
        if wants_dynamic(call):
            mark_dynamic((call.args, call.kwargs), ndims)
            patch = size_oblivious()
            patch.__enter__()
            _SIZE_OBLIVIOUS.append(patch)
    except Exception:  # never break a compile from here
        log.debug("zqhero: could not mark the compiled call's inputs dynamic", exc_info=True)


def _on_compile_end(_args=None) -> None:
    while _SIZE_OBLIVIOUS:
        _SIZE_OBLIVIOUS.pop().__exit__(None, None, None)


def install_compile_hooks(wants_dynamic: Callable[[CompiledCall], bool] | None = None, ndims: int = 2) -> None:
    """(Re)install the compile start/end callbacks; torch._dynamo.reset() clears them, so call this from every
    entry point. `wants_dynamic(call)` decides, per compile, whether the call's dims are marked (kept from the first
    install when None).

    Relies on `torch._dynamo.callback_handler` (a CompilationCallbackHandler): `start_callbacks`, `end_callbacks`,
    `register_start_callback`, `register_end_callback`; Dynamo runs them around each frame's compile."""
    if wants_dynamic is not None:
        _HOOK_POLICY[:] = [(wants_dynamic, ndims)]
    handler = getattr(torch._dynamo, "callback_handler", None)
    needed = ("start_callbacks", "end_callbacks", "register_start_callback", "register_end_callback")
    if handler is None or not all(hasattr(handler, name) for name in needed):
        raise _changed("torch._dynamo.callback_handler", f"is missing or lacks {', '.join(needed)}")
    if _on_compile_start not in handler.start_callbacks:
        handler.register_start_callback(_on_compile_start)
    if _on_compile_end not in handler.end_callbacks:
        handler.register_end_callback(_on_compile_end)


# ---------------------------------------------------------------- the backend registry
def register_backend(compiler_fn: Callable, name: str) -> None:
    """Register `compiler_fn` as torch.compile(backend=name), unless the name is taken or is an entry point.

    Relies on torch._dynamo.backends.registry: `_COMPILER_FNS` (name -> loaded function), `_BACKENDS` (name -> entry
    point, None for registered functions) and `register_backend`. Skipped while torch loads `compiler_fn` through the
    torch_dynamo_backends entry point: it registers the name itself."""
    from torch._dynamo.backends import registry

    fns, entries = getattr(registry, "_COMPILER_FNS", None), getattr(registry, "_BACKENDS", None)
    if not isinstance(fns, dict) or not isinstance(entries, dict) or not hasattr(registry, "register_backend"):
        raise _changed("torch._dynamo.backends.registry", "lacks the dicts _COMPILER_FNS / _BACKENDS or "
                       "register_backend")
    if name not in fns and entries.get(name) is None:
        registry.register_backend(compiler_fn, name=name)


# ---------------------------------------------------------------- Dynamo's graph meta
def _grapharg(node: fx.Node):
    return node.meta.get("grapharg")


def graph_arg_source(node: fx.Node) -> str:
    """The name of a placeholder's Dynamo source (`L['self']._modules['fc']._parameters['weight']`), "" if none.

    Relies on `node.meta["grapharg"]`, a torch._dynamo.variables.builder.GraphArg, and its `source.name`."""
    grapharg = _grapharg(node)
    if grapharg is None or getattr(grapharg, "source", None) is None:
        if grapharg is not None and not hasattr(grapharg, "source"):
            raise _changed("Dynamo's GraphArg (node.meta['grapharg'])", "has no `source`")
        return ""
    name = grapharg.source.name
    name = name() if callable(name) else name
    if not isinstance(name, str):
        raise _changed("Dynamo's GraphArg.source.name", f"is a {type(name).__name__}, not a str")
    return name


def passes_as_tensor(node: fx.Node) -> bool:
    """Whether Dynamo passes this placeholder's Python number as a 0-dim tensor (`dynamic=True` does so for float
    module attributes such as LayerNorm.eps): GraphArg's `pass_arg_as_tensor`."""
    grapharg = _grapharg(node)
    if grapharg is None:
        return False
    if not hasattr(grapharg, "pass_arg_as_tensor"):
        raise _changed("Dynamo's GraphArg (node.meta['grapharg'])", "has no `pass_arg_as_tensor`")
    return bool(grapharg.pass_arg_as_tensor)


def example_value(node: fx.Node, default=None):
    """Dynamo's fake value of a node (`node.meta["example_value"]`: FakeTensors with symbolic sizes, SymInts)."""
    return node.meta.get("example_value", default)


def compile_id(gm: fx.GraphModule, default) -> str:
    """Dynamo's compile id of a graph ("frame/recompile", e.g. "3/1"): `gm.meta["dynamo_compile_id"]`."""
    return str(gm.meta.get("dynamo_compile_id", default))
