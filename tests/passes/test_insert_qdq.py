import pytest
import torch

from tests.models import bert_batch, sqnr_db
from tests.passes._util import apply, count, pipeline_until, run_flat
from zqhero_fx.capture import flatten_inputs
from zqhero_fx.errors import ConfigError
from zqhero_fx.modes import MODES
from zqhero_fx.passes._graph import LINEAR, aten, fetch_attr, zq
from zqhero_fx.formats import Scheme
from zqhero_fx.passes.insert_qdq import insert_qdq
from zqhero_fx.passes.state import is_quantized, state

# Two layers: LayerNorm-fed GEMMs = 3 QKV + 1 FC1 per layer, and the pooler (its [CLS] rows are picked after the last
# LayerNorm, so it gets its own per-token quantize); FWQ GEMMs = attention output + FC2 per layer.
EXPECTED = {
    "M1": {"quantize_per_token": 5, "quantize": 0, "int8_sites": 9},
    "M2": {"quantize_per_token": 5, "quantize": 4, "int8_sites": 13},
    "M3": {"quantize_per_token": 5, "quantize": 4 + 6, "int8_sites": 13},
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
    quantized_linears = [n for n in after.graph.nodes if n.target is LINEAR and is_quantized(n)]
    assert len(quantized_linears) == exp["int8_sites"]
    assert all(n.args[0].target is zq.dequantize.default for n in quantized_linears)
    assert all(n.args[1].op == "get_attr" and fetch_attr(after, n.args[1].target).dtype == torch.float32
               for n in quantized_linears)  # weights stay float until fold_scales has scaled them
    flat = flatten_inputs(gm, bert_batch(2, 12, seed=3))
    ref = run_flat(before, flat).last_hidden_state
    assert sqnr_db(ref, run_flat(after, flat).last_hidden_state) >= {"M1": 30, "M2": 25, "M3": 20}[mode]


def test_schemes_follow_the_producers(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    before, insert, _ = pipeline_until(gm, "M3", bert_calibration, "insert_qdq")
    after = apply(before, insert, "insert_qdq")
    schemes = {n.args[1].target.removeprefix("encoder.layer.0.").removesuffix(".weight"): state(n).scheme
               for n in after.graph.nodes if n.target is LINEAR and "layer.0." in str(n.args[1].target)}
    assert schemes == {"attention.self.query": Scheme.TWQ, "attention.self.key": Scheme.TWQ,
                       "attention.self.value": Scheme.TWQ, "attention.output.dense": Scheme.FWQ,
                       "intermediate.dense": Scheme.TWQ, "output.dense": Scheme.FWQ}
    attn = [n for n in after.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert all(state(n).attention_schemes == "sq(q,k)+fwq(v)+sq(p)" for n in attn)


def test_fp16_override_and_unmatched_override(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    before, _, _ = pipeline_until(gm, "M2", bert_calibration, "insert_qdq")
    after = apply(__import__("copy").deepcopy(before),
                  lambda g: insert_qdq(g, MODES["M2"], {"encoder.layer.0.output.dense": "fp16"}), "insert_qdq")
    fc2 = next(n for n in after.graph.nodes if n.target is LINEAR
               and state(n).module_path == "encoder.layer.0.output.dense")
    assert fc2.meta["val"].dtype == torch.float16 and state(fc2).precision == "fp16"
    assert fc2.args[0].target is aten._to_copy.default
    with pytest.raises(ConfigError, match="matches no module"):
        insert_qdq(before, MODES["M2"], {"encoder.layer.9.*": "fp32"})
