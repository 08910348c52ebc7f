"""Sentence-embedding helpers and the frozen-encoder polarity head.

The eval loop runs the encoder (FP32 and W8A8) itself and passes hidden states or
features in; nothing here runs a model.

* :func:`mean_pool` -- sentence-transformers pooling of all-MiniLM-L6-v2: masked mean
  over tokens, then L2 normalisation.
* :func:`train_polarity_head` -- ``LogisticRegression(C=1, max_iter=1000)`` fitted once
  on the FP32 train features; the same head is then applied to FP32 and W8A8 test
  features, so any accuracy change comes from the encoder.
* :func:`polarity_head` -- the same, memoised in-process by a digest of the features.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from .metrics import to_numpy

__all__ = ["mean_pool", "l2_normalize", "train_polarity_head", "polarity_head", "clear_head_cache"]


def _is_torch(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "masked_fill")


def l2_normalize(x, eps: float = 1e-12):
    """Row-wise L2 normalisation (``torch.nn.functional.normalize(x, p=2, dim=-1)``).

    Keeps the input's type: torch in, torch out; otherwise numpy."""
    if _is_torch(x):
        import torch.nn.functional as F

        return F.normalize(x, p=2.0, dim=-1, eps=eps)
    a = np.asarray(x)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)


def mean_pool(last_hidden_state, attention_mask, normalize: bool = True):
    """Masked mean of ``last_hidden_state [B, T, H]`` over tokens where
    ``attention_mask [B, T]`` is non-zero, then (``normalize=True``) L2 normalisation.

    Same arithmetic as sentence-transformers' ``Pooling(mean)`` + ``Normalize``
    (sum of masked tokens / clamp(token count, min=1e-9)).  Torch tensors stay torch
    (computed in float32 at least, on their device); anything else is numpy.
    """
    if _is_torch(last_hidden_state):
        import torch

        h = last_hidden_state
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        m = torch.as_tensor(attention_mask, device=h.device).unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    else:
        h = np.asarray(last_hidden_state)
        if h.dtype.kind != "f" or h.dtype.itemsize < 4:
            h = h.astype(np.float32)
        m = to_numpy(attention_mask).astype(h.dtype)[..., None]
        pooled = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    if h.ndim != 3:
        raise ValueError(f"last_hidden_state must be [B, T, H], got shape {tuple(h.shape)}")
    return l2_normalize(pooled) if normalize else pooled


def _xy(features, labels) -> tuple[np.ndarray, np.ndarray]:
    x = to_numpy(features)
    if x.dtype != np.float64:
        x = x.astype(np.float32)
    y = to_numpy(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need [N, D] features and [N] labels; got {x.shape} and {y.shape}")
    return x, y


def train_polarity_head(train_features, train_labels, *, C: float = 1.0, max_iter: int = 1000):
    """Fit ``sklearn.linear_model.LogisticRegression(C=C, max_iter=max_iter)`` (lbfgs,
    deterministic) on FP32 sentence features ``[N, D]`` and labels ``[N]``."""
    from sklearn.linear_model import LogisticRegression

    x, y = _xy(train_features, train_labels)
    return LogisticRegression(C=C, max_iter=max_iter).fit(x, y)


_HEADS: dict[str, Any] = {}


def _digest(x: np.ndarray, y: np.ndarray, C: float, max_iter: int) -> str:
    h = hashlib.sha256()
    for a in (x, y):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    h.update(f"{C}/{max_iter}".encode())
    return h.hexdigest()


def polarity_head(train_features, train_labels, *, C: float = 1.0, max_iter: int = 1000):
    """:func:`train_polarity_head`, memoised per process on a sha256 of the inputs, so
    repeated evaluations (e.g. several W8A8 variants) reuse one FP32-trained head."""
    x, y = _xy(train_features, train_labels)
    key = _digest(x, y, C, max_iter)
    if key not in _HEADS:
        _HEADS[key] = train_polarity_head(x, y, C=C, max_iter=max_iter)
    return _HEADS[key]


def clear_head_cache() -> None:
    _HEADS.clear()
