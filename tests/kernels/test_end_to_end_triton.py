"""A small BERT converted in mode M3 runs on the Triton kernels (interpreter on CPU) and matches the reference path."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_checks import INTERPRET

zqhero_fx = pytest.importorskip("zqhero_fx")
if not (hasattr(zqhero_fx, "convert") and hasattr(zqhero_fx, "trace")):
    pytest.skip("zqhero_fx.convert / zqhero_fx.trace are not available yet", allow_module_level=True)
pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels on CPU: needs TRITON_INTERPRET=1")


def _batch(batch, seq, seed, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        mask[0, pad_from:] = 0  # a padded sequence: exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}


def _last_hidden_state(out):
    if isinstance(out, dict):
        return out["last_hidden_state"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.last_hidden_state


@pytest.fixture(scope="module")
def converted_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=64)
    model = BertModel(config).eval()
    example = _batch(2, 8, seed=1, pad_from=5)
    gm = zqhero_fx.trace(model, example)
    q = zqhero_fx.convert(gm, "M3", calibration=[_batch(4, 16, seed=10 + i) for i in range(2)])
    return model, q


def test_m3_bert_triton_matches_reference(converted_bert):
    model, q = converted_bert
    ops = zqhero_fx.ops_histogram(q) if hasattr(zqhero_fx, "ops_histogram") else {}
    if ops:
        assert any(name.startswith("zqhero.quantized_linear") for name in ops), ops
    batch = _batch(2, 8, seed=2, pad_from=5)
    with torch.no_grad(), zqhero_fx.use_kernels("reference"):
        reference = _last_hidden_state(q(**batch))
    with torch.no_grad(), zqhero_fx.use_kernels("triton"):
        triton_out = _last_hidden_state(q(**batch))
    assert triton_out.shape == reference.shape == (2, 8, 64)
    assert torch.isfinite(triton_out).all()
    # Same INT8 model, two implementations: they differ only where a LayerNorm or softmax value rounds to a different
    # INT8 step, a tiny fraction of the hidden state's range.
    torch.testing.assert_close(triton_out, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
    # And the INT8 model still approximates the float one (guards against both paths being wrong the same way).
    with torch.no_grad():
        float_out = _last_hidden_state(model(**batch))
    cosine = torch.nn.functional.cosine_similarity(triton_out.flatten(), float_out.flatten(), dim=0)
    assert cosine > 0.9, float(cosine)
