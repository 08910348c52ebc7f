"""The evaluation loop behind ``zqhero eval``: one model, one data set, FP32 and every quantization mode side by side.

Two kinds of evaluation:

* the embedded default (``model=None``): all-MiniLM-L6-v2 from the offline asset cache, on
  (a) Lee 50-document similarity (Pearson / Spearman of the cosine of mean-pooled, L2-normalised embeddings against the
  human ratings, 1225 pairs) and (b) Pang & Lee sentence polarity (a logistic-regression head trained once on the FP32
  features of the 3000-sentence train split, accuracy on the fixed 1000-sentence test split; the same head judges every
  mode);
* a GLUE task (``task="sst2"`` ...) with any Hugging Face model id or local path, loaded with
  ``AutoModelForSequenceClassification``; predictions are the arg-max of the logits (the score itself for STS-B).

For every mode the model is captured once with :func:`zqhero_fx.trace`, converted with :func:`zqhero_fx.convert` on
calibration batches from the *training* split (bucketed by length so that they cover the evaluated sequence lengths),
and run on exactly the batches the FP32 model saw. Latency is timed at the end, round-robin over the modes on one fixed
batch, so that a change of background load hits every mode alike.

Everything a report needs is returned as a plain JSON-able dict (see :func:`evaluate`); :mod:`zqhero_fx.eval.report`
turns it into the table, JSON, markdown and PNG.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from zqhero_fx.errors import ConfigError, ZqheroError

__all__ = ["EvalSettings", "evaluate", "parse_modes", "parse_override", "model_size_mb", "gemm_weight_bits", "cpu_model",
           "build_calibration", "length_sorted_batches", "DEFAULT_MODEL", "DEFAULT_MODES"]

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded, offline)"
DEFAULT_MODES = ("M1", "M2", "M3")
BASELINE = "fp32"


# --------------------------------------------------------------------------- settings / argument parsing


@dataclass
class EvalSettings:
    """What ``zqhero eval`` does. ``model=None`` runs the embedded default (MiniLM on Lee + polarity)."""

    model: str | None = None
    task: str | None = None
    data_dir: str | None = None
    modes: tuple[str, ...] = DEFAULT_MODES
    overrides: dict[str, str] = field(default_factory=dict)
    batch_size: int = 64
    max_length: int | None = None  # default: 128 for sentences / GLUE, the model's maximum (256) for Lee documents
    max_examples: int | None = None
    calib_batches: int = 16
    calib_batch_size: int = 32
    timed_batches: int = 10
    warmup: int = 2
    device: str = "auto"
    seed: int = 0
    progress: bool | None = None  # None: tqdm bars only on a terminal

    def __post_init__(self):
        self.modes = tuple(parse_modes(self.modes) if isinstance(self.modes, str) else parse_modes(",".join(self.modes)))
        for name in ("batch_size", "calib_batches", "calib_batch_size", "timed_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.max_length is not None and self.max_length < 4:
            raise ConfigError(f"max_length must be at least 4, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 2:
            raise ConfigError(f"max_examples must be at least 2, got {self.max_examples}")
        if self.model is not None and self.task is None:
            raise ConfigError("a model other than the embedded default needs a task: pass --task (a GLUE task such as "
                              "sst2, mrpc, stsb) and, offline, --data-dir DIR with its train/dev files (the decoder "
                              "job, --model smollm2, is zqhero_fx.eval.lm.evaluate_decoder)")


def parse_modes(text: str, flag: str | None = None) -> list[str]:
    """'M1,m3' -> ['M1', 'M3']; 'fp32' (the baseline, always run) is accepted and dropped; unknown names raise.
    Any name zqhero_fx.modes.resolve_mode takes works ("W4A8-int4", "A8W4+weight_search=none"). `flag` is the
    command-line option the text came from, for the example in the error message."""
    from zqhero_fx.modes import MODES, resolve_mode

    out: list[str] = []
    for raw in str(text).split(","):
        name = raw.strip()
        if not name:
            continue
        if name.lower() == BASELINE:
            continue
        try:
            config = resolve_mode(name)
        except ConfigError as error:  # it names the mode and lists the known ones
            example = f", e.g. {flag} M1,M3" if flag else ""
            raise ConfigError(f"{error}; several modes are comma-separated{example}; {BASELINE} is the baseline "
                              "and always runs") from None
        if config.name not in out:
            out.append(config.name)
    if not out:
        raise ConfigError(f"no mode to evaluate in {text!r}: choose from {', '.join(MODES)}")
    return out


def parse_override(text: str) -> tuple[str, str]:
    """'encoder.layer.5.*=fp16' -> ('encoder.layer.5.*', 'fp16'); the precision is a float dtype or an 8-bit format."""
    from zqhero_fx.modes import FLOAT_PRECISIONS, resolve_overrides

    pattern, sep, precision = str(text).rpartition("=")
    pattern, precision = pattern.strip(), precision.strip().lower()
    if not sep or not pattern or not precision:
        raise ConfigError(f"bad override {text!r}: write GLOB=PRECISION, e.g. 'encoder.layer.5.*=fp16' "
                          f"(precision one of {', '.join(FLOAT_PRECISIONS)} or an 8-bit format such as int8, fp8)")
    try:
        (pattern, precision), = resolve_overrides({pattern: precision}).items()
    except ConfigError as error:
        raise ConfigError(f"bad override {text!r}: {error}") from None
    return pattern, precision


# --------------------------------------------------------------------------- small helpers


def _log(msg: str) -> None:
    print(f"[zqhero] {msg}", file=sys.stderr, flush=True)


def _bar(iterable, *, desc: str, total: int | None = None, progress: bool | None = None, unit: str = "batch"):
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False,
                disable=None if progress is None else not progress)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resolve_device(device: str) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_weight_bits(gm) -> dict:
    """Bits per weight of a converted model's quantized GEMMs, measured from the tensors the fused ops read: codes,
    per-channel and per-group scales, zero points, LoRC factors (not biases). {"bits_per_weight", "weights",
    "bytes"}; bits_per_weight is None when no GEMM is quantized."""
    import torch.fx as fx

    zq = torch.ops.zqhero
    # op -> (positions of its weight tensors, position of the tensor whose numel x the K multiplier counts weights)
    layout = {zq.quantized_linear.default: (2, 3), zq.quantized_gated_linear.default: (2, 3, 4, 5),
              zq.packed_linear.default: (2, 5, 6, 8, 9)}
    total_bytes = total_weights = 0
    if isinstance(gm, fx.GraphModule):
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in layout:
                continue
            parts = []
            for i in layout[node.target]:
                arg = node.args[i]
                parts += arg if isinstance(arg, (list, tuple)) else [arg]
            tensors = [_attr(gm, a.target) for a in parts
                       if isinstance(a, fx.Node) and a.op == "get_attr"]
            total_bytes += sum(t.numel() * t.element_size() for t in tensors)
            if node.target is zq.packed_linear.default:
                codes = _attr(gm, node.args[2][0].target)
                total_weights += codes.shape[0] * codes.shape[1] * 2
            else:
                total_weights += sum(_attr(gm, node.args[i].target).numel() for i in layout[node.target][::2])
    return {"bits_per_weight": 8 * total_bytes / total_weights if total_weights else None,
            "weights": total_weights, "bytes": total_bytes}


def _attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def model_size_mb(module: torch.nn.Module) -> float:
    """MB (1e6 bytes) of the tensors a model holds: weights, scales, tables, buffers, each storage counted once.

    For a GraphModule only the tensors its graph reads (get_attr and call_module nodes) count, so weights a pass replaced are not
    counted even if they were left behind as attributes."""
    import torch.fx as fx

    tensors: list[torch.Tensor] = []
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                obj: Any = module
                try:
                    for part in str(node.target).split("."):
                        obj = getattr(obj, part)
                except AttributeError:
                    continue
                if isinstance(obj, torch.Tensor):
                    tensors.append(obj)
                elif isinstance(obj, torch.nn.Module):
                    tensors += list(obj.parameters()) + list(obj.buffers())
    else:
        tensors = list(module.parameters()) + list(module.buffers())
    seen: set = set()
    total = 0
    for t in tensors:
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes(), t.device.type)
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total / 1e6


def _doc_bootstrap(emb: np.ndarray, human: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, list]:
    """95% percentile CIs of the Lee Pearson / Spearman, resampling *documents* (pairs sharing a document are not
    independent, so a pair-level interval would be too narrow)."""
    from scipy.stats import rankdata

    e = emb.astype(np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sims = e @ e.T
    n = human.shape[0]
    rng = np.random.default_rng(seed)
    pear, spear = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        ix = rng.integers(0, n, n)
        iu = np.triu_indices(n, 1)
        a, c = ix[iu[0]], ix[iu[1]]
        keep = a != c
        x, y = sims[a[keep], c[keep]], human[a[keep], c[keep]]
        pear[b] = np.corrcoef(x, y)[0, 1]
        spear[b] = np.corrcoef(rankdata(x), rankdata(y))[0, 1]
    out = {}
    for name, stats in (("pearson", pear), ("spearman", spear)):
        lo, hi = np.nanquantile(stats, [0.025, 0.975])
        out[name] = [float(lo), float(hi)]
    return out


# --------------------------------------------------------------------------- tokenization and batching


def _tokenize(tokenizer, columns: Sequence[Sequence[str]], max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"]))]


def _pad(rows: list[dict[str, list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        data = [r[key] + [fill] * (width - len(r[key])) for r in rows]
        out[key] = torch.tensor(data, dtype=torch.long, device=device)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                              for r in rows], dtype=torch.long, device=device)
    return out


@dataclass
class Batches:
    """A data set tokenized, sorted by length and cut into padded batches; ``index[i]`` are the original rows."""

    name: str
    batches: list[dict[str, torch.Tensor]]
    index: list[np.ndarray]
    n: int
    max_len: int

    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(b["input_ids"].shape) for b in self.batches]


def length_sorted_batches(name: str, tokenizer, columns, *, batch_size: int, max_length: int,
                          device: torch.device) -> Batches:
    rows = _tokenize(tokenizer, columns, max_length)
    lengths = np.array([len(r["input_ids"]) for r in rows])
    order = np.argsort(lengths, kind="stable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, index = [], []
    for start in range(0, len(order), batch_size):
        ix = order[start:start + batch_size]
        batches.append(_pad([rows[i] for i in ix], pad_id, device))
        index.append(ix)
    return Batches(name, batches, index, len(rows), int(lengths.max()) if len(rows) else 0)


def build_calibration(tokenizer, train_columns, *, n_batches: int, batch_size: int, max_length: int,
                      cover_length: int, seed: int, device: torch.device, pool: int = 4096) -> tuple[list, dict]:
    """Calibration batches from the training split, bucketed by length, covering sequence lengths up to
    ``cover_length`` (the longest evaluated sequence).

    The train rows (a random subset of at most ``pool``) are sorted by token length and cut into equal-count buckets;
    each bucket gives one batch of ``batch_size`` random rows (the last one: the longest rows). When the training
    split is shorter than ``cover_length`` (e.g. polarity sentences calibrating for 256-token Lee documents), a quarter
    of the batches are made of training sentences concatenated up to ``cover_length`` tokens.
    Returns (batches, a description for the report).
    """
    rng = np.random.default_rng(seed)
    n_rows = len(train_columns[0])
    if n_rows == 0:
        raise ConfigError("the calibration split is empty")
    pick = np.sort(rng.choice(n_rows, min(pool, n_rows), replace=False))
    cols = [[c[i] for i in pick] for c in train_columns]
    rows = _tokenize(tokenizer, cols, max_length)
    lengths = np.array([len(r["input_ids"]) for r in rows])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_long = max(1, n_batches // 4) if cover_length > lengths.max() and n_batches > 1 else 0
    n_plain = max(1, min(n_batches - n_long, len(rows) // 2))
    order = np.argsort(lengths, kind="stable")
    batches = []
    for b, chunk in enumerate(np.array_split(order, n_plain)):
        if len(chunk) == 0:
            continue
        size = min(batch_size, len(chunk))
        ix = chunk[-size:] if b == n_plain - 1 else np.sort(rng.choice(chunk, size, replace=False))
        batches.append(_pad([rows[i] for i in ix], pad_id, device))
    for _ in range(n_long):
        packed_cols: list[list[str]] = [[] for _ in cols]
        for _row in range(batch_size):
            parts: list[list[str]] = [[] for _ in cols]
            while True:
                j = int(rng.integers(0, len(rows)))
                for c, col in enumerate(cols):
                    parts[c].append(col[j])
                if sum(len(r) for r in parts[0]) > 8 * cover_length or \
                        len(tokenizer(*[" ".join(p) for p in parts])["input_ids"]) >= cover_length:
                    break
            for c in range(len(cols)):
                packed_cols[c].append(" ".join(parts[c]))
        packed = _tokenize(tokenizer, packed_cols, cover_length)
        batches.append(_pad(packed, pad_id, device))
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    info = {"batches": len(batches), "shapes": [list(s) for s in shapes],
            "sequences": int(sum(s[0] for s in shapes)), "max_seq": int(max(s[1] for s in shapes)),
            "packed_long_batches": n_long}
    return batches, info


# --------------------------------------------------------------------------- running a model


def _last_hidden(out) -> torch.Tensor:
    h = getattr(out, "last_hidden_state", None)
    if h is None and isinstance(out, dict):
        h = out.get("last_hidden_state")
    if h is None:
        hs = getattr(out, "hidden_states", None) if not isinstance(out, dict) else out.get("hidden_states")
        if hs:
            h = hs[-1]
    if h is None:
        h = out[0]
    return h


def _logits(out) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out.logits


def _run(fn: Callable, data: Batches, *, kind: str, desc: str, progress) -> dict[str, np.ndarray]:
    """Run ``fn`` on every batch; return per-row outputs in the original row order.

    kind "embed": {"emb": mean-pooled, L2-normalised last hidden state};
    kind "classify": {"logits": ..., "emb": the same pooled embedding of the last hidden state}."""
    from zqhero_fx.eval.head import mean_pool

    parts: dict[str, list] = {"emb": [], "logits": []}
    with torch.no_grad():
        for batch in _bar(data.batches, desc=desc, progress=progress):
            out = fn(**batch)
            parts["emb"].append(mean_pool(_last_hidden(out).float(), batch["attention_mask"]).cpu().numpy())
            if kind == "classify":
                parts["logits"].append(_logits(out).float().cpu().numpy())
    order = np.concatenate(data.index)
    result = {}
    for key, chunks in parts.items():
        if not chunks:
            continue
        stacked = np.concatenate(chunks)
        restored = np.empty_like(stacked)
        restored[order] = stacked
        result[key] = restored
    return result


def _time_round_robin(fns: dict[str, Callable], batch: dict, *, reps: int, warmup: int, device: torch.device,
                      progress) -> dict[str, list[float]]:
    """Median-ready per-batch latencies (seconds). Modes are interleaved: rep r runs every mode once."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for name, fn in fns.items():
            for _ in range(warmup):
                fn(**batch)
        _sync(device)
        for _ in _bar(range(reps), desc="timing", progress=progress, unit="round"):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn(**batch)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- metrics


