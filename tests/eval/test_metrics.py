"""zqhero_fx.eval.metrics and zqhero_fx.eval.head: known values, scipy/sklearn agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from zqhero_fx.eval import head as H
from zqhero_fx.eval import metrics as M

# --------------------------------------------------------------------------- known values


def test_known_values():
    assert M.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert M.f1([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert M.matthews([1, 1, 0, 0], [1, 0, 1, 0]) == 0.0
    assert M.matthews([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert M.matthews([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [1, 4, 9]) == pytest.approx(24 / math.sqrt(2 * 294))  # 0.98974
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_logits_and_tensors_are_accepted():
    logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [0.0, 5.0]], dtype=torch.bfloat16)
    assert M.accuracy(logits, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
    assert M.agreement(logits, np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])) == 1.0
    assert M.pearson(torch.tensor([[1.0], [2.0], [3.0]]), [1, 2, 3]) == pytest.approx(1.0)


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="length mismatch"):
        M.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        M.accuracy([], [])


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=60))
def test_agrees_with_sklearn(pairs):
    p = np.array([a for a, _ in pairs])
    y = np.array([b for _, b in pairs])
    assert M.accuracy(p, y) == pytest.approx(float((p == y).mean()))
    assert M.f1(p, y) == pytest.approx(f1_score(y, p, zero_division=0.0))
    assert M.matthews(p, y) == pytest.approx(matthews_corrcoef(y, p))


def test_agrees_with_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert M.pearson(x, y) == pytest.approx(pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(spearmanr(x, y)[0])


# --------------------------------------------------------------------------- GLUE


def _hf_glue_reference(task, preds, labels):
    """Verbatim logic of evaluate's metrics/glue/glue.py (its script is not available offline)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(labels, preds)}
    if task == "stsb":
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}
    if task in ("mrpc", "qqp"):
        return {"accuracy": float((preds == labels).mean()), "f1": float(f1_score(y_true=labels, y_pred=preds))}
    return {"accuracy": float((preds == labels).mean())}


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_mismatched", "qnli", "rte", "wnli"])
def test_glue_metrics_match_hf(task):
    rng = np.random.default_rng(1)
    n = 200
    if task == "stsb":
        labels = rng.uniform(0, 5, n)
        preds = labels + rng.normal(0, 1, n)
    else:
        k = 3 if task.startswith("mnli") else 2
        labels = rng.integers(0, k, n)
        preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
    got = M.glue_metrics(task, preds, labels)
    want = _hf_glue_reference(task, preds, labels)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12)
        assert isinstance(got[k], float)


def test_glue_metrics_keys_follow_task_info():
    from zqhero_fx.eval.data import GLUE_TASKS

    for name, info in GLUE_TASKS.items():
        preds = np.array([0.1, 0.9, 0.4, 0.3]) if info.is_regression else np.array([0, 1, 1, 0])
        assert tuple(M.glue_metrics(name, preds, np.array([0, 1, 0, 0]))) == info.metric_names


