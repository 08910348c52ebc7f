"""Every block type on one core: small random-initialised Hugging Face models of many families convert in every mode,
run at a batch size and sequence length they were not captured or calibrated with, quantize the sites their mode
names (coverage report), keep the block structure each family needs, and stay close to FP32 (SQNR of the last hidden
state: M1 >= 30 dB, M2 >= 22 dB, M3 >= 20 dB; FP8 E4M3 M3 >= 20 dB, measured beside INT8)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

import zqhero_fx
from tests.families import FAMILIES, build, last_hidden
from tests.models import sqnr_db

zq = torch.ops.zqhero
REQUIRED = ["bert", "roberta", "distilbert", "electra", "albert", "vit", "clip_text", "bart", "gpt2", "opt", "llama",
            "qwen2", "mistral"]
EXTRA = ["phi3", "gemma", "t5_encoder", "modernbert"]
THRESHOLD_DB = {"M1": 30.0, "M2": 22.0, "M3": 20.0, "M1-fp8": 20.0, "M2-fp8": 20.0, "M3-fp8": 20.0}
CALIBRATION_BATCHES = 8  # random tiny models: ranges need a few batches to cover an unseen one


@pytest.fixture(scope="module")
def captured():
    """{family: (model, traced, calibration, test batch, FP32 last hidden state)}, built once per family."""
    cache = {}

    def get(name):
        if name not in cache:
            family = FAMILIES[name]
            model, example = build(name)
            gm = zqhero_fx.trace(model, example)
            calibration = [family.inputs(4, 16, seed=i) for i in range(CALIBRATION_BATCHES)]
            test = family.inputs(3, 11, seed=99)  # other batch size and length than capture and calibration
            with torch.no_grad():
                reference = last_hidden(model(**test))
            cache[name] = (model, gm, calibration, test, reference)
        return cache[name]

    return get


def _convert(captured, name, mode):
    model, gm, calibration, test, reference = captured(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", zqhero_fx.CoverageWarning)  # no GEMM the mode meant to quantize stays float
        q = zqhero_fx.convert(gm, mode, calibration=calibration)
    with torch.no_grad():
        got = last_hidden(q(**test))
    assert got.shape == reference.shape
    return q, sqnr_db(reference, got)


def _check_coverage(q, mode):
    coverage = zqhero_fx.coverage_of(q)
    quantized, total = coverage.counts()["gemm"]
    if mode.startswith(("M2", "M3")):
        assert quantized >= 0.9 * total, coverage.table()
    else:  # M1: every norm-fed GEMM (TWQ); the FWQ ones stay float by the mode's definition
        twq = [s for s in coverage.of_kind("gemm") if s.scheme == "twq"]
        by_mode = [s for s in coverage.float_gemms() if "does not quantize them (FWQ" in s.reason]
        assert twq and len(twq) + len(by_mode) == total, coverage.table()
    attention_q, attention_n = coverage.counts()["attention"]
    assert attention_n > 0
    assert attention_q == (attention_n if mode.startswith("M3") else 0), coverage.table()
    return coverage


# The default suite: every family in M3 (every site) and M3-fp8, and M1/M2 on one pre-norm RMSNorm decoder, one
# Conv1D decoder and one post-LN encoder; the slow suite (run by CI) covers every family in every mode.
DEFAULT = {(name, mode) for name in REQUIRED for mode in ("M3", "M3-fp8")} | {
    ("llama", "M1"), ("llama", "M2"), ("gpt2", "M1"), ("gpt2", "M2"), ("bert", "M1"), ("bert", "M2")}


def _cases():
    for name in REQUIRED:
        for mode in ("M1", "M2", "M3", "M3-fp8"):
            if (name, mode) in DEFAULT:
                yield pytest.param(name, mode, id=f"{name}-{mode}")


@pytest.mark.parametrize("name, mode", list(_cases()))
def test_family_converts_quantizes_and_stays_close(captured, name, mode):
    q, db = _convert(captured, name, mode)
    _check_coverage(q, mode)
    assert db >= THRESHOLD_DB[mode], f"{name} {mode}: {db:.1f} dB"
    fmt = torch.float8_e4m3fn if mode.endswith("fp8") else torch.int8
    for node in q.graph.nodes:
        if node.target is zq.quantized_linear.default:
            assert node.args[0].meta["val"].dtype == fmt and getattr(q, node.args[2].target).dtype == fmt


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["M1", "M2", "M3", "M1-fp8", "M2-fp8", "M3-fp8"])
@pytest.mark.parametrize("name", EXTRA + REQUIRED)
def test_every_family_in_every_mode(captured, name, mode):
    if (name, mode) in DEFAULT:
        pytest.skip("in the default suite")
    q, db = _convert(captured, name, mode)
    _check_coverage(q, mode)
    assert db >= THRESHOLD_DB[mode], f"{name} {mode}: {db:.1f} dB"


def _ops(q) -> Counter:
    return Counter(n.target for n in q.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_rmsnorm_decoder_block(captured, name):
    # Pre-norm: RMSNorm^quant with the residual add fused feeds Q/K/V and gate/up (TWQ); the SiLU-gated product and the
    # attention output feed down_proj / o_proj through FWQ; GQA attention runs quantized without the float repeat.
    q, _ = _convert(captured, name, "M3")
    norms = [n for n in q.graph.nodes if n.target is zq.norm_quant.default]
    assert norms and all(n.args[7] == "rms" for n in norms)
    assert any(n.args[1] is not None for n in norms)  # residual add fused
    assert _ops(q)[torch.ops.aten.rms_norm.default] == 1  # the final norm: no GEMM reads it (no LM head here)
    sites = {s.module.rsplit(".", 1)[-1]: s.scheme for s in zqhero_fx.coverage_of(q).of_kind("gemm")}
    assert sites == {"q_proj": "twq", "k_proj": "twq", "v_proj": "twq", "o_proj": "fwq", "gate_proj": "twq",
                     "up_proj": "twq", "down_proj": "fwq"}
    attention = [n for n in q.graph.nodes if n.target is zq.quantized_attention.default]
    assert len(attention) == 2
    for node in attention:
        q_heads, kv_heads = node.args[0].meta["val"].shape[1], node.args[1].meta["val"].shape[1]
        assert node.args[1].meta["val"].dtype == torch.int8 and q_heads % kv_heads == 0


def test_gpt2_conv1d_and_tanh_gelu(captured):
    q, _ = _convert(captured, "gpt2", "M2")
    ops = _ops(q)
    assert torch.ops.aten.addmm.default not in ops and ops[zq.quantized_linear.default] == 8
    fc_epilogues = {n.args[7] for n in q.graph.nodes if n.target is zq.quantized_linear.default}
    assert "gelu_tanh" in fc_epilogues  # gelu_new recognised and fused into c_fc's epilogue


@pytest.mark.parametrize("name, activation", [("opt", "relu"), ("clip_text", "quick_gelu")])
def test_activation_epilogues(captured, name, activation):
    q, _ = _convert(captured, name, "M2")
    assert activation in {n.args[7] for n in q.graph.nodes if n.target is zq.quantized_linear.default}


@pytest.mark.parametrize("name", ["electra", "albert"])
def test_embedding_projection_with_several_users(captured, name):
    # The embedding projection feeds Q, K, V and the residual stream: it lowers, with no epilogue fused after it.
    q, _ = _convert(captured, name, "M3")
    projection = [s for s in zqhero_fx.coverage_of(q).of_kind("gemm")
                  if "embeddings_project" in s.module or "embedding_hidden_mapping_in" in s.module]
    assert projection and all(s.quantized and s.scheme == "twq" for s in projection)


def test_bart_cross_attention_quantized(captured):
    q, _ = _convert(captured, "bart", "M3")
    attention = [n for n in q.graph.nodes if n.target is zq.quantized_attention.default]
    assert len(attention) == 6  # encoder self, decoder self and cross, two layers each
    assert all(n.args[0].meta["val"].dtype == torch.int8 for n in attention)
