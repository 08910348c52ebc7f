"""`zqhero study`: the related papers' formats beside HERO's INT8 and FP8 modes, on MiniLM (encoder) and SmolLM2-135M
(decoder LLM), with the per-layer error that says *where* one format beats another.

Two parts per model:

1. **End to end**: every mode through the project's own jobs (`zqhero eval`: MiniLM's Lee-similarity and polarity
   accuracy; SmolLM2's perplexity, KL divergence and top-1 agreement to FP32), with model bytes, bits per GEMM weight
   (measured from the tensors the converted model's GEMMs read) and latency on this machine.
2. **Per layer**: every linear layer of the float model, fed real text captured by forward hooks, quantized alone
   with each format recipe (the formats' PyTorch references, the same math as the kernels): the SQNR of that op's
   output, and of its input activation alone in INT8 and in FP8 (per-token scales, as the modes quantize GEMM
   inputs). Beside them each layer's activation outlier measures (excess kurtosis of the input values; largest over
   median per-channel range), so the Qualcomm paper's claim — FP8 helps only where activations have outliers — is
   tested on these models: the report gives the fraction of layers where FP8 wins and the rank correlation of FP8's
   advantage with the outlier measures.

Writes study.json, study.md and two plots (per-layer SQNR by recipe; FP8's advantage against kurtosis).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from zqhero_fx.errors import ConfigError
from zqhero_fx.formats import FP8_E4M3, FP8_E5M2, INT8, Format
from zqhero_fx.weight_quant import WeightScheme, quantize_weight

MODELS = ("minilm", "smollm2")
# Every format and ablation of the study, as mode names (zqhero_fx.modes.resolve_mode).
DECODER_MODES = (
    "M1", "M1-fp8", "M2", "M2-fp8", "M3", "M3-fp8",
    "W4A8", "W4A8+lorc_rank=0", "W4A8+group_scales=power_of_two", "W4A8-int4",
    "A8W4", "A8W4+weight_search=none", "A8W4+smoothing=none", "A8W4+weight_search=none+smoothing=none",
    "W6A16",
)
# The encoder is post-LN (BERT): no norm feeds only GEMMs, so smoothing never applies and its ablation is omitted.
ENCODER_MODES = ("M1", "M1-fp8", "M2", "M2-fp8", "M3", "M3-fp8", "W4A8", "W4A8+lorc_rank=0", "W4A8-int4", "A8W4",
                 "A8W4+weight_search=none", "W6A16")
LAYER_ROWS = 512  # captured input rows per linear layer (evaluation text; the same count of calibration rows)
GROUP_SIZE = 64


@dataclass(frozen=True)
class Recipe:
    """One way to quantize a linear layer on its own: an activation format (per token; None: float) and a weight
    quantizer (float weight, calibration rows -> dequantized weight)."""

    name: str
    activation: Format | None
    weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    description: str


def _per_channel(fmt: Format):
    def quantize(w, _calibration):
        q, scale = fmt.quantize_per_channel(w)
        return fmt.dequantize(q, scale[:, None])
    return quantize


def _packed(scheme: WeightScheme):
    def quantize(w, calibration):
        return quantize_weight(w, scheme, calibration).dequantize()
    return quantize


RECIPES = (
    Recipe("int8", INT8, _per_channel(INT8), "W8A8 INT8 (per-token x per-channel)"),
    Recipe("fp8_e4m3", FP8_E4M3, _per_channel(FP8_E4M3), "W8A8 FP8 E4M3"),
    Recipe("fp8_e5m2", FP8_E5M2, _per_channel(FP8_E5M2), "W8A8 FP8 E5M2"),
    Recipe("w4a8", FP8_E4M3, _packed(WeightScheme("fp4_e2m1", GROUP_SIZE, "power_of_two_ratio", lorc_rank=8)),
           f"W4A8: FP8 E4M3 x FP4 E2M1 g{GROUP_SIZE}, power-of-two ratios, LoRC 8"),
    Recipe("a8w4", INT8, _packed(WeightScheme("int4", GROUP_SIZE, "integer", True, "grid")),
           f"A8W4 DGQ: INT8 x uint4 g{GROUP_SIZE}, integer group scales, grid search"),
    Recipe("w6a16", None, _packed(WeightScheme("fp6_e3m2")), "FP6 E3M2 weight-only, per channel"),
)


def sqnr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    noise = (reference - estimate).double().square().sum()
    signal = reference.double().square().sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(signal / noise))


def fake_quantize_per_token(x: torch.Tensor, fmt: Format | None) -> torch.Tensor:
    if fmt is None:
        return x
    q, scale = fmt.quantize_per_token(x)
    return fmt.dequantize(q, scale)


def outlier_measures(x: torch.Tensor) -> dict:
    """Excess kurtosis of the values, and the largest per-channel range over the median one."""
    flat = x.double().flatten()
    centered = flat - flat.mean()
    variance = centered.square().mean()
    kurtosis = float(centered.pow(4).mean() / variance.square() - 3) if variance > 0 else 0.0
    channel_range = x.abs().amax(0)
    return {"kurtosis": kurtosis,
            "channel_ratio": float(channel_range.max() / channel_range.median().clamp_min(1e-12))}


def capture_linear_inputs(model: nn.Module, batches, max_rows: int = LAYER_ROWS) -> dict[str, torch.Tensor]:
    """Up to max_rows input rows of every nn.Linear, from running `batches` (kwargs dicts) through the model."""
    rows: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(_module, args, _output, name=name):
                kept = sum(r.shape[0] for r in rows.get(name, []))
                if kept < max_rows:
                    flat = args[0].detach().float().reshape(-1, args[0].shape[-1])
                    rows.setdefault(name, []).append(flat[: max_rows - kept].clone())
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


def layer_errors(model: nn.Module, eval_batches, calib_batches, recipes=RECIPES, progress=None) -> list[dict]:
    """Per linear layer: outlier measures of its input, the input's SQNR in INT8 and FP8 E4M3 (per token), and the
    output SQNR of the layer quantized alone with each recipe."""
    from tqdm.auto import tqdm

    inputs = capture_linear_inputs(model, eval_batches)
    calibration = capture_linear_inputs(model, calib_batches)
    modules = dict(model.named_modules())
    records = []
    for name in tqdm(list(inputs), desc="per-layer errors", unit="layer", leave=False, disable=progress is False):
        linear = modules[name]
        x = inputs[name]
        weight = linear.weight.detach().float()
        bias = linear.bias.detach().float() if linear.bias is not None else None
        reference = nn.functional.linear(x, weight, bias)
        record = {"layer": name, "shape": list(weight.shape), **outlier_measures(x),
                  "input_sqnr": {fmt.name: sqnr_db(x, fake_quantize_per_token(x, fmt)) for fmt in (INT8, FP8_E4M3)},
                  "sqnr": {}}
        for recipe in recipes:
            try:
                w_hat = recipe.weight(weight, calibration.get(name))
            except ConfigError as error:  # a group size that does not divide this layer's K: said, not skipped
                record["sqnr"][recipe.name] = None
                record.setdefault("notes", []).append(f"{recipe.name}: {error}")
                continue
            estimate = nn.functional.linear(fake_quantize_per_token(x, recipe.activation), w_hat, bias)
            record["sqnr"][recipe.name] = sqnr_db(reference, estimate)
        records.append(record)
    return records


def _rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    for position, index in enumerate(order):
        ranks[index] = float(position)
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = _rank(a), _rank(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / norm if norm else None


def summarize_layers(records: list[dict]) -> dict:
    """Where FP8 beats INT8: per-layer counts, medians, and the correlation of FP8's advantage with outliers."""
    advantage_op = [r["sqnr"]["fp8_e4m3"] - r["sqnr"]["int8"] for r in records]
    advantage_input = [r["input_sqnr"]["fp8_e4m3"] - r["input_sqnr"]["int8"] for r in records]
    kurtosis = [r["kurtosis"] for r in records]
    ratio = [r["channel_ratio"] for r in records]
    cut = sorted(kurtosis)[int(0.75 * (len(kurtosis) - 1))] if kurtosis else 0.0
    heavy = [a for a, k in zip(advantage_op, kurtosis) if k >= cut]
    light = [a for a, k in zip(advantage_op, kurtosis) if k < cut]
    medians = {}
    for name in records[0]["sqnr"] if records else []:
        values = [r["sqnr"][name] for r in records if r["sqnr"][name] is not None]
        medians[name] = statistics.median(values) if values else None
    return {
        "layers": len(records),
        "fp8_beats_int8_op": sum(a > 0 for a in advantage_op),
        "fp8_beats_int8_input": sum(a > 0 for a in advantage_input),
        "median_sqnr_db": medians,
        "median_fp8_advantage_db": statistics.median(advantage_op) if advantage_op else None,
        "spearman_advantage_vs_kurtosis": spearman(advantage_op, kurtosis),
        "spearman_advantage_vs_channel_ratio": spearman(advantage_op, ratio),
        "mean_advantage_top_quartile_kurtosis_db": statistics.fmean(heavy) if heavy else None,
        "mean_advantage_other_layers_db": statistics.fmean(light) if light else None,
    }


