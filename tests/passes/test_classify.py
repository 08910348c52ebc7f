import torch

from tests.passes._util import apply, pipeline_until
from zqhero_fx.passes._graph import ATTENTION, LAYER_NORM, LINEAR, aten
from zqhero_fx.passes.classify import DEVICES, bound_summary, classify
from zqhero_fx.passes.state import state


def test_labels_flops_and_bytes(bert_traced, bert_calibration):
    _, gm = bert_traced("h128_l1")
    gm, _, _ = pipeline_until(gm, "fp", None, "classify")
    gm = apply(gm, lambda g: classify(g, device="h100"), "classify")
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in nodes.values():
        if node.op == "call_function":
            assert state(node).bound is not None
    fc1 = next(n for n in nodes.values() if n.target is LINEAR and n.args[1].target.endswith("intermediate.dense.weight"))
    m = 2 * 8  # the traced example: batch 2, sequence 8
    assert state(fc1).flops == 2 * m * 128 * 512
    assert state(fc1).bytes == 4 * (m * 128 + 512 * 128 + 512 + m * 512)
    ln = next(n for n in nodes.values() if n.target is LAYER_NORM)
    assert state(ln).bound == "memory"
    views = [n for n in nodes.values() if n.target in (aten.view.default, aten.transpose.int)]
    assert views and all(state(v).bound == "free" for v in views)
    assert any(n.target is ATTENTION for n in nodes.values())
    assert "graph_view" in gm.meta["zqhero"] and gm.meta["zqhero"]["graph_view"].number_of_nodes() == len(nodes)
    summary = bound_summary(gm)
    assert summary["memory"]["nodes"] > 0


def test_large_gemms_are_compute_bound_small_ones_memory_bound():
    from torch._subclasses.fake_tensor import FakeTensorMode

    h100 = DEVICES["h100"]
    with FakeTensorMode():
        for tokens, expected in ((16384, "compute"), (4, "memory")):
            x, w = torch.empty(tokens, 768), torch.empty(3072, 768)
            g = torch.fx.Graph()
            xn, wn = g.placeholder("x"), g.placeholder("w")
            out = g.call_function(LINEAR, (xn, wn, None))
            g.output(out)
            xn.meta["val"], wn.meta["val"], out.meta["val"] = x, w, torch.empty(tokens, 3072)
            gm = torch.fx.GraphModule(torch.nn.Module(), g)
            classify(gm, device="h100")
            assert state(out).bound == expected, (tokens, state(out).flops / state(out).bytes, h100)
