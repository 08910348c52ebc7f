import pytest
import torch

from tests.models import bert_batch
from tests.passes._util import apply, count, pipeline_until, run_flat
from zqhero_fx.capture import flatten_inputs
from zqhero_fx.errors import FoldError
from zqhero_fx.kernels import use_kernels
from zqhero_fx.passes._graph import LINEAR, aten, param_of, zq
from zqhero_fx.formats import Scheme
from zqhero_fx.passes.fold_scales import check_fold, fold_scales
from zqhero_fx.passes.state import state


def _non_unit_static_scales(gm):
    """dequantize/quantize nodes whose scale is a static constant other than 1."""
    out = []
    for n in gm.graph.nodes:
        if n.target in (zq.dequantize.default, zq.quantize.default):
            s = param_of(gm, n.args[1])
            if s is not None and not (s.numel() == 1 and float(s) == 1.0):
                out.append(n)
    return out


def test_folds_leave_unit_scales_and_keep_the_function(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    before, fold, _ = pipeline_until(gm, "M3", bert_calibration, "fold_scales")
    after = apply(__import__("copy").deepcopy(before), fold, "fold_scales")
    # F1: every FWQ GEMM input dequantizes with scale 1; F2: Q/K/V quantize with scale 1; F3/F4 the attention's too.
    fwq = [n for n in after.graph.nodes if n.target is LINEAR and state(n).scheme is Scheme.FWQ]
    assert len(fwq) == 4 and all(float(param_of(after, n.args[0].args[1])) == 1.0 for n in fwq)
    left = [n for n in _non_unit_static_scales(after) if n.args[0].op != "get_attr"]  # not embedding tables
    # Only the FC1 epilogue quantize (after a GeLU nothing folds) and the attention-output requantization stay scaled.
    assert {n.args[0].target for n in left} <= {aten.gelu.default, aten.scaled_dot_product_attention.default}
    assert len(left) == 4
    attn = [n for n in after.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert all(n.kwargs["scale"] < 0.25 * 1e-2 for n in attn)  # the Q and K scales now sit in the logit scale
    flat = flatten_inputs(gm, bert_batch(2, 12, seed=3))
    with use_kernels("reference"):
        torch.testing.assert_close(run_flat(after, flat).last_hidden_state, run_flat(before, flat).last_hidden_state,
                                   rtol=2e-3, atol=2e-3)  # same rounding grid, up to ties at .5 boundaries


def test_fold_check_raises_on_a_changed_function():
    node = torch.fx.Graph().placeholder("x")
    check_fold("F1", node, torch.ones(4), torch.ones(4) * (1 + 1e-7))
    with pytest.raises(FoldError, match="F1 at node x"):
        check_fold("F1", node, torch.ones(4), torch.ones(4) * 1.01)


def test_m1_has_nothing_static_to_fold(bert_traced):
    _, gm = bert_traced("h64_l2")
    before, fold, _ = pipeline_until(gm, "M1", None, "fold_scales")
    after = apply(__import__("copy").deepcopy(before), fold_scales, "fold_scales")
    assert count(after, zq.dequantize.default) == count(before, zq.dequantize.default)
    assert not _non_unit_static_scales(after)
