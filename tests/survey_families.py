"""Survey: how each Transformer family in tests/families.py looks as a zqhero_fx graph, and what convert does with it.

A plain script, not a test:   python tests/survey_families.py [--raw] [family ...]

--raw analyses the graph as torch.export wrote it (propagate_meta only, no canonicalize): the spellings that
canonicalize rules must match. Its output goes to /tmp/family_survey_raw.txt and /tmp/family_survey_raw_summary.md.

Per family it captures the model with zqhero_fx.trace (torch.export underneath), runs propagate_meta + canonicalize
(the pipeline up to "classify", as tests/passes/_util.py does) and prints
  - capture status (the error if it failed) and the histogram of call_function targets in the canonical graph;
  - per module class (first instance), its op sequence in the canonical graph: the module's own nodes in full, and of
    nested submodules only the nodes whose values leave them (marked with the submodule path);
  - focused views: LayerNorm / RMSNorm (rsqrt chains), activations (gelu approximate=, tanh, erf, sigmoid, silu, relu),
    gated MLPs, the attention core (every scaled_dot_product_attention with q/k/v/mask shapes, dtypes, producers and
    kwargs, GQA expand/reshape chains, leftover eager softmax/matmul), RoPE (neg/cat), addmm (GPT-2 Conv1D),
    embeddings and what follows them, convolutions, weights used by several ops (shared / tied);
  - GEMM sites with a weight parameter (aten.linear / aten.addmm / matmul-like ops with a get_attr operand);
then runs zqhero_fx.convert(gm, mode, calibration=[batch, batch]) for M1, M2, M3 and reports success or the error,
the counts of torch.ops.zqhero.quantized_linear vs remaining aten.linear / aten.addmm, the other zqhero ops, and the SQNR of
the converted model's last hidden state against the float model.

Full output goes to /tmp/family_survey.txt (and stdout); a short table to /tmp/family_survey_summary.md.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import sys
import time
import traceback
import warnings

import torch
import torch.fx as fx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zqhero_fx  # noqa: E402
from tests.families import FAMILIES, build, last_hidden  # noqa: E402
from tests.passes._util import pipeline_until  # noqa: E402

FULL = "/tmp/family_survey.txt"
SUMMARY = "/tmp/family_survey_summary.md"
MODES = ("M1", "M2", "M3")
MAX_CLASS_LINES = 90
STOP_BEFORE = "classify"  # the graph after canonicalize; "canonicalize" with --raw

aten = torch.ops.aten
LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.contiguous.default, aten.clone.default, aten.expand.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.slice.Tensor, aten.t.default, aten.alias.default}
GEMM_LIKE = {aten.matmul.default, aten.mm.default, aten.bmm.default}

_out = None


def emit(*parts):
    line = " ".join(str(p) for p in parts)
    print(line)
    _out.write(line + "\n")


# ------------------------------------------------------------------------------------------------ formatting


def _shape(t) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def vstr(node) -> str:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{_shape(v)}"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
        return "(" + ", ".join(f"{str(x.dtype).replace('torch.', '')}{_shape(x)}" for x in v) + ")"
    if v is not None and not isinstance(v, torch.Tensor):
        return f"{type(v).__name__}={v}"
    return "?"


def fmt_arg(gm, a) -> str:
    if isinstance(a, fx.Node):
        if a.op == "get_attr":
            obj = _attr(gm, a.target)
            return f"@{a.target}{_shape(obj) if isinstance(obj, torch.Tensor) else ''}"
        if a.op == "placeholder":
            return f"${a.target}"
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(fmt_arg(gm, x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, float):
        return repr(a) if abs(a) < 1e6 else f"{a:.4g}"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "torch.")
    if isinstance(a, torch.device):
        return f"device({a.type!r})"
    if isinstance(a, int) and abs(a) > 2 ** 40:
        return "INT_MAX" if a > 0 else "INT_MIN"
    return repr(a)


def fmt_node(gm, n) -> str:
    args = ", ".join(fmt_arg(gm, a) for a in n.args)
    kwargs = ", ".join(f"{k}={fmt_arg(gm, v)}" for k, v in n.kwargs.items())
    call = ", ".join(x for x in (args, kwargs) if x)
    return f"%{n.name} = {n.target}({call}) -> {vstr(n)}"


def _attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def stack(n) -> list[tuple[str, str]]:
    """[(module path, class name)] outermost first, without export's placeholder entries."""
    out = []
    for path, cls in (n.meta.get("nn_module_stack") or {}).values():
        if "_empty_nn_module_stack" in str(path):
            continue
        cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        out.append((path, cls.rsplit(".", 1)[-1]))
    return out


