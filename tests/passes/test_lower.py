"""lower: structure (fused op counts), invariants, numerics, and a self-match test per rule variant: the traced
pattern function, instantiated with concrete weights and scales, is rewritten exactly once."""

import copy
import dataclasses

import pytest
import torch

from tests.models import bert_batch, sqnr_db
from tests.passes._util import apply, count, pipeline_until, run_flat
from zqhero_fx.capture import flatten_inputs
from zqhero_fx.modes import MODES, QuantConfig
from zqhero_fx.passes._graph import LAYER_NORM, LINEAR, aten, zq
from zqhero_fx.passes._rules import apply_rules, trace_with_constants
from zqhero_fx.passes.insert_qdq import WEIGHT_ONLY
from zqhero_fx.passes.lower import rules
from zqhero_fx.passes.propagate_meta import propagate_meta
from zqhero_fx.passes.state import state


def test_m3_lowers_to_fused_ops(bert_traced, bert_calibration):
    model, gm = bert_traced("h64_l2")
    before, low, _ = pipeline_until(gm, "M3", bert_calibration, "lower")
    assert count(before, zq.quantized_linear.default) == 0
    after = apply(copy.deepcopy(before), low, "lower")
    assert count(after, zq.quantized_linear.default) == 13  # 6 per layer and the pooler
    assert count(after, zq.quantized_attention.default) == 2
    assert count(after, zq.norm_quant.default) == 3
    assert count(after, zq.embedding_norm_quant.default) == 1
    assert count(after, zq.quantized_embedding.default) == 0  # folded into the fused embedding block
    assert count(after, zq.quantize_per_token.default) == 1  # the pooler's [CLS] rows, picked after the last norm
    assert count(after, zq.dequantize.default) == 0
    assert count(after, zq.quantize.default) == 0  # all fused: FC1 epilogue, QKV epilogues, attention output
    assert count(after, LINEAR) == 0
    gelu_linears = [n for n in after.graph.nodes if n.target is zq.quantized_linear.default and n.args[7] == "gelu"]
    assert len(gelu_linears) == 2 and all(n.meta["val"].dtype == torch.int8 for n in gelu_linears)
    assert after.meta["zqhero"]["lowered"]
    flat = flatten_inputs(gm, bert_batch(2, 12, seed=3))
    ref = run_flat(before, flat).last_hidden_state
    assert sqnr_db(ref, run_flat(after, flat).last_hidden_state) >= 35  # fusing changes no arithmetic that matters


def _int8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


D, N = 32, 24

# Per rule: (tensors fed as graph inputs, tensors that become get_attr constants like weights and scales, literals).
EXAMPLES = {
    "_pattern_norm_quant": lambda v: (
        {"x": torch.randn(2, 3, D), "residual": torch.randn(2, 3, D)},
        {"weight": torch.rand(D) + 0.5, "bias": torch.randn(D)},
        {"shape": [D], "eps": 1e-5, "cudnn": False, "dtype": torch.int8}),
    "_pattern_quantized_linear": lambda v: (
        {"xq": _int8(2, 3, D), "x_scale": torch.rand(2, 3, 1) * 0.01},
        {"weight": torch.randn(N, D), "bias": torch.randn(N), "out_scale": torch.rand(N) * 0.05 + 0.01},
        {"deq_dtype": torch.float32, "approximate": "tanh", "coefficient": 1.702, "out_dtype": torch.int8}),
    "_pattern_quantized_attention": lambda v: (
        {"q": _int8(2, 4, 5, 16), "k": _int8(2, 4, 5, 16), "v": _int8(2, 4, 5, 16), "mask": torch.zeros(2, 1, 5, 5)},
        {"q_scale": torch.ones(1), "k_scale": torch.ones(1), "v_scale": torch.ones(1),
         "out_scale": torch.ones(1) * 0.5},
        {"q_dtype": torch.float32, "k_dtype": torch.float32, "v_dtype": torch.float32, "dropout": 0.0,
         "causal": False, "scale": 1e-3, "gqa": False, "out_dtype": torch.int8}),
    "_pattern_quantized_gated_linear": lambda v: (
        {"x": _int8(2, 3, D), "x_scale": torch.rand(2, 3, 1) * 0.01},
        {"w_gate": _int8(N, D), "s_gate": torch.rand(N) * 0.01, "w_up": _int8(N, D), "s_up": torch.rand(N) * 0.01,
         "out_scale": torch.rand(N) * 0.05 + 0.01},
        {"activation": "silu", "dtype": torch.float32, "out_dtype": torch.int8}),
    "_pattern_rotary_quantize": lambda v: (
        {"x": torch.randn(2, 4, 5, 16), "cos_h": torch.randn(2, 1, 5, 16), "sin_h": torch.randn(2, 1, 5, 16)},
        {"scale": torch.ones(1) * 0.03},
        {"dim_a": 3, "start_a": 0, "end_a": 8, "dim_b": 3, "start_b": 8, "end_b": 2**63 - 1, "cat_dim": -1,
         "dtype": torch.int8}),
    "_pattern_weight_only_linear": lambda v: (
        {"x": torch.randn(2, 3, D)}, {"weight": torch.randn(N, D), "bias": torch.randn(N)}, {}),
    "_pattern_quantized_embedding": lambda v: (
        {"indices": torch.randint(0, 10, (2, 3))},
        {"table_q": _int8(10, 8), "scale": torch.rand(10, 1)},
        {"out_dtype": torch.float32, "padding_idx": -1, "scale_grad": False, "sparse": False}),
    "_pattern_embedding_norm_quant": lambda v: (
        {f"i{i}": torch.randint(0, 10, (2, 3)) for i in range(4)},
        {**{f"t{i}": _int8(10, 16) for i in range(4)}, **{f"s{i}": torch.rand(10, 1) * 0.01 for i in range(4)},
         "weight": torch.rand(16) + 0.5, "bias": torch.randn(16)},
        {**{f"o{i}": torch.float32 for i in range(4)}, "eps": 1e-12, "emit_normed": False, "emit_sum": False,
         "kind": "layer", "dtype": torch.int8}),
}


