"""The related papers' formats through the whole pipeline: W4A8 (ZeroQuant-FP), A8W4 (DGQ) and W6A16 (ZeroQuant(4+2))
convert encoders and decoders, run, report their formats, save and load, and refuse what makes no sense."""

import pytest
import torch

import zqhero_fx
from tests import families
from tests.models import bert_batch, sqnr_db, tiny_bert
from zqhero_fx import decoder
from zqhero_fx.errors import ConfigError
from zqhero_fx.eval.run import gemm_weight_bits

PACKED = ("W4A8", "A8W4", "W6A16")


@pytest.fixture(scope="module")
def bert():
    model = tiny_bert()
    batch = bert_batch(2, 16)
    gm = zqhero_fx.trace(model, batch)
    calibration = [bert_batch(2, 16, seed=s) for s in range(3)]
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
    return gm, batch, calibration, reference


@pytest.fixture(scope="module")
def llama():
    model = families.causal_lm("llama")
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    gm = zqhero_fx.trace(model, {"input_ids": ids})
    calibration = [{"input_ids": torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(s))}
                   for s in range(3)]
    return gm, ids, calibration, decoder.prefill_logits(gm, ids)


def _hidden(out):
    out = out[0] if isinstance(out, (tuple, list)) else out
    return getattr(out, "last_hidden_state", out)


def _packed_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.zqhero.packed_linear.default]


@pytest.mark.parametrize("mode", PACKED)
def test_encoder_converts_every_gemm_to_packed_weights(bert, mode):
    gm, batch, calibration, reference = bert
    q = zqhero_fx.convert(gm, mode, calibration=calibration)
    coverage = q.meta["zqhero"]["coverage"]
    gemms = coverage.of_kind("gemm")
    assert all(s.quantized for s in gemms) and len(_packed_nodes(q)) == len(gemms)
    assert {s.weight.split("/")[0] for s in gemms} == {zqhero_fx.modes.resolve_mode(mode).weight_format}
    assert sqnr_db(reference, _hidden(q(**batch))) > 25


@pytest.mark.parametrize("mode", PACKED)
def test_decoder_generates_with_packed_weights_and_saves(llama, mode, tmp_path):
    gm, ids, calibration, reference = llama
    q = zqhero_fx.convert(gm, mode, calibration=calibration)
    coverage = q.meta["zqhero"]["coverage"]
    assert coverage.counts()["gemm"] == (14, 15)  # all but the LM head
    logits = decoder.prefill_logits(q, ids)
    assert sqnr_db(reference, logits) > (20 if mode == "W6A16" else 15)  # a random model: no smooth weights
    out = zqhero_fx.generate(q, ids, max_new_tokens=3)
    assert out.sequences.shape == (1, 15)
    path = zqhero_fx.save(q, tmp_path / "model.safetensors")
    loaded = zqhero_fx.load(path)
    assert torch.equal(decoder.prefill_logits(loaded, ids), logits)
    assert torch.equal(zqhero_fx.generate(loaded, ids, max_new_tokens=3).sequences, out.sequences)


@pytest.mark.parametrize("mode, low, high", [
    ("W6A16", 6.0, 6.5),  # 6-bit codes + one fp32 scale per row of K >= 64
    ("W4A8+lorc_rank=0", 4.125, 4.75),  # 4-bit codes + an int8 exponent per 64 + a row scale
    ("A8W4", 4.25, 4.9),  # + an int8 integer scale and a uint8 zero per 64
])
def test_bits_per_weight_match_the_format(bert, mode, low, high):
    gm, batch, calibration, _ = bert
    q = zqhero_fx.convert(gm, mode, calibration=calibration)
    bits = gemm_weight_bits(q)
    assert low <= bits["bits_per_weight"] <= high
    assert bits["weights"] == sum(int(w.numel()) for name, w in gm.named_parameters()
                                  if name.endswith("weight") and w.dim() == 2 and "embeddings" not in name)


def test_int8_gemms_measure_8_bits_plus_scales(bert):
    gm, batch, calibration, _ = bert
    bits = gemm_weight_bits(zqhero_fx.convert(gm, "M2", calibration=calibration))["bits_per_weight"]
    assert 8.0 < bits <= 8.5


def test_group_size_that_does_not_divide_a_gemm_is_a_clear_error(bert):
    gm, _, calibration, _ = bert
    with pytest.raises(ConfigError, match=r"K=64 input features are not a multiple of the weight group size 48"):
        zqhero_fx.convert(gm, "W4A8+weight_group_size=48", calibration=calibration)


def test_dgq_smooths_decoder_norms_and_overrides_keep_modules_float(llama):
    gm, ids, calibration, _ = llama
    q = zqhero_fx.convert(gm, "A8W4", calibration=calibration, overrides={"model.model.layers.1.mlp.*": "fp16"})
    assert q.meta["zqhero"]["smoothed_norms"] > 0
    sites = {s.module: s for s in q.meta["zqhero"]["coverage"].of_kind("gemm")}
    assert sites["model.model.layers.1.mlp.down_proj"].precision == "fp16"
    assert sites["model.model.layers.0.mlp.down_proj"].weight.startswith("int4/g64 int-scales asym grid")
    assert len(_packed_nodes(q)) == 14 - 3


def test_weight_only_mode_needs_no_calibration(bert):
    gm, batch, _, reference = bert
    q = zqhero_fx.convert(gm, "W6A16")
    assert sqnr_db(reference, _hidden(q(**batch))) > 25


def test_backend_takes_the_new_formats_by_name(bert):
    model = tiny_bert()
    batch = bert_batch(2, 16)
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        compiled = torch.compile(model, backend="zqhero", options={"mode": "W6A16"})
        assert sqnr_db(reference, _hidden(compiled(**batch))) > 25


def test_inductor_compiles_a_packed_model(bert):
    gm, batch, calibration, _ = bert
    q = zqhero_fx.convert(gm, "A8W4", calibration=calibration)
    with torch.no_grad():
        eager, compiled = _hidden(q(**batch)), _hidden(zqhero_fx.compile(q)(**batch))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
