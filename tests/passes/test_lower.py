import inspect

import pytest
import torch

from tests.models import bert_batch, sqnr_db
from tests.passes._util import apply, count, pipeline_until, run_flat
from zqhero_fx.capture import flatten_inputs
from zqhero_fx.passes._graph import LAYER_NORM, LINEAR, aten, zq
from zqhero_fx.passes.lower import RULES, lower, lower_int8_attention
from zqhero_fx.passes.propagate_meta import propagate_meta


def test_m3_lowers_to_fused_ops(bert_traced, bert_calibration):
    model, gm = bert_traced("h64_l2")
    before, low, _ = pipeline_until(gm, "M3", bert_calibration, "lower")
    assert count(before, zq.int8_linear.default) == 0
    after = apply(__import__("copy").deepcopy(before), low, "lower")
    assert count(after, zq.int8_linear.default) == 12
    assert count(after, zq.int8_attention.default) == 2
    assert count(after, zq.layer_norm_quant.default) == 3
    assert count(after, zq.embedding_layer_norm_quant.default) == 1
    assert count(after, zq.quantized_embedding.default) == 0  # folded into the fused embedding block
    assert count(after, zq.quantize_per_token.default) == 0 and count(after, zq.dequantize.default) == 0
    assert count(after, zq.quantize.default) == 0  # all fused: FC1 epilogue, QKV epilogues, attention output
    assert count(after, LINEAR) == 1  # only the pooler stays float
    gelu_linears = [n for n in after.graph.nodes if n.target is zq.int8_linear.default and n.args[7] == "gelu"]
    assert len(gelu_linears) == 2 and all(n.meta["val"].dtype == torch.int8 for n in gelu_linears)
    assert after.meta["zqhero"]["lowered"]
    flat = flatten_inputs(gm, bert_batch(2, 12, seed=3))
    ref = run_flat(before, flat).last_hidden_state
    assert sqnr_db(ref, run_flat(after, flat).last_hidden_state) >= 35  # fusing changes no arithmetic that matters


def _pattern_graph(fn, inputs, constants):
    """Trace a rule's pattern; the inputs named in `constants` become get_attr nodes, as weights and scales are."""
    names = list(inspect.signature(fn).parameters)
    gm = torch.fx.symbolic_trace(fn)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and node.target in constants:
            gm.register_buffer(node.target, constants[node.target])
            with gm.graph.inserting_before(node):
                attr = gm.graph.get_attr(node.target)
            node.replace_all_uses_with(attr)
            gm.graph.erase_node(node)
    gm.recompile()
    assert len(names) == len(inputs) + len(constants)
    return gm


def _example(rule_pattern):
    d, n = 768, 32
    if rule_pattern.__name__ == "_pattern_layer_norm_quant":
        return lambda x, r, w, b: rule_pattern(x, r, w, b), (torch.randn(2, 3, d), torch.randn(2, 3, d)), \
            {"w": torch.ones(d), "b": torch.zeros(d)}
    if rule_pattern.__name__ == "_pattern_int8_linear":
        return (lambda xq, sx, w, b, t: rule_pattern(xq, sx, w, b, t),
                (torch.randint(-127, 128, (2, 3, d), dtype=torch.int8), torch.rand(2, 3, 1)),
                {"w": torch.randn(n, d), "b": torch.randn(n), "t": torch.rand(n) + 0.1})
    if rule_pattern.__name__ == "_pattern_int8_attention":
        q = torch.randint(-127, 128, (2, 4, 5, 16), dtype=torch.int8)
        return (lambda q, k, v, mask, unit, r: rule_pattern(q, k, v, unit, mask, r), (q, q, q, torch.zeros(2, 1, 5, 5)),
                {"unit": torch.ones(1), "r": torch.ones(1) * 0.05})
    if rule_pattern.__name__ == "_pattern_quantized_embedding":
        return (lambda ids, tq, s: rule_pattern(tq, s, ids), (torch.randint(0, 10, (2, 3)),),
                {"tq": torch.randint(-127, 128, (10, 8), dtype=torch.int8), "s": torch.rand(10, 1)})
    if rule_pattern.__name__ == "_pattern_embedding_layer_norm_quant":
        d = 16
        return (lambda ids_a, ids_b, table_a, table_b, scale_a, scale_b, weight, bias:
                rule_pattern(ids_a, ids_b, table_a, table_b, scale_a, scale_b, weight, bias),
                (torch.randint(0, 10, (2, 3)), torch.randint(0, 5, (1, 3))),
                {"table_a": torch.randint(-127, 128, (10, d), dtype=torch.int8),
                 "table_b": torch.randint(-127, 128, (5, d), dtype=torch.int8),
                 "scale_a": torch.rand(10, 1), "scale_b": torch.rand(5, 1), "weight": torch.ones(d),
                 "bias": torch.zeros(d)})
    raise AssertionError(rule_pattern.__name__)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.pattern.__name__)
def test_each_rule_fires_once_on_its_own_pattern(rule):
    fn, inputs, constants = _example(rule.pattern)
    gm = _pattern_graph(fn, inputs, constants)
    gm.meta["zqhero"] = {"flat_example": list(inputs)}
    propagate_meta(gm)
    expected = fn(*inputs, *constants.values())
    apply_rule = rule.lower or (lambda g, n: lower_int8_attention(g, n, 1.0 / 127))
    fired = sum(bool(apply_rule(gm, node)) for node in list(gm.graph.nodes))
    assert fired == 1, rule.name
    gm.graph.eliminate_dead_code()
    gm.recompile()
    got = gm(*inputs)
    if isinstance(expected, tuple):  # (q, scale, ...): the fused op returns the same first two outputs
        assert (got[0].int() - expected[0].int()).abs().max() <= 1 and torch.allclose(got[1], expected[1])
    elif expected.dtype == torch.int8:  # the fused op also quantizes the weight: a few LSBs apart on average at most
        assert (got.int() - expected.int()).abs().float().mean() < 1.0
    else:
        torch.testing.assert_close(got, expected)


def test_layer_norm_quant_keeps_float_output_for_the_residual(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    before, low, _ = pipeline_until(gm, "M1", bert_calibration, "lower")
    after = apply(before, low, "lower")
    fused = [n for n in after.graph.nodes if n.target is zq.layer_norm_quant.default]
    assert len(fused) == 4 and all(n.args[4] > 0 for n in fused)
    assert all(n.args[5] for n in fused)  # emit_normed: the post-LN residual stream reads the float output
    assert count(after, LAYER_NORM) == 1  # the last LayerNorm has no INT8 consumer
    assert count(after, aten.add.Tensor) >= 2  # residual adds fused into layer_norm_quant are gone from before
