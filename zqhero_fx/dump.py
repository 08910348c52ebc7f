"""Graph dumps for debugging: per pass, the readable code (`NN_<pass>.py`), a picture (`NN_<pass>.svg`) whose nodes show
precision, scheme, bound class and FLOPs/bytes, and the same per-node facts as JSON; after conversion, an SQNR report of
every quantized op against the float graph on one calibration batch (`sqnr_report.md` / `.json`).
Only built when `dump_dir` or $ZQHERO_DUMP_DIR is set; stale files in the directory are removed first.
"""

from __future__ import annotations

import copy
import html
import json
import math
import shutil
import subprocess
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx

from zqhero_fx.formats import is_quantized_dtype
from zqhero_fx.passes._graph import module_path
from zqhero_fx.passes.state import NodeState, peek

# Quantized formats warm, float ones cool.
_COLOURS = {"int8": "#f4a261", "fp8_e4m3": "#e76f51", "fp8_e5m2": "#e9c46a", "fp16": "#8ecae6", "bf16": "#8ecae6",
            "fp32": "#e9ecef"}
_BOUND_SHAPES = {"compute": "box", "memory": "ellipse", "free": "plaintext"}


def _short(target) -> str:
    text = str(target)
    for prefix in ("torch.ops.aten.", "torch.ops.zqhero.", "aten.", "zqhero."):
        text = text.replace(prefix, "zq." if "zqhero" in prefix else "")
    return text.replace(".default", "")


def _precision(node: fx.Node, record: NodeState) -> str | None:
    if record.precision is not None:
        return record.precision
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        v = v[0] if v and isinstance(v[0], torch.Tensor) else None
    if not isinstance(v, torch.Tensor):
        return None
    if is_quantized_dtype(v.dtype):
        return {torch.int8: "int8", torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}.get(v.dtype,
                                                                                                        str(v.dtype))
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(v.dtype, "fp32")


def node_facts(node: fx.Node) -> dict:
    v = node.meta.get("val")
    record = peek(node) or NodeState()
    scheme = record.attention_schemes or record.scheme
    return {
        "name": node.name,
        "op": node.op,
        "target": _short(node.target),
        "shape": [str(s) for s in v.shape] if isinstance(v, torch.Tensor) else None,
        "dtype": str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else None,
        "precision": _precision(node, record),
        "scheme": str(scheme) if scheme is not None else None,
        "bound": record.bound,
        "flops": record.flops,
        "bytes": record.bytes,
        "module": module_path(node),
    }


def _si(n) -> str:
    if not n:
        return "0"
    exp = min(int(math.log10(abs(n)) // 3), 4)
    return f"{n / 10 ** (3 * exp):.3g}{['', 'k', 'M', 'G', 'T'][exp]}"


def _label(f: dict) -> str:
    lines = [f["target"] if f["op"] in ("call_function", "call_method", "call_module", "get_attr") else f["name"]]
    if f["shape"] is not None:
        lines.append(f"{f['dtype']}[{','.join(f['shape'])}]")
    tags = [t for t in (f["precision"], f["scheme"], f["bound"]) if t]
    if tags:
        lines.append(" ".join(tags))
    if f["flops"] or f["bytes"]:
        lines.append(f"{_si(f['flops'])}FLOP {_si(f['bytes'])}B")
    return "\n".join(lines)


def to_dot(gm: fx.GraphModule) -> str:
    out = ["digraph G {", "  rankdir=TB; node [fontsize=9, style=filled, fontname=Helvetica];"]
    for node in gm.graph.nodes:
        f = node_facts(node)
        if node.op == "get_attr":
            continue
        colour = _COLOURS.get(f["precision"] or "", "#ffffff")
        label = _label(f).replace('"', "'").replace("\n", "\\n")
        out.append(f'  "{node.name}" [label="{label}", shape={_BOUND_SHAPES.get(f["bound"], "ellipse")}, '
                   f'fillcolor="{colour}"];')
        for inp in node.all_input_nodes:
            if inp.op != "get_attr":
                out.append(f'  "{inp.name}" -> "{node.name}";')
    out.append("}")
    return "\n".join(out)


def _svg_with_matplotlib(gm: fx.GraphModule, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = nx.DiGraph()
    facts = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        facts[node.name] = node_facts(node)
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            if inp.op != "get_attr":
                g.add_edge(inp.name, node.name)
    for layer, names in enumerate(nx.topological_generations(g)):
        for name in names:
            g.nodes[name]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal")
    pos = {k: (x, -y) for k, (y, x) in ((k, (v[1], v[0])) for k, v in pos.items())}
    depth = max((g.nodes[n]["layer"] for n in g), default=0) + 1
    fig, ax = plt.subplots(figsize=(14, max(6, depth * 0.55)))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=6, width=0.5, edge_color="#888888")
    colours = [_COLOURS.get(facts[n]["precision"] or "", "#ffffff") for n in g]
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colours, node_size=60, edgecolors="#333333", linewidths=0.4)
    for name, (x, y) in pos.items():
        ax.text(x, y, _label(facts[name]), fontsize=3.5, ha="center", va="bottom")
    ax.set_axis_off()
    fig.savefig(path, format="svg", bbox_inches="tight")
    plt.close(fig)


def write_svg(gm: fx.GraphModule, path: Path) -> None:
    dot = shutil.which("dot")
    if dot:
        subprocess.run([dot, "-Tsvg", "-o", str(path)], input=to_dot(gm).encode(), check=True)
    else:
        _svg_with_matplotlib(gm, path)


def _sqnr(reference: torch.Tensor, estimate: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    reference, estimate = reference.double(), estimate.double()
    if keep is not None and reference.dim() >= 2 and tuple(reference.shape[:2]) == tuple(keep.shape):
        # Padded positions carry values no consumer reads: leave them out of the error.
        reference, estimate = reference[keep], estimate[keep]
    noise = (reference - estimate).pow(2).sum()
    signal = reference.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise.clamp_min(1e-300)))


