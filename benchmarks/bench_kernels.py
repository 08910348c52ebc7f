#!/usr/bin/env python
"""Benchmark the zqhero Triton kernels against their unfused PyTorch equivalents and the natural baselines.

On CUDA, over BERT-base shapes (batch 1/8/32/128 x seq 128/384, hidden 768, FFN 3072, 12 heads x 64):

  norm_quant            vs  the reference (add, fp32 LayerNorm, per-token quantize as separate ops) and
                                  fp16 F.layer_norm + a separate quantize
  quantized_linear (QKV, attention-out, FFN1 with GeLU, FFN2 with residual)
                              vs  torch._int_mm + separate epilogue ops (the reference) and fp16 F.linear (cuBLAS)
  quantized_attention              vs  the reference (unfused, where it fits in memory) and fp16 scaled_dot_product_attention
  quantize_per_token / quantize / dequantize / quantized_embedding / embedding_norm_quant
                              vs  their references

Times are medians from triton.testing.do_bench (warm-up included, so autotuning happens before timing), or from CUDA
graph replays with --cuda-graphs (no launch overhead: the fair comparison at batch 1). Each row
reports achieved TOPS (GEMM-like kernels) or GB/s (memory-bound ones) and the fraction of the device's peak from a
small table (A100, H100 SXM/PCIe, H200), prints a markdown table and the H100 targets, and writes JSON (--out).

Without CUDA the script says so and exits 0; `--cpu-interpret` instead runs every benchmark once on tiny shapes
through the Triton interpreter (numbers meaningless) to prove the script and the kernels run end to end.

    python benchmarks/bench_kernels.py --out bench.json
    python benchmarks/bench_kernels.py --batches 32 --seqs 384 --kernels quantized_linear quantized_attention
    python benchmarks/bench_kernels.py --cpu-interpret --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Dense (no sparsity) peaks per device: INT8 tensor TOPS, FP16 tensor TFLOPS, HBM GB/s (vendor datasheets).
PEAKS = {
    "A100 SXM 80GB": {"int8_tops": 624.0, "fp16_tflops": 312.0, "hbm_gbs": 2039.0},
    "A100 40GB": {"int8_tops": 624.0, "fp16_tflops": 312.0, "hbm_gbs": 1555.0},
    "H100 SXM": {"int8_tops": 1979.0, "fp16_tflops": 989.0, "hbm_gbs": 3350.0},
    "H100 PCIe": {"int8_tops": 1513.0, "fp16_tflops": 756.0, "hbm_gbs": 2000.0},
    "H200": {"int8_tops": 1979.0, "fp16_tflops": 989.0, "hbm_gbs": 4800.0},
}

KERNELS = [
    "norm_quant", "quantized_linear", "quantized_attention", "quantize_per_token", "quantize", "dequantize",
    "quantized_embedding", "embedding_norm_quant",
]

BERT_BASE = dict(hidden=768, ffn=3072, heads=12, head_dim=64, vocab=30522, max_pos=512)
TINY = dict(hidden=64, ffn=128, heads=2, head_dim=32, vocab=100, max_pos=64)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 384])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS)
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measurement time, ms")
    parser.add_argument(
        "--cuda-graphs", action="store_true",
        help="time CUDA-graph replays (do_bench_cudagraph): no Python/launch overhead, which dominates at batch 1",
    )
    parser.add_argument(
        "--cpu-interpret", action="store_true",
        help="smoke mode: tiny shapes on CPU through the Triton interpreter, one timed run each",
    )
    return parser.parse_args(argv)


def device_peaks(torch):
    """(name, peaks or None) for the current CUDA device."""
    name = torch.cuda.get_device_name()
    if "H200" in name:
        return name, PEAKS["H200"]
    if "H100" in name:
        return name, PEAKS["H100 PCIe" if "PCIe" in name else "H100 SXM"]
    if "A100" in name:
        big = torch.cuda.get_device_properties(0).total_memory > 60 * 2**30
        return name, PEAKS["A100 SXM 80GB" if big else "A100 40GB"]
    return name, None


@dataclass
class Record:
    kernel: str
    shape: str
    impl: str
    ms: float
    metric: str  # "TOPS" or "GB/s"
    value: float
    peak_fraction: float | None
    tokens: int
    extra: dict = field(default_factory=dict)


class Bench:
    def __init__(self, args, torch, triton):
        self.args, self.torch, self.triton = args, torch, triton
        self.smoke = args.cpu_interpret
        self.device = "cpu" if self.smoke else "cuda"
        self.records: list[Record] = []
        if self.smoke:
            self.device_name, self.peaks = "cpu (Triton interpreter)", None
        else:
            self.device_name, self.peaks = device_peaks(torch)

    def time_ms(self, fn):
        if self.smoke:
            fn()  # first call: interpreter set-up
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        if self.args.cuda_graphs:
            # The first, uncaptured call inside do_bench_cudagraph also runs any autotuning before capture starts.
            return self.triton.testing.do_bench_cudagraph(fn, rep=self.args.rep, return_mode="median")
        return self.triton.testing.do_bench(fn, warmup=self.args.warmup, rep=self.args.rep, return_mode="median")

    def add(self, kernel, shape, impl, fn, *, flops=None, bytes_moved=None, tokens=0, **extra):
        ms = self.time_ms(fn)
        if flops is not None:
            metric, value = "TOPS", flops / (ms * 1e-3) / 1e12
            peak = self.peaks and (self.peaks["int8_tops"] if "fp16" not in impl else self.peaks["fp16_tflops"])
        else:
            metric, value = "GB/s", bytes_moved / (ms * 1e-3) / 1e9
            peak = self.peaks and self.peaks["hbm_gbs"]
        rec = Record(kernel, shape, impl, ms, metric, value, value / peak if peak else None, tokens, extra)
        self.records.append(rec)
        return rec

    def check(self, name, got, want, *, atol, int8_steps=1):
        """Guard against timing a broken kernel: compare with the reference before benchmarking."""
        torch = self.torch
        got, want = (got if isinstance(got, (tuple, list)) else (got,)), (want if isinstance(want, (tuple, list))
                                                                           else (want,))
        for g, w in zip(got, want):
            if g.numel() == 0:
                continue
            if g.dtype == torch.int8:
                bad = float((g.int() - w.int()).abs().max())
                ok = bad <= int8_steps
            else:
                bad = float((g.float() - w.float()).abs().max())
                ok = bad <= atol * (1 + float(w.float().abs().max()))
            if not ok:
                raise AssertionError(f"{name}: Triton output differs from the reference by {bad}")


def run(args) -> dict:
    if args.cpu_interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit runs in the kernel modules
    import torch

    if not args.cpu_interpret and not torch.cuda.is_available():
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch.nn.functional as F
    import triton
    import triton.testing  # noqa: F401

    from zqhero_fx.kernels import REFERENCES as OPS, use_kernels
    from zqhero_fx.formats import INT8
    from zqhero_fx.kernels.quantize import quantize_per_token_ref

    bench = Bench(args, torch, triton)
    dims = TINY if args.cpu_interpret else BERT_BASE
    batches, seqs = ([1], [8]) if args.cpu_interpret else (args.batches, args.seqs)
    dev = bench.device
    half = torch.float32 if args.cpu_interpret else torch.float16  # the interpreter has no fast fp16 matmul
    hidden, ffn, heads, head_dim = dims["hidden"], dims["ffn"], dims["heads"], dims["head_dim"]
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen, device=dev).to(dtype)

    def rand_int8(*shape):
        return torch.randint(-127, 128, shape, generator=gen, device=dev, dtype=torch.int8)

    def triton_op(name, *op_args):
        op = getattr(torch.ops.zqhero, name)

        def call():
            with use_kernels("triton"):
                return op(*op_args)

        return call

    def ref_op(name, *op_args):
        return lambda: OPS[name](*op_args)

    for batch in batches:
        for seq in seqs:
            tokens = batch * seq
            tag = f"B{batch} S{seq}"

            if "norm_quant" in args.kernels:
                x, r = randn(tokens, hidden, dtype=half), randn(tokens, hidden, dtype=half)
                w, b = randn(hidden, dtype=half), randn(hidden, dtype=half)
                op_args = (x, r, w, b, 1e-12, True, False)  # BERT is post-LN: the normed output is the residual
                bench.check("norm_quant", triton_op("norm_quant", *op_args)(),
                            OPS["norm_quant"](*op_args), atol=1e-2)
                es = x.element_size()
                moved = tokens * hidden * (2 * es + 1 + es) + tokens * 4
                shape = f"{tag} [{tokens}x{hidden}]"
                bench.add("norm_quant", shape, "triton", triton_op("norm_quant", *op_args),
                          bytes_moved=moved, tokens=tokens)
                bench.add("norm_quant", shape, "reference (unfused)", ref_op("norm_quant", *op_args),
                          bytes_moved=moved, tokens=tokens)

                def ln_then_quant():
                    y = F.layer_norm(x + r, (hidden,), w, b, 1e-12)
                    return quantize_per_token_ref(y), y

                bench.add("norm_quant", shape, "F.layer_norm + quantize", ln_then_quant, bytes_moved=moved,
                          tokens=tokens)

            if "quantized_linear" in args.kernels:
                layers = [  # (name, K, N, activation, residual, requantize)
                    ("qkv", hidden, 3 * hidden, "none", False, True),
                    ("attn_out", hidden, hidden, "none", True, False),
                    ("ffn1", hidden, ffn, "gelu", False, True),
                    ("ffn2", ffn, hidden, "none", True, False),
                ]
                for lname, k, n, act, has_res, requant in layers:
                    xq, xs = rand_int8(tokens, k), randn(tokens, 1).abs() * 0.01
                    w16 = randn(n, k, dtype=half) * 0.05
                    wq, ws = INT8.quantize_per_channel(w16.float())
                    bias = randn(n)
                    res = randn(tokens, n, dtype=half) if has_res else None
                    out_scale = randn(n).abs() * 0.05 + 0.01 if requant else None
                    op_args = (xq, xs, wq, ws, bias, res, out_scale, act, torch.int8 if requant else half)
                    int_mm_ok = tokens > 16 or args.cpu_interpret  # torch._int_mm needs M > 16 on CUDA
                    if int_mm_ok:
                        bench.check(f"quantized_linear {lname}", triton_op("quantized_linear", *op_args)(),
                                    OPS["quantized_linear"](*op_args), atol=1e-2)
                    shape = f"{tag} {lname} [{tokens}x{k}]x[{k}x{n}]"
                    flops = 2 * tokens * n * k
                    bench.add("quantized_linear", shape, "triton", triton_op("quantized_linear", *op_args), flops=flops,
                              tokens=tokens)
                    if int_mm_ok:
                        bench.add("quantized_linear", shape, "torch._int_mm + epilogue", ref_op("quantized_linear", *op_args),
                                  flops=flops, tokens=tokens)
                    x16, b16 = randn(tokens, k, dtype=half), bias.to(half)

                    def fp16_linear(x16=x16, w16=w16, b16=b16, act=act, res=res):
                        y = F.linear(x16, w16, b16)
                        if act == "gelu":
                            y = F.gelu(y)
                        return y if res is None else y + res

                    bench.add("quantized_linear", shape, "fp16 cuBLAS (F.linear)", fp16_linear, flops=flops,
                              tokens=tokens)

            if "quantized_attention" in args.kernels:
                q, k, v = (rand_int8(batch, heads, seq, head_dim) for _ in range(3))
                mask = torch.zeros(batch, 1, 1, seq, device=dev)
                out_scale = randn(heads, 1, head_dim).abs() * 0.3 + 0.2
                qk_scale = (4.0 / 127) ** 2 / math.sqrt(head_dim)
                op_args = (q, k, v, mask, qk_scale, 1 / 127, out_scale, False, torch.int8)
                shape = f"{tag} [{batch}x{heads}x{seq}x{head_dim}]"
                flops = 4 * batch * heads * seq * seq * head_dim
                reference_fits = batch * heads * seq * seq <= 2**28
                if reference_fits:
                    bench.check("quantized_attention", triton_op("quantized_attention", *op_args)(),
                                OPS["quantized_attention"](*op_args), atol=1e-2)
                bench.add("quantized_attention", shape, "triton", triton_op("quantized_attention", *op_args), flops=flops,
                          tokens=tokens)
                if reference_fits:
                    bench.add("quantized_attention", shape, "reference (unfused)", ref_op("quantized_attention", *op_args),
                              flops=flops, tokens=tokens)
                q16, k16, v16 = (randn(batch, heads, seq, head_dim, dtype=half) for _ in range(3))
                mask16 = mask.to(half)
                bench.add("quantized_attention", shape, "fp16 SDPA (masked)",
                          lambda: F.scaled_dot_product_attention(q16, k16, v16, attn_mask=mask16), flops=flops,
                          tokens=tokens)
                bench.add("quantized_attention", shape, "fp16 SDPA (no mask)",
                          lambda: F.scaled_dot_product_attention(q16, k16, v16), flops=flops, tokens=tokens)

            elementwise_shape = f"{tag} [{tokens}x{hidden}]"
            if "quantize_per_token" in args.kernels:
                x = randn(tokens, hidden, dtype=half)
                moved = tokens * hidden * (x.element_size() + 1) + tokens * 4
                bench.check("quantize_per_token", triton_op("quantize_per_token", x)(), OPS["quantize_per_token"](x),
                            atol=0, int8_steps=0)
                for impl, fn in (("triton", triton_op("quantize_per_token", x)),
                                 ("reference (unfused)", ref_op("quantize_per_token", x))):
                    bench.add("quantize_per_token", elementwise_shape, impl, fn, bytes_moved=moved, tokens=tokens)

            if "quantize" in args.kernels:
                x, s = randn(tokens, hidden, dtype=half), randn(hidden).abs() * 0.05
                moved = tokens * hidden * (x.element_size() + 1)
                bench.check("quantize", triton_op("quantize", x, s)(), OPS["quantize"](x, s), atol=0, int8_steps=0)
                for impl, fn in (("triton", triton_op("quantize", x, s)),
                                 ("reference (unfused)", ref_op("quantize", x, s))):
                    bench.add("quantize", elementwise_shape, impl, fn, bytes_moved=moved, tokens=tokens)

            if "dequantize" in args.kernels:
                qx, s = rand_int8(tokens, hidden), randn(tokens, 1).abs() * 0.05
                moved = tokens * hidden * (1 + torch.finfo(half).bits // 8) + tokens * 4
                bench.check("dequantize", triton_op("dequantize", qx, s, half)(), OPS["dequantize"](qx, s, half),
                            atol=0)
                for impl, fn in (("triton", triton_op("dequantize", qx, s, half)),
                                 ("reference (unfused)", ref_op("dequantize", qx, s, half))):
                    bench.add("dequantize", elementwise_shape, impl, fn, bytes_moved=moved, tokens=tokens)

            if "quantized_embedding" in args.kernels:
                ids = torch.randint(0, dims["vocab"], (batch, seq), generator=gen, device=dev)
                table, scale = rand_int8(dims["vocab"], hidden), randn(dims["vocab"], 1).abs() * 0.01
                moved = tokens * hidden * (1 + torch.finfo(half).bits // 8) + tokens * 12
                op_args = (ids, table, scale, half)
                bench.check("quantized_embedding", triton_op("quantized_embedding", *op_args)(),
                            OPS["quantized_embedding"](*op_args), atol=0)
                for impl, fn in (("triton", triton_op("quantized_embedding", *op_args)),
                                 ("reference (unfused)", ref_op("quantized_embedding", *op_args))):
                    bench.add("quantized_embedding", elementwise_shape, impl, fn, bytes_moved=moved, tokens=tokens)

            if "embedding_norm_quant" in args.kernels:
                ids = torch.randint(0, dims["vocab"], (batch, seq), generator=gen, device=dev)
                type_ids = torch.zeros(batch, seq, dtype=torch.long, device=dev)
                pos_ids = torch.arange(seq, device=dev)[None]
                tables = [rand_int8(dims["vocab"], hidden), rand_int8(2, hidden), randn(dims["max_pos"], hidden)]
                scales = [randn(dims["vocab"], 1).abs() * 0.01, randn(1).abs() * 0.01, torch.empty(0, device=dev)]
                w, b = randn(hidden), randn(hidden)
                op_args = ([ids, type_ids, pos_ids], tables, scales, w, b, 1e-12, True)
                # Gathered rows (int8 word/type, fp32 position: mostly cache hits), int8 + fp32 normed out.
                moved = tokens * hidden * (1 + 1 + 4 + 1 + 4) + tokens * 24
                bench.check("embedding_norm_quant", triton_op("embedding_norm_quant", *op_args)(),
                            OPS["embedding_norm_quant"](*op_args), atol=1e-2)
                for impl, fn in (("triton", triton_op("embedding_norm_quant", *op_args)),
                                 ("reference (unfused)", ref_op("embedding_norm_quant", *op_args))):
                    bench.add("embedding_norm_quant", elementwise_shape, impl, fn, bytes_moved=moved,
                              tokens=tokens)

    return {
        "mode": "cpu-interpret" if args.cpu_interpret else "cuda",
        "device": bench.device_name,
        "peaks": bench.peaks,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "records": [asdict(r) for r in bench.records],
        "targets": check_targets(bench.records, bench.device_name),
    }


def speedups(records):
    """{(kernel, shape): {impl: triton_speedup_over_impl}}."""
    by_case = {}
    for r in records:
        by_case.setdefault((r.kernel, r.shape), {})[r.impl] = r
    out = {}
    for key, impls in by_case.items():
        if "triton" in impls:
            out[key] = {impl: rec.ms / impls["triton"].ms for impl, rec in impls.items() if impl != "triton"}
    return out


def check_targets(records, device_name):
    """The H100 targets from docs/kernels.md, evaluated on whatever device ran (meaningful on an H100)."""
    ups = speedups(records)
    targets = []

    def add(name, values, threshold):
        if values:
            worst = min(values)
            targets.append({"target": name, "worst": worst, "threshold": threshold, "met": worst >= threshold,
                            "device": device_name})

    add("norm_quant >= 80% of HBM bandwidth at >= 16k tokens",
        [r.peak_fraction for r in records
         if r.kernel == "norm_quant" and r.impl == "triton" and r.tokens >= 16384 and r.peak_fraction], 0.8)
    big = [(k, v) for k, v in ups.items() if k[0] == "quantized_linear" and int(k[1].split("[")[1].split("x")[0]) >= 4096]
    add("quantized_linear >= 1.0x torch._int_mm + epilogue at M >= 4096",
        [v["torch._int_mm + epilogue"] for _, v in big if "torch._int_mm + epilogue" in v], 1.0)
    add("quantized_linear >= 1.6x fp16 cuBLAS at M >= 4096",
        [v["fp16 cuBLAS (F.linear)"] for _, v in big if "fp16 cuBLAS (F.linear)" in v], 1.6)
    add("quantized_attention >= 1.3x fp16 SDPA at seq 384",
        [v["fp16 SDPA (masked)"] for k, v in ups.items() if k[0] == "quantized_attention" and "S384" in k[1]], 1.3)
    return targets


def markdown(result) -> str:
    records = [Record(**r) for r in result["records"]]
    ups = speedups(records)
    lines = [
        f"Device: {result['device']} ({result['mode']}); torch {result['torch']}, triton {result['triton']}",
        "",
        "| kernel | shape | impl | time (us) | throughput | % of peak | triton speedup |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        frac = f"{100 * r.peak_fraction:.1f}%" if r.peak_fraction is not None else "n/a"
        up = ups.get((r.kernel, r.shape), {}).get(r.impl)
        lines.append(
            f"| {r.kernel} | {r.shape} | {r.impl} | {r.ms * 1e3:.1f} | {r.value:.2f} {r.metric} | {frac} | "
            f"{f'{up:.2f}x' if up is not None else '-'} |"
        )
    if result["targets"]:
        lines += ["", "| target | worst | met |", "|---|---:|---|"]
        lines += [f"| {t['target']} | {t['worst']:.2f} | {'yes' if t['met'] else 'NO'} |" for t in result["targets"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if not result:
        print("bench_kernels: no CUDA device here, nothing to benchmark. The kernels' GPU numbers need a GPU; "
              "run with --cpu-interpret for a smoke run of the script on tiny shapes.")
        return 0
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
