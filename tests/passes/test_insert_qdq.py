import pytest
import torch

from tests.models import bert_batch, sqnr_db
from tests.passes._util import apply, count, pipeline_until, run_flat
from zqhero_fx.capture import flatten_inputs
from zqhero_fx.errors import ConfigError
from zqhero_fx.modes import MODES
from zqhero_fx.passes._graph import LINEAR, aten, fetch_attr, zq
from zqhero_fx.passes.insert_qdq import insert_qdq

# Two layers: LayerNorm-fed GEMMs = 3 QKV + 1 FC1 per layer; FWQ GEMMs = attention output + FC2 per layer.
EXPECTED = {
    "M1": {"quantize_per_token": 4, "quantize": 0, "int8_sites": 8},
    "M2": {"quantize_per_token": 4, "quantize": 4, "int8_sites": 12},
    "M3": {"quantize_per_token": 4, "quantize": 4 + 6, "int8_sites": 12},
}


@pytest.mark.parametrize("mode", ["M1", "M2", "M3"])
def test_counts_and_fake_quant_numerics(bert_traced, bert_calibration, mode):
    model, gm = bert_traced("h64_l2")
    before, insert, batches = pipeline_until(gm, mode, bert_calibration, "insert_qdq")
    assert count(before, zq.quantize.default) == 0 and count(before, zq.dequantize.default) == 0
    after = apply(__import__("copy").deepcopy(before), insert, "insert_qdq")
    exp = EXPECTED[mode]
    assert count(after, zq.quantize_per_token.default) == exp["quantize_per_token"]  # one per LN with INT8 consumers
    assert count(after, zq.quantize.default) == exp["quantize"]
    int8_linears = [n for n in after.graph.nodes if n.target is LINEAR and n.meta.get("zq_precision") == "int8"]
    assert len(int8_linears) == exp["int8_sites"]
    assert all(n.args[0].target is zq.dequantize.default for n in int8_linears)
    assert all(n.args[1].op == "get_attr" and fetch_attr(after, n.args[1].target).dtype == torch.float32
               for n in int8_linears)  # weights stay float until fold_scales has scaled them
    flat = flatten_inputs(gm, bert_batch(2, 12, seed=3))
    ref = run_flat(before, flat).last_hidden_state
    assert sqnr_db(ref, run_flat(after, flat).last_hidden_state) >= {"M1": 30, "M2": 25, "M3": 20}[mode]


def test_schemes_follow_the_producers(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    before, insert, _ = pipeline_until(gm, "M3", bert_calibration, "insert_qdq")
    after = apply(before, insert, "insert_qdq")
    schemes = {n.args[1].target.removeprefix("encoder.layer.0.").removesuffix(".weight"): n.meta.get("zq_scheme")
               for n in after.graph.nodes if n.target is LINEAR and "layer.0." in str(n.args[1].target)}
    assert schemes == {"attention.self.query": "twq", "attention.self.key": "twq", "attention.self.value": "twq",
                       "attention.output.dense": "fwq", "intermediate.dense": "twq", "output.dense": "fwq"}
    attn = [n for n in after.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert all(n.meta["zq_scheme"] == "sq(q,k)+fwq(v)+sq(p)" for n in attn)


def test_fp16_override_and_unmatched_override(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    before, _, _ = pipeline_until(gm, "M2", bert_calibration, "insert_qdq")
    after = apply(__import__("copy").deepcopy(before),
                  lambda g: insert_qdq(g, MODES["M2"], {"encoder.layer.0.output.dense": "fp16"}), "insert_qdq")
    fc2 = next(n for n in after.graph.nodes if n.target is LINEAR
               and n.meta.get("zq_module_path") == "encoder.layer.0.output.dense")
    assert fc2.meta["val"].dtype == torch.float16 and fc2.meta["zq_precision"] == "fp16"
    assert fc2.args[0].target is aten._to_copy.default
    with pytest.raises(ConfigError, match="matches no module"):
        insert_qdq(before, MODES["M2"], {"encoder.layer.9.*": "fp32"})
