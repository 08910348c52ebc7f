"""zqhero study's per-layer part on a tiny model, its summary statistics, and the report files."""

import json

import pytest
import torch

from tests.families import causal_lm
from zqhero_fx.eval import study


@pytest.fixture(scope="module")
def records():
    model = causal_lm("llama")
    with torch.no_grad():  # heavy-tailed inputs on one norm: where FP8 should beat INT8
        model.model.layers[1].post_attention_layernorm.weight[5] = 60.0
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (2, 16), generator=g)}]
    calibration = [{"input_ids": torch.randint(0, 100, (2, 16), generator=g)}]
    return study.layer_errors(model, batches, calibration, progress=False)


def test_every_linear_layer_gets_every_recipe(records):
    assert len(records) == 15  # 2 layers x 7 + the LM head
    for r in records:
        assert set(r["sqnr"]) == {recipe.name for recipe in study.RECIPES}
        assert all(v is not None and v > 5 for v in r["sqnr"].values())
        assert r["input_sqnr"]["int8"] > 20 and r["kurtosis"] > -3 and r["channel_ratio"] >= 1
    # Format ordering on ordinary layers: 8-bit beats FP6 weight-only beats 4-bit weights.
    median = study.summarize_layers(records)["median_sqnr_db"]
    assert median["int8"] > median["w6a16"] > median["w4a8"]


def test_fp8_advantage_follows_the_outlier_layer(records):
    by_name = {r["layer"]: r for r in records}
    loud = by_name["model.layers.1.mlp.gate_proj"]
    quiet = by_name["model.layers.0.mlp.gate_proj"]
    assert loud["kurtosis"] > quiet["kurtosis"]
    assert (loud["sqnr"]["fp8_e4m3"] - loud["sqnr"]["int8"]) > (quiet["sqnr"]["fp8_e4m3"] - quiet["sqnr"]["int8"])
    summary = study.summarize_layers(records)
    assert summary["layers"] == 15 and 0 <= summary["fp8_beats_int8_op"] <= 15


def test_spearman():
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert study.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert study.spearman([1, 2], [1, 2]) is None


def test_group_size_that_does_not_divide_is_reported_not_skipped():
    layer = torch.nn.Linear(40, 8)
    model = torch.nn.Sequential(layer)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

    batches = [{"x": torch.randn(4, 40)}]
    [record] = study.layer_errors(Wrapped(), batches, batches, progress=False)
    assert record["sqnr"]["w4a8"] is None and record["sqnr"]["w6a16"] is not None
    assert any("not a multiple of the weight group size 64" in note for note in record["notes"])


def test_report_files(records, tmp_path):
    e2e_rows = [{"mode": "fp32", "metrics": {"lee": {"ppl": 30.0, "rel_ppl": 0.0, "kl": 0.0, "top1": 1.0}},
                 "size_mb": 540.0, "gemm_bits": None, "prefill_ms": 100.0, "decode_tok_s": 20.0},
                {"mode": "W6A16", "metrics": {"lee": {"ppl": 30.1, "rel_ppl": 0.0033, "kl": 0.001, "top1": 0.99}},
                 "size_mb": 150.0, "gemm_bits": 6.05, "prefill_ms": 90.0, "decode_tok_s": 30.0},
                {"mode": "A8W4", "error": "ValueError: boom", "metrics": {}}]
    report = {"date": "2026-12-01T00:00:00", "commit": "abc", "runtime_s": 1.0,
              "machine": {"cpu": "test cpu", "cpu_count": 2, "torch": "2.13", "torch_threads": 2},
              "recipes": {r.name: r.description for r in study.RECIPES},
              "models": {"smollm2": {"layers": records, "layer_summary": study.summarize_layers(records),
                                     "end_to_end": {"rows": e2e_rows}}}}
    paths = study.write_report(report, tmp_path)
    text = paths["markdown"].read_text()
    assert "| W6A16 | 30.10 | 0.33% |" in text and "failed: ValueError: boom" in text
    assert "model.layers.1.mlp.gate_proj" in text and "test cpu" in text
    assert json.loads(paths["json"].read_text())["models"]["smollm2"]["layer_summary"]["layers"] == 15
    assert paths["per_layer_sqnr"].stat().st_size > 1000 and paths["fp8_advantage_vs_kurtosis"].stat().st_size > 1000


def test_study_settings_reject_unknown_models():
    from zqhero_fx.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown study model"):
        study.StudySettings(models=("bert",))
