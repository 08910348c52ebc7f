"""zqhero_fx.eval.run / report pieces without a real model: argument parsing, batching, calibration buckets, model
size, the Lee document bootstrap, and the reports (table, markdown, JSON, PNG) from a synthetic result."""

from __future__ import annotations

import builtins
import io
import json

import numpy as np
import pytest
import torch

from zqhero_fx.errors import ConfigError
from zqhero_fx.eval import report as R
from zqhero_fx.eval import run as E


class _WordTokenizer:
    """Whitespace 'tokenizer' with the call signature the eval loop uses (ids = word lengths; CLS=1, SEP=2)."""

    pad_token_id = 0

    def __call__(self, a, b=None, truncation=True, max_length=512):
        single = isinstance(a, str)
        a = [a] if single else list(a)
        b = None if b is None else ([b] if single else list(b))
        ids = []
        for i, text in enumerate(a):
            row = [1] + [3 + len(w) for w in text.split()] + [2]
            if b is not None:
                row += [3 + len(w) for w in b[i].split()] + [2]
            ids.append(row[:max_length])
        out = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}
        return {k: v[0] for k, v in out.items()} if single else out


def test_parse_modes():
    assert E.parse_modes("m1, M3") == ["M1", "M3"]
    assert E.parse_modes("fp32,M2,m2") == ["M2"]
    assert E.parse_modes("fp") == ["fp"]
    with pytest.raises(ConfigError, match="unknown mode 'M9'"):
        E.parse_modes("M1,M9")
    with pytest.raises(ConfigError, match="no mode"):
        E.parse_modes("fp32")


def test_parse_override():
    assert E.parse_override("encoder.layer.5.*=FP16") == ("encoder.layer.5.*", "fp16")
    assert E.parse_override(" *.query = int8 ") == ("*.query", "int8")
    for bad in ("encoder.layer.5.*", "=fp16", "x=", "x=int4"):
        with pytest.raises(ConfigError, match="bad override"):
            E.parse_override(bad)


def test_settings_validate():
    with pytest.raises(ConfigError, match="needs a task"):
        E.EvalSettings(model="bert-base-uncased")
    with pytest.raises(ConfigError, match="batch_size"):
        E.EvalSettings(batch_size=0)
    assert E.EvalSettings(modes="M3,m1").modes == ("M3", "M1")


def test_length_sorted_batches_restore_order():
    texts = ["a b c d e", "a", "a b", "a b c d e f g h", "a b c"]
    data = E.length_sorted_batches("t", _WordTokenizer(), [texts], batch_size=2, max_length=6,
                                   device=torch.device("cpu"))
    assert [s[0] for s in data.shapes()] == [2, 2, 1]
    widths = [s[1] for s in data.shapes()]
    assert widths == sorted(widths) and data.max_len == 6  # truncated to max_length
    order = np.concatenate(data.index)
    assert sorted(order.tolist()) == list(range(5))
    first = data.batches[0]
    assert first["attention_mask"].sum(1).tolist() == [3, 4]  # "a" then "a b", padded to 4
    assert first["input_ids"][0, -1].item() == 0


def test_calibration_buckets_cover_the_evaluated_lengths():
    rng = np.random.default_rng(0)
    train = [" ".join("w" * int(rng.integers(1, 6)) for _ in range(int(rng.integers(2, 20)))) for _ in range(300)]
    batches, info = E.build_calibration(_WordTokenizer(), [train], n_batches=8, batch_size=16, max_length=64,
                                        cover_length=48, seed=0, device=torch.device("cpu"))
    assert info["batches"] == len(batches) == 8
    assert info["packed_long_batches"] == 2  # train rows are <= 21 tokens: two batches of joined sentences
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert lengths[:6] == sorted(lengths[:6]) and max(lengths[:6]) == 21
    assert lengths[6:] == [48, 48] and info["max_seq"] == 48
    assert all(b["input_ids"].shape[0] == 16 for b in batches)
    again, _ = E.build_calibration(_WordTokenizer(), [train], n_batches=8, batch_size=16, max_length=64,
                                   cover_length=48, seed=0, device=torch.device("cpu"))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_calibration_on_a_tiny_split_keeps_two_rows_per_batch():
    batches, info = E.build_calibration(_WordTokenizer(), [["a b", "a", "a b c", "b", "c c"]], n_batches=16,
                                        batch_size=32, max_length=16, cover_length=0, seed=0,
                                        device=torch.device("cpu"))
    assert info["batches"] == 2 and all(b["input_ids"].shape[0] >= 2 for b in batches)


