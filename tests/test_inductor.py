"""zqhero_fx.compile: Inductor with the zqhero ops decomposed on CPU — same numbers, one compile for all shapes."""

import pytest
import torch

import zqhero_fx
from tests.harness import RecordingBackend  # noqa: F401  (harness import keeps the helpers in one place)
from tests.models import bert_batch, sqnr_db


@pytest.mark.parametrize("mode", ["M3", "M3-fp8"])
def test_compiled_converted_model_matches_and_is_shape_generic(bert_traced, bert_calibration, mode):
    # FP8 too: its references (widen to fp32, matmul, epilogue) decompose for Inductor like INT8's.
    model, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, mode, calibration=bert_calibration)
    torch._dynamo.reset()
    fast = zqhero_fx.compile(q)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for batch, seq in [(2, 16), (5, 37), (3, 9)]:
            test = bert_batch(batch, seq, pad_from=seq - 2, seed=seq)
            got = fast(**test).last_hidden_state
            expected = q(**test).last_hidden_state
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
            assert sqnr_db(model(**test).last_hidden_state, got) >= 20
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before <= 1


def test_relayout_gemm_weights_is_a_copy_with_n_major_weights(bert_traced, bert_calibration):
    from zqhero_fx.inductor import relayout_gemm_weights

    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    before = {name: (t.stride(), t.clone()) for name, t in q.named_buffers()}
    relaid = relayout_gemm_weights(q)

    weights = {n.args[2].target for n in q.graph.nodes if n.target is torch.ops.zqhero.quantized_linear.default}
    assert weights
    for name in weights:
        new, old = relaid.get_buffer(name), q.get_buffer(name)
        assert new.shape == old.shape and torch.equal(new, old)
        assert new.stride() == (1, old.shape[0]) and new.t().is_contiguous()
    for name, t in q.named_buffers():  # the input module kept its own tensors and layouts
        assert t.stride() == before[name][0] and torch.equal(t, before[name][1])
    shared = [n for n, _ in q.named_buffers() if n not in weights]
    assert all(relaid.get_buffer(n) is q.get_buffer(n) for n in shared)

    test = bert_batch(2, 11, pad_from=9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(relaid(**test).last_hidden_state, q(**test).last_hidden_state, rtol=0, atol=0)
