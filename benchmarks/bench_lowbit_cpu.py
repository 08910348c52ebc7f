#!/usr/bin/env python
"""Low-bit GEMMs on the CPU: the packed weight formats of zqhero::packed_linear against float and INT8 GEMMs.

For each weight shape (K, N) -- SmolLM2-135M's 576 x 576 (attention), 576 x 1536 (MLP up), 1536 x 576 (MLP down) and a
large 4096 x 4096 -- and each number of rows M (1, 4, 8: decode; 128, 512: prefill), times on this machine's CPU:

  FP32          F.linear, float32
  BF16          F.linear, bfloat16 operands
  W8A8          torch.ops.zqhero.quantized_linear, int8 x (per-token scale) x int8 weight (per-channel scale): the
                INT8 CPU kernel this host runs (kernels/int8_cpu.py: zqhero's VNNI GEMM with the epilogue fused, or
                oneDNN's torch._int_mm plus the epilogue pass), or its reference where none builds
  A8W4          torch.ops.zqhero.packed_linear, int8 x x DGQ INT4 codes (zero point, integer group scales)
  W4A8          torch.ops.zqhero.packed_linear, FP8 E4M3 x x FP4 E2M1 codes with power-of-two group scales
  FP6           torch.ops.zqhero.packed_linear, float32 x x FP6 E3M2 "4+2" codes, one scale per channel

The packed rows run whatever kernel dispatch picks under ZQHERO_KERNELS=auto; the `kernel` column is dispatch.select's
label ("cpu": a CPU kernel, "reference": the PyTorch reference). Every GEMM includes its epilogue (scales, float32
output). Calls are interleaved (one sample of each row per round, so drift and turbo states hit every row alike) and
the median (and the min, the cleaner number on a shared machine) per row is reported with GOPS (2 M N K / median
time), the weight bytes each call reads and the speed relative to W8A8. The table is headed by the host (CPU model,
INT8 instruction sets, threads, torch, date, git commit, load) and followed by A8W4 / W8A8 per shape; JSON goes to
--out.

By default every call reads the same weight, which stays in cache where it fits (SmolLM2's INT8 matrices fit a 2 MB
L2): that favours the INT8 GEMM, whose inner loop needs no unpacking. In a model, each layer's weight has been pushed
out by the others by the time it comes back; --rotate-mb cycles every row through that many MB of weight copies to
measure that case.

    python benchmarks/bench_lowbit_cpu.py
    python benchmarks/bench_lowbit_cpu.py --rotate-mb 64 --ms 1 4 8
    python benchmarks/bench_lowbit_cpu.py --shapes 4096x4096 --ms 1 512 --rounds 15 --out /tmp/lowbit.json
    python benchmarks/bench_lowbit_cpu.py --quick   # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zqhero_fx import dispatch, weights  # noqa: E402
from zqhero_fx.formats import FP4_E2M1, FP6_E3M2, FP8_E4M3, INT8  # noqa: E402

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]  # (K, N)
ROWS = [1, 4, 8, 128, 512]  # M
QUICK_SHAPES, QUICK_ROWS = [(64, 48)], [1, 5]
IMPLS = ["FP32", "BF16", "W8A8", "A8W4", "W4A8", "FP6"]
# A sample is a loop of calls lasting at least this long, so the timer's resolution and call jitter do not matter.
MIN_SAMPLE_S = 0.005
FP4_MIN_EXPONENT = -8  # FP4's smallest code 0.5 times 2**-8 is FP8 E4M3's smallest subnormal: exact conversion


# ---------------------------------------------------------------- host
def host_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "x86_64", "", platform.machine()):
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = {"AMX": "amx_int8" in flags, "AVX-512 VNNI": "avx512_vnni" in flags, "AVX-VNNI": "avx_vnni" in flags,
           "AVX2": "avx2" in flags}
    return {"cpu": model, "isa": isa, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (uncommitted changes)" if dirty else "")


# ---------------------------------------------------------------- operands
def dgq_weight(w8: torch.Tensor, group_size: int):
    """DGQ's A8W4 layout of an INT8 weight: per group an integer scale S2 >= 1 and a zero point z with unsigned INT4
    codes q, |S2 (q - z)| <= 127 (the codes are clamped to the reach of z). Returns (codes [N, K/2], S2, z)."""
    n, k = w8.shape
    groups = w8.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    s2 = torch.ceil((high - low) / 15).clamp(1, 127)
    zero = torch.round(-low / s2).clamp(0, 15)
    reach = torch.floor(127 / s2)
    q = torch.round(groups / s2[..., None]) + zero[..., None]
    q = torch.minimum(torch.maximum(q, (zero - reach).clamp(min=0)[..., None]), (zero + reach).clamp(max=15)[..., None])
    codes = weights.pack_nibbles(q.reshape(n, k).to(torch.uint8))
    return codes, s2.to(torch.int8).contiguous(), zero.to(torch.uint8).contiguous()


def fp4_weight(w: torch.Tensor, group_size: int):
    """ZeroQuant-FP's W4A8 layout: FP4 E2M1 codes, a per-channel scale (the row's largest group scale) and per group
    a power-of-two ratio 2**e to it, e in [FP4_MIN_EXPONENT, 0]. Returns (codes [N, K/2], w_scale, e int8)."""
    n, k = w.shape
    group_scale = FP4_E2M1.scale_for(w.float().abs().reshape(n, k // group_size, group_size).amax(-1))
    w_scale = group_scale.amax(-1)
    mantissa, exponent = torch.frexp(group_scale / w_scale[:, None])  # ratio = m * 2**e, m in [0.5, 1)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent).clamp(FP4_MIN_EXPONENT, 0)  # round the ratio up
    column_scale = weights.per_column(w_scale[:, None] * torch.exp2(e.float()), group_size, k)
    return FP4_E2M1.quantize(w, column_scale), w_scale.contiguous(), e.to(torch.int8).contiguous()


def operands(m: int, k: int, n: int, group_size: int, seed: int = 0) -> dict:
    """impl -> (call(weight) running the GEMM on its weight operands, weight (a tuple of tensors, or of lists of
    them), (zqhero op name, its args) or None for F.linear)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    x_bf16 = x.bfloat16()
    xq, x_scale = INT8.quantize_per_token(x)
    w8, s1 = INT8.quantize_per_channel(w)
    codes4, s2, zero = dgq_weight(w8, group_size)
    x8, x8_scale = FP8_E4M3.quantize_per_token(x)
    fp4, fp4_scale, fp4_exponent = fp4_weight(w, group_size)
    fp6, fp6_scale = FP6_E3M2.quantize_per_channel(w)
    tail = ([], None, None, None, "none", torch.float32)  # lorc, bias, residual, out_scale, activation, out_dtype
    ops = torch.ops.zqhero
    w8a8 = (None, None, None, "none", torch.float32)  # bias, residual, out_scale, activation, out_dtype
    rows = {
        "FP32": (lambda wt: F.linear(x, wt[0]), (w,), None),
        "BF16": (lambda wt: F.linear(x_bf16, wt[0]), (w.bfloat16(),), None),
        "W8A8": (lambda wt: ops.quantized_linear(xq, x_scale, *wt, *w8a8), (w8, s1),
                 ("quantized_linear", (xq, x_scale, w8, s1, *w8a8))),
    }
    packed = {  # x, x_scale, then the weight operands (codes, format, group size, scales, kind, zero points)
        "A8W4": ((xq, x_scale), ([codes4], "int4", group_size, s1, s2, "integer", zero)),
        "W4A8": ((x8, x8_scale), ([fp4], "fp4_e2m1", group_size, fp4_scale, fp4_exponent, "exponent", None)),
        "FP6": ((x, None), (weights.pack_fp6(fp6), "fp6_e3m2", 0, fp6_scale, None, "none", None)),
    }
    for name, (activations, weight) in packed.items():
        rows[name] = ((lambda wt, a=activations: ops.packed_linear(*a, *wt, *tail)), weight,
                      ("packed_linear", (*activations, *weight, *tail)))
    return rows


