import pytest
import torch

from tests.passes._util import apply, pipeline_until
from zqhero_fx.errors import CalibrationError
from zqhero_fx.passes._graph import LINEAR
from zqhero_fx.passes.calibrate import calibrate
from zqhero_fx.passes.state import state


def test_ranges_are_per_feature_absmax_over_all_batches(bert_traced, bert_calibration):
    model, gm = bert_traced("h64_l2")
    gm, _, batches = pipeline_until(gm, "M2", bert_calibration, "calibrate")
    gm = apply(gm, lambda g: calibrate(g, batches), "calibrate")
    fc2 = next(n for n in gm.graph.nodes if n.target is LINEAR and n.args[1].target == "encoder.layer.0.output.dense.weight")
    seen = []
    hook = model.encoder.layer[0].output.dense.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        for b in bert_calibration:
            model(**b)
    hook.remove()
    expected = torch.stack([s.abs().reshape(-1, s.shape[-1]).amax(0) for s in seen]).amax(0)
    torch.testing.assert_close(state(fc2.args[0]).range, expected, rtol=1e-5, atol=1e-6)
    assert gm.meta["zqhero"]["calibration_batches"] == len(bert_calibration)


def test_percentile_is_below_absmax(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    gm, _, batches = pipeline_until(gm, "M2", bert_calibration, "calibrate")
    absmax = apply(__import__("copy").deepcopy(gm), lambda g: calibrate(g, batches), "calibrate")
    pct = apply(gm, lambda g: calibrate(g, batches, method="percentile", percentile=99.0), "calibrate")
    for a, p in zip(absmax.graph.nodes, pct.graph.nodes):
        if state(a).range is not None:
            assert (state(p).range <= state(a).range + 1e-6).all()
            assert (state(p).range < state(a).range).any()
            break


def test_inf_activation_raises(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    gm, _, batches = pipeline_until(gm, "M2", bert_calibration, "calibrate")
    weight = gm.get_parameter("encoder.layer.1.intermediate.dense.weight") if "encoder.layer.1.intermediate.dense.weight" \
        in dict(gm.named_parameters()) else gm.get_buffer("encoder.layer.1.intermediate.dense.weight")
    with torch.no_grad():
        weight[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match=r"calibration batch 0: node .* \(module encoder.layer.1.intermediate"):
        calibrate(gm, batches)