def _acc_entry(preds: np.ndarray, labels: np.ndarray, base_preds: np.ndarray | None) -> dict:
    from zqhero_fx.eval.metrics import accuracy, accuracy_stderr, paired_bootstrap_ci

    acc = accuracy(preds, labels)
    entry = {"value": acc, "stderr": accuracy_stderr(acc, len(labels))}
    if base_preds is not None:
        delta, lo, hi = paired_bootstrap_ci(accuracy, base_preds, preds, labels)
        entry.update(delta=delta, delta_ci=[lo, hi])
    return entry


def _boot_entry(metric: Callable, preds, labels, base_preds) -> dict:
    from zqhero_fx.eval.metrics import bootstrap_ci, paired_bootstrap_ci

    value, lo, hi = bootstrap_ci(metric, preds, labels)
    entry = {"value": value, "ci": [lo, hi]}
    if base_preds is not None:
        delta, dlo, dhi = paired_bootstrap_ci(metric, base_preds, preds, labels)
        entry.update(delta=delta, delta_ci=[dlo, dhi])
    return entry


# --------------------------------------------------------------------------- the two evaluations


def hub_not_needed(model: str | None, task: str | None, data_dir) -> bool:
    """True when neither the model (embedded default or a local directory) nor the data (embedded default or a local
    GLUE directory) comes from the Hugging Face Hub."""
    from zqhero_fx.eval.lm import is_decoder_model

    local_model = model is None or is_decoder_model(model) or os.path.isdir(os.path.expanduser(str(model)))
    local_data = task is None or data_dir is not None
    return local_model and local_data