def _clean_path(path: str) -> str:
    # export records paths like "L['self'].layers[0].self_attn" or "layers.0.self_attn"; keep the dotted form.
    p = path.replace("L['self'].", "").replace("L['self']", "")
    p = p.replace("[", ".").replace("]", "").replace("'", "")
    return p or "<root>"


def calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def is_(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def weight_arg(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


# ------------------------------------------------------------------------------------------------ analyses


def histogram(gm):
    return collections.Counter(str(n.target) for n in calls(gm))


def module_listings(gm):
    """Per module class, the op sequence of its first instance."""
    first_path: dict[str, str] = {}
    members: dict[str, list] = collections.defaultdict(list)
    counts: dict[str, set] = collections.defaultdict(set)
    for n in calls(gm):
        st = stack(n)
        for depth, (path, cls) in enumerate(st):
            path = _clean_path(path)
            counts[cls].add(path)
            first_path.setdefault(cls, path)
            if first_path[cls] == path:
                inner = _clean_path(st[-1][0]) if depth < len(st) - 1 else None
                inner_cls = st[-1][1] if inner else None
                members[cls].append((n, inner, inner_cls))
    for cls, items in members.items():
        path = first_path[cls]
        own = sum(1 for _, inner, _ in items if inner is None)
        emit(f"  [{cls}] first instance '{path}' ({len(counts[cls])} instances; {own} own ops, "
             f"{len(items) - own} in submodules)")
        node_set = {n for n, _, _ in items}
        lines = 0
        for n, inner, inner_cls in items:
            if inner is not None:
                # a nested submodule: show only the nodes whose values leave that submodule
                leaves = any(_clean_path(stack(u)[-1][0]) != inner if stack(u) else True for u in n.users)
                if not leaves and all(u in node_set for u in n.users):
                    continue
                prefix = f"      <{inner} :: {inner_cls}> "
            else:
                prefix = "      "
            if n.target is aten._assert_tensor_metadata.default or n.target is aten.sym_size.int:
                continue
            emit(prefix + fmt_node(gm, n))
            lines += 1
            if lines >= MAX_CLASS_LINES:
                emit("      ... (truncated)")
                break


def back_chain(gm, n, stop, depth=12):
    """Nodes from n backwards along first tensor args while `stop` is false."""
    chain = []
    cur = n
    while isinstance(cur, fx.Node) and cur.op == "call_function" and len(chain) < depth:
        chain.append(cur)
        nxt = next((a for a in cur.args if isinstance(a, fx.Node) and a.op == "call_function"), None)
        if nxt is None or stop(nxt):
            if nxt is not None:
                chain.append(nxt)
            break
        cur = nxt
    return list(reversed(chain))


def same_module_nodes(gm, n):
    st = stack(n)
    if not st:
        return [n]
    path = st[-1][0]
    return [m for m in calls(gm) if stack(m) and stack(m)[-1][0] == path
            and m.target not in (aten._assert_tensor_metadata.default, aten.sym_size.int)]


def norms(gm):
    ln = [n for n in calls(gm) if is_(n, aten.layer_norm.default, aten.native_layer_norm.default)]
    emit(f"  layer_norm nodes: {len(ln)}")
    seen = set()
    for n in ln:
        x, shape = n.args[0], n.args[1]
        w = n.args[2] if len(n.args) > 2 else None
        b = n.args[3] if len(n.args) > 3 else None
        eps = n.args[4] if len(n.args) > 4 else None
        key = (str(shape), w is None, b is None, eps, stack(n)[-1][1] if stack(n) else "?")
        if key in seen:
            continue
        seen.add(key)
        emit(f"    e.g. {fmt_node(gm, n)}   [module {key[-1]}; weight={'get_attr' if weight_arg(w) else w}, "
             f"bias={'get_attr' if weight_arg(b) else b}, eps={eps}]")
    rs = [n for n in calls(gm) if is_(n, aten.rsqrt.default)]
    emit(f"  rsqrt nodes (RMSNorm-like): {len(rs)}")
    seen = set()
    for r in rs:
        cls = stack(r)[-1][1] if stack(r) else "?"
        if cls in seen:
            continue
        seen.add(cls)
        emit(f"    module {cls} ({_clean_path(stack(r)[-1][0]) if stack(r) else '?'}), all its ops:")
        for m in same_module_nodes(gm, r):
            emit("      " + fmt_node(gm, m))


ACTS = [aten.gelu.default, aten.gelu_.default, aten.tanh.default, aten.erf.default, aten.sigmoid.default,
        aten.silu.default, aten.silu_.default, aten.relu.default, aten.relu_.default, aten.pow.Tensor_Scalar,
        aten.sqrt.default]


def activations(gm):
    for op in ACTS:
        ns = [n for n in calls(gm) if n.target is op]
        if not ns:
            continue
        if op is aten.gelu.default:
            kinds = collections.Counter(n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
                                        for n in ns)
            emit(f"  {op}: {len(ns)}  approximate={dict(kinds)}")
        else:
            emit(f"  {op}: {len(ns)}")
        seen = set()
        for n in ns:
            cls = stack(n)[-1][1] if stack(n) else "?"
            if cls in seen:
                continue
            seen.add(cls)
            if op in (aten.pow.Tensor_Scalar, aten.sqrt.default) and any(
                    m.target is aten.rsqrt.default for m in same_module_nodes(gm, n)):
                emit(f"    in module {cls}: part of the RMSNorm shown above")
                continue
            emit(f"    in module {cls} ({_clean_path(stack(n)[-1][0]) if stack(n) else '?'}):")
            for m in same_module_nodes(gm, n)[:30]:
                emit("      " + fmt_node(gm, m))
            # how the activation's result is used
            for u in list(n.users)[:3]:
                emit(f"      user: {fmt_node(gm, u)}")


def gated(gm):
    """mul(act(x), y) where both sides trace back to a linear: the gated MLP."""
    found = 0
    for n in calls(gm):
        if not is_(n, aten.mul.Tensor) or len(n.args) != 2:
            continue
        a, b = n.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        acts = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default}

        def origin(x, depth=8):
            chain = []
            while isinstance(x, fx.Node) and x.op == "call_function" and depth:
                chain.append(x)
                if x.target in (aten.linear.default, aten.addmm.default) or x.target in acts:
                    break
                x = next((y for y in x.args if isinstance(y, fx.Node)), None)
                depth -= 1
            return chain

        ca, cb = origin(a), origin(b)
        ta = [x.target for x in ca]
        tb = [x.target for x in cb]
        act_side = any(t in acts for t in ta) or any(t in acts for t in tb)
        lin_side = (ta and ta[-1] in (aten.linear.default, aten.addmm.default)) or (
            tb and tb[-1] in (aten.linear.default, aten.addmm.default))
        if act_side and lin_side and (len(ca) <= 4 and len(cb) <= 4):
            found += 1
            if found <= 2:
                emit(f"  gated mul: {fmt_node(gm, n)}")
                emit("    left : " + " <- ".join(f"{x.target}" for x in ca))
                emit("    right: " + " <- ".join(f"{x.target}" for x in cb))
                for x in reversed(ca + cb):
                    if x.target in (aten.linear.default, aten.addmm.default, aten.split.Tensor,
                                    aten.chunk.default, aten.split_with_sizes.default, aten.slice.Tensor,
                                    operator_getitem):
                        emit("      " + fmt_node(gm, x))
    emit(f"  gated muls (act(x) * linear-derived y): {found}")


import operator  # noqa: E402

operator_getitem = operator.getitem


def _layout_chain(gm, x, depth=10):
    chain = []
    while isinstance(x, fx.Node) and x.op == "call_function" and depth:
        chain.append(x)
        if x.target not in LAYOUT and x.target is not operator.getitem:
            break
        x = x.args[0]
        depth -= 1
    return chain


def attention(gm):
    sd = [n for n in calls(gm) if is_(n, aten.scaled_dot_product_attention.default)]
    emit(f"  scaled_dot_product_attention nodes: {len(sd)}")
    seen = set()
    for n in sd:
        q, k, v = n.args[:3]
        mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        desc = (vstr(q), vstr(k), vstr(v), vstr(mask) if isinstance(mask, fx.Node) else repr(mask),
                tuple(sorted((kk, str(vv)) for kk, vv in n.kwargs.items() if kk != "attn_mask")),
                getattr(mask, "target", None), stack(n)[-1][1] if stack(n) else "?")
        if desc in seen:
            continue
        seen.add(desc)
        emit(f"    {fmt_node(gm, n)}")
        emit(f"      q {vstr(q)}  k {vstr(k)}  v {vstr(v)}  module {desc[-1]}  "
             f"fused_from={n.meta.get('zq_fused_from', 'sdpa')}")
        if isinstance(mask, fx.Node):
            emit(f"      attn_mask {vstr(mask)} produced by: {fmt_node(gm, mask) if mask.op == 'call_function' else mask.op}")
            chain = back_chain(gm, mask, lambda m: m.op != "call_function", depth=6)
            emit("        mask chain: " + " <- ".join(str(m.target) for m in reversed(chain)))
        else:
            emit(f"      attn_mask = {mask!r}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            chain = _layout_chain(gm, x)
            emit(f"      {name} chain: " + " <- ".join(f"{m.target}{'' if m.target not in (aten.expand.default, aten.reshape.default, aten.view.default, aten.transpose.int, aten.permute.default, aten.slice.Tensor) else fmt_arg(gm, list(m.args[1:]))}" for m in chain))
    sm = [n for n in calls(gm) if is_(n, aten.softmax.int, aten._softmax.default)]
    if sm:
        emit(f"  leftover softmax nodes (eager attention not fused): {len(sm)}")
        for n in sm[:2]:
            emit("    " + fmt_node(gm, n))
            for m in same_module_nodes(gm, n)[:40]:
                emit("      " + fmt_node(gm, m))
    mm = [n for n in calls(gm) if n.target in GEMM_LIKE and not any(weight_arg(a) for a in n.args)]
    if mm:
        emit(f"  activation x activation matmul/bmm/mm nodes: {len(mm)}")
        for n in mm[:3]:
            emit("    " + fmt_node(gm, n))
    rk = [n for n in calls(gm) if is_(n, aten.expand.default) and val_dim(n) == 5]
    if rk:
        emit(f"  5-d expands (repeat_kv style GQA): {len(rk)}")
        for n in rk[:2]:
            emit("    " + fmt_node(gm, n))
            for u in n.users:
                emit("      -> " + fmt_node(gm, u))


def val_dim(n):
    v = n.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else -1


def rope(gm):
    negs = [n for n in calls(gm) if is_(n, aten.neg.default)]
    cats = [n for n in calls(gm) if is_(n, aten.cat.default)]
    coss = [n for n in calls(gm) if is_(n, aten.cos.default, aten.sin.default)]
    emit(f"  neg: {len(negs)}  cat: {len(cats)}  cos/sin: {len(coss)}")
    if coss:
        n = coss[0]
        emit(f"    cos/sin built in module {stack(n)[-1][1] if stack(n) else '?'}; ops of that module:")
        for m in same_module_nodes(gm, n)[:40]:
            emit("      " + fmt_node(gm, m))
    if negs:
        n = negs[0]
        # the rotate_half / apply_rotary_pos_emb region: nodes around the first neg in graph order
        nodes = calls(gm)
        i = nodes.index(n)
        emit(f"    around the first neg (module {stack(n)[-1][1] if stack(n) else '?'}):")
        for m in nodes[max(0, i - 10): i + 16]:
            if m.target in (aten._assert_tensor_metadata.default, aten.sym_size.int):
                continue
            emit("      " + fmt_node(gm, m))


def addmm(gm):
    ns = [n for n in calls(gm) if is_(n, aten.addmm.default)]
    if not ns:
        return
    emit(f"  addmm nodes: {len(ns)}")
    n = ns[0]
    emit(f"    module {stack(n)[-1][1] if stack(n) else '?'} ({_clean_path(stack(n)[-1][0]) if stack(n) else '?'}):")
    for m in same_module_nodes(gm, n):
        emit("      " + fmt_node(gm, m))
    emit("      users: " + "; ".join(fmt_node(gm, u) for u in n.users))
    x = n.args[1]
    if isinstance(x, fx.Node):
        emit("      mat1 from: " + fmt_node(gm, x) if x.op == "call_function" else f"      mat1 from {x.op}")


def embeddings(gm):
    ns = [n for n in calls(gm) if is_(n, aten.embedding.default)]
    emit(f"  embedding nodes: {len(ns)}")
    for n in ns:
        emit(f"    {fmt_node(gm, n)}  [module {stack(n)[-1][1] if stack(n) else '?'}]")
    # after the embedding LayerNorm (or the first LN): show what consumes it
    ln = [n for n in calls(gm) if is_(n, aten.layer_norm.default)]
    if ns and ln:
        first = ln[0]
        emit(f"    first layer_norm: {fmt_node(gm, first)}")
        for u in first.users:
            emit(f"      -> {fmt_node(gm, u)}  [module {stack(u)[-1][1] if stack(u) else '?'}]")
            for uu in list(u.users)[:3]:
                emit(f"         -> {fmt_node(gm, uu)}")


def convs(gm):
    ns = [n for n in calls(gm) if "conv" in str(n.target)]
    for n in ns:
        emit(f"  {fmt_node(gm, n)}  [module {stack(n)[-1][1] if stack(n) else '?'}]")
        for u in n.users:
            emit(f"    -> {fmt_node(gm, u)}")
            for uu in u.users:
                emit(f"       -> {fmt_node(gm, uu)}")


def shared_weights(gm, model):
    users = collections.defaultdict(list)
    by_storage = collections.defaultdict(set)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = _attr(gm, n.target)
            if isinstance(obj, torch.Tensor):
                by_storage[(obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape))].add(n.target)
                for u in n.users:
                    users[n.target].append(u)
    multi = {t: us for t, us in users.items() if len(us) > 1}
    emit(f"  get_attr tensors used by >1 op: {len(multi)}")
    for t, us in list(multi.items())[:8]:
        emit(f"    {t}: " + ", ".join(f"{u.target}" for u in us))
    aliased = [ts for ts in by_storage.values() if len(ts) > 1]
    emit(f"  distinct get_attr targets sharing storage (tied): {aliased if aliased else 'none'}")
    tied = getattr(model, "_tied_weights_keys", None)
    emit(f"  model._tied_weights_keys = {tied!r}; config.tie_word_embeddings = "
         f"{getattr(model.config, 'tie_word_embeddings', None)}")


def gemm_sites(gm) -> dict:
    c = collections.Counter()
    for n in calls(gm):
        if is_(n, aten.linear.default):
            c["linear(get_attr W)" if weight_arg(n.args[1]) else "linear(non-param W)"] += 1
        elif is_(n, aten.addmm.default):
            c["addmm(get_attr W)" if weight_arg(n.args[2]) else "addmm(non-param W)"] += 1
        elif n.target in GEMM_LIKE:
            if any(weight_arg(a) for a in n.args):
                c[f"{str(n.target).split('.')[1]}(get_attr)"] += 1
            else:
                c[f"{str(n.target).split('.')[1]}(act x act)"] += 1
        elif "conv" in str(n.target):
            c["convolution"] += 1
    return dict(c)


# ------------------------------------------------------------------------------------------------ convert


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    noise = (ref - out).pow(2).mean().item()
    return float("inf") if noise == 0 else 10 * math.log10(ref.pow(2).mean().item() / noise)


def first_lines(error: BaseException, n: int = 6) -> str:
    text = f"{type(error).__name__}: {error}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    cause = error.__cause__
    if cause is not None:
        lines.append(f"  caused by {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
    return "\n".join(lines[:n])


def where(error: BaseException) -> str:
    """The innermost zqhero_fx frame of the (cause of the) error."""
    err = error.__cause__ or error
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "zqhero_fx" in f.filename]
    if not frames:
        frames = traceback.extract_tb(err.__traceback__)[-1:]
    return "; ".join(f"{os.path.relpath(f.filename)}:{f.lineno} {f.name}" for f in frames[-2:])


def convert_all(name, gm, model, batch):
    results = {}
    with torch.no_grad():
        ref = last_hidden(model(**batch))
    for mode in MODES:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = zqhero_fx.convert(gm, mode, calibration=[batch, batch])
        except Exception as error:  # noqa: BLE001
            results[mode] = {"ok": False, "error": first_lines(error), "where": where(error),
                             "seconds": time.perf_counter() - start}
            emit(f"  {mode}: CRASH after {time.perf_counter() - start:.1f}s")
            for ln in first_lines(error, 12).splitlines():
                emit(f"      {ln}")
            emit(f"      at {where(error)}")
            continue
        hist = zqhero_fx.ops_histogram(q)
        # torch.ops.zqhero.quantized_linear (any overload; also a renamed quantized linear op, if the kernels move)
        int8 = sum(v for k, v in hist.items() if k.startswith("zqhero.") and "linear" in k)
        zq_ops = {k: v for k, v in hist.items() if k.startswith("zqhero.")}
        res = {"ok": True, "quantized_linear": int8, "linear": hist.get("aten.linear.default", 0),
               "addmm": hist.get("aten.addmm.default", 0), "zq_ops": zq_ops, "seconds": time.perf_counter() - start}
        try:
            with torch.no_grad():
                out = last_hidden(q(**batch))
            res["sqnr"] = sqnr(ref, out)
        except Exception as error:  # noqa: BLE001
            res["run_error"] = first_lines(error, 3)
        results[mode] = res
        emit(f"  {mode}: ok in {res['seconds']:.1f}s  quantized_linear={int8}  aten.linear={res['linear']}  "
             f"aten.addmm={res['addmm']}  sqnr_last_hidden="
             f"{res.get('sqnr', float('nan')):.1f} dB{'  RUN ERROR: ' + res['run_error'] if 'run_error' in res else ''}")
        emit(f"      zqhero ops: {zq_ops}")
        where_int8 = [_clean_path(stack(n)[-1][0]) if stack(n) else n.name for n in q.graph.nodes
                      if n.op == "call_function" and str(n.target).startswith("zqhero.") and "linear" in str(n.target)]
        emit(f"      quantized linears at: {where_int8}")
        res["int8_at"] = where_int8
    return results


# ------------------------------------------------------------------------------------------------ main


def survey(name):
    emit("=" * 110)
    family = FAMILIES[name]
    emit(f"FAMILY {name}  kind={family.kind} norm={family.norm}  {family.notes}")
    info = {"name": name, "kind": family.kind}
    try:
        model, batch = build(name)
    except Exception as error:  # noqa: BLE001
        emit(f"  BUILD FAILED: {first_lines(error)}")
        info["build"] = first_lines(error, 2)
        return info
    emit(f"  attn_implementation={model.config._attn_implementation}  inputs: "
         + ", ".join(f"{k}:{str(v.dtype).replace('torch.', '')}{list(v.shape)}" for k, v in batch.items()))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = zqhero_fx.trace(model, batch)
    except Exception as error:  # noqa: BLE001
        emit(f"  CAPTURE FAILED after {time.perf_counter() - start:.1f}s:")
        for ln in first_lines(error, 12).splitlines():
            emit(f"    {ln}")
        info["capture"] = first_lines(error, 3)
        return info
    info["capture"] = "ok"
    emit(f"  capture: ok ({time.perf_counter() - start:.1f}s)")
    try:
        with torch.no_grad():
            same = sqnr(last_hidden(model(**batch)), last_hidden(gm(**batch)))
        emit(f"  captured graph vs model, last hidden SQNR: {same:.1f} dB")
    except Exception as error:  # noqa: BLE001
        emit(f"  captured graph does not run on the example: {first_lines(error, 3)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            canon, _, _ = pipeline_until(gm, "fp", None, STOP_BEFORE)
    except Exception as error:  # noqa: BLE001
        emit(f"  CANONICALIZE FAILED: {first_lines(error, 8)}")
        info["canonicalize"] = first_lines(error, 3)
        return info
    hist = histogram(canon)
    emit(f"-- call_function histogram ({'raw export graph' if STOP_BEFORE == 'canonicalize' else 'canonical graph'}):")
    for t, c in sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])):
        emit(f"  {c:4d}  {t}")
    info["hist"] = hist
    info["gemm"] = gemm_sites(canon)
    emit(f"-- GEMM sites: {info['gemm']}")
    for title, fn in (("norms", norms), ("activations", activations), ("gated MLP", gated),
                      ("attention", attention), ("RoPE", rope), ("addmm / Conv1D", addmm),
                      ("embeddings", embeddings), ("convolutions", convs)):
        emit(f"-- {title}:")
        try:
            fn(canon)
        except Exception as error:  # noqa: BLE001
            emit(f"  (analysis failed: {first_lines(error, 2)})")
    emit("-- shared / tied weights:")
    shared_weights(canon, model)
    emit("-- per module class (first instance; nested submodules show only their outputs):")
    module_listings(canon)
    emit("-- convert:")
    info["convert"] = convert_all(name, gm, model, batch)
    return info