def test_model_size_counts_graph_tensors_once():
    lin = torch.nn.Linear(10, 4)
    assert E.model_size_mb(lin) == pytest.approx((40 + 4) * 4 / 1e6)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8, bias=False)
            self.b = torch.nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight
            self.unused = torch.nn.Parameter(torch.zeros(1000))

        def forward(self, x):
            return self.b(self.a(x))

    gm = torch.fx.symbolic_trace(Tied())
    assert E.model_size_mb(Tied()) == pytest.approx((64 + 1000) * 4 / 1e6)
    assert E.model_size_mb(gm) == pytest.approx(64 * 4 / 1e6)  # shared weight once, unread parameter not at all


def test_doc_bootstrap_interval_contains_the_estimate():
    from zqhero_fx.eval.metrics import lee_scores

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(20, 8))
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    human = np.clip(e @ e.T + rng.normal(scale=0.2, size=(20, 20)), 0, 1)
    human = np.triu(human, 1) + np.triu(human, 1).T
    np.fill_diagonal(human, 1.0)
    point = lee_scores(emb, human)
    ci = E._doc_bootstrap(emb, human, n_boot=200)
    for name in ("pearson", "spearman"):
        lo, hi = ci[name]
        assert lo < point[name] < hi and hi - lo < 0.6


# --------------------------------------------------------------------------- reports


def _report():
    spec = [{"key": "polarity_acc", "label": "polarity acc", "percent": True, "task": "polarity", "n": 1000,
             "main": True},
            {"key": "lee_spearman", "label": "Lee Spearman", "percent": False, "task": "lee", "n": 1225}]
    rows = [{"mode": "fp32", "metrics": {"polarity_acc": {"value": 0.771, "stderr": 0.0133},
                                         "lee_spearman": {"value": 0.508, "ci": [0.41, 0.61]}},
             "agreement": None, "cos_mean": None, "cos_min": None, "latency_ms": 100.0, "speedup": 1.0,
             "latency_min_ms": 90.0, "speedup_min": 1.0, "size_mb": 90.9, "latency_all_ms": [100.0]},
            {"mode": "M3", "metrics": {"polarity_acc": {"value": 0.768, "stderr": 0.0134, "delta": -0.003},
                                       "lee_spearman": {"value": 0.5084, "ci": [0.41, 0.61], "delta": 0.0001}},
             "agreement": 0.985, "cos_mean": 0.99551, "cos_min": 0.98574, "latency_ms": 50.0, "speedup": 2.0,
             "latency_min_ms": 30.0, "speedup_min": 3.0, "size_mb": 23.5, "latency_all_ms": [50.0]}]
    return {"model": "m", "suite": "default", "metrics": spec, "rows": rows, "baseline": "fp32",
            "timing": {"batch_shape": [64, 28]}, "machine": {"device": "cpu", "cpu": "X", "torch_threads": 2},
            "calibration": {"batches": 16, "sequences": 512, "max_seq": 154, "split": "train"},
            "command": "zqhero eval", "runtime_s": 12.0, "nan": float("nan"), "arr": np.arange(2)}


