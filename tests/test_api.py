"""convert end to end: accuracy per mode on several encoder shapes, INT8 really used, shapes, no mutation, errors."""

import copy

import pytest
import torch

import zqhero_fx
from tests.models import BERT_SHAPES, ConvNet, bert_batch, encoder_batch, sqnr_db
from zqhero_fx.passes._graph import val
from zqhero_fx.passes.state import state

THRESHOLD_DB = {"M1": 30.0, "M2": 25.0, "M3": 20.0}
zq = torch.ops.zqhero


def _last_hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.mark.parametrize("shape", list(BERT_SHAPES))
@pytest.mark.parametrize("mode", ["M1", "M2", "M3"])
def test_bert_sqnr_per_mode(bert_traced, bert_calibration, shape, mode):
    model, gm = bert_traced(shape)
    test = bert_batch(3, 20, pad_from=14, seed=99)
    q = zqhero_fx.convert(gm, mode, calibration=bert_calibration)
    with torch.no_grad():
        reference = model(**test).last_hidden_state
        got = q(**test).last_hidden_state
    assert sqnr_db(reference, got) >= THRESHOLD_DB[mode]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fp_mode_matches_fp32(bert_traced, attn):
    model, gm = bert_traced("h64_l2", attn)
    test = bert_batch(2, 11, pad_from=7, seed=5)
    q = zqhero_fx.convert(gm, "fp")
    with torch.no_grad():
        torch.testing.assert_close(q(**test).last_hidden_state, model(**test).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert not any("zqhero" in k for k in zqhero_fx.ops_histogram(q))


def test_eager_and_sdpa_attention_convert_to_the_same_graph(bert_traced, bert_calibration):
    outputs, histograms = [], []
    test = bert_batch(2, 10, seed=3)
    for attn in ("sdpa", "eager"):
        _, gm = bert_traced("h64_l2", attn)
        q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
        histograms.append({k: v for k, v in zqhero_fx.ops_histogram(q).items() if "zqhero" in k})
        outputs.append(q(**test).last_hidden_state)
    assert histograms[0] == histograms[1]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("front_end", ["export", "symbolic_trace"])
@pytest.mark.parametrize("mode", ["M1", "M2", "M3"])
def test_encoder_with_other_module_names(encoder_model, encoder_calibration, front_end, mode):
    gm = zqhero_fx.trace(encoder_model, encoder_batch(2, 8)) if front_end == "export" \
        else torch.fx.symbolic_trace(encoder_model)
    q = zqhero_fx.convert(gm, mode, calibration=encoder_calibration)
    test = encoder_batch(3, 12, seed=9)
    with torch.no_grad():
        assert sqnr_db(encoder_model(*test), q(*test)) >= THRESHOLD_DB[mode]
    histogram = zqhero_fx.ops_histogram(q)
    assert histogram.get("zqhero.quantized_linear.default", 0) >= 6  # q, k, v, FC1 of both blocks at least


def test_graph_really_computes_in_int8(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    hist = zqhero_fx.ops_histogram(q)
    layers = 2
    assert hist["zqhero.quantized_linear.default"] == 6 * layers + 1  # q, k, v, attention out, FC1, FC2; the pooler
    assert hist["zqhero.quantized_attention.default"] == layers
    # LN^quant: after attention in each layer, after FC2 except in the last layer (its output is the model's output)
    assert hist["zqhero.norm_quant.default"] == 2 * layers - 1
    assert hist["zqhero.embedding_norm_quant.default"] == 1  # word + type + position gathers, add, LN, TWQ
    assert "aten.scaled_dot_product_attention.default" not in hist
    for node in q.graph.nodes:
        if node.target is zq.quantized_linear.default:
            assert val(node.args[0]).dtype == torch.int8, node.format_node()
            weight = getattr(q, node.args[2].target)
            assert weight.dtype == torch.int8 and weight.dim() == 2
        if node.target is zq.quantized_attention.default:
            assert all(val(a).dtype == torch.int8 for a in node.args[:3])
            assert val(node).dtype == torch.int8  # feeds the attention-output GEMM directly
    float_weights = [n for n, t in q.named_buffers() if t.dtype == torch.float32 and t.dim() == 2 and t.numel() > 4096]
    assert not float_weights, f"float GEMM weights left: {float_weights}"


def test_other_batch_and_sequence_sizes_without_reconversion(bert_traced, bert_calibration):
    model, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    for batch, seq in [(1, 5), (7, 40), (2, 128)]:
        test = bert_batch(batch, seq, seed=batch)
        with torch.no_grad():
            got = q(**test).last_hidden_state
            assert got.shape == (batch, seq, 64)
            assert sqnr_db(model(**test).last_hidden_state, got) >= THRESHOLD_DB["M3"]


def test_convert_never_mutates_its_input(bert_traced, bert_calibration):
    model, gm = bert_traced("h64_l2")
    code, state = gm.code, copy.deepcopy(gm.state_dict())
    meta_keys, model_state = set(gm.meta), copy.deepcopy(model.state_dict())
    zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    assert gm.code == code and set(gm.meta) == meta_keys
    for key, tensor in gm.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, model_state[key]), key


def test_classifier_head_model_converts(bert_calibration):
    from tests.models import tiny_bert

    model = tiny_bert("h64_l2", classifier=True)
    gm = zqhero_fx.trace(model, bert_batch(2, 8))
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    test = bert_batch(4, 16, seed=2)
    with torch.no_grad():
        assert sqnr_db(model(**test).logits, q(**test).logits) >= THRESHOLD_DB["M3"]


def test_overrides_keep_named_modules_in_float(bert_traced, bert_calibration):
    model, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration,
                          overrides={"encoder.layer.1.*": "fp16", "*.attention.self": "fp32"})
    int8_paths = [state(n).module_path or "" for n in q.graph.nodes if n.target is zq.quantized_linear.default]
    assert int8_paths and not any(p.startswith("encoder.layer.1.") for p in int8_paths)
    assert any(p.startswith("encoder.layer.0.") for p in int8_paths)
    assert "zqhero.quantized_attention.default" not in zqhero_fx.ops_histogram(q)
    fp16_linears = [n for n in q.graph.nodes if n.target is torch.ops.aten.linear.default
                    and val(n) is not None and val(n).dtype == torch.float16]
    assert len(fp16_linears) == 6  # the whole of layer 1
    test = bert_batch(2, 12, seed=4)
    with torch.no_grad():
        assert sqnr_db(model(**test).last_hidden_state, q(**test).last_hidden_state) >= THRESHOLD_DB["M3"]


