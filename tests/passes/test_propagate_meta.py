import torch

from tests.passes._util import pipeline_until


def test_every_node_gets_a_fake_value_with_symbolic_batch_and_sequence(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    gm, _, _ = pipeline_until(gm, "M3", bert_calibration, "clean_up")
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta, node.name
    hidden = [n.meta["val"] for n in gm.graph.nodes if n.op == "call_function"
              and isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].dim() == 3]
    assert hidden and sum(isinstance(v.shape[1], torch.SymInt) for v in hidden) > len(hidden) // 2
    assert sum(isinstance(v.shape[0], torch.SymInt) for v in hidden) > len(hidden) // 2  # batch (not the position table)
