"""End-to-end CPU latency on the BERT-base configuration (bert-base-uncased's, random weights): FP32, BF16, torch.ao and
torchao INT8, and zqhero M1/M2/M3 through all three entry points, in one process:

  * zqhero_<mode>_eager:   the GraphModule `zqhero_fx.convert` returns, called as it is (what `zqhero eval` times);
  * zqhero_<mode>:         `zqhero_fx.compile(converted)` (Inductor around the zqhero ops);
  * zqhero_<mode>_backend: `torch.compile(model, backend=zqhero_fx.backend(mode=...))`.

Every configuration is built and warmed up first; then repetitions are interleaved (rep 1 of every config, rep 2 of
every config, ...) so that machine noise hits all of them alike. `int8_gemms_alone` is the model's INT8 GEMM shapes
(each linear layer at this batch, oneDNN's `torch._int_mm` on N-major weights) timed alone in the same loop: the
share of each zqhero mode's time that those GEMMs account for is the "GEMM share" column (HERO exists to make
everything else nearly free). Reports median and spread (min-max) per batch size, speed-ups (a baseline's median
latency divided by the config's: above 1 is faster) against FP32 eager and against torch.ao dynamic INT8, the time
`convert` itself takes, the host's CPU and INT8 path in the header, and compares against the last committed JSON
(docs/benchmarks/bench_e2e_cpu.json) when it comes from the same CPU and model depth: a config more than
--regression slower is flagged.

    python benchmarks/bench_e2e.py                   # batch 1, 8, 32 x sequence 128
    python benchmarks/bench_e2e.py --batches 8 --reps 5 --only fp32_eager,ao_dynamic_int8,zqhero_M3_eager
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
GEMMS_ALONE = "int8_gemms_alone"
BASELINES = (("fp32_eager", "speedup_vs_fp32_eager"), ("ao_dynamic_int8", "speedup_vs_ao_dynamic_int8"))


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


def int8_gemm_shapes(config, tokens: int, batch: int) -> list[tuple[int, int, int]]:
    """(M, N, K) of every linear layer of a BERT model at `tokens` rows (batch x sequence): per layer Q, K, V, the
    attention output, the two FFN GEMMs; then the pooler (one row per sequence)."""
    h, i = config.hidden_size, config.intermediate_size
    layer = [(tokens, h, h)] * 4 + [(tokens, i, h), (tokens, h, i)]
    return layer * config.num_hidden_layers + [(batch, h, h)]


def gemms_alone(config):
    """A callable that runs the model's INT8 GEMM shapes at the given batch back to back with torch._int_mm (oneDNN;
    weights N-major, its preferred layout), on random operands made once per batch size (during warm-up)."""
    operands: dict[int, list] = {}

    def run(batch):
        size = batch["input_ids"].shape[0]
        if size not in operands:
            g = torch.Generator().manual_seed(size)
            operands[size] = [(torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8),
                               torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).t().contiguous())
                              for m, n, k in int8_gemm_shapes(config, size * SEQ, size)]
        for a, b in operands[size]:
            torch._int_mm(a, b)

    return run


def build_configs(model, calibration, only):
    """name -> callable(batch dict) -> tensor. Built lazily so --only skips what it does not need."""
    import zqhero_fx

    def want(name):
        return not only or name in only

    configs, convert_seconds = {}, {}
    if want(GEMMS_ALONE):
        configs[GEMMS_ALONE] = gemms_alone(model.config)
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
    modes = [m for m in ("M1", "M2", "M3")
             if any(want(f"zqhero_{m}{suffix}") for suffix in ("", "_eager", "_backend"))]
    if modes:
        start = time.perf_counter()
        traced = zqhero_fx.trace(model, _batch(2, 16))
        capture = time.perf_counter() - start
    for mode in modes:
        if want(f"zqhero_{mode}") or want(f"zqhero_{mode}_eager"):
            start = time.perf_counter()
            converted = zqhero_fx.convert(traced, mode, calibration=calibration)
            seconds = time.perf_counter() - start
            timings = converted.meta["zqhero"]["timings"]
            convert_seconds[mode] = {"capture": round(capture, 2), "convert": round(seconds, 2),
                                     "calibrate": round(timings.get("calibrate", 0.0), 2),
                                     "passes": round(seconds - timings.get("calibrate", 0.0), 2)}
            if want(f"zqhero_{mode}"):
                fast = zqhero_fx.compile(converted)
                configs[f"zqhero_{mode}"] = lambda b, f=fast: f(**b).last_hidden_state
            if want(f"zqhero_{mode}_eager"):
                configs[f"zqhero_{mode}_eager"] = lambda b, f=converted: f(**b).last_hidden_state
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
    """One row per (config, batch): median / min / max ms, speed-ups (baseline median / config median: above 1 is
    faster) against FP32 eager and torch.ao dynamic INT8, and for zqhero configs the share of their median that the
    same INT8 GEMM shapes take alone."""
    rows = []
    for (name, b), times in samples.items():
        rows.append({"config": name, "batch": b, "seq": SEQ, "median_ms": 1000 * statistics.median(times),
                     "min_ms": 1000 * min(times), "max_ms": 1000 * max(times), "reps": len(times)})
    by = {(r["config"], r["batch"]): r for r in rows}
    for r in rows:
        for ref, key in BASELINES:
            base = by.get((ref, r["batch"]))
            r[key] = base["median_ms"] / r["median_ms"] if base else None
        gemms = by.get((GEMMS_ALONE, r["batch"]))
        r["gemm_share"] = gemms["median_ms"] / r["median_ms"] if gemms and r["config"].startswith("zqhero_") else None
    return rows


def compare_with_baseline(rows, baseline_path: Path, tolerance: float, meta: dict | None = None):
    """Notes on configs slower (or faster) than in the committed JSON by more than `tolerance`; only against a
    baseline measured on the same CPU model with the same model depth (other hosts differ by more than that)."""
    if not baseline_path.exists():
        return ["no committed baseline to compare against"]
    baseline = json.loads(baseline_path.read_text())
    old_meta = baseline.get("meta", {})
    if meta is not None:
        for key in ("cpu", "layers"):
            if key in old_meta and old_meta[key] != meta.get(key):
                return [f"not compared with {baseline_path.name}: it was measured with {key} {old_meta[key]!r}, "
                        f"this run has {meta.get(key)!r}"]
    old = {(r["config"], r["batch"]): r for r in baseline.get("rows", [])}
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


def model_label(layers: int) -> str:
    return "BERT-base configuration" if layers == 12 else f"BERT-base configuration cut to {layers} layers"


def markdown(rows, convert_seconds, meta) -> str:
    lines = [f"{model_label(meta.get('layers', 12))} (random weights), sequence {SEQ}; {meta['cpu']}, "
             f"{meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}",
             f"CPU INT8 features: {meta.get('isa', '-')}; zqhero CPU path: {meta.get('cpu_path', '-')}", "",
             "Speed-up = the baseline's median latency / the config's (above 1: faster than the baseline). GEMM share ="
             f" the same INT8 GEMM shapes alone ({GEMMS_ALONE}, oneDNN) / the config's median.", "",
             "| config | batch | median ms | min-max ms | speed-up vs FP32 eager | speed-up vs torch.ao dynamic INT8 "
             "| GEMM share |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v, unit="x": f"{v:.2f}{unit}" if v is not None else "-"  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["batch"], r["median_ms"])):
        share = f"{100 * r['gemm_share']:.0f}%" if r.get("gemm_share") is not None else "-"
        lines.append(f"| {r['config']} | {r['batch']} | {r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} | "
                     f"{fmt(r['speedup_vs_fp32_eager'])} | {fmt(r['speedup_vs_ao_dynamic_int8'])} | {share} |")
    if convert_seconds:
        lines += ["", "| convert | capture s | calibration s | passes s | total convert s |", "|---|---|---|---|---|"]
        for mode, t in convert_seconds.items():
            lines.append(f"| {mode} | {t['capture']} | {t['calibrate']} | {t['passes']} | {t['convert']} |")
    return "\n".join(lines)


def host_isa() -> str:
    """The INT8-relevant instruction sets /proc/cpuinfo lists (AMX-INT8, AVX-512 VNNI, AVX-VNNI, AVX2)."""
    from zqhero_fx.kernels import vnni_cpu

    features = vnni_cpu.cpu_features()
    names = {"amx_int8": "AMX-INT8", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx2": "AVX2"}
    present = [label for flag, label in names.items() if features.get(flag)]
    return ", ".join(present) or "none of AMX / AVX-512 VNNI / AVX2"


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
    parser.add_argument("--layers", type=int, default=12,
                        help="encoder layers (12 = BERT-base; fewer for a quick run, labelled as such and never "
                             "compared with a baseline of another depth)")
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
    print(f"building configs for the {model_label(args.layers)} ({_cpu_model()}, {torch.get_num_threads()} threads)"
          "...", file=sys.stderr)
    configs, convert_seconds = build_configs(model, calibration, only)
    print(f"measuring {len(configs)} configs x batches {batches} x {args.reps} reps...", file=sys.stderr)
    rows = summarise(measure(configs, batches, args.reps, args.warmup), batches)
    from zqhero_fx.kernels import int8_cpu

    meta = {"date": datetime.date.today().isoformat(), "cpu": _cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": _commit(), "layers": args.layers, "seq": SEQ,
            "isa": host_isa(), "cpu_path": int8_cpu.describe(),
            "calibration": f"{args.calibration_batches} x {args.calibration_batch_size} x {SEQ}"}
    table = markdown(rows, convert_seconds, meta)
    print(table)
    notes = compare_with_baseline(rows, Path(args.baseline), args.regression, meta)
    print("\n" + "\n".join(notes))
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "convert_seconds": convert_seconds,
                                          "comparison": notes}, indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