def test_conv_net_converts_with_unknown_ops_left_in_float():
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    for gm in (zqhero_fx.trace(model, (x,)), torch.fx.symbolic_trace(model)):
        q = zqhero_fx.convert(gm, "M3", calibration=[(torch.randn(2, 3, 8, 8),) for _ in range(2)])
        hist = zqhero_fx.ops_histogram(q)
        assert any("conv" in k for k in hist)  # still there, in float
        with torch.no_grad():
            assert torch.isfinite(q(x)).all() and q(x).shape == (2, 10)
            assert sqnr_db(model(x), q(x)) >= 20


def test_zero_range_channels_and_out_of_range_inputs_stay_finite(bert_traced, bert_calibration):
    model, gm = bert_traced("h64_l2")
    dead = copy.deepcopy(model)
    with torch.no_grad():  # a LayerNorm whose channel 3 is always zero: a zero-range feature everywhere downstream
        dead.embeddings.LayerNorm.weight[3] = 0.0
        dead.embeddings.LayerNorm.bias[3] = 0.0
    gm_dead = zqhero_fx.trace(dead, bert_batch(2, 8))
    q = zqhero_fx.convert(gm_dead, "M3", calibration=bert_calibration)
    with torch.no_grad():
        out = q(**bert_batch(2, 16, seed=7)).last_hidden_state
    assert torch.isfinite(out).all()
    q2 = zqhero_fx.convert(gm, "M2", calibration=[bert_batch(2, 8, seed=0)])  # tiny calibration: later inputs exceed it
    with torch.no_grad():
        assert torch.isfinite(q2(**bert_batch(4, 64, seed=8)).last_hidden_state).all()