# ---------------------------------------------------------------- the models' inputs for the per-layer part
def _minilm_layers(progress):
    from zqhero_fx.eval.data import polarity
    from zqhero_fx.eval.run import EvalSettings, _load

    model, tokenizer, *_ = _load(EvalSettings(progress=progress), torch.device("cpu"))
    sentences = polarity(progress=progress)
    test, train = list(sentences["test"]["sentence"]), list(sentences["train"]["sentence"])

    def batches(texts):
        return [dict(tokenizer(texts[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, 64, 16)]
    return model, batches(test), batches(train)


def _smollm2_layers(progress):
    from zqhero_fx.eval.assets import load_smollm2
    from zqhero_fx.eval.data import lm_text, tokenize_text

    model, tokenizer = load_smollm2(progress=progress)
    lee = tokenize_text(lm_text("lee", progress=progress), tokenizer)
    wsj = tokenize_text(lm_text("wsj", progress=progress), tokenizer)
    # Lee's first tokens are the evaluation text; WSJ tokens past the decoder job's scored span calibrate.
    return model, [{"input_ids": lee[None, :LAYER_ROWS]}], [{"input_ids": wsj[None, 4096:4096 + LAYER_ROWS]}]


# ---------------------------------------------------------------- the study
@dataclass
class StudySettings:
    models: tuple[str, ...] = MODELS
    decoder_modes: tuple[str, ...] = DECODER_MODES
    encoder_modes: tuple[str, ...] = ENCODER_MODES
    max_tokens: int = 2048  # Lee tokens scored per decoder mode
    calib_windows: int = 4
    max_examples: int | None = 1000  # polarity / Lee examples per encoder mode
    timed: int = 2
    end_to_end: bool = True
    progress: bool | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ConfigError(f"unknown study model(s) {unknown}: choose from {', '.join(MODELS)}")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except Exception:
        return None


def _log(message: str) -> None:
    print(f"[zqhero study] {message}", file=sys.stderr, flush=True)


def run_study(settings: StudySettings) -> dict:
    from zqhero_fx.eval.lm import DecoderSettings, _machine, evaluate_decoder
    from zqhero_fx.eval.run import EvalSettings, evaluate

    start = time.perf_counter()
    report = {"tool": "zqhero study", "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "commit": _git_commit(), "machine": _machine(torch.device("cpu")), "models": {},
              "recipes": {r.name: r.description for r in RECIPES}}
    for name in settings.models:
        _log(f"{name}: per-layer errors ({', '.join(r.name for r in RECIPES)})")
        model, eval_batches, calib_batches = (_smollm2_layers if name == "smollm2" else _minilm_layers)(
            settings.progress)
        records = layer_errors(model, eval_batches, calib_batches, progress=settings.progress)
        entry = {"layers": records, "layer_summary": summarize_layers(records)}
        del model
        if settings.end_to_end:
            _log(f"{name}: end to end")
            if name == "smollm2":
                entry["end_to_end"] = evaluate_decoder(DecoderSettings(
                    modes=settings.decoder_modes, texts=("lee",), max_tokens=settings.max_tokens,
                    calib_windows=settings.calib_windows, new_tokens=16, timed=settings.timed,
                    progress=settings.progress), command="zqhero study")
            else:
                entry["end_to_end"] = evaluate(EvalSettings(
                    modes=settings.encoder_modes, max_examples=settings.max_examples,
                    timed_batches=max(settings.timed, 2), progress=settings.progress), command="zqhero study")
        report["models"][name] = entry
    report["runtime_s"] = time.perf_counter() - start
    return report


# ---------------------------------------------------------------- output
def _f(value, digits=2, suffix="") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else \
        f"{value:.{digits}f}{suffix}"


def _end_to_end_rows(name: str, e2e: dict) -> list[str]:
    rows = e2e["rows"]
    if name == "smollm2":
        lines = ["| mode | Lee ppl | Δ ppl vs FP32 | KL | top-1 | bits/weight (GEMMs) | model MB | prefill ms | "
                 "decode tok/s |", "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            m = row.get("metrics", {}).get("lee")
            if not m:
                lines.append(f"| {row['mode']} | failed: {row.get('error')} |||||||")
                continue
            lines.append(f"| {row['mode']} | {_f(m['ppl'])} | {_f(100 * m.get('rel_ppl', 0.0), 2, '%')} | "
                         f"{_f(m.get('kl'), 4)} | {_f(m.get('top1'), 3)} | {_f(row.get('gemm_bits') or 32.0, 2)} | "
                         f"{_f(row.get('size_mb'), 1)} | {_f(row.get('prefill_ms'), 0)} | "
                         f"{_f(row.get('decode_tok_s'), 1)} |")
        return lines
    metric_names = list(rows[0]["metrics"])
    lines = ["| mode | " + " | ".join(metric_names) + " | cos mean | bits/weight (GEMMs) | model MB | latency ms | "
             "speed-up |", "|---" * (len(metric_names) + 6) + "|"]
    for row in rows:
        values = " | ".join(_f(row["metrics"][k]["value"], 4) for k in metric_names)
        lines.append(f"| {row['mode']} | {values} | {_f(row.get('cos_mean'), 5)} | "
                     f"{_f(row.get('gemm_bits') or 32.0, 2)} | {_f(row.get('size_mb'), 1)} | "
                     f"{_f(row.get('latency_ms'), 1)} | {_f(row.get('speedup'), 2, 'x')} |")
    return lines


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"# zqhero study: formats side by side ({report['date'][:10]})", "",
             f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, "
             f"{machine.get('torch_threads')} threads); commit {report.get('commit')}; "
             f"runtime {report.get('runtime_s', 0):.0f} s.", "", "Per-layer recipes:", ""]
    lines += [f"- `{k}`: {v}" for k, v in report["recipes"].items()]
    for name, entry in report["models"].items():
        summary = entry["layer_summary"]
        lines += ["", f"## {name}", ""]
        if "end_to_end" in entry:
            lines += ["### End to end", ""] + _end_to_end_rows(name, entry["end_to_end"]) + [""]
        lines += ["### Where FP8 beats INT8 (per layer)", "",
                  f"- FP8 E4M3 W8A8 beats INT8 W8A8 on {summary['fp8_beats_int8_op']} of {summary['layers']} "
                  f"linear layers (output SQNR); on the input activation alone: {summary['fp8_beats_int8_input']} "
                  f"of {summary['layers']}.",
                  f"- Median FP8 advantage: {_f(summary['median_fp8_advantage_db'], 2, ' dB')}; in the quarter of "
                  f"layers with the most kurtotic inputs {_f(summary['mean_advantage_top_quartile_kurtosis_db'], 2, ' dB')}"
                  f" (mean) vs {_f(summary['mean_advantage_other_layers_db'], 2, ' dB')} elsewhere.",
                  f"- Rank correlation of FP8's advantage with input kurtosis: "
                  f"{_f(summary['spearman_advantage_vs_kurtosis'], 2)}; with the largest/median channel range: "
                  f"{_f(summary['spearman_advantage_vs_channel_ratio'], 2)}.",
                  "- Median output SQNR (dB): " + ", ".join(
                      f"{k} {_f(v, 1)}" for k, v in summary["median_sqnr_db"].items()), "",
                  "### Per layer", "",
                  "| layer | [N, K] | kurtosis | max/median channel | input SQNR int8 | input SQNR fp8 | "
                  + " | ".join(f"{r} SQNR" for r in report["recipes"]) + " |",
                  "|---" * (6 + len(report["recipes"])) + "|"]
        for r in entry["layers"]:
            lines.append(f"| {r['layer']} | {r['shape']} | {_f(r['kurtosis'], 1)} | {_f(r['channel_ratio'], 1)} | "
                         f"{_f(r['input_sqnr']['int8'], 1)} | {_f(r['input_sqnr']['fp8_e4m3'], 1)} | "
                         + " | ".join(_f(r["sqnr"].get(k), 1) for k in report["recipes"]) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = list(report["models"].items())
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.6 * len(models)), squeeze=False)
    for ax, (name, entry) in zip(axes[:, 0], models):
        for recipe in report["recipes"]:
            ax.plot([r["sqnr"].get(recipe) if r["sqnr"].get(recipe) is not None else float("nan")
                     for r in entry["layers"]], label=recipe, linewidth=1)
        ax.set_title(f"{name}: output SQNR of each linear layer quantized alone")
        ax.set_xlabel("linear layer (model order)")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    paths.append(out_dir / "per_layer_sqnr.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in models:
        ax.scatter([max(r["kurtosis"], 1e-2) for r in entry["layers"]],
                   [r["sqnr"]["fp8_e4m3"] - r["sqnr"]["int8"] for r in entry["layers"]], s=12, label=name)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("excess kurtosis of the layer's input (log)")
    ax.set_ylabel("FP8 E4M3 minus INT8 output SQNR (dB)")
    ax.set_title("Does FP8 win where activations have outliers?")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "fp8_advantage_vs_kurtosis.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_report(report: dict, out_dir: Path | str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "study.json", "markdown": out_dir / "study.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["markdown"].write_text(markdown(report))
    for path in plot(report, out_dir):
        paths[path.stem] = path
    return paths


__all__ = ["RECIPES", "StudySettings", "layer_errors", "summarize_layers", "run_study", "write_report", "markdown"]
