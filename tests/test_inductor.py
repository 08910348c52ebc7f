"""zqhero_fx.compile: Inductor with the zqhero ops decomposed on CPU — same numbers, one compile for all shapes."""

import pytest
import torch

import zqhero_fx
from zqhero_fx.kernels import int8_cpu
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


def test_relayout_gemm_weights_is_a_copy_with_n_major_weights(bert_traced, bert_calibration, monkeypatch):
    """Where oneDNN runs the CPU GEMMs (AMX and AVX2 hosts), compile hands it N-major weights."""
    from zqhero_fx.inductor import relayout_gemm_weights
    from zqhero_fx.kernels import int8_cpu

    monkeypatch.setattr(int8_cpu, "gemm_path", lambda flags=None: "onednn")
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


@pytest.mark.skipif(not int8_cpu.available(), reason="no INT8 CPU kernels here")
def test_relayout_leaves_k_major_weights_to_the_zqhero_gemm(bert_traced, bert_calibration, monkeypatch):
    """zqhero's own VNNI GEMM reads the weight rows as stored: nothing to re-lay out, nothing copied."""
    from zqhero_fx.inductor import relayout_gemm_weights

    monkeypatch.setattr(int8_cpu, "gemm_path", lambda flags=None: "zqhero")
    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    assert relayout_gemm_weights(q) is q


def test_compiled_model_runs_for_inference_without_no_grad(bert_traced, bert_calibration):
    """A caller who forgot torch.no_grad() gets the answer, not AOTAutograd's "no autograd formula" failure; under
    no_grad the same compiled graph serves (one compile for both)."""
    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    torch._dynamo.reset()
    fast = zqhero_fx.compile(q)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    test = bert_batch(3, 14, pad_from=12, seed=4)
    assert torch.is_grad_enabled()
    got = fast(**test)
    assert not got.last_hidden_state.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(got.last_hidden_state, q(**test).last_hidden_state, rtol=1e-3, atol=1e-3)
        fast(**test)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before <= 1
    assert torch.is_grad_enabled()  # the caller's grad mode is theirs again
    assert isinstance(fast, torch.nn.Module) and fast.meta["zqhero"]["config"].name == "M3"  # reads through to q
    with pytest.raises(zqhero_fx.InputError, match="'input_ids'"):
        fast(input_ids=test["input_ids"].float(), attention_mask=test["attention_mask"])
