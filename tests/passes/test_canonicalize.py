import torch

import zqhero_fx
from tests.models import ConvNet, bert_batch
from tests.passes._util import apply, count, run_flat
from zqhero_fx.capture import flatten_inputs
from zqhero_fx.passes._graph import ATTENTION, EMBEDDING, GELU, LAYER_NORM, LINEAR, MATMUL, SOFTMAX, aten
from zqhero_fx.passes.canonicalize import canonicalize
from zqhero_fx.passes.propagate_meta import propagate_meta


def _canonical(gm, example):
    gm = __import__("copy").deepcopy(gm)
    gm.meta["zqhero"] = {"flat_example": flatten_inputs(gm, example) if example is not None else None}
    propagate_meta(gm)
    return gm, apply(__import__("copy").deepcopy(gm), canonicalize, "canonicalize")


def test_eager_attention_becomes_one_attention_node(bert_traced):
    _, gm = bert_traced("h64_l2", "eager")
    before, after = _canonical(gm, None)
    assert count(before, MATMUL) == 4 and count(before, SOFTMAX) == 2 and count(before, ATTENTION) == 0
    assert count(after, MATMUL) == 0 and count(after, SOFTMAX) == 0 and count(after, ATTENTION) == 2
    assert count(after, aten.dropout.default) == 0
    flat = flatten_inputs(gm, bert_batch(2, 9, pad_from=6, seed=1))
    torch.testing.assert_close(run_flat(after, flat), run_flat(before, flat), rtol=1e-5, atol=1e-5)


def test_both_attention_implementations_give_the_same_canonical_ops(bert_traced):
    canon = {}
    for attn in ("sdpa", "eager"):
        _, after = _canonical(bert_traced("h64_l2", attn)[1], None)
        canon[attn] = {t: count(after, t) for t in (LINEAR, LAYER_NORM, GELU, EMBEDDING, ATTENTION, MATMUL, SOFTMAX)}
    assert canon["sdpa"] == canon["eager"]
    assert canon["sdpa"][LINEAR] == 13 and canon["sdpa"][ATTENTION] == 2


def test_symbolic_trace_modules_become_aten_ops_with_weights_as_get_attr(encoder_model):
    from tests.models import encoder_batch

    gm = torch.fx.symbolic_trace(encoder_model)
    before, after = _canonical(gm, encoder_batch(2, 8))
    assert sum(n.op == "call_module" for n in before.graph.nodes) > 0
    assert sum(n.op == "call_module" for n in after.graph.nodes) == 0
    linears = [n for n in after.graph.nodes if n.target is LINEAR]
    assert len(linears) == 12 and all(n.args[1].op == "get_attr" for n in linears)
    assert count(after, ATTENTION) == 0  # the score scale is a traced shape value here, not a constant: left alone
    flat = flatten_inputs(gm, encoder_batch(3, 7, seed=2))
    torch.testing.assert_close(run_flat(after, flat), run_flat(before, flat), rtol=1e-5, atol=1e-5)


def test_unknown_modules_stay():
    gm = torch.fx.symbolic_trace(ConvNet().eval())
    _, after = _canonical(gm, (torch.randn(2, 3, 8, 8),))
    assert [n.target for n in after.graph.nodes if n.op == "call_module"] == ["conv", "bn"]
    assert count(after, LINEAR) == 1 and count(after, LAYER_NORM) == 1
