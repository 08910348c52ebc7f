"""End-to-end CPU latency on BERT-base (bert-base-uncased configuration, random weights): FP32, BF16, torch.ao and
torchao INT8, and zqhero M1/M2/M3 (through convert, and through the torch.compile backend), in one process.

Every configuration is built and warmed up first; then repetitions are interleaved (rep 1 of every config, rep 2 of
every config, ...) so that machine noise hits all of them alike. Reports median and spread (min-max) per batch size,
ratios against FP32 eager and against torch.ao dynamic INT8, the time `convert` itself takes, and compares against the
last committed JSON (docs/benchmarks/bench_e2e_cpu.json): a config more than --regression slower is flagged.

    python benchmarks/bench_e2e.py                   # batch 1, 8, 32 x sequence 128
    python benchmarks/bench_e2e.py --batches 8 --reps 5 --only fp32_eager,ao_dynamic_int8,zqhero_M3
    zqhero bench                                     # the same
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

BASELINE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "bench_e2e_cpu.json"
SEQ = 128


def _batch(batch, seq, seed=0, vocab=30522):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def build_configs(model, calibration, only):
    """name -> callable(batch dict) -> tensor. Built lazily so --only skips what it does not need."""
    import zqhero_fx

    def want(name):
        return not only or name in only

    configs, convert_seconds = {}, {}
    if want("fp32_eager"):
        configs["fp32_eager"] = lambda b: model(**b).last_hidden_state
    if want("fp32_compile"):
        compiled = torch.compile(model, dynamic=True)
        configs["fp32_compile"] = lambda b: compiled(**b).last_hidden_state
    if want("bf16_eager"):
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        configs["bf16_eager"] = lambda b: bf16(**b).last_hidden_state
    if want("ao_dynamic_int8"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        configs["ao_dynamic_int8"] = lambda b: dyn(**b).last_hidden_state
    if want("torchao_int8_compile"):
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            tao = copy.deepcopy(model)
            quantize_(tao, Int8DynamicActivationInt8WeightConfig())
            tao_c = torch.compile(tao, dynamic=True)
            configs["torchao_int8_compile"] = lambda b: tao_c(**b).last_hidden_state
        except Exception as error:  # torchao missing or incompatible: say so, keep going
            print(f"skipping torchao_int8_compile: {type(error).__name__}: {error}", file=sys.stderr)
    modes = [m for m in ("M1", "M2", "M3") if want(f"zqhero_{m}") or want(f"zqhero_{m}_backend")]
    if modes:
        start = time.perf_counter()
        traced = zqhero_fx.trace(model, _batch(2, 16))
        capture = time.perf_counter() - start
    for mode in modes:
        if want(f"zqhero_{mode}"):
            start = time.perf_counter()
            converted = zqhero_fx.convert(traced, mode, calibration=calibration)
            seconds = time.perf_counter() - start
            timings = converted.meta["zqhero"]["timings"]
            convert_seconds[mode] = {"capture": round(capture, 2), "convert": round(seconds, 2),
                                     "calibrate": round(timings.get("calibrate", 0.0), 2),
                                     "passes": round(seconds - timings.get("calibrate", 0.0), 2)}
            fast = zqhero_fx.compile(converted)
            configs[f"zqhero_{mode}"] = lambda b, f=fast: f(**b).last_hidden_state
        if want(f"zqhero_{mode}_backend"):
            try:
                backend = zqhero_fx.backend(mode=mode, calibration=calibration)
                # The backend marks batch and sequence dynamic itself; dynamic=True here would make every size
                # symbolic (head counts included), which Inductor's CPU codegen mishandles for these graphs.
                via_backend = torch.compile(copy.deepcopy(model), backend=backend)
                configs[f"zqhero_{mode}_backend"] = lambda b, f=via_backend: f(**b).last_hidden_state
            except Exception as error:
                print(f"skipping zqhero_{mode}_backend: {type(error).__name__}: {error}", file=sys.stderr)
    return configs, convert_seconds


def measure(configs, batches, reps, warmup):
    samples = {(name, b): [] for name in configs for b in batches}
    inputs = {b: _batch(b, SEQ, seed=b) for b in batches}
    with torch.no_grad():
        for b in batches:
            for name, fn in list(configs.items()):
                try:
                    for _ in range(warmup):
                        fn(inputs[b])
                except Exception as error:  # one broken configuration must not lose the whole run
                    print(f"dropping {name}: {type(error).__name__}: {str(error)[:300]}", file=sys.stderr)
                    del configs[name]
                    for key in [k for k in samples if k[0] == name]:
                        del samples[key]
        for _ in range(reps):
            for b in batches:
                for name, fn in configs.items():
                    start = time.perf_counter()
                    fn(inputs[b])
                    samples[(name, b)].append(time.perf_counter() - start)
    return samples


def summarise(samples, batches):
    rows = []
    for (name, b), times in samples.items():
        rows.append({"config": name, "batch": b, "seq": SEQ, "median_ms": 1000 * statistics.median(times),
                     "min_ms": 1000 * min(times), "max_ms": 1000 * max(times), "reps": len(times)})
    by = {(r["config"], r["batch"]): r for r in rows}
    for r in rows:
        for ref, key in (("fp32_eager", "vs_fp32_eager"), ("ao_dynamic_int8", "vs_ao_dynamic_int8")):
            base = by.get((ref, r["batch"]))
            r[key] = r["median_ms"] / base["median_ms"] if base else None
    return rows


def compare_with_baseline(rows, baseline_path: Path, tolerance: float):
    if not baseline_path.exists():
        return ["no committed baseline to compare against"]
    old = {(r["config"], r["batch"]): r for r in json.loads(baseline_path.read_text()).get("rows", [])}
    notes = []
    for r in rows:
        prev = old.get((r["config"], r["batch"]))
        if prev and r["median_ms"] > prev["median_ms"] * (1 + tolerance):
            notes.append(f"REGRESSION {r['config']} batch {r['batch']}: {r['median_ms']:.0f} ms, was "
                         f"{prev['median_ms']:.0f} ms ({r['median_ms'] / prev['median_ms']:.2f}x)")
        elif prev and r["median_ms"] < prev["median_ms"] * (1 - tolerance):
            notes.append(f"faster {r['config']} batch {r['batch']}: {r['median_ms']:.0f} ms, was "
                         f"{prev['median_ms']:.0f} ms")
    return notes or [f"no change beyond {tolerance:.0%} against {baseline_path.name}"]


def markdown(rows, convert_seconds, meta) -> str:
    lines = [f"BERT-base (random weights), sequence {SEQ}, {meta['cpu']}, {meta['threads']} threads, torch "
             f"{meta['torch']}, commit {meta['commit']}, {meta['date']}", "",
             "| config | batch | median ms | min-max ms | vs FP32 eager | vs torch.ao dynamic INT8 |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["batch"], r["median_ms"])):
        fmt = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
        lines.append(f"| {r['config']} | {r['batch']} | {r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} | "
                     f"{fmt(r['vs_fp32_eager'])} | {fmt(r['vs_ao_dynamic_int8'])} |")
    if convert_seconds:
        lines += ["", "| convert | capture s | calibration s | passes s | total convert s |", "|---|---|---|---|---|"]
        for mode, t in convert_seconds.items():
            lines.append(f"| {mode} | {t['capture']} | {t['calibrate']} | {t['passes']} | {t['convert']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (sequence is 128)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per config and batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated config names to run")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--calibration-batch-size", type=int, default=2)
    parser.add_argument("--out", default="bench_e2e_cpu.json", help="JSON results path")
    parser.add_argument("--baseline", default=str(BASELINE), help="committed JSON to compare against")
    parser.add_argument("--regression", type=float, default=0.10, help="relative slow-down flagged as regression")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (12 = BERT-base)")
    args = parser.parse_args(argv)

    from transformers import BertConfig, BertModel

    import zqhero_fx  # noqa: F401

    # Every compiled configuration compiles the same BertModel.forward code object; past Dynamo's default limit of
    # 8 recompiles the later ones would silently run eagerly and be measured as such.
    torch._dynamo.config.recompile_limit = 64

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=args.layers)).eval()
    calibration = [_batch(args.calibration_batch_size, SEQ, seed=1000 + i) for i in range(args.calibration_batches)]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    batches = [int(b) for b in args.batches.split(",")]
    print(f"building configs ({_cpu_model()}, {torch.get_num_threads()} threads)...", file=sys.stderr)
    configs, convert_seconds = build_configs(model, calibration, only)
    print(f"measuring {len(configs)} configs x batches {batches} x {args.reps} reps...", file=sys.stderr)
    rows = summarise(measure(configs, batches, args.reps, args.warmup), batches)
    meta = {"date": datetime.date.today().isoformat(), "cpu": _cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": _commit(), "layers": args.layers, "seq": SEQ,
            "calibration": f"{args.calibration_batches} x {args.calibration_batch_size} x {SEQ}"}
    table = markdown(rows, convert_seconds, meta)
    print(table)
    notes = compare_with_baseline(rows, Path(args.baseline), args.regression)
    print("\n" + "\n".join(notes))
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "convert_seconds": convert_seconds,
                                          "comparison": notes}, indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
