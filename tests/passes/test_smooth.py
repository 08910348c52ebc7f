"""smooth: the migrated graph computes the same function in float, outliers move from the norm output into the GEMM
columns, and norms whose output also feeds a residual (post-norm BERT) or an LM head are left alone."""

import copy

import pytest
import torch

import zqhero_fx
from tests.families import causal_lm
from tests.passes._util import apply, pipeline_until, run_flat
from zqhero_fx import decoder
from zqhero_fx.modes import MODES
from zqhero_fx.passes._graph import RMS_NORM, param_of
from zqhero_fx.passes.smooth import smooth


def _decoder_graph():
    model = causal_lm("llama")
    with torch.no_grad():  # one loud input channel of the first norm, as LLMs have
        model.model.layers[0].input_layernorm.weight[3] = 20.0
    gm = zqhero_fx.trace(model, {"input_ids": torch.randint(0, 100, (2, 6))}, max_cache_len=32)
    calibration = [{"input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i))}
                   for i in range(3)]
    return gm, calibration


def test_smoothing_keeps_the_float_function_and_flattens_the_norm_output():
    gm, calibration = _decoder_graph()
    config = MODES["M1"].replace(smoothing=0.8)
    before, smooth_pass, batches = pipeline_until(gm, config, calibration, "smooth")
    after = apply(copy.deepcopy(before), smooth_pass, "smooth")
    assert after.meta["zqhero"]["smoothed_norms"] == 4  # two per layer: attention and MLP norms; not the final one
    flat = decoder.step_inputs(gm, torch.randint(0, 100, (2, 9)))
    torch.testing.assert_close(run_flat(after, list(flat)), run_flat(before, list(flat)), rtol=1e-4, atol=1e-4)
    norm_after = next(n for n in after.graph.nodes if n.target is RMS_NORM)
    gemm = next(iter(norm_after.users))  # q_proj: its column 3 took the factor the loud channel gave up
    factor = 20.0 / param_of(after, norm_after.args[2])[3]
    assert factor > 2.0
    torch.testing.assert_close(param_of(after, gemm.args[1])[:, 3], param_of(before, gemm.args[1])[:, 3] * factor)


def test_norms_feeding_a_residual_or_a_head_are_left_alone(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    before, _, _ = pipeline_until(gm, "M1", bert_calibration, "insert_qdq")
    weights = {k: v.clone() for k, v in before.state_dict().items()}
    after = smooth(copy.deepcopy(before), 0.5)
    assert after.meta["zqhero"]["smoothed_norms"] == 0  # post-LN: every LayerNorm output is also a residual
    assert all(torch.equal(weights[k], v) for k, v in after.state_dict().items())


def test_m1_on_a_decoder_needs_calibration_for_its_default_smoothing():
    gm, _ = _decoder_graph()
    with pytest.raises(zqhero_fx.CalibrationError, match="smoothing=None"):
        zqhero_fx.convert(gm, "M1")
    q = zqhero_fx.convert(gm, MODES["M1"].replace(smoothing=None))  # no calibration needed without it
    assert "smoothed_norms" not in q.meta["zqhero"]


def test_percentile_smoothing_squeezes_only_the_outlier_channels():
    from zqhero_fx.passes.smooth import percentile_clip_factor

    ranges = torch.ones(400)
    ranges[7], ranges[100] = 30.0, 2.0  # the top 0.5% of 400 channels: two, squeezed to the 99.5th-percentile one
    factor = percentile_clip_factor(ranges)
    assert factor[7] == pytest.approx(30.0) and factor[100] == pytest.approx(2.0)
    assert torch.all(factor[(torch.arange(400) != 7) & (torch.arange(400) != 100)] == 1.0)
    assert torch.all(percentile_clip_factor(torch.linspace(1, 2, 64)) == 1.0)  # 64 channels: 0.5% is none


def test_percentile_smoothing_keeps_the_float_function():
    gm, calibration = _decoder_graph()
    config = MODES["A8W4"]
    before, smooth_pass, batches = pipeline_until(gm, config, calibration, "smooth")
    after = apply(copy.deepcopy(before), smooth_pass, "smooth")
    assert after.meta["zqhero"]["smoothed_norms"] == 4
    flat = decoder.step_inputs(gm, torch.randint(0, 100, (2, 9)))
    torch.testing.assert_close(run_flat(after, list(flat)), run_flat(before, list(flat)), rtol=1e-4, atol=1e-4)