def _concrete_graph(rule, variant):
    inputs, constants, literals = EXAMPLES[rule.pattern.__name__](variant)
    gm = trace_with_constants(rule.pattern, {**variant, **literals})
    used = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    for node in [n for n in gm.graph.nodes if n.op == "placeholder" and n.target in constants]:
        gm.register_buffer(node.target, constants[node.target])
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(node.target)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    gm.recompile()
    flat = [inputs[name] for name in used if name in inputs]
    gm.meta["zqhero"] = {"flat_example": flat}
    propagate_meta(gm)
    return gm, flat


RULE_VARIANTS = [(rule, variant) for rule in rules(QuantConfig()) for variant in rule.variants]


@pytest.mark.parametrize("rule, variant", RULE_VARIANTS,
                         ids=[f"{r.pattern.__name__}-{'-'.join(f'{k}={v}' for k, v in v.items())}"
                              for r, v in RULE_VARIANTS])
def test_each_rule_fires_once_on_its_own_pattern(rule, variant):
    gm, flat = _concrete_graph(rule, variant)
    weight_only = rule.pattern.__name__ == "_pattern_weight_only_linear"
    if weight_only:  # the rule packs the weight in the config's format: a weight-only mode's rule table
        rule = next(r for r in rules(MODES["W6A16"]) if r.pattern is rule.pattern)
    for node in gm.graph.nodes:  # what insert_qdq would have recorded at these sites
        if node.op == "call_function":
            state(node).precision = "fp6_e3m2" if weight_only else "int8"
            state(node).scheme = WEIGHT_ONLY if weight_only else state(node).scheme
    expected = gm(*flat)
    counts = apply_rules(gm, [dataclasses.replace(rule, variants=(variant,))], lambda g: g.graph.eliminate_dead_code())
    assert counts == {rule.name: 1}, (rule.name, variant)
    gm.recompile()
    got = gm(*flat)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    first, reference = (got[0], expected[0])
    if isinstance(reference, (tuple, list)):  # (q, scale): the fused op returns the same first two outputs
        assert (first[0].int() - reference[0].int()).abs().max() <= 1 and torch.allclose(first[1], reference[1])
    elif reference.dtype == torch.int8:  # the fused op also quantizes the weight: a few LSBs apart on average at most
        assert (first.int() - reference.int()).abs().float().mean() < 1.0
    elif weight_only:  # FP6 weights of a random matrix: E3M2's two mantissa bits
        assert sqnr_db(reference, first) >= 20
    else:  # float output of a fused op that quantizes inside (attention's probabilities): close, not equal
        assert sqnr_db(reference, first) >= 30


def test_a_linear_with_several_users_lowers_without_its_epilogue():
    # ELECTRA's embedding projection feeds Q, K, V and the residual: the GEMM lowers, nothing is fused after it.
    rule = rules(QuantConfig())[1]
    variant = {"act": "gelu", "quant": False}
    gm, flat = _concrete_graph(rule, {"act": "none", "quant": False})
    out = next(n for n in gm.graph.nodes if n.op == "output")
    linear = out.args[0]
    with gm.graph.inserting_after(linear):
        extra = gm.graph.call_function(aten.gelu.default, (linear,))
    out.args = ((linear, extra),)
    gm.recompile()
    propagate_meta(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            state(node).precision = "int8"
    counts = apply_rules(gm, [dataclasses.replace(rule, variants=(variant, {"act": "none", "quant": False}))],
                         lambda g: g.graph.eliminate_dead_code())
    assert counts == {rule.name: 1}
    assert count(gm, zq.quantized_linear.default) == 1 and count(gm, aten.gelu.default) == 1


def test_norm_quant_keeps_float_output_for_the_residual(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    before, low, _ = pipeline_until(gm, "M1", bert_calibration, "lower")
    after = apply(before, low, "lower")
    fused = [n for n in after.graph.nodes if n.target is zq.norm_quant.default]
    assert len(fused) == 4 and all(n.args[4] > 0 for n in fused)
    assert all(n.args[5] for n in fused)  # emit_normed: the post-LN residual stream reads the float output
    assert count(after, LAYER_NORM) == 1  # the last LayerNorm has no quantized consumer in M1
    assert count(after, aten.add.Tensor) >= 2  # residual adds fused into norm_quant are gone from before