def _hf_offline_for(settings: "EvalSettings") -> None:
    if hub_not_needed(settings.model, settings.task, settings.data_dir):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _trace(model, example: dict):
    import zqhero_fx

    # export specialises size-1 dims and may unify equal ones: use 2 rows (seq is > 2 for any tokenized text).
    rows = 2 if example["input_ids"].shape[1] != 2 else 3
    small = {k: v[:rows].clone() for k, v in example.items()}
    if small["input_ids"].shape[0] < 2:
        small = {k: torch.cat([v, v]) for k, v in small.items()}
    return zqhero_fx.trace(model, small)


class _Suite:
    """What differs between the default (MiniLM embeddings) and a GLUE classification evaluation."""

    kind: str  # "embed" | "classify"
    sets: list[Batches]
    calibration: list
    calibration_info: dict
    metric_specs: list[dict]

    def score(self, outputs: dict[str, dict], base: dict | None) -> tuple[dict, dict]:
        raise NotImplementedError


class _DefaultSuite(_Suite):
    kind = "embed"

    def __init__(self, tokenizer, settings: EvalSettings, device: torch.device, max_model_len: int):
        from zqhero_fx.eval.data import lee_similarity, polarity

        _log("loading the Lee similarity and Pang & Lee polarity data (cached after the first run)")
        docs, self.human = lee_similarity(progress=settings.progress)
        pol = polarity(progress=settings.progress)
        sent_len = min(settings.max_length or 128, max_model_len)
        doc_len = min(settings.max_length or max_model_len, max_model_len)
        test, train = pol["test"], pol["train"]
        if settings.max_examples is not None:
            test = test.select(range(min(settings.max_examples, test.num_rows)))
        self.test_labels = np.asarray(test["label"])
        self.train_labels = np.asarray(train["label"])
        bs = settings.batch_size
        self.polarity = length_sorted_batches("polarity test", tokenizer, [test["sentence"]], batch_size=bs,
                                              max_length=sent_len, device=device)
        self.lee = length_sorted_batches("Lee documents", tokenizer, [docs], batch_size=bs, max_length=doc_len,
                                         device=device)
        self.train = length_sorted_batches("polarity train", tokenizer, [train["sentence"]], batch_size=bs,
                                           max_length=sent_len, device=device)
        self.sets = [self.polarity, self.lee]
        cover = max(self.polarity.max_len, self.lee.max_len)
        self.calibration, self.calibration_info = build_calibration(
            tokenizer, [train["sentence"]], n_batches=settings.calib_batches, batch_size=settings.calib_batch_size,
            max_length=max(sent_len, doc_len), cover_length=cover, seed=settings.seed, device=device)
        self.calibration_info["split"] = "polarity train (3000 sentences; never the test split)"
        self.metric_specs = [
            {"key": "polarity_acc", "label": "polarity acc", "percent": True, "task": "polarity",
             "n": int(self.polarity.n), "main": True},
            {"key": "lee_pearson", "label": "Lee Pearson", "percent": False, "task": "lee", "n": 1225},
            {"key": "lee_spearman", "label": "Lee Spearman", "percent": False, "task": "lee", "n": 1225},
        ]
        self.head = None
        self.description = {
            "model": DEFAULT_MODEL,
            "tasks": {
                "polarity": f"Pang & Lee sentence polarity: logistic-regression head trained once on FP32 features of "
                            f"the {train.num_rows}-sentence train split, accuracy on {self.polarity.n} test sentences",
                "lee": f"Lee et al. (2005): Pearson/Spearman of embedding cosine vs human ratings, "
                       f"{len(docs)} documents, {len(docs) * (len(docs) - 1) // 2} pairs",
            },
            "max_length": {"sentences": sent_len, "documents": doc_len},
        }

    def fit_head(self, fp32_fn, progress) -> None:
        from zqhero_fx.eval.head import polarity_head

        feats = _run(fp32_fn, self.train, kind="embed", desc="fp32: polarity train features", progress=progress)
        self.head = polarity_head(feats["emb"], self.train_labels)

    def score(self, outputs, base):
        from zqhero_fx.eval.metrics import agreement, lee_scores

        pol, lee = outputs["polarity test"]["emb"], outputs["Lee documents"]["emb"]
        preds = self.head.predict(pol.astype(np.float32))
        metrics = {"polarity_acc": _acc_entry(preds, self.test_labels, base and base["preds"])}
        scores = lee_scores(lee, self.human)
        cis = _doc_bootstrap(lee, self.human)
        for name in ("pearson", "spearman"):
            entry = {"value": scores[name], "ci": cis[name]}
            if base is not None:
                entry["delta"] = scores[name] - base["metrics"][f"lee_{name}"]["value"]
            metrics[f"lee_{name}"] = entry
        extra = {"preds": preds,
                 "agreement": None if base is None else agreement(base["preds"], preds)}
        return metrics, extra


