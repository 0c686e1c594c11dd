"""ScaNN / brute-force indexes and the ANN-recall gate, on embeddings (no training needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfrs_coldstart.serving.index import (
    SCANN_MIN_ITEMS,
    AnnRecallError,
    ExactIndex,
    IndexBuildError,
    ann_recall,
    build_gated_index,
    build_index,
    scann_params,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around sqrt(n) centres: the shape trained embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(4, int(math.sqrt(n))), dim))
    return _unit(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, dim)))


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    emb = _clustered(3000, 16, 0)
    ids = np.array([f"item{i:05d}" for i in range(len(emb))])
    queries = _clustered(200, 16, 1)
    return ids, emb, queries


def test_scann_params_follow_catalogue_size() -> None:
    p = scann_params(10_000, 64, k=100)
    assert p["num_leaves"] == 100  # sqrt(n)
    assert 10 <= p["num_leaves_to_search"] <= p["num_leaves"]  # a fraction, at least 10%
    assert p["num_reordering_candidates"] == 400  # 4 * k
    assert p["dimensions_per_block"] == 2 and p["overridden"] == []
    big = scann_params(1_000_000, 64, k=100)
    assert big["num_leaves"] == 1000 and big["num_leaves_to_search"] == 100
    tiny = scann_params(1, 8, k=100)
    assert tiny["num_leaves"] == 1 and tiny["num_leaves_to_search"] == 1
    assert tiny["num_reordering_candidates"] == 1  # clamped to the catalogue
    # a catalogue about the size of k: every leaf is searched
    small = scann_params(200, 8, k=100)
    assert small["num_leaves_to_search"] == small["num_leaves"]


def test_scann_params_overrides_win_and_are_recorded() -> None:
    p = scann_params(10_000, 64, k=10, num_leaves=50, num_leaves_to_search=7,
                     num_reordering_candidates=80)
    assert (p["num_leaves"], p["num_leaves_to_search"], p["num_reordering_candidates"]) == (
        50, 7, 80)
    assert sorted(p["overridden"]) == ["num_leaves", "num_leaves_to_search",
                                       "num_reordering_candidates"]
    # never more leaves searched than exist, never fewer re-ordered than k
    q = scann_params(100, 8, k=20, num_leaves=5, num_leaves_to_search=99,
                     num_reordering_candidates=3)
    assert q["num_leaves_to_search"] == 5 and q["num_reordering_candidates"] == 20
    with pytest.raises(IndexBuildError, match="empty"):
        scann_params(0, 8)


def test_brute_force_is_exact(catalogue) -> None:
    ids, emb, queries = catalogue
    layer = build_index(None, ids, emb, 25, "brute-force")
    scores, got = layer(queries, k=25)
    ex_scores, ex_ids = ExactIndex(ids, emb).search(queries, 25)
    np.testing.assert_allclose(scores.numpy(), ex_scores, rtol=1e-5, atol=1e-5)
    assert ann_recall(layer, ExactIndex(ids, emb), queries, 25) == pytest.approx(1.0)
    assert (got.numpy().astype(str) == ex_ids).mean() > 0.99  # same order up to float ties


def test_scann_passes_the_gate_and_reports_recall(catalogue) -> None:
    ids, emb, queries = catalogue
    g = build_gated_index(ids, emb, queries, 50, "scann", gate=0.95)
    assert g.recall == pytest.approx(ann_recall(g.layer, ExactIndex(ids, emb), queries, 50))
    # the gate's recall holds for queries it never saw (measured 0.99; 0.9 leaves margin)
    held_out = _clustered(200, 16, 7)
    assert ann_recall(g.layer, ExactIndex(ids, emb), held_out, 50) >= 0.9
    assert g.trials and g.trials[-1]["recall"] == g.recall
    scores, got = g.layer(queries, k=50)
    assert got.shape == (len(queries), 50) and got.dtype.name == "string"
    # ScaNN's scores are real dot products (after exact re-ordering), best first
    exact = ExactIndex(ids, emb).score(queries, got.numpy().astype(str))
    np.testing.assert_allclose(scores.numpy(), exact, atol=1e-4)
    assert np.all(np.diff(scores.numpy(), axis=1) <= 1e-6)


def test_gate_tunes_what_was_not_overridden(catalogue) -> None:
    ids, emb, queries = catalogue
    p = scann_params(len(ids), emb.shape[1], 50)
    p.update(num_leaves_to_search=1, num_reordering_candidates=50)  # a bad start to climb from
    g = build_gated_index(ids, emb, queries, 50, "scann", gate=0.95, params=p)
    assert ann_recall(g.layer, ExactIndex(ids, emb), queries, 50) >= 0.95  # measured anew
    assert g.params["num_leaves_to_search"] > 1 or g.params["num_reordering_candidates"] > 50
    assert g.trials[0]["recall"] < 0.95  # the first index really was below the gate
    assert any(t.get("probe") for t in g.trials)
    # with re-ordering fixed by the caller, only leaves_to_search may move
    fixed = {**p, "num_reordering_candidates": 200, "overridden": ["num_reordering_candidates"]}
    g2 = build_gated_index(ids, emb, queries, 50, "scann", gate=0.9, params=fixed)
    assert g2.params["num_reordering_candidates"] == 200
    assert g2.params["num_leaves_to_search"] > 1


def test_gate_above_one_fails_with_the_measured_recall(catalogue) -> None:
    ids, emb, queries = catalogue
    with pytest.raises(AnnRecallError) as e:
        build_gated_index(ids, emb, queries[:50], 20, "scann", gate=1.01)
    msg = str(e.value)
    assert "recall@20" in msg and "gate 1.01" in msg
    measured = float(msg.split(" is ")[1].split()[0])
    assert 0.9 <= measured <= 1.0
    assert "scann_leaves_to_search" in msg and "brute-force" in msg


def test_absurd_params_fail_the_gate_and_name_the_knob(catalogue) -> None:
    ids, emb, queries = catalogue
    p = scann_params(len(ids), emb.shape[1], 50, num_leaves=1000, num_leaves_to_search=1,
                     num_reordering_candidates=50)
    with pytest.raises(AnnRecallError, match=r"now 1 of 1000 leaves") as e:
        build_gated_index(ids, emb, queries, 50, "scann", gate=0.95, params=p)
    measured = float(str(e.value).split(" is ")[1].split()[0])
    assert measured < 0.95


def test_tiny_and_empty_catalogues_give_clear_errors() -> None:
    emb = _clustered(SCANN_MIN_ITEMS - 1, 8, 0)
    ids = np.array([f"i{i}" for i in range(len(emb))])
    with pytest.raises(IndexBuildError, match="brute-force"):
        build_index(None, ids, emb, 5, "scann")
    layer = build_index(None, ids, emb, 100, "brute-force")  # k clamps to the catalogue
    assert layer(emb[:2])[1].shape == (2, len(ids))
    with pytest.raises(IndexBuildError, match="empty"):
        build_index(None, ids[:0], emb[:0], 5, "brute-force")
    with pytest.raises(IndexBuildError, match="unknown index kind"):
        build_index(None, ids, emb, 5, "annoy")
    bad = emb.copy()
    bad[3, 0] = np.nan
    with pytest.raises(IndexBuildError, match=r"'i3' \(row 3\)"):
        build_index(None, ids, bad, 5, "brute-force")


def test_recall_counts_ties_and_ignores_padding_and_repeats() -> None:
    emb = _unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    ids = np.array(["a", "b", "c", "d"])
    exact = ExactIndex(ids, emb)
    q = _unit(np.array([[1.0, 0.1]]))
    # "a" and "b" tie exactly: either is a correct top-1
    assert ann_recall(lambda x: (None, np.array([["b"]])), exact, q, 1) == 1.0
    assert ann_recall(lambda x: (None, np.array([["a"]])), exact, q, 1) == 1.0
    assert ann_recall(lambda x: (None, np.array([["c"]])), exact, q, 1) == 0.0
    assert ann_recall(lambda x: (None, np.array([["a", ""]])), exact, q, 2) == 0.5
    assert ann_recall(lambda x: (None, np.array([["a", "a"]])), exact, q, 2) == 0.5
    # a plain callable reference: set overlap
    assert ann_recall(lambda x: (None, np.array([["a", "c"]])),
                      lambda x, k: (None, np.array([["a", "b"]])), q, 2) == 0.5
