"""benchmarks/bench_kernels.py runs: its --cpu-interpret smoke mode on tiny shapes, and a clean exit without CUDA."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.kernel_checks import INTERPRET

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    # In-process: this session already imported the kernels in the mode the script's smoke run needs.
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not INTERPRET, reason="the smoke mode runs the kernels in the Triton interpreter")
def test_smoke_mode_runs_every_benchmark(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-interpret", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-interpret"
    assert {r["kernel"] for r in result["records"]} == set(bench.KERNELS)
    impls = {(r["kernel"], r["impl"]) for r in result["records"]}
    for expected in [
        ("norm_quant", "F.layer_norm + quantize"),
        ("quantized_linear", "torch._int_mm + epilogue"),
        ("quantized_linear", "fp16 cuBLAS (F.linear)"),
        ("quantized_attention", "fp16 SDPA (masked)"),
    ]:
        assert expected in impls
    assert all(r["ms"] > 0 and r["value"] >= 0 for r in result["records"])
    assert "| kernel | shape | impl |" in capsys.readouterr().out


def test_targets_are_evaluated_from_records(bench):
    # The H100 targets read the right rows: a fake record set that meets two and misses one.
    rec = bench.Record
    records = [
        rec("norm_quant", "B64 S384 [24576x768]", "triton", 0.02, "GB/s", 2900.0, 0.87, 24576),
        rec("quantized_linear", "B32 S384 ffn1 [12288x768]x[768x3072]", "triton", 0.1, "TOPS", 1.0, 0.5, 12288),
        rec("quantized_linear", "B32 S384 ffn1 [12288x768]x[768x3072]", "torch._int_mm + epilogue", 0.15, "TOPS", 1.0,
            0.5, 12288),
        rec("quantized_linear", "B32 S384 ffn1 [12288x768]x[768x3072]", "fp16 cuBLAS (F.linear)", 0.12, "TOPS", 1.0,
            0.5, 12288),
        rec("quantized_attention", "B32 S384 [32x12x384x64]", "triton", 0.1, "TOPS", 1.0, 0.5, 12288),
        rec("quantized_attention", "B32 S384 [32x12x384x64]", "fp16 SDPA (masked)", 0.14, "TOPS", 1.0, 0.5, 12288),
    ]
    met = {t["target"].split(" >=")[0] + " " + t["target"].split(" ")[2]: t["met"]
           for t in bench.check_targets(records, "test")}
    assert met == {
        "norm_quant 80%": True, "quantized_linear 1.0x": True, "quantized_linear 1.6x": False, "quantized_attention 1.3x": True,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_without_cuda_exits_cleanly(bench, capsys):
    assert bench.main(["--batches", "1", "--seqs", "128"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
