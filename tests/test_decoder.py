"""Decoder LLMs with their KV cache (zqhero_fx/decoder.py): every causal-LM family captures with its cache on,
converts in M1/M2/M3, and generates; "fp" greedy output equals Hugging Face's generate token for token; M3 keeps an
INT8 cache; prefill + decode through the cache gives the logits a full forward gives; bad inputs get named errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import zqhero_fx
from zqhero_fx import decoder
from zqhero_fx.errors import CaptureError
from tests.families import CAUSAL_LMS, causal_lm
from tests.models import sqnr_db

VOCAB = 100


def _ids(batch, tokens, seed):
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def traced():
    cache = {}

    def get(name):
        if name not in cache:
            model = causal_lm(name)
            cache[name] = (model, zqhero_fx.trace(model, {"input_ids": _ids(2, 6, 0)}, max_cache_len=48))
        return cache[name]

    return get


def _hf_greedy(model, ids, new_tokens, attention_mask=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _convert(gm, mode):
    calibration = [{"input_ids": _ids(2, 16, seed)} for seed in range(1, 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", zqhero_fx.CoverageWarning)
        return zqhero_fx.convert(gm, mode, calibration=calibration)


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_fp_greedy_generation_equals_hugging_face(traced, name):
    model, gm = traced(name)
    ids = _ids(2, 7, 11)  # other batch and length than the capture example
    fp = zqhero_fx.convert(gm, "fp")
    out = zqhero_fx.generate(fp, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out.sequences, _hf_greedy(model, ids, 6))
    assert out.new_tokens == 6 and out.decode_tokens_per_second > 0


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_m3_generates_with_an_int8_cache_and_tracks_fp32(traced, name):
    model, gm = traced(name)
    q = _convert(gm, "M3")
    assert all(k == v == torch.int8 for k, v in decoder.cache_dtypes(q))
    ids = _ids(3, 9, 12)
    out = zqhero_fx.generate(q, ids, max_new_tokens=4, eos_token_id=[])
    assert out.sequences.shape == (3, 13) and torch.equal(out.sequences[:, :9], ids)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    assert sqnr_db(reference, decoder.prefill_logits(q, ids)) > 12.0


@pytest.mark.parametrize("mode", ["M1", "M2", "M3"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decode_through_the_cache_matches_one_prefill(traced, name, mode):
    """Prefill 5 tokens, then decode 3 one at a time: each step's logits equal the full 8-token prefill's."""
    _, gm = traced(name)
    q = _convert(gm, mode)
    ids = _ids(2, 8, 13)
    full = decoder.prefill_logits(q, ids)
    flat = decoder.step_inputs(q, ids[:, :5], cache_len=8)
    flat[3][:, 5:] = 0
    with torch.no_grad():
        logits = [decoder.run_step(q, flat)]
        for slot in range(5, 8):
            flat[3][:, slot] = 1
            flat[0], flat[1], flat[2] = ids[:, slot:slot + 1], torch.full((2, 1), slot), torch.tensor([slot])
            logits.append(decoder.run_step(q, flat))
    stepped = torch.cat(logits, 1)
    assert sqnr_db(full, stepped) > 40.0  # equal up to the per-token dynamic scales' rounding order


def test_m3_lowers_gqa_attention_without_repeating_kv(traced):
    _, gm = traced("llama")
    q = _convert(gm, "M3")
    ops = zqhero_fx.ops_histogram(q)
    assert "aten.expand.default" not in ops
    attention = [n for n in q.graph.nodes if n.target == torch.ops.zqhero.quantized_attention.default]
    assert attention and all(n.args[1].meta["val"].shape[1] == 2 for n in attention)  # 2 KV heads of 4


def test_m1_keeps_a_float_cache_and_an_option_turns_the_int8_cache_off(traced):
    _, gm = traced("llama")
    assert all(k == torch.float32 for k, _ in decoder.cache_dtypes(_convert(gm, "M1")))
    q = _convert(gm, zqhero_fx.MODES["M3"].replace(quantize_kv_cache=False))
    assert all(k == v == torch.float32 for k, v in decoder.cache_dtypes(q))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_eager_attention_models_generate_like_hugging_face(name):
    """attn_implementation="eager" adds the mask to the logits: the step graph gives it the additive form."""
    model = causal_lm(name)
    model.set_attn_implementation("eager")
    gm = zqhero_fx.trace(model, {"input_ids": _ids(2, 6, 0)}, max_cache_len=32)
    ids = _ids(2, 5, 17)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    out = zqhero_fx.generate(gm, ids, max_new_tokens=4, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out.sequences, _hf_greedy(model, ids, 4, attention_mask=mask))
    q = _convert(gm, "M3")
    assert zqhero_fx.ops_histogram(q).get("zqhero.quantized_attention.default", 0) == 2


def test_left_padded_batch_generates_like_hugging_face(traced):
    model, gm = traced("llama")
    ids = _ids(2, 6, 14)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    out = zqhero_fx.generate(gm, ids, max_new_tokens=5, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out.sequences, _hf_greedy(model, ids, 5, attention_mask=mask))


def test_sampling_is_seeded_and_top_k_1_is_greedy(traced):
    _, gm = traced("qwen2")
    ids = _ids(1, 4, 15)
    a = zqhero_fx.generate(gm, ids, 6, do_sample=True, seed=3, temperature=0.8, top_p=0.9, eos_token_id=[])
    b = zqhero_fx.generate(gm, ids, 6, do_sample=True, seed=3, temperature=0.8, top_p=0.9, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences)
    greedy = zqhero_fx.generate(gm, ids, 6, eos_token_id=[])
    top1 = zqhero_fx.generate(gm, ids, 6, do_sample=True, top_k=1, seed=0, eos_token_id=[])
    assert torch.equal(greedy.sequences, top1.sequences)


def test_generation_stops_at_eos_and_streams_tokens(traced):
    _, gm = traced("llama")
    ids = _ids(1, 5, 16)
    first = zqhero_fx.generate(gm, ids, 1, eos_token_id=[]).sequences[0, -1].item()
    seen = []
    out = zqhero_fx.generate(gm, ids, 10, eos_token_id=first, on_token=seen.append)
    assert out.new_tokens == 1 and len(seen) == 1 and seen[0].item() == first


def test_bad_inputs_are_named(traced):
    model, gm = traced("llama")
    with pytest.raises(CaptureError, match="max_cache_len=48"):
        zqhero_fx.generate(gm, _ids(1, 40, 0), max_new_tokens=20)
    with pytest.raises(CaptureError, match="integer tensor"):
        zqhero_fx.generate(gm, torch.rand(1, 4), max_new_tokens=2)
    with pytest.raises(CaptureError, match="pad prompts on the left"):
        zqhero_fx.generate(gm, _ids(1, 4, 0), 2, attention_mask=torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(CaptureError, match="max_position_embeddings"):
        zqhero_fx.trace(model, {"input_ids": _ids(1, 4, 0)}, max_cache_len=10**6)
    with pytest.raises(CaptureError, match="not a decoder step graph"):
        zqhero_fx.generate(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), _ids(1, 4, 0))
    with pytest.raises(ValueError, match="top_p"):
        zqhero_fx.generate(gm, _ids(1, 4, 0), 2, do_sample=True, top_p=1.5)


def test_a_cache_of_the_wrong_dtype_is_refused(traced):
    _, gm = traced("llama")
    q = _convert(gm, "M3")
    flat = decoder.step_inputs(gm, _ids(1, 4, 0))  # float caches, as the float graph takes them
    with pytest.raises(CaptureError, match="key_cache_0.*int8"):
        decoder.run_step(q, flat)


def test_a_model_that_ignores_the_cache_is_refused():
    model = causal_lm("llama")
    inner = model.model.forward

    def forgetful(*args, **kwargs):  # keeps its state elsewhere: never writes the cache it is given
        kwargs.pop("past_key_values", None), kwargs.pop("cache", None)
        return inner(*args, use_cache=False, **{k: v for k, v in kwargs.items() if k != "use_cache"})

    model.model.forward = forgetful
    with pytest.raises(CaptureError, match="cache"):
        zqhero_fx.trace(model, {"input_ids": _ids(1, 4, 0)}, max_cache_len=16)


def test_mixed_sliding_and_full_layers_beyond_the_window_are_refused():
    model = causal_lm("mistral")
    model.config.sliding_window = 8
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(CaptureError, match="sliding-window"):
        zqhero_fx.trace(model, {"input_ids": _ids(1, 4, 0)}, max_cache_len=16)


def test_fp8_kv_cache_generates_like_a_float_cache():
    """M3-fp8 stores the cache in float8 (written through a byte view: CPU index_copy_ has no float8 kernel)."""
    model = causal_lm("llama")
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    gm = zqhero_fx.trace(model, {"input_ids": ids})
    calibration = [{"input_ids": torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(s))}
                   for s in range(3)]
    q = zqhero_fx.convert(gm, "M3-fp8", calibration=calibration)
    assert decoder.cache_dtypes(q)[0] == (torch.float8_e4m3fn, torch.float8_e4m3fn)
    float_cache = zqhero_fx.convert(gm, "M3-fp8+quantize_kv_cache=false", calibration=calibration)
    assert torch.equal(zqhero_fx.generate(q, ids, max_new_tokens=5).sequences,
                       zqhero_fx.generate(float_cache, ids, max_new_tokens=5).sequences)
