"""Recall@K and NDCG@K against a reference that sorts every candidate (a known answer)."""

from __future__ import annotations

import numpy as np
import pytest

from tfrs_coldstart.evaluation import SegmentTask, embedding_score_fn, rank_metrics


def _reference(task: SegmentTask, scores: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """The definition: a stable sort by descending score, excluded items removed."""
    out = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in ks}
    for j in range(len(task.user_rows)):
        keep = np.setdiff1d(np.arange(scores.shape[1]), task.excluded[j])
        order = keep[np.argsort(-scores[j, keep], kind="stable")]
        rel = set(task.relevant[j].tolist())
        for k in ks:
            hit = np.array([c in rel for c in order[:k]], dtype=float)
            disc = 1.0 / np.log2(np.arange(2, len(hit) + 2))
            out[f"recall@{k}"] += hit.sum() / len(rel)
            out[f"ndcg@{k}"] += (hit * disc).sum() / disc[: min(len(rel), k)].sum()
    return {key: v / len(task.user_rows) for key, v in out.items()}


@pytest.mark.parametrize("n_items,ties,most", [(30, False, 8), (500, False, 8), (500, True, 8),
                                               (15, True, 8), (600, False, 150),
                                               (600, True, 150)])
def test_rank_metrics_match_a_full_sort(n_items: int, ties: bool, most: int) -> None:
    """Few relevant items per user (counted one by one) and many (one sorted search)."""
    rng = np.random.default_rng(n_items + ties)
    n_users = 70
    users = rng.normal(size=(n_users, 4)).astype(np.float32)
    items = rng.normal(size=(n_items, 4)).astype(np.float32)
    if ties:  # whole-number embeddings: many items score exactly alike
        users, items = np.round(users), np.round(items)
    relevant, excluded = [], []
    for _ in range(n_users):
        picked = rng.choice(n_items, size=int(rng.integers(1, most)), replace=False)
        cut = int(rng.integers(1, len(picked) + 1))
        relevant.append(np.sort(picked[:cut]))
        excluded.append(picked[cut:])
    cand = rng.permutation(n_items)  # candidates are a subset order of the items table
    task = SegmentTask("x", np.arange(n_users), cand, relevant, excluded)
    fn = embedding_score_fn(users, items)
    ks = (1, 5, 20, 100)
    got = rank_metrics(task, fn, ks)
    want = _reference(task, fn(task.user_rows, cand), ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["users"] == n_users
    assert got["recall@20"] > 0  # the case ranks something: the comparison is not vacuous
