"""The coverage report of a conversion: every GEMM, attention and embedding site, its precision, format and scheme, and
why it stays float when it does. insert_qdq writes it into gm.meta["zqhero"]["coverage"]; `convert` warns (or raises,
with strict=True) when a quantizing mode leaves GEMMs float; dumps and `zqhero dump` print it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch.fx as fx


@dataclass(frozen=True)
class Site:
    node: str
    kind: str  # "gemm" | "attention" | "embedding"
    module: str
    precision: str  # a format name when quantized, else "fp32" / "fp16" / "bf16"
    scheme: str  # "twq" | "fwq" | "sq" | "sq(q,k)+fwq(v)+sq(p)" | "float"
    reason: str  # why it stays float; "" when quantized
    by_design: bool = False  # float because the mode, an override or the LM-head default says so (no warning)
    weight: str = ""  # a quantized GEMM's weight format ("int8", "int4/g64 int-scales asym grid", ...)

    @property
    def quantized(self) -> bool:
        return not self.reason


@dataclass
class Coverage:
    mode: str
    activation_format: str  # "none": weight-only
    weight_format: str = ""
    sites: list[Site] = field(default_factory=list)
    # Which kernels run the quantized ops where the model lives (convert fills it in: on the CPU, the INT8 GEMM and
    # instruction set picked for this host, kernels/int8_cpu.py describe()).
    kernels: str = ""

    def add(self, node: fx.Node, kind: str, reason: str, by_design: bool = False) -> None:
        from zqhero_fx.passes._graph import module_path
        from zqhero_fx.passes.state import state

        record = state(node)
        quantized = not reason
        scheme = record.attention_schemes or (str(record.scheme) if record.scheme is not None else "float")
        precision = record.precision if quantized else (
            record.precision if record.precision in ("fp16", "bf16") else "fp32")
        weight = self.weight_format if quantized and kind == "gemm" and record.precision in (
            self.activation_format, self.weight_format.split("/")[0]) else (record.precision if quantized else "")
        self.sites.append(Site(node.name, kind, module_path(node), precision, scheme if quantized else "float",
                               reason, by_design and not quantized, weight))

    def of_kind(self, kind: str) -> list[Site]:
        return [s for s in self.sites if s.kind == kind]

    def float_gemms(self, unexpected_only: bool = False) -> list[Site]:
        """GEMM sites left float; with `unexpected_only`, those the mode meant to quantize."""
        return [s for s in self.of_kind("gemm") if not s.quantized and not (unexpected_only and s.by_design)]

    def counts(self) -> dict[str, tuple[int, int]]:
        """kind -> (quantized, total)."""
        return {kind: (sum(s.quantized for s in self.of_kind(kind)), len(self.of_kind(kind)))
                for kind in ("gemm", "attention", "embedding")}

    def reasons(self, kind: str = "gemm") -> Counter:
        return Counter(s.reason for s in self.of_kind(kind) if not s.quantized)

    def summary(self) -> str:
        if not self.sites:
            return (f"zqhero {self.mode}: nothing to quantize: the graph has no GEMM with a weight, no attention and no "
                    "embedding (every op stays floating point)")
        parts = [f"{q}/{n} {kind}s" for kind, (q, n) in self.counts().items() if n]
        text = f"zqhero {self.mode}: quantized {', '.join(parts)}"
        float_gemms = self.reasons("gemm")
        if float_gemms:
            first = "; ".join(f"{count} x {reason}" for reason, count in float_gemms.most_common(3))
            text += f". Float GEMMs: {first}"
        return text

    def table(self) -> str:
        lines = [f"{self.summary()}", *([f"Kernels: {self.kernels}"] if self.kernels else []), "",
                 "| site | kind | module | precision | weight | scheme | why float |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {s.node} | {s.kind} | {s.module} | {s.precision} | {s.weight} | {s.scheme} | {s.reason} |"
                  for s in self.sites]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "activation_format": self.activation_format,
                           "weight_format": self.weight_format, "kernels": self.kernels,
                           "counts": {k: list(v) for k, v in self.counts().items()},
                           "sites": [asdict(s) for s in self.sites]}, indent=1)

    def __str__(self) -> str:
        return self.summary()


__all__ = ["Coverage", "Site"]