def write_summary(infos):
    lines = ["# Family survey summary", "",
             "| family | kind | capture | GEMM sites (canonical graph) | M1 | M2 | M3 |", "|---|---|---|---|---|---|---|"]
    for info in infos:
        cap = info.get("capture", info.get("build", "?"))
        cap = "ok" if cap == "ok" else "FAIL: " + str(cap).splitlines()[0][:120].replace("|", "/")
        cells = []
        for mode in MODES:
            r = info.get("convert", {}).get(mode)
            if r is None:
                cells.append("-")
            elif r["ok"]:
                s = f"ok quantized_linear={r['quantized_linear']} linear={r['linear']} addmm={r['addmm']}"
                if "sqnr" in r:
                    s += f" sqnr={r['sqnr']:.1f}dB"
                if "run_error" in r:
                    s += " RUN-ERR"
                cells.append(s)
            else:
                cells.append("CRASH: " + r["error"].splitlines()[0][:140].replace("|", "/"))
        gemm = ", ".join(f"{k}={v}" for k, v in info.get("gemm", {}).items())
        lines.append(f"| {info['name']} | {info['kind']} | {cap} | {gemm} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("## Convert errors (first lines)")
    for info in infos:
        for mode in MODES:
            r = info.get("convert", {}).get(mode)
            if r is not None and not r["ok"]:
                lines.append(f"- **{info['name']} {mode}**: `{r['error'].splitlines()[0][:300]}` at {r['where']}")
    with open(SUMMARY, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    global _out, FULL, SUMMARY, STOP_BEFORE
    if "--raw" in argv:
        argv = [a for a in argv if a != "--raw"]
        FULL, SUMMARY, STOP_BEFORE = "/tmp/family_survey_raw.txt", "/tmp/family_survey_raw_summary.md", "canonicalize"
    names = argv or list(FAMILIES)
    _out = io.StringIO()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    infos = []
    try:
        for name in names:
            try:
                infos.append(survey(name))
            except Exception as error:  # noqa: BLE001
                emit(f"  SURVEY OF {name} FAILED: {first_lines(error)}")
                emit(traceback.format_exc())
                infos.append({"name": name, "kind": FAMILIES[name].kind, "capture": "survey failed"})
            with open(FULL, "w") as f:
                f.write(_out.getvalue())
    finally:
        with open(FULL, "w") as f:
            f.write(_out.getvalue())
        write_summary(infos)
    print(f"\nwrote {FULL} and {SUMMARY}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
