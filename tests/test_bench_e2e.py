"""The end-to-end benchmark's bookkeeping: ratios, the markdown table, and the regression check against a baseline."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_e2e.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _samples():
    return {("fp32_eager", 8): [1.0, 1.2, 1.1], ("ao_dynamic_int8", 8): [0.4, 0.41, 0.39],
            ("zqhero_M3", 8): [0.2, 0.19, 0.25], ("int8_gemms_alone", 8): [0.15, 0.16, 0.14]}


def test_speedups_against_fp32_and_torch_ao_and_the_gemm_share():
    rows = {r["config"]: r for r in _bench().summarise(_samples(), [8])}
    assert rows["zqhero_M3"]["median_ms"] == 200.0
    assert abs(rows["zqhero_M3"]["speedup_vs_ao_dynamic_int8"] - 2.0) < 1e-9  # 400 ms / 200 ms: twice as fast
    assert abs(rows["ao_dynamic_int8"]["speedup_vs_fp32_eager"] - 1.1 / 0.4) < 1e-9
    assert rows["zqhero_M3"]["min_ms"] == 190.0 and rows["zqhero_M3"]["max_ms"] == 250.0
    assert abs(rows["zqhero_M3"]["gemm_share"] - 0.75) < 1e-9  # 150 ms of its 200 ms are the GEMMs alone
    assert rows["fp32_eager"]["gemm_share"] is None


def test_gemm_shapes_are_the_models_linear_layers():
    from transformers import BertConfig

    shapes = _bench().int8_gemm_shapes(BertConfig(num_hidden_layers=2), tokens=1024, batch=8)
    assert len(shapes) == 2 * 6 + 1 and shapes[-1] == (8, 768, 768)
    assert (1024, 3072, 768) in shapes and (1024, 768, 3072) in shapes


def test_baselines_from_another_host_or_depth_are_not_compared(tmp_path):
    bench = _bench()
    rows = bench.summarise(_samples(), [8])
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"meta": {"cpu": "AMD EPYC", "layers": 12}, "rows": rows}))
    notes = bench.compare_with_baseline(rows, baseline, 0.1, {"cpu": "Intel Xeon", "layers": 12})
    assert notes[0].startswith("not compared") and "AMD EPYC" in notes[0]
    notes = bench.compare_with_baseline(rows, baseline, 0.1, {"cpu": "AMD EPYC", "layers": 2})
    assert notes[0].startswith("not compared") and "layers" in notes[0]


def test_regressions_are_reported(tmp_path):
    bench = _bench()
    rows = bench.summarise(_samples(), [8])
    baseline = tmp_path / "baseline.json"
    old = [dict(r) for r in rows]
    for r in old:
        if r["config"] == "zqhero_M3":
            r["median_ms"] = 150.0  # it used to be faster
    baseline.write_text(json.dumps({"rows": old}))
    notes = bench.compare_with_baseline(rows, baseline, 0.10)
    assert any(n.startswith("REGRESSION zqhero_M3 batch 8") for n in notes)
    assert not any("fp32_eager" in n for n in notes)
    assert bench.compare_with_baseline(rows, tmp_path / "missing.json", 0.1) == ["no committed baseline to compare against"]


def test_markdown_table_lists_every_row():
    bench = _bench()
    rows = bench.summarise(_samples(), [8])
    meta = {"cpu": "test CPU", "threads": 2, "torch": "2.13", "commit": "abc", "date": "2026-11-22", "layers": 2,
            "isa": "AVX-512 VNNI", "cpu_path": "INT8 GEMM: test"}
    text = bench.markdown(rows, {"M3": {"capture": 1, "calibrate": 2, "passes": 3, "convert": 5}}, meta)
    assert text.count("| zqhero_M3 |") == 1 and "| M3 | 1 | 2 | 3 | 5 |" in text and "test CPU" in text
    assert "cut to 2 layers" in text and "AVX-512 VNNI" in text and "INT8 GEMM: test" in text
    assert "| 2.00x | 75% |" in text  # speed-up vs torch.ao, GEMM share
