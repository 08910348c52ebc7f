"""Rewrite rules as objects: a traced pattern function, named captures, and a builder.

    Rule(name="quant(act(linear(dequant(x_q, s_x), W))) => zqhero.quantized_linear(...)",
         pattern=_pattern_quantized_linear,           # plain Python over aten / zqhero ops
         build=build_quantized_linear,                # (gm, Match) -> bool; False declines the match
         variants=({"act": "gelu", "quant": True}, ...))

The pattern function IS what the matcher matches: it is symbolically traced (once per variant: keyword arguments bound
as constants select optional parts) and handed to torch.fx's SubgraphMatcher. Its parameters are the named captures:
`match.captures["weight"]` is the graph node (or literal: an eps, a shape, a dtype) that the parameter `weight` met.
Literals of the graph are always matched by parameters, never written into a pattern, so a pattern does not burn in a
shape or an epsilon. Intermediate nodes the pattern returns may have users outside the match (a norm whose float output
a residual stream also reads); all other inner nodes may not.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher


def _normalized(node: fx.Node) -> dict | None:
    """A call's arguments by schema name, defaults filled in (None for a target without a schema)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    out = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if out is None:
        return None
    values = dict(out.kwargs)
    for arg in node.target._schema.arguments:  # normalize_function leaves omitted defaults out
        if arg.name not in values and arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _where_used(pattern_gm: fx.GraphModule) -> dict[str, tuple[fx.Node, str, int | None]]:
    """For each pattern parameter, one call that reads it: (pattern node, argument name, index in a list arg)."""
    where = {}
    for placeholder in (n for n in pattern_gm.graph.nodes if n.op == "placeholder"):
        for user in placeholder.users:
            values = _normalized(user)
            for key, value in (values or {}).items():
                if value is placeholder:
                    where[placeholder.target] = (user, key, None)
                elif isinstance(value, (list, tuple)) and any(v is placeholder for v in value):
                    where[placeholder.target] = (user, key, next(i for i, v in enumerate(value) if v is placeholder))
            if placeholder.target in where:
                break
    return where


@dataclass
class Match:
    captures: dict[str, Any]  # pattern parameter name -> graph node or literal, as matched
    returned: list[fx.Node]  # graph nodes matched by the pattern's return values, in order
    nodes: dict[Any, fx.Node] = field(default_factory=dict)  # op overload -> the (first) graph node of that op
    variant: dict = field(default_factory=dict)
    # How to read a capture again from the matched call that consumes it (see __getitem__).
    uses: dict[str, tuple[fx.Node, str, int | None]] = field(default_factory=dict)

    def __getitem__(self, name: str):
        """The capture as the graph has it now. An earlier rewrite in the same sweep may have replaced the node a
        parameter matched (a norm whose float output a later residual add reads): the consumer inside this match
        then reads the replacement, and so does this lookup."""
        if name in self.uses:
            consumer, key, index = self.uses[name]
            values = _normalized(consumer)
            if values is not None and key in values:
                value = values[key]
                return value[index] if index is not None else value
        return self.captures[name]

    def get(self, name: str, default=None):
        return self[name] if name in self.captures else default

    @property
    def output(self) -> fx.Node:
        return self.returned[0]


@dataclass(frozen=True)
class Rule:
    name: str  # the rewrite, readable
    pattern: Callable
    build: Callable[[fx.GraphModule, Match], bool]
    variants: tuple[dict, ...] = ({},)


def trace_with_constants(fn: Callable, constants: dict) -> fx.GraphModule:
    """symbolic_trace `fn` with the arguments in `constants` bound as Python constants, leaving only the dataflow."""
    gm = fx.symbolic_trace(fn, concrete_args=constants)
    graph = gm.graph
    # concrete_args leave a placeholder and an assert per bound constant; the pattern is only the dataflow.
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._assert:
            graph.erase_node(node)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "call_function") and not node.users:
                graph.erase_node(node)
                changed = True
    graph._codegen = fx.graph.CodeGen()  # plain positional placeholders: the bound ones are gone
    graph.lint()
    gm.recompile()
    return gm


@functools.lru_cache(maxsize=None)
def _traced(pattern: Callable, variant_items: tuple) -> fx.GraphModule:
    return trace_with_constants(pattern, dict(variant_items))


def trace_pattern(rule: Rule, variant: dict) -> fx.GraphModule:
    return _traced(rule.pattern, tuple(sorted(variant.items())))


def _parameter_names(pattern: Callable) -> list[str]:
    return list(inspect.signature(pattern).parameters)


def find_matches(gm: fx.GraphModule, rule: Rule, variant: dict) -> list[Match]:
    pattern_gm = trace_pattern(rule, variant)
    placeholders = [n for n in pattern_gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(pattern_gm.graph.nodes) if n.op == "output")
    returned = output.all_input_nodes
    where = _where_used(pattern_gm)
    matcher = SubgraphMatcher(pattern_gm.graph, match_output=False, match_placeholder=False,
                              remove_overlapping_matches=True, ignore_literals=False)
    matches = []
    for internal in matcher.match(gm.graph):
        captures = {p.target: internal.nodes_map[p] for p in placeholders}
        nodes = {}
        for pn, gn in internal.nodes_map.items():
            if pn.op == "call_function":
                nodes.setdefault(pn.target, gn)
        uses = {name: (internal.nodes_map[pn], key, index) for name, (pn, key, index) in where.items()}
        matches.append(Match(captures, [internal.nodes_map[r] for r in returned], nodes, dict(variant), uses))
    return matches


def apply_rules(gm: fx.GraphModule, rules, cleanup: Callable[[fx.GraphModule], None]) -> dict[str, int]:
    """Apply each rule's variants in order over the whole graph; count the rewrites per rule name."""
    counts: dict[str, int] = {}
    for rule in rules:
        for variant in rule.variants:
            for match in find_matches(gm, rule, variant):
                alive = all(n.graph is gm.graph for n in match.returned) and all(
                    not isinstance(match[k], fx.Node) or match[k].graph is gm.graph for k in match.captures)
                if alive and rule.build(gm, match):
                    counts[rule.name] = counts.get(rule.name, 0) + 1
            cleanup(gm)
    return counts


__all__ = ["Rule", "Match", "find_matches", "apply_rules", "trace_pattern", "trace_with_constants"]
