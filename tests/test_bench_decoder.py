"""The decoder benchmark (benchmarks/bench_decoder.py): a 2-layer toy run end to end (HF eager with its DynamicCache,
zqhero step graphs with preallocated caches, an unavailable variant recorded instead of failing), and its bookkeeping
(medians, tokens/s, ratios against FP32 eager, the markdown table)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decoder.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_table_and_json(tmp_path):
    bench = _bench()
    argv = ["--tiny", "--layers", "2", "--rounds", "1", "--steps", "2", "--prefill", "1x16,2x8", "--context", "12",
            "--decode-batches", "1,3", "--calibration-batches", "1", "--calibration-shape", "2x8",
            "--variants", "fp32_eager,bf16_eager,zqhero_fp", "--out", str(tmp_path), "--stem", "smoke"]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    table = (tmp_path / "smoke.md").read_text()
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["fp32_eager", "bf16_eager", "zqhero_fp"]
    assert result["workloads"] == ["prefill_1x16", "prefill_2x8", "decode_b1", "decode_b3"]
    for row in rows.values():
        for name, cell in row["workloads"].items():
            assert cell["status"] == "ok", (row["variant"], name, cell["status"])
            assert cell["speedup_vs_fp32_eager"] > 0
    decode = rows["zqhero_fp"]["workloads"]["decode_b3"]
    assert abs(decode["tokens_per_s"] - 3 * 2 / decode["seconds"][0]) < 1e-6 * decode["tokens_per_s"]
    assert rows["fp32_eager"]["workloads"]["prefill_1x16"]["speedup_vs_fp32_eager"] == 1.0
    assert rows["bf16_eager"]["bytes_vs_fp32_eager"] == 0.5
    assert rows["bf16_eager"]["kv_bytes_per_token"] == rows["fp32_eager"]["kv_bytes_per_token"] // 2
    meta = result["meta"]
    assert meta["prefill_logits"] == "all positions" and meta["host"]["cpu"] and "isa" in meta["host"]
    assert table.count("| zqhero_fp |") == 3  # the results, the spread and the build tables
    assert "prefill 1x16 ms" in table and "decode b3 tok/s" in table
    assert meta["host"]["versions"]["torch"] in table


def test_decode_rounds_start_from_the_same_cache():
    """Every timed round decodes from the same 512-token (here 12-token) state: the tokens of two rounds agree; M3
    keeps an INT8 cache (a quarter of the FP32 bytes per token) and smaller weights."""
    bench = _bench()
    args = bench.parse_args(["--tiny", "--layers", "2", "--steps", "3", "--context", "12", "--prefill", "1x8",
                             "--calibration-batches", "1", "--calibration-shape", "2x8"])
    model, _ = bench.build_model(args)
    work = bench.Workloads(model.config.vocab_size, args.prefill_shapes, args.context, [2], args.steps)
    calibration = [{"input_ids": work.decode_prompt[:, :8]}]
    runners, skipped, _ = bench.build_variants(model, ["fp32_eager", "zqhero_fp", "zqhero_M3"], work, calibration,
                                               args.context + args.steps)
    assert not skipped
    import torch

    with torch.no_grad():
        for runner in runners.values():
            runner.setup_decode(2)
            first = runner.decode(2)
            runner.rewind(2)
            assert torch.equal(first, runner.decode(2))
            runner.rewind(2)
        # zqhero "fp" is the FP32 model: the same greedy tokens as Hugging Face with its DynamicCache.
        assert torch.equal(runners["fp32_eager"].decode(2), runners["zqhero_fp"].decode(2))
    fp32, m3 = runners["fp32_eager"], runners["zqhero_M3"]
    assert bench.kv_bytes_per_token(m3) * 4 == bench.kv_bytes_per_token(fp32) == bench.kv_bytes_per_token(
        runners["zqhero_fp"])
    assert bench.model_bytes(m3.gm) < 0.6 * bench.model_bytes(fp32.model)  # tied FP32 embedding counted once


def test_unavailable_variants_are_recorded_not_fatal():
    bench = _bench()
    samples = {("fp32_eager", "prefill_1x512"): [1.0, 1.2, 1.1], ("zqhero_M3", "prefill_1x512"): [0.5, 0.6, 0.4],
               ("fp32_eager", "decode_b8"): [2.0, 2.0, 2.0], ("zqhero_M3", "decode_b8"): [1.0, 1.0, 1.0]}
    failed = {("fp32_compile", "decode_b8"): "failed: BackendCompilerFailed: boom"}
    skipped = {"torchao_int8_compile": "build failed: RuntimeError: torchao is not installed"}
    facts = {"fp32_eager": {"model_bytes": 1000}, "zqhero_M3": {"model_bytes": 300}}
    rows = bench.summarise(samples, {}, failed, ["prefill_1x512", "decode_b8"], 16, facts, skipped)
    by = {r["variant"]: r for r in rows}
    assert by["zqhero_M3"]["workloads"]["prefill_1x512"]["median_ms"] == 500.0
    assert abs(by["zqhero_M3"]["workloads"]["prefill_1x512"]["speedup_vs_fp32_eager"] - 1.1 / 0.5) < 1e-9
    assert by["zqhero_M3"]["workloads"]["decode_b8"]["tokens_per_s"] == 8 * 16 / 1.0
    assert by["zqhero_M3"]["workloads"]["decode_b8"]["speedup_vs_fp32_eager"] == 2.0
    assert by["zqhero_M3"]["bytes_vs_fp32_eager"] == 0.3
    assert by["fp32_compile"]["workloads"]["decode_b8"]["status"].startswith("failed: BackendCompilerFailed")
    assert by["torchao_int8_compile"]["workloads"]["decode_b8"]["status"].startswith("build failed")
    meta = {"model": "m", "layers": 2, "rounds": 3, "steps": 16, "context": 512, "date": "2026-12-01",
            "load_avg_end": None,
            "host": {"cpu": "test CPU", "isa": ["avx512_vnni"], "amx": False, "vnni": True, "usable_cpus": 2,
                     "logical_cpus": 2, "torch_threads": 2, "versions": {"torch": "2.13", "transformers": "5",
                                                                         "torchao": None},
                     "commit": "abc", "host": "h", "load_avg_start": None}}
    text = bench.markdown(rows, ["prefill_1x512", "decode_b8"], meta)
    assert "test CPU" in text and "VNNI: yes" in text and "torchao not installed" in text
    assert "torchao is not installed" in text and "BackendCompilerFailed" in text
    assert "| zqhero_M3 | 500 (2.20x) | 128.0 (2.00x) |" in text