def test_table_columns_and_cells():
    rep = _report()
    assert R.columns(rep) == ["mode", "polarity acc (%)", "Δ polarity acc", "Lee Spearman", "Δ Lee Spearman",
                              "agreement", "cos mean", "cos min", "latency ms 64x28 median (min)",
                              "speed-up median (min)", "size MB"]
    fp32, m3 = R.table_rows(rep)
    assert fp32[:3] == ["fp32", "77.10 ±1.33", "—"] and fp32[5:8] == ["—", "—", "—"]
    assert m3 == ["M3", "76.80 ±1.34", "-0.30", "0.5084 [0.41, 0.61]", "+0.0001", "0.9850", "0.99551", "0.98574",
                  "50.0 (30.0)", "2.00x (3.00x)", "23.5"]


def test_render_table_rich_and_plain(monkeypatch):
    buf = io.StringIO()
    plain = R.render_table(_report(), file=buf)
    assert "0.5084 [0.41, 0.61]" in buf.getvalue()  # rich must not eat the brackets as markup
    assert plain.splitlines()[0].startswith("mode")
    real_import = builtins.__import__

    def no_rich(name, *args, **kwargs):
        if name.startswith("rich"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    buf = io.StringIO()
    R.render_table(_report(), file=buf)
    text = buf.getvalue()
    assert "M3" in text and "2.00x (3.00x)" in text and "± is the standard error" in text


def test_write_all(tmp_path):
    paths = R.write_all(_report(), tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["nan"] is None and data["arr"] == [0, 1]
    md = paths["markdown"].read_text()
    assert "| M3 | 76.80 ±1.34 | -0.30 |" in md and "command: `zqhero eval`" in md
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_default_model_load_says_fetching_only_when_not_cached(tmp_path, monkeypatch, capsys):
    """The "fetching ..." line comes from the asset cache, which knows whether it fetches; a cached MiniLM loads
    silently."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from zqhero_fx.eval import assets

    model_dir = tmp_path / "minilm"
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    BertModel(BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(model_dir)
    (model_dir / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    monkeypatch.setattr(assets, "is_cached", lambda asset, cache=None: True)
    monkeypatch.setattr(assets, "_asset_dir", lambda asset, root: model_dir)
    model, _, max_len, _ = E._load(E.EvalSettings(progress=False), torch.device("cpu"))
    assert max_len == 256 and isinstance(model, BertModel)
    assert "fetching" not in capsys.readouterr().err


def test_plot_labels_of_close_points_do_not_overlap():
    from itertools import combinations

    import matplotlib.pyplot as plt

    report = _report()
    m3 = report["rows"][1]
    close = [("M1", 1.50, 0.7700), ("M2", 1.51, 0.7705), ("M3", 1.52, 0.7695), ("M3-fp8", 1.515, 0.7700),
             ("W4A8", 1.505, 0.7702), ("A8W4", 1.512, 0.7698), ("W6A16", 1.508, 0.7701)]
    report["rows"] = report["rows"][:1] + [
        dict(m3, mode=mode, speedup=speedup, metrics={"polarity_acc": {"value": acc, "stderr": 0.0134},
                                                      "lee_spearman": {"value": 0.508 + i * 1e-4, "ci": [0.41, 0.61]}})
        for i, (mode, speedup, acc) in enumerate(close)]
    fig = R.accuracy_vs_speed_figure(report)
    try:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes[:2]:
            boxes = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
            assert set(boxes) == {"fp32", *(mode for mode, _, _ in close)}
            overlapping = [(a, b) for (a, box_a), (b, box_b) in combinations(boxes.items(), 2)
                           if min(box_a.x1, box_b.x1) > max(box_a.x0, box_b.x0)
                           and min(box_a.y1, box_b.y1) > max(box_a.y0, box_b.y0)]
            assert not overlapping, overlapping
    finally:
        plt.close(fig)


def test_hub_needed_only_for_hub_models_or_hub_data(tmp_path):
    assert E.hub_not_needed(None, None, None)  # the embedded default
    assert E.hub_not_needed(str(tmp_path), "sst2", tmp_path)  # local model, local GLUE files
    assert not E.hub_not_needed(str(tmp_path), "sst2", None)  # GLUE from the Hub
    assert not E.hub_not_needed("bert-base-uncased", "sst2", tmp_path)  # model from the Hub