def weight_bytes(weight) -> int:
    return weights.nbytes([t for item in weight for t in (item if isinstance(item, list) else [item])])


def copied(weight):
    return tuple([t.clone() for t in item] if isinstance(item, list) else
                 item.clone() if isinstance(item, torch.Tensor) else item for item in weight)


def rotating(call, weight, rotate_bytes: int):
    """A zero-argument GEMM call; with rotate_bytes, each call takes the next of enough copies of the weight to fill
    that many bytes, so that it reads a weight the previous calls have pushed out of the caches it fits in."""
    copies = [weight] + [copied(weight) for _ in range(max(0, -(-rotate_bytes // weight_bytes(weight)) - 1))]
    if len(copies) == 1:
        return lambda: call(weight)
    turn = itertools.cycle(copies)
    return lambda: call(next(turn))


def kernel_label(op) -> str:
    """dispatch.select's label for a zqhero op's call ("cpu", "reference"); quantized_linear's says which INT8 GEMM."""
    if op is None:
        return "F.linear"
    name, args = op
    label = dispatch.select(name, *args)[0]
    if name == "quantized_linear":
        from zqhero_fx.kernels import int8_cpu

        gemm = "zqhero VNNI GEMM" if int8_cpu.gemm_path() == "zqhero" else "oneDNN _int_mm + epilogue"
        return f"cpu: {gemm}" if label == "cpu" else "reference: torch._int_mm + epilogue"
    return label


# ---------------------------------------------------------------- timing
def time_interleaved(fns: dict, rounds: int, min_sample_s: float) -> tuple[dict, dict]:
    """(median, min) seconds per call of each fn, one sample of each per round. On a shared machine the min is the
    cleaner number (other tenants can only push it up); both are reported."""
    inner = {}
    for name, fn in fns.items():  # warm up (builds, caches), and size each sample to min_sample_s
        fn()
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return ({name: statistics.median(s) for name, s in samples.items()}, {name: min(s) for name, s in samples.items()})


def run_shape(m: int, k: int, n: int, group_size: int, rounds: int, min_sample_s: float,
              rotate_bytes: int = 0) -> list[dict]:
    rows = operands(m, k, n, group_size)
    with dispatch.use_kernels("auto"):
        labels = {name: kernel_label(op) for name, (_, _, op) in rows.items()}
        calls = {name: rotating(call, weight, rotate_bytes) for name, (call, weight, _) in rows.items()}
        seconds, fastest = time_interleaved(calls, rounds, min_sample_s)
    records = []
    for name in IMPLS:
        t = seconds[name]
        records.append({"K": k, "N": n, "M": m, "impl": name, "kernel": labels[name], "ms": t * 1e3,
                        "min_ms": fastest[name] * 1e3, "gops": 2.0 * m * n * k / t / 1e9,
                        "weight_bytes": weight_bytes(rows[name][1]), "vs_w8a8": seconds["W8A8"] / t,
                        "vs_w8a8_min": fastest["W8A8"] / fastest[name]})
    return records


# ---------------------------------------------------------------- report
def print_report(info: dict, records: list[dict], rounds: int, group_size: int, rotate_mb: float) -> None:
    isa = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in info["isa"].items())
    load = [info.get("load_average"), info.get("load_average_end")]
    load_text = "; load average {:.2f} at start, {:.2f} at end".format(load[0][0], load[1][0]) if all(load) else ""
    weights_text = (f"rotated through {rotate_mb:g} MB of copies per row (each call reads a weight evicted from the "
                    "caches it fits in, as a model's layers do)" if rotate_mb else
                    "hot (the same weight every call, in cache where it fits)")
    print(f"## Low-bit GEMMs on the CPU\n\nHost: {info['cpu']}; {isa}; {info['threads']} threads; "
          f"torch {info['torch']}; {info['date']}; commit {info['commit']}{load_text}\n")
    print(f"ms per call (epilogue included), median (and min) of {rounds} interleaved rounds; A8W4 and W4A8 groups of "
          f"{group_size} features; weights {weights_text}; vs W8A8 = W8A8 time / row time\n")
    print("| K x N | M | impl | kernel | ms (min) | GOPS | weight MB | vs W8A8 (min) |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['K']}x{r['N']} | {r['M']} | {r['impl']} | {r['kernel']} | {r['ms']:.4f} ({r['min_ms']:.4f}) | "
              f"{r['gops']:.1f} | {r['weight_bytes'] / 1e6:.3f} | {r['vs_w8a8']:.2f}x ({r['vs_w8a8_min']:.2f}x) |")
    print("\n### A8W4 / W8A8: speed of A8W4 relative to the INT8 GEMM (> 1: A8W4 faster), median (min)\n")
    shapes = sorted({(r["K"], r["N"]) for r in records}, key=lambda s: (s[0] * s[1], s))
    ms = sorted({r["M"] for r in records})
    print("| K x N | " + " | ".join(f"M={m}" for m in ms) + " |")
    print("|---|" + "---:|" * len(ms))
    by_key = {(r["K"], r["N"], r["M"], r["impl"]): r for r in records}
    for k, n in shapes:
        cells = []
        for m in ms:
            a8w4 = by_key.get((k, n, m, "A8W4"))
            cells.append(f"{a8w4['vs_w8a8']:.2f}x ({a8w4['vs_w8a8_min']:.2f}x)" if a8w4 else "-")
        print(f"| {k}x{n} | " + " | ".join(cells) + " |")


def parse_shape(text: str) -> tuple[int, int]:
    k, _, n = text.lower().partition("x")
    return int(k), int(n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="weight shapes KxN (default: SmolLM2-135M's and 4096x4096)")
    parser.add_argument("--ms", nargs="+", type=int, default=None, help="rows of x (default: 1 4 8 128 512)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="features per group of A8W4 and W4A8 (64 divides every default K; DGQ's 128 does not "
                             "divide 576)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (samples per row)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rotate-mb", type=float, default=0.0,
                        help="rotate each row through this many MB of weight copies (0: the same weight every call). "
                             "Past the cache sizes, a call reads its weight from memory, as in a model's decode step")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run")
    parser.add_argument("--out", default="bench_lowbit_cpu.json", help="JSON results path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    ms = args.ms or (QUICK_ROWS if args.quick else ROWS)
    rounds, min_sample_s = (2, 0.0) if args.quick else (args.rounds, MIN_SAMPLE_S)
    for k, _ in shapes:
        if k % args.group_size:
            parser.error(f"--group-size {args.group_size} does not divide K={k}")

    info = host_info()
    records = []
    for k, n in shapes:
        for m in ms:
            records.extend(run_shape(m, k, n, args.group_size, rounds, min_sample_s, int(args.rotate_mb * 1e6)))
            print(f"done {k}x{n} M={m}", file=sys.stderr, flush=True)
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_report(info, records, rounds, args.group_size, args.rotate_mb)
    Path(args.out).write_text(json.dumps({"host": info, "rounds": rounds, "group_size": args.group_size,
                                          "rotate_mb": args.rotate_mb, "records": records}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
