"""Metrics for ``zqhero eval``: GLUE-compatible scores, uncertainty, FP32-vs-INT8 agreement.

:func:`glue_metrics` gives the same numbers as Hugging Face ``evaluate``'s ``glue``
metric (which is only a thin wrapper over scipy / scikit-learn, and whose script is
not available offline).  Inputs may be lists, numpy arrays or (CPU or CUDA) torch
tensors.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = [
    "to_numpy",
    "accuracy",
    "f1",
    "matthews",
    "pearson",
    "spearman",
    "glue_metrics",
    "accuracy_stderr",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "cosine_similarity_rows",
    "cosine_stats",
    "agreement",
    "lee_scores",
]


def to_numpy(x) -> np.ndarray:
    """numpy view of a list / array / torch tensor (detached, on CPU; bf16/fp16 -> fp32)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() < 4:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _labels(preds) -> np.ndarray:
    """Class ids; 2-D logits/probabilities ``[N, C]`` (C > 1) are arg-maxed."""
    p = to_numpy(preds)
    if p.ndim == 2 and p.shape[1] > 1:
        return p.argmax(axis=1)
    return p.reshape(-1)


def _scores(x) -> np.ndarray:
    return to_numpy(x).astype(np.float64).reshape(-1)


def _check_len(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"length mismatch: {a.shape[0]} predictions vs {b.shape[0]} references")
    if a.shape[0] == 0:
        raise ValueError("empty input")


# --------------------------------------------------------------------------- basic metrics


def accuracy(preds, labels) -> float:
    p, y = _labels(preds), _labels(labels)
    _check_len(p, y)
    return float((p == y).mean())


def f1(preds, labels) -> float:
    """Binary F1 of the positive class 1 (``sklearn.metrics.f1_score`` default, as GLUE)."""
    from sklearn.metrics import f1_score

    p, y = _labels(preds), _labels(labels)
    _check_len(p, y)
    return float(f1_score(y_true=y, y_pred=p))


def matthews(preds, labels) -> float:
    """Matthews correlation coefficient (``sklearn.metrics.matthews_corrcoef``)."""
    from sklearn.metrics import matthews_corrcoef

    p, y = _labels(preds), _labels(labels)
    _check_len(p, y)
    return float(matthews_corrcoef(y, p))


def pearson(x, y) -> float:
    from scipy.stats import pearsonr

    a, b = _scores(x), _scores(y)
    _check_len(a, b)
    return float(pearsonr(a, b)[0])


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    a, b = _scores(x), _scores(y)
    _check_len(a, b)
    return float(spearmanr(a, b)[0])


_GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "ax": ("matthews_correlation",),
    "stsb": ("pearson", "spearmanr"),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    **{t: ("accuracy",) for t in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")},
}


def glue_metrics(task: str, preds, labels) -> dict[str, float]:
    """The HF ``evaluate.load("glue", task)`` numbers, computed with scipy / scikit-learn.

    cola, ax: ``matthews_correlation``; stsb: ``pearson``, ``spearmanr``; mrpc, qqp:
    ``accuracy``, ``f1``; sst2, mnli(_matched/_mismatched), qnli, rte, wnli, hans:
    ``accuracy``.  ``preds`` are class ids, or ``[N, C]`` logits (arg-maxed); for stsb,
    scores (``[N]`` or ``[N, 1]``).
    """
    from .data import task_info

    key = task.strip().lower()
    if key not in _GLUE_METRICS:
        key = task_info(task).name  # aliases such as "sst-2"; raises for unknown names
    if key not in _GLUE_METRICS:
        raise KeyError(f"no GLUE metric for task {task!r}")
    if key == "stsb":
        return {"pearson": pearson(preds, labels), "spearmanr": spearman(preds, labels)}
    if key in ("cola", "ax"):
        return {"matthews_correlation": matthews(preds, labels)}
    if key in ("mrpc", "qqp"):
        return {"accuracy": accuracy(preds, labels), "f1": f1(preds, labels)}
    return {"accuracy": accuracy(preds, labels)}


# --------------------------------------------------------------------------- uncertainty


def accuracy_stderr(acc: float, n: int) -> float:
    """Binomial standard error ``sqrt(acc (1 - acc) / n)`` of an accuracy over ``n`` items."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"accuracy {acc} not in [0, 1]")
    return math.sqrt(acc * (1.0 - acc) / n)


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    preds,
    labels,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap ``(point, low, high)`` of ``metric(preds, labels)``.

    Items are resampled with replacement ``n_boot`` times; the interval is the
    ``alpha/2`` and ``1 - alpha/2`` quantiles.  ``metric`` is e.g. :func:`accuracy`
    or ``lambda p, y: glue_metrics("cola", p, y)["matthews_correlation"]``.
    """
    p, y = to_numpy(preds), to_numpy(labels)
    _check_len(p, y)
    rng = np.random.default_rng(seed)
    n = p.shape[0]
    stats = np.empty(n_boot)
    for i in range(n_boot):
        ix = rng.integers(0, n, n)
        stats[i] = metric(p[ix], y[ix])
    lo, hi = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(metric(p, y)), float(lo), float(hi)


def paired_bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    preds_a,
    preds_b,
    labels,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired bootstrap of ``metric(preds_b) - metric(preds_a)`` on the same resamples.

    For FP32 (a) vs W8A8 (b): returns ``(delta, low, high)``; an interval that contains
    0 means the quantisation change is not significant at level ``alpha``.
    """
    a, b, y = to_numpy(preds_a), to_numpy(preds_b), to_numpy(labels)
    _check_len(a, y)
    _check_len(b, y)
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    stats = np.empty(n_boot)
    for i in range(n_boot):
        ix = rng.integers(0, n, n)
        stats[i] = metric(b[ix], y[ix]) - metric(a[ix], y[ix])
    lo, hi = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(metric(b, y) - metric(a, y)), float(lo), float(hi)


# --------------------------------------------------------------------------- embeddings / agreement


def _unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_similarity_rows(a, b) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (``[N]``, float64)."""
    x, y = to_numpy(a), to_numpy(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    y = y.reshape(x.shape)
    return np.sum(_unit_rows(x) * _unit_rows(y), axis=1)


def cosine_stats(a, b) -> tuple[float, float]:
    """``(mean, min)`` of the row-wise cosine similarity of two ``[N, D]`` embedding matrices
    (e.g. FP32 vs W8A8 sentence embeddings)."""
    c = cosine_similarity_rows(a, b)
    return float(c.mean()), float(c.min())


def agreement(preds_a, preds_b) -> float:
    """Fraction of items on which two models predict the same class (logits are arg-maxed)."""
    a, b = _labels(preds_a), _labels(preds_b)
    _check_len(a, b)
    return float((a == b).mean())


def lee_scores(embeddings, human) -> dict[str, float]:
    """Lee benchmark: Pearson / Spearman between the cosine similarity of L2-normalised
    document embeddings and the human ratings, over the upper-triangle pairs
    (1225 for the 50 Lee documents)."""
    h = to_numpy(human).astype(np.float64)
    e = to_numpy(embeddings)
    n = h.shape[0]
    if h.shape != (n, n) or e.ndim != 2 or e.shape[0] != n:
        raise ValueError(f"need [n, D] embeddings and an [n, n] matrix; got {e.shape} and {h.shape}")
    e = _unit_rows(e)
    iu = np.triu_indices(n, 1)
    sims = (e @ e.T)[iu]
    return {"pearson": pearson(sims, h[iu]), "spearman": spearman(sims, h[iu])}