class _Recorder(fx.Interpreter):
    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out
        return out


def float_estimate(node: fx.Node, value):
    """What a lowered node's output means in the float graph's units (None if it has no float counterpart)."""
    if isinstance(value, (tuple, list)):  # norm_quant: quantized values x per-token scales
        return value[0].float() * value[1]
    if is_quantized_dtype(value.dtype):
        record = peek(node)
        return None if record is None or record.origin_scale is None else value.float() * record.origin_scale
    return value.float()


def _padding_mask(gm: fx.GraphModule, flat_batch) -> torch.Tensor | None:
    """The [batch, sequence] positions to score: from an input named like '*mask*' holding 0/1 integers, if any."""
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], flat_batch):
        if "mask" in str(node.target).lower() and isinstance(value, torch.Tensor) and value.dim() == 2 \
                and not value.dtype.is_floating_point and bool(((value == 0) | (value == 1)).all()):
            return value.bool()
    return None


class Dumper:
    def __init__(self, directory):
        self.dir = Path(directory)
        if self.dir.exists():
            for stale in list(self.dir.glob("[0-9][0-9]_*")) + list(self.dir.glob("sqnr_report.*")) + list(
                    self.dir.glob("coverage.*")):
                stale.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = 0
        self.float_gm = None

    def write_coverage(self, gm: fx.GraphModule) -> None:
        """coverage.md / coverage.json: every GEMM / attention / embedding site and why it stays float."""
        coverage = gm.meta.get("zqhero", {}).get("coverage")
        if coverage is not None:
            (self.dir / "coverage.md").write_text("# Coverage\n\n" + coverage.table() + "\n")
            (self.dir / "coverage.json").write_text(coverage.to_json())

    def write(self, gm: fx.GraphModule, pass_name: str) -> None:
        stem = self.dir / f"{self.index:02d}_{pass_name}"
        self.index += 1
        facts = [node_facts(n) for n in gm.graph.nodes]
        header = "\n".join(f"# {f['name']:<40} {f['target']:<28} {f['precision'] or '':<5} {f['scheme'] or '':<18} "
                           f"{f['bound'] or '':<8} {_si(f['flops']):>7}FLOP {_si(f['bytes']):>7}B"
                           for f in facts if f["op"] == "call_function")
        stem.with_suffix(".py").write_text(f"# zqhero_fx dump after pass '{pass_name}'\n# node, op, precision, scheme, "
                                           f"bound, FLOPs, bytes\n{header}\n\n{gm.print_readable(print_output=False)}")
        stem.with_suffix(".json").write_text(json.dumps(facts, indent=1))
        write_svg(gm, stem.with_suffix(".svg"))
        if pass_name == "calibrate":  # the canonical float graph: the reference of the error report
            self.float_gm = copy.deepcopy(gm)

    def write_error_report(self, traced_module: fx.GraphModule, gm: fx.GraphModule, flat_batch) -> list[dict]:
        if self.float_gm is None:
            return []
        keep = _padding_mask(self.float_gm, flat_batch)
        lowered = {n.name: n for n in gm.graph.nodes if peek(n) is not None and peek(n).origin is not None}
        origins = {peek(n).origin for n in lowered.values()}
        with torch.no_grad():
            reference = _Recorder(self.float_gm, origins | {"output"})
            reference.run(*flat_batch)
            quantized = _Recorder(gm, set(lowered))
            final = quantized.run(*flat_batch)
            expected = reference.run(*flat_batch)
        rows = []
        for name, node in lowered.items():
            ref = reference.values.get(peek(node).origin)
            est = float_estimate(node, quantized.values[name]) if name in quantized.values else None
            if not isinstance(ref, torch.Tensor) or est is None or est.shape != ref.shape:
                continue
            facts = node_facts(node)
            rows.append({"node": name, "op": _short(node.target), "float_node": peek(node).origin,
                         "module": module_path(node), "precision": facts["precision"],
                         "scheme": facts["scheme"], "sqnr_db": round(_sqnr(ref, est, keep), 2)})
        outs = [t for t in torch.utils._pytree.tree_leaves(final) if isinstance(t, torch.Tensor)]
        refs = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
        for i, (o, r) in enumerate(zip(outs, refs)):
            if r.dtype.is_floating_point:
                rows.append({"node": f"output[{i}]", "op": "output", "float_node": "output", "module": "",
                             "precision": "", "scheme": "", "sqnr_db": round(_sqnr(r, o, keep), 2)})
        (self.dir / "sqnr_report.json").write_text(json.dumps(rows, indent=1))
        lines = ["| node | op | module | precision | scheme | SQNR (dB) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['node']} | {r['op']} | {html.escape(r['module'])} | {r['precision']} | {r['scheme'] or ''} | "
                  f"{r['sqnr_db']} |" for r in rows]
        (self.dir / "sqnr_report.md").write_text("# Quantization error per op (one calibration batch)\n\n"
                                                 + "\n".join(lines) + "\n")
        return rows