class _GlueSuite(_Suite):
    kind = "classify"

    def __init__(self, tokenizer, settings: EvalSettings, device: torch.device, max_model_len: int):
        from zqhero_fx.eval.data import glue, texts

        _log(f"loading GLUE {settings.task!r}" + (f" from {settings.data_dir}" if settings.data_dir else
                                                  " from the Hugging Face Hub"))
        dd, info = glue(settings.task, settings.data_dir)
        self.info = info
        if info.eval_split not in dd:
            raise ConfigError(f"GLUE task {info.name!r} has no {info.eval_split!r} split to evaluate on")
        ev = dd[info.eval_split]
        labels = np.asarray(ev["label"])
        if settings.max_examples is not None:
            ev = ev.select(range(min(settings.max_examples, ev.num_rows)))
            labels = labels[: ev.num_rows]
        self.labels = labels
        self.labelled = labels >= 0 if not info.is_regression else labels > -1
        length = min(settings.max_length or 128, max_model_len)
        self.eval = length_sorted_batches(f"{info.name} {info.eval_split}", tokenizer, texts(ev, info),
                                          batch_size=settings.batch_size, max_length=length, device=device)
        self.sets = [self.eval]
        if "train" in dd and dd["train"].num_rows >= 2:
            calib_ds, split_note = dd["train"], "train"
        else:
            calib_ds, split_note = ev, f"{info.eval_split} (no train split found: calibrating on the evaluated data)"
            _log(f"warning: no train split for {info.name}; calibrating on {info.eval_split}")
        self.calibration, self.calibration_info = build_calibration(
            tokenizer, texts(calib_ds, info), n_batches=settings.calib_batches, batch_size=settings.calib_batch_size,
            max_length=length, cover_length=self.eval.max_len, seed=settings.seed, device=device)
        self.calibration_info["split"] = split_note
        n = int(self.labelled.sum())
        self.metric_specs = [{"key": m, "label": f"{info.name} {m}", "percent": m in ("accuracy", "f1"),
                              "task": info.name, "n": n, "main": i == 0}
                             for i, m in enumerate(info.metric_names)] if n else []
        self.description = {"task": info.name, "eval_split": info.eval_split, "examples": int(self.eval.n),
                            "labelled": n, "max_length": length}

    def preds(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, 0] if self.info.is_regression else logits.argmax(axis=1)

    def score(self, outputs, base):
        from zqhero_fx.eval.metrics import agreement, glue_metrics

        out = outputs[self.eval.name]
        preds = self.preds(out["logits"])
        metrics: dict[str, dict] = {}
        if self.metric_specs:
            p, y = preds[self.labelled], self.labels[self.labelled]
            bp = base["preds"][self.labelled] if base is not None else None
            for spec in self.metric_specs:
                key = spec["key"]
                if key == "accuracy":
                    metrics[key] = _acc_entry(p, y, bp)
                else:
                    metrics[key] = _boot_entry(lambda a, b, key=key: glue_metrics(self.info.name, a, b)[key], p, y, bp)
        if base is None:
            agree = None
        elif self.info.is_regression:  # no classes: the fraction of scores within 0.1 of FP32's
            agree = float(np.mean(np.abs(preds - base["preds"]) <= 0.1))
        else:
            agree = agreement(base["preds"], preds)
        return metrics, {"preds": preds, "agreement": agree}