def test_glue_metrics_logits_and_aliases():
    logits = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert M.glue_metrics("SST-2", logits, [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}
    out = M.glue_metrics("stsb", np.array([[1.0], [2.0], [3.5]]), [1.0, 2.5, 3.0])
    assert set(out) == {"pearson", "spearmanr"} and out["spearmanr"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- uncertainty


def test_accuracy_stderr():
    assert M.accuracy_stderr(0.771, 1000) == pytest.approx(math.sqrt(0.771 * 0.229 / 1000))
    assert M.accuracy_stderr(1.0, 10) == 0.0
    with pytest.raises(ValueError):
        M.accuracy_stderr(0.5, 0)
    with pytest.raises(ValueError):
        M.accuracy_stderr(1.5, 10)


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p = np.where(rng.random(1000) < 0.8, y, 1 - y)
    point, lo, hi = M.bootstrap_ci(M.accuracy, p, y, n_boot=500)
    assert point == M.accuracy(p, y) and lo < point < hi
    se = M.accuracy_stderr(point, 1000)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)  # agrees with the normal approximation
    assert M.bootstrap_ci(M.accuracy, p, y, n_boot=200, seed=3) == M.bootstrap_ci(M.accuracy, p, y, n_boot=200, seed=3)


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    a = np.where(rng.random(500) < 0.8, y, 1 - y)
    assert M.paired_bootstrap_ci(M.accuracy, a, a, y, n_boot=100) == (0.0, 0.0, 0.0)
    worse = a.copy()
    worse[:100] = 1 - y[:100]  # b is clearly worse
    d, lo, hi = M.paired_bootstrap_ci(M.accuracy, a, worse, y, n_boot=300)
    assert d == pytest.approx(M.accuracy(worse, y) - M.accuracy(a, y)) and lo <= d <= hi < 0


# --------------------------------------------------------------------------- embeddings


def test_cosine_stats():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    mean, mn = M.cosine_stats(a, b)
    assert mn == pytest.approx(-1.0)
    assert mean == pytest.approx((1.0 - 1.0 + 1 / math.sqrt(2)) / 3)
    assert M.cosine_stats(torch.ones(4, 8), torch.ones(4, 8)) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="shape mismatch"):
        M.cosine_stats(np.ones((2, 3)), np.ones((3, 3)))


def test_agreement():
    assert M.agreement([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75


def test_lee_scores():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 4))
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    human = u @ u.T  # ratings equal to the cosine similarity -> perfect correlation
    s = M.lee_scores(e * 3.0, human)  # scale does not matter (L2 normalised)
    assert s == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    # Only the 15 upper-triangle pairs count: the lower triangle may be anything (e.g. zeros).
    s2 = M.lee_scores(e, np.triu(human))
    assert s2["pearson"] == pytest.approx(1.0)
    noisy = human + np.triu(rng.normal(0, 0.3, (6, 6)), 1)
    iu = np.triu_indices(6, 1)
    s3 = M.lee_scores(e, noisy)
    assert s3["pearson"] == pytest.approx(pearsonr(human[iu], noisy[iu])[0])
    assert s3["spearman"] == pytest.approx(spearmanr(human[iu], noisy[iu])[0])
    with pytest.raises(ValueError):
        M.lee_scores(e[:5], human)


# --------------------------------------------------------------------------- head.py


def test_mean_pool_matches_sentence_transformers_formula():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    raw = H.mean_pool(h, mask, normalize=False)
    want = torch.stack([h[0, :3].mean(0), h[1].mean(0), h[2, 0]])
    torch.testing.assert_close(raw, want)
    pooled = H.mean_pool(h, mask)
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(want, dim=1))
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(3))
    # numpy in, numpy out, same numbers
    np.testing.assert_allclose(H.mean_pool(h.numpy(), mask.numpy()), pooled.numpy(), rtol=1e-5, atol=1e-6)
    # half precision is pooled in float32
    assert H.mean_pool(h.to(torch.bfloat16), mask).dtype == torch.float32


def test_l2_normalize_zero_row():
    out = H.l2_normalize(np.array([[0.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.6, 0.8]])


def test_polarity_head_trains_and_is_memoised():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = (x[:, 0] + 0.1 * rng.normal(size=200) > 0).astype(int)
    clf = H.train_polarity_head(x, y)
    assert clf.C == 1.0 and clf.max_iter == 1000
    assert M.accuracy(clf.predict(x), y) > 0.9
    H.clear_head_cache()
    h1 = H.polarity_head(x, y)
    assert H.polarity_head(x.copy(), list(y)) is h1  # same data -> same fitted head
    assert H.polarity_head(x[:100], y[:100]) is not h1
    np.testing.assert_array_equal(h1.predict(x), clf.predict(x))
    with pytest.raises(ValueError):
        H.train_polarity_head(x, y[:10])
