"""benchmarks/bench_lowbit_cpu.py: its --quick smoke run on tiny shapes (every row, the host header, the JSON), and the
packed operands it builds are the formats' valid layouts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from zqhero_fx import weights
from zqhero_fx.kernels.packed_linear import packed_linear_ref

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lowbit_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lowbit_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_lowbit_cpu"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rotate", [[], ["--rotate-mb", "0.05"]], ids=["hot", "rotated"])
def test_quick_run_times_every_row(bench, tmp_path, capsys, rotate):
    out = tmp_path / "lowbit.json"
    assert bench.main(["--quick", "--out", str(out), *rotate]) == 0
    result = json.loads(out.read_text())
    records = result["records"]
    (k, n), = bench.QUICK_SHAPES
    assert {(r["M"], r["impl"]) for r in records} == {(m, impl) for m in bench.QUICK_ROWS for impl in bench.IMPLS}
    for r in records:
        assert (r["K"], r["N"]) == (k, n) and r["ms"] >= r["min_ms"] > 0 and r["gops"] > 0 and r["weight_bytes"] > 0
        assert r["kernel"] in ("F.linear", "reference: torch._int_mm + epilogue", "cpu", "reference",
                               "cpu: zqhero VNNI GEMM", "cpu: oneDNN _int_mm + epilogue")
    w8a8 = {r["M"]: r for r in records if r["impl"] == "W8A8"}
    assert all(r["vs_w8a8"] == pytest.approx(w8a8[r["M"]]["ms"] / r["ms"]) for r in records)
    host = result["host"]
    assert set(host["isa"]) == {"AMX", "AVX-512 VNNI", "AVX-VNNI", "AVX2"} and host["cpu"] and host["commit"]
    text = capsys.readouterr().out
    assert "| K x N | M | impl | kernel | ms (min) | GOPS | weight MB | vs W8A8 (min) |" in text
    assert "A8W4 / W8A8" in text and f"| {k}x{n} |" in text


def test_weight_bytes_are_the_packed_sizes(bench):
    size = {name: bench.weight_bytes(weight) for name, (_, weight, _) in bench.operands(1, 128, 32, 64).items()}
    # 4-bit codes, 6-bit codes (4 + 2 streams), INT8 and float weights, plus their scales and zero points
    assert size["A8W4"] == 32 * 64 + 2 * 32 * 2 + 4 * 32
    assert size["W4A8"] == 32 * 64 + 32 * 2 + 4 * 32
    assert size["FP6"] == 32 * 64 + 32 * 32 + 4 * 32
    assert size["W8A8"] == 32 * 128 + 4 * 32 and size["FP32"] == 4 * 32 * 128 and size["BF16"] == 2 * 32 * 128


def test_rotation_cycles_through_equal_copies(bench):
    call, weight, _ = bench.operands(2, 64, 16, 16)["A8W4"]
    rotate = bench.rotating(call, weight, 3 * bench.weight_bytes(weight))
    results = [rotate() for _ in range(4)]
    assert all(torch.equal(r, results[0]) for r in results)
    seen = bench.rotating(lambda w: w[0][0].data_ptr(), weight, 3 * bench.weight_bytes(weight))
    assert len({seen() for _ in range(6)}) == 3  # three copies, each a separate tensor


def test_packed_operands_are_valid(bench):
    """The DGQ weight is INT8 (|S2 (q - z)| <= 127) and close to the INT8 one it came from; every packed row matches
    its reference."""
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (24, 192), generator=g, dtype=torch.int8)
    codes, s2, zero = bench.dgq_weight(w8, 64)
    w = weights.expand([codes], "int4", 64, s2, "integer", zero)
    assert w.abs().max() <= 127 and (w - w8.float()).abs().max() <= s2.float().max()
    rows = bench.operands(3, 192, 24, 64)
    for name in ("A8W4", "W4A8", "FP6"):
        call, weight, (op, args) = rows[name]
        assert op == "packed_linear"
        torch.testing.assert_close(call(weight), packed_linear_ref(*args), rtol=1e-5, atol=1e-5)