# --------------------------------------------------------------------------- evaluate


def _load(settings: EvalSettings, device: torch.device):
    _hf_offline_for(settings)
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    if settings.model is None:
        from zqhero_fx.eval.assets import minilm_max_seq_length, minilm_path

        path = minilm_path(progress=settings.progress)  # says "fetching ..." when it is not cached yet
        max_len = minilm_max_seq_length()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if settings.task is None:
            model = AutoModel.from_pretrained(path)
            return model.eval().to(device), tokenizer, max_len, str(path)
        name = str(path)
    else:
        name = settings.model
        tokenizer = AutoTokenizer.from_pretrained(name)
        max_len = None
    from zqhero_fx.eval.data import task_info

    info = task_info(settings.task)
    config = AutoConfig.from_pretrained(name)
    kwargs: dict = {}
    if getattr(config, "num_labels", None) != info.num_labels:
        kwargs = {"num_labels": info.num_labels, "ignore_mismatched_sizes": True}
        _log(f"note: {name} has {getattr(config, 'num_labels', '?')} labels, {info.name} needs {info.num_labels}: "
             "its classifier is freshly initialised (random); the comparison against FP32 still holds")
    torch.manual_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    model.config.output_hidden_states = True  # the pooled last hidden state gives the embedding cosine
    limits = [v for v in (getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length,
                          max_len) if isinstance(v, int) and 0 < v < 100_000]
    max_len = min(limits) if limits else 512
    # BERT-style models add position ids up to max_position_embeddings; keep a margin for special tokens.
    return model.eval().to(device), tokenizer, max_len, name