def test_converted_model_runs_with_grad_enabled(bert_traced, bert_calibration):
    """A caller who forgot torch.no_grad() still gets the model's answer: the float parts record autograd history
    (the pooler's Linear), the zqhero ops need none."""
    model, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    test = bert_batch(2, 12, seed=5)
    assert torch.is_grad_enabled()
    out = q(**test)
    with torch.no_grad():
        expected = q(**test)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.pooler_output.detach(), expected.pooler_output, rtol=0, atol=0)


class _Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class TestBadInput:
    def test_missing_calibration(self, bert_traced):
        _, gm = bert_traced("h64_l2")
        for mode in ("M2", "M3"):
            with pytest.raises(zqhero_fx.CalibrationError, match="needs calibration"):
                zqhero_fx.convert(gm, mode)
        zqhero_fx.convert(gm, "M1")  # TWQ is dynamic: no calibration needed

    def test_empty_calibration(self, bert_traced):
        _, gm = bert_traced("h64_l2")
        with pytest.raises(zqhero_fx.CalibrationError, match="empty"):
            zqhero_fx.convert(gm, "M2", calibration=[])

    def test_single_batch_instead_of_iterable(self, bert_traced):
        _, gm = bert_traced("h64_l2")
        with pytest.raises(zqhero_fx.CalibrationError, match="iterable of batches"):
            zqhero_fx.convert(gm, "M2", calibration=bert_batch(2, 8))

    def test_nan_in_calibration_names_node_and_batch(self):
        model = _Scale().eval()
        gm = zqhero_fx.trace(model, (torch.randn(2, 4, 16),))
        bad = torch.randn(2, 4, 16)
        bad[1, 2, 5] = float("nan")
        with pytest.raises(zqhero_fx.CalibrationError, match=r"batch 1: node .* produced NaN"):
            zqhero_fx.convert(gm, "M2", calibration=[(torch.randn(2, 4, 16),), (bad,)])

    def test_wrong_dtype_in_calibration(self, bert_traced):
        _, gm = bert_traced("h64_l2")
        batch = bert_batch(2, 8)
        batch["input_ids"] = batch["input_ids"].float()
        with pytest.raises(zqhero_fx.CalibrationError, match="input_ids.*dtype torch.float32"):
            zqhero_fx.convert(gm, "M2", calibration=[batch])

    def test_wrong_structure_in_calibration(self, bert_traced):
        _, gm = bert_traced("h64_l2")
        with pytest.raises(zqhero_fx.CalibrationError, match="structure"):
            zqhero_fx.convert(gm, "M2", calibration=[{"input_ids": torch.ones(2, 8, dtype=torch.long)}])

    def test_unknown_mode(self, bert_traced):
        _, gm = bert_traced("h64_l2")
        with pytest.raises(zqhero_fx.ConfigError, match="unknown mode 'M4'"):
            zqhero_fx.convert(gm, "M4")

    def test_override_matching_nothing(self, bert_traced, bert_calibration):
        _, gm = bert_traced("h64_l2")
        with pytest.raises(zqhero_fx.ConfigError, match="decoder.layers.*matches no module"):
            zqhero_fx.convert(gm, "M1", overrides={"decoder.layers.*": "fp16"})

    def test_override_matching_nothing_shows_real_module_paths(self, bert_traced):
        _, gm = bert_traced("h64_l2")
        with pytest.raises(zqhero_fx.ConfigError, match="matches no module") as info:
            zqhero_fx.convert(gm, "M1", overrides={"encoder.layers.*": "fp16"})
        examples = str(info.value).split("module paths look like: ")[1].rstrip(")").split(", ")
        assert examples and not any(part.startswith("_") for path in examples for part in path.split("."))
        assert any(path.startswith("encoder.layer.") for path in examples), examples  # near the glob, not only A..Z

    @pytest.mark.parametrize("mode", ["fp", "M1", "M3"])  # aten.embedding; embedding_norm_quant (M3)
    def test_float_token_ids_are_refused_by_name(self, bert_traced, bert_calibration, mode):
        _, gm = bert_traced("h64_l2")
        q = zqhero_fx.convert(gm, mode, calibration=bert_calibration)
        test = bert_batch(2, 8)
        for dtype in (torch.float32, torch.int16, torch.bool):
            with pytest.raises(zqhero_fx.InputError, match=rf"'input_ids' holds token ids.*integer tensor.*{dtype}"):
                q(input_ids=test["input_ids"].to(dtype), attention_mask=test["attention_mask"])
        with torch.no_grad():  # int32 ids index as well as int64 ones; the attention mask is no token-id input
            expected = q(**test).last_hidden_state
            torch.testing.assert_close(q(input_ids=test["input_ids"].int(),
                                         attention_mask=test["attention_mask"]).last_hidden_state, expected)
            q(input_ids=test["input_ids"], attention_mask=test["attention_mask"].float())

    @pytest.mark.parametrize("front_end", ["export", "symbolic_trace"])
    def test_float_token_ids_positional(self, encoder_model, encoder_calibration, front_end):
        gm = zqhero_fx.trace(encoder_model, encoder_batch(2, 8)) if front_end == "export" \
            else torch.fx.symbolic_trace(encoder_model)
        q = zqhero_fx.convert(gm, "M3", calibration=encoder_calibration)
        ids, keep = encoder_batch(2, 8)
        with pytest.raises(TypeError, match="'ids' holds token ids"):  # InputError is a TypeError
            q(ids.float(), keep)

    def test_override_with_bad_precision(self, bert_traced):
        _, gm = bert_traced("h64_l2")
        with pytest.raises(zqhero_fx.ConfigError, match="8-bit"):
            zqhero_fx.convert(gm, "M1", overrides={"encoder.*": "int4"})

    def test_not_a_graph_module(self):
        with pytest.raises(zqhero_fx.CaptureError, match="capture the model first"):
            zqhero_fx.convert(torch.nn.Linear(2, 2), "M1")

    def test_untraceable_model(self):
        class Branchy(torch.nn.Module):
            def forward(self, x):
                return x * 2 if x.sum().item() > 0 else x - 1

        with pytest.raises(zqhero_fx.CaptureError, match="could not capture Branchy"):
            zqhero_fx.trace(Branchy(), (torch.randn(3, 4),))

    def test_symbolic_trace_graph_without_shapes(self):
        gm = torch.fx.symbolic_trace(_Scale())
        with pytest.raises(zqhero_fx.CaptureError, match="needs example inputs"):
            zqhero_fx.convert(gm, "M1")
        q = zqhero_fx.convert(gm, "M1", example_inputs=(torch.randn(2, 4, 16),))
        assert "zqhero.quantized_linear.default" in zqhero_fx.ops_histogram(q)


def test_fp8_on_a_gpu_without_fp8_is_refused_by_name(monkeypatch):
    from zqhero_fx import api
    from zqhero_fx.modes import MODES

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(zqhero_fx.ConfigError, match="fp8_e4m3.*sm_89.*sm_80"):
        api.check_device_runs(MODES["M3-fp8"], torch.device("cuda", 0))
    api.check_device_runs(MODES["M3"], torch.device("cuda", 0))  # INT8 runs there
    api.check_device_runs(MODES["M3-fp8"], torch.device("cpu"))  # the CPU runs FP8 through the references
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    api.check_device_runs(MODES["M3-fp8"], torch.device("cuda", 0))


def test_ops_histogram_names_are_stable(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    histogram = zqhero_fx.ops_histogram(q)
    assert histogram.get("check_token_ids") == 1 and not any(" at 0x" in key for key in histogram)
