"""benchmarks/bench_kernels.py runs: its --cpu-interpret smoke mode on tiny shapes, and a clean exit without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_kernels.py"


def _run(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_smoke_mode_runs_every_benchmark(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--cpu-interpret", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-interpret"
    kernels = {r["kernel"] for r in result["records"]}
    assert kernels == {
        "layer_norm_quant", "int8_linear", "int8_attention", "quantize_per_token", "quantize", "dequantize",
        "quantized_embedding", "embedding_layer_norm_quant",
    }
    impls = {(r["kernel"], r["impl"]) for r in result["records"]}
    assert ("int8_linear", "torch._int_mm + epilogue") in impls and ("int8_attention", "fp16 SDPA (masked)") in impls
    assert all(r["ms"] > 0 for r in result["records"])
    assert "| kernel | shape | impl |" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_without_cuda_exits_cleanly():
    proc = _run("--batches", "1", "--seqs", "128")
    assert proc.returncode == 0
    assert "no CUDA device" in proc.stdout