def evaluate(settings: EvalSettings, *, command: str | None = None) -> dict:
    """Run the whole evaluation; return the report dict (see module docstring)."""
    import zqhero_fx

    t_start = time.perf_counter()
    device = _resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    model, tokenizer, max_model_len, model_name = _load(settings, device)
    suite: _Suite = (_DefaultSuite if settings.task is None else _GlueSuite)(tokenizer, settings, device,
                                                                              max_model_len)
    progress = settings.progress

    _log(f"capturing the model with zqhero_fx.trace (calibration: {suite.calibration_info['batches']} batches, "
         f"{suite.calibration_info['sequences']} sequences up to {suite.calibration_info['max_seq']} tokens)")
    gm = _trace(model, suite.calibration[0])

    rows: list[dict] = []
    fns: dict[str, Callable] = {BASELINE: model}
    sizes = {BASELINE: model_size_mb(gm)}
    convert_s: dict[str, float | None] = {BASELINE: None}

    # FP32 baseline: the model itself, eagerly.
    t0 = time.perf_counter()
    if isinstance(suite, _DefaultSuite):
        _log("FP32: embedding the polarity train split once to train the polarity head")
        suite.fit_head(model, progress)
    outputs = {s.name: _run(model, s, kind=suite.kind, desc=f"{BASELINE}: {s.name}", progress=progress)
               for s in suite.sets}
    metrics, extra = suite.score(outputs, None)
    base = {"outputs": outputs, "metrics": metrics, "preds": extra["preds"]}
    rows.append({"mode": BASELINE, "metrics": metrics, "agreement": None, "cos_mean": None, "cos_min": None,
                 "eval_s": time.perf_counter() - t0})
    _log(f"{BASELINE}: " + ", ".join(f"{k}={v['value']:.4f}" for k, v in metrics.items()))

    from zqhero_fx.eval.metrics import cosine_similarity_rows

    for mode in settings.modes:
        _log(f"{mode}: converting (calibration over {len(suite.calibration)} batches)")
        t0 = time.perf_counter()
        q = zqhero_fx.convert(gm, mode, calibration=suite.calibration, overrides=settings.overrides or None)
        convert_s[mode] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = {s.name: _run(q, s, kind=suite.kind, desc=f"{mode}: {s.name}", progress=progress)
                   for s in suite.sets}
        metrics, extra = suite.score(outputs, base)
        cos = {s.name: cosine_similarity_rows(base["outputs"][s.name]["emb"], outputs[s.name]["emb"])
               for s in suite.sets}
        allcos = np.concatenate(list(cos.values()))
        rows.append({"mode": mode, "metrics": metrics, "agreement": extra["agreement"],
                     "cos_mean": float(allcos.mean()), "cos_min": float(allcos.min()),
                     "cos_by_set": {k: {"mean": float(v.mean()), "min": float(v.min()), "n": int(v.size)}
                                    for k, v in cos.items()},
                     "eval_s": time.perf_counter() - t0})
        fns[mode] = q
        sizes[mode] = model_size_mb(q)
        rows[-1]["gemm_bits"] = gemm_weight_bits(q)["bits_per_weight"]
        _log(f"{mode}: " + ", ".join(f"{k}={v['value']:.4f}" for k, v in metrics.items())
             + f", cos mean {allcos.mean():.5f} min {allcos.min():.5f}"
             + (f", agreement {extra['agreement']:.4f}" if extra["agreement"] is not None else ""))
        gc.collect()

    # Latency: one fixed batch of the main eval set (the batch at the median length), modes interleaved.
    main = suite.sets[0]
    timing_batch = main.batches[len(main.batches) // 2] if len(main.batches) > 2 else main.batches[-1]
    shape = list(timing_batch["input_ids"].shape)
    _log(f"timing {settings.timed_batches} batches of {shape[0]}x{shape[1]} tokens per mode "
         f"(+{settings.warmup} warm-up), modes interleaved")
    times = _time_round_robin(fns, timing_batch, reps=settings.timed_batches, warmup=settings.warmup, device=device,
                              progress=progress)
    base_ms = statistics.median(times[BASELINE]) * 1e3
    base_min_ms = min(times[BASELINE]) * 1e3
    for row in rows:
        t = times[row["mode"]]
        row["latency_ms"] = statistics.median(t) * 1e3
        row["latency_min_ms"] = min(t) * 1e3  # the least disturbed run: robust to background load on a shared machine
        row["latency_all_ms"] = [x * 1e3 for x in t]
        row["speedup"] = base_ms / row["latency_ms"]
        row["speedup_min"] = base_min_ms / row["latency_min_ms"]
        row["size_mb"] = sizes[row["mode"]]
        row["convert_s"] = convert_s[row["mode"]]

    import transformers

    try:
        from importlib.metadata import version

        zq_version = version("zqhero_fx")
    except Exception:  # not installed (running from a checkout)
        zq_version = "checkout"
    return {
        "tool": "zqhero eval",
        "zqhero_fx_version": zq_version,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "model": DEFAULT_MODEL if settings.model is None else settings.model,
        "model_path": model_name,
        "suite": "default" if settings.task is None else "glue",
        "description": suite.description,
        "metrics": suite.metric_specs,
        "baseline": BASELINE,
        "rows": rows,
        "calibration": suite.calibration_info,
        "timing": {"batch_shape": shape, "timed_batches": settings.timed_batches, "warmup": settings.warmup,
                   "statistic": "median (and min) per-batch latency; modes interleaved round-robin"},
        "machine": {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "runtime_s": time.perf_counter() - t_start,
    }


# Errors a CLI should report as a one-line message rather than a traceback.
USER_ERRORS = (ZqheroError, FileNotFoundError, OSError, ValueError)
