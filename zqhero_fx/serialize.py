"""save / load a converted GraphModule as ONE safetensors file: every tensor the graph reads is a safetensors entry, and
the graph itself is a JSON description (nodes, ops by qualified name, arguments) in the file's metadata. Loading
resolves ops only from an allowlist (torch.ops.aten / torch.ops.zqhero overloads, operator, math, torch functions) and
executes no stored code and unpickles nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import operator
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from safetensors.torch import load_file, save_file
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from zqhero_fx.errors import SerializationError

FORMAT = "zqhero_fx.graph/2"  # /2: the format-neutral op names of zqhero_fx/ops.py
_OP_NAMESPACES = {"aten", "zqhero"}
_FUNCTION_MODULES = {"operator", "_operator", "builtins", "math", "torch", "torch.nn.functional", "torch._C._nn",
                     "torch.functional", "torch.fx.experimental.sym_node"}
_ZQHERO_FUNCTIONS = {"zqhero_fx.capture:check_token_ids"}  # zqhero_fx's own, one by one (convert inserts them)


def _encode_target(node: fx.Node):
    t = node.target
    if node.op in ("placeholder", "get_attr", "call_method", "output"):
        return t
    if node.op == "call_module":
        raise SerializationError(f"node {node.name} calls module {t!r}: save supports graphs made of functions; "
                                 "capture with zqhero_fx.trace (torch.export) so modules become functions")
    if isinstance(t, torch._ops.OpOverload):
        namespace = t.namespace
        if namespace not in _OP_NAMESPACES:
            raise SerializationError(f"node {node.name}: op {t} is outside the namespaces save supports "
                                     f"({', '.join(sorted(_OP_NAMESPACES))})")
        return {"overload": f"{namespace}::{t._opname}.{t._overloadname}"}
    module = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None)
    if name and (module in _FUNCTION_MODULES or f"{module}:{name}" in _ZQHERO_FUNCTIONS):
        return {"function": f"{module}:{name}"}
    raise SerializationError(f"node {node.name}: cannot save a call to {t!r} (module {module!r})")


def _decode_target(op: str, spec):
    if not isinstance(spec, dict):
        return spec
    if "overload" in spec:
        namespace, rest = spec["overload"].split("::", 1)
        opname, overload = rest.rsplit(".", 1)
        if namespace not in _OP_NAMESPACES:
            raise SerializationError(f"refusing op namespace {namespace!r}")
        if namespace == "zqhero":
            import zqhero_fx.ops  # noqa: F401  (registers the ops)
        return getattr(getattr(getattr(torch.ops, namespace), opname), overload)
    module, qualname = spec["function"].split(":", 1)
    if module not in _FUNCTION_MODULES and spec["function"] not in _ZQHERO_FUNCTIONS:
        raise SerializationError(f"refusing function {spec['function']!r}: not from an allowed module")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _encode(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).replace("torch.", "")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).replace("torch.", "")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise SerializationError(f"cannot save argument {value!r} of type {type(value).__name__}")


def _decode(value, nodes):
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "node":
        return nodes[payload]
    if kind == "float":
        return float(payload)
    if kind in ("list", "tuple"):
        items = [_decode(v, nodes) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode(v, nodes) for k, v in payload.items()}
    if kind in ("dtype", "layout", "memory_format"):
        obj = getattr(torch, payload)
        return obj
    if kind == "device":
        return torch.device(payload)
    if kind == "slice":
        return slice(*(_decode(v, nodes) for v in payload))
    if kind == "ellipsis":
        return Ellipsis
    raise SerializationError(f"unknown argument encoding {kind!r}")


def save(gm: fx.GraphModule, path) -> Path:
    """Write a converted model to `path` (one .safetensors file). `load(path)` gives identical outputs."""
    nodes, tensors = [], {}
    for node in gm.graph.nodes:
        nodes.append({"name": node.name, "op": node.op, "target": _encode_target(node),
                      "args": _encode(node.args), "kwargs": _encode(dict(node.kwargs))})
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                raise SerializationError(f"get_attr {node.target!r} is a {type(obj).__name__}, not a tensor")
            tensors[node.target] = obj.detach().contiguous().clone()
    meta = {"format": FORMAT, "nodes": nodes}
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        try:
            meta["pytree"] = {"orig_args": list(info.orig_args),
                              "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec else None,
                              "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec else None}
        except Exception as error:
            raise SerializationError(f"cannot save the model's input/output structure: {error}") from error
    state = gm.meta.get("zqhero", {})
    config = state.get("config")
    meta["zqhero"] = {"mode": getattr(config, "name", None), "lowered": state.get("lowered", {}),
                      "activation_format": getattr(config, "activation_format", None),
                      "weight_format": getattr(config, "weight_format", None)}
    if "zqhero_decoder" in gm.meta:  # a decoder step graph: its cache layout, so generate() works after load
        from zqhero_fx import decoder

        meta["decoder"] = {"spec": dataclasses.asdict(gm.meta["zqhero_decoder"]),
                           "cache_dtypes": [[str(k).removeprefix("torch."), str(v).removeprefix("torch.")]
                                            for k, v in decoder.cache_dtypes(gm)]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"zqhero_fx": json.dumps(meta)})
    # safetensors writes a private temporary file (mode 0600) and renames it: give the file the mode any new file
    # gets here (0644 under umask 022), so that others can read a model as they read the rest of the user's files.
    os.chmod(path, 0o666 & ~_umask())
    return path


def _umask() -> int:
    """The process umask. It can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load(path) -> fx.GraphModule:
    """Read a model written by `save`: a GraphModule of the same graph, weights and scales; no re-calibration."""
    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"no saved model at {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get("zqhero_fx")
        tensors = load_file(str(path))
    except Exception as error:
        raise SerializationError(f"{path} is not a safetensors file written by zqhero_fx.save: {error}") from error
    if header is None:
        raise SerializationError(f"{path} has no zqhero_fx graph in its metadata")
    meta = json.loads(header)
    if meta.get("format") == "zqhero_fx.graph/1":
        raise SerializationError(f"{path} was saved by an older zqhero_fx whose ops had INT8-only names "
                                 "(int8_linear, int8_attention, ...); convert the model again and save it anew")
    if meta.get("format") != FORMAT:
        raise SerializationError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in meta["nodes"]:
        args = _decode(entry["args"], nodes)
        kwargs = _decode(entry["kwargs"], nodes)
        op, target = entry["op"], _decode_target(entry["op"], entry["target"])
        if op == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(op, target, args, kwargs, name=entry["name"])
        nodes[entry["name"]] = node
    if "pytree" in meta:
        p = meta["pytree"]
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(
            p["orig_args"], pytree.treespec_loads(p["in_spec"]) if p["in_spec"] else None,
            pytree.treespec_loads(p["out_spec"]) if p["out_spec"] else None))
    missing = [n.target for n in graph.nodes if n.op == "get_attr" and n.target not in tensors]
    if missing:
        raise SerializationError(f"{path} lacks tensors {missing[:3]}")
    gm = fx.GraphModule({n.target: tensors[n.target] for n in graph.nodes if n.op == "get_attr"}, graph)
    gm.meta["zqhero"] = meta.get("zqhero", {})
    if "decoder" in meta:
        from zqhero_fx import decoder

        spec = dict(meta["decoder"]["spec"], eos_token_ids=tuple(meta["decoder"]["spec"]["eos_token_ids"]))
        gm.meta["zqhero_decoder"] = decoder.DecoderSpec(**spec)
        gm.meta["zqhero_cache_dtypes"] = [tuple(_dtype(d) for d in pair) for pair in meta["decoder"]["cache_dtypes"]]
    return gm


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SerializationError(f"unknown dtype {name!r} in the saved decoder cache layout")
    return dtype


__all__ = ["save", "load"]
