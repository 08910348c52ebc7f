"""zqhero_fx.compile: Inductor with the zqhero ops decomposed on CPU — same numbers, one compile for all shapes."""

import torch

import zqhero_fx
from tests.harness import RecordingBackend  # noqa: F401  (harness import keeps the helpers in one place)
from tests.models import bert_batch, sqnr_db


def test_compiled_converted_model_matches_and_is_shape_generic(bert_traced, bert_calibration):
    model, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
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
