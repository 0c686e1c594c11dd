"""ScaNN / partitioned / brute-force indexes and the ANN-recall gate, on embeddings (no
training needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf  # after conftest imported tfrs_coldstart (legacy Keras for TFRS)

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfrs_coldstart.serving.index import (
    SCANN_MIN_ITEMS,
    AnnRecallError,
    ExactIndex,
    IndexBuildError,
    PartitionedTopK,
    ann_recall,
    build_gated_index,
    build_index,
    partitioned_params,
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


# --------------------------------------------------------------------------------------------
# the partitioned index (TensorFlow's own ops, for the official TF Serving image)


def test_partitioned_params_follow_catalogue_size() -> None:
    p = partitioned_params(10_000, 64, k=100)
    assert p["num_clusters"] == 100 and p["leaves_to_search"] is None
    assert p["overridden"] == [] and p["target_candidates"] == 800  # 8 * k
    assert partitioned_params(1_000_000, 64, k=10)["target_candidates"] == 20_000  # 2% of n
    assert partitioned_params(1, 8)["num_clusters"] == 1
    q = partitioned_params(100, 8, num_clusters=500, leaves_to_search=3)
    assert q["num_clusters"] == 100 and q["leaves_to_search"] == 3
    assert sorted(q["overridden"]) == ["leaves_to_search", "num_clusters"]
    with pytest.raises(IndexBuildError, match="empty"):
        partitioned_params(0, 8)
    with pytest.raises(IndexBuildError, match="at least 1"):
        partitioned_params(100, 8, leaves_to_search=0)


def test_partitioned_recall_against_exact_with_string_ids(catalogue) -> None:
    ids, emb, queries = catalogue
    g = build_gated_index(ids, emb, queries, 50, "partitioned", gate=0.95)
    layer = g.layer
    assert isinstance(layer, PartitionedTopK) and not layer.is_exact()
    exact = ExactIndex(ids, emb)
    assert g.recall is not None and g.recall >= 0.95
    assert g.recall == pytest.approx(ann_recall(layer, exact, queries, 50))
    # an approximate index: fewer than all leaves searched, so fewer items scored than exist
    assert layer.leaves_to_search < layer.n_leaves
    assert layer.leaves_to_search * layer.leaf_size < len(ids)
    # the recall holds on queries the gate never saw
    assert ann_recall(layer, exact, _clustered(200, 16, 7), 50) >= 0.9
    scores, got = layer(queries, k=50)
    assert got.shape == scores.shape == (len(queries), 50) and got.dtype.name == "string"
    got = got.numpy().astype(str)
    assert set(got.ravel()) <= set(ids)
    assert all(len(set(row)) == 50 for row in got)  # every item sits in exactly one leaf
    # scores are exact dot products, best first
    np.testing.assert_allclose(scores.numpy(), exact.score(queries, got), atol=1e-5)
    assert np.all(np.diff(scores.numpy(), axis=1) <= 1e-6)
    p = g.params
    assert p["num_clusters"] == round(math.sqrt(len(ids)))
    assert p["leaves_to_search"] == layer.leaves_to_search and p["overridden"] == []
    assert p["index_rows"] == p["num_leaves"] * p["leaf_size"] >= len(ids)
    # a large batch goes through in chunks and gives the same answer as one query at a time
    one = np.concatenate([layer(queries[i:i + 1], k=50)[1].numpy() for i in range(5)])
    assert (one.astype(str) == got[:5]).all()


def test_partitioned_gate_raises_leaves_to_search(catalogue) -> None:
    ids, emb, queries = catalogue
    p = partitioned_params(len(ids), emb.shape[1], 50)
    p["target_candidates"] = 1  # start from a single leaf: far below the gate
    g = build_gated_index(ids, emb, queries, 50, "partitioned", gate=0.95, params=p)
    assert g.trials[0]["leaves_to_search"] == 1 and g.trials[0]["recall"] < 0.95
    steps = [t["leaves_to_search"] for t in g.trials]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) > 1
    assert g.recall == g.trials[-1]["recall"] >= 0.95
    assert g.params["leaves_to_search"] == steps[-1]
    assert ann_recall(g.layer, ExactIndex(ids, emb), queries, 50) >= 0.95  # measured anew


def test_partitioned_gate_failure_names_recall_and_knobs(catalogue) -> None:
    ids, emb, queries = catalogue
    p = partitioned_params(len(ids), emb.shape[1], 50, leaves_to_search=1)
    with pytest.raises(AnnRecallError, match=r"now 1 of \d+ leaves") as e:
        build_gated_index(ids, emb, queries, 50, "partitioned", gate=0.95, params=p)
    msg = str(e.value)
    assert "partitioned index" in msg and "partitioned_leaves_to_search" in msg
    assert "brute-force" in msg
    assert float(msg.split(" is ")[1].split()[0]) < 0.95
    # a gate above 1 cannot pass even with every leaf searched (which is exact)
    with pytest.raises(AnnRecallError, match=r"recall@20 .* is 1\.0000 .* gate 1\.01"):
        build_gated_index(ids, emb, queries[:50], 20, "partitioned", gate=1.01)


def test_partitioned_k_larger_than_a_leaf_and_padding(catalogue) -> None:
    ids, emb, queries = catalogue
    p = partitioned_params(len(ids), emb.shape[1], 10, num_clusters=100, leaves_to_search=1)
    layer = build_index(None, ids, emb, 10, "partitioned", p)
    assert layer.leaf_size < 100  # k = 100 below needs more than one leaf holds
    scores, got = layer(queries[:4], k=100)
    scores, got = scores.numpy(), got.numpy().astype(str)
    assert scores.shape == got.shape == (4, 100)
    pad = got == ""
    assert pad.any() and ((~pad).sum(axis=1) <= layer.leaf_size).all()
    assert np.all(np.isneginf(scores[pad])) and np.all(np.isfinite(scores[~pad]))
    # the real results come first, then the padding
    assert all((~row[:(~row).sum()]).all() for row in pad)
    assert all(row[(~row).sum():].all() for row in pad)
    # with more leaves searched the same partition fills every slot
    layer.leaves_to_search = layer.n_leaves
    full = layer(queries[:4], k=100)[1].numpy().astype(str)
    assert (full != "").all()
    ex = ExactIndex(ids, emb)
    assert ann_recall(layer, ex, queries[:4], 100) == pytest.approx(1.0)  # all leaves: exact


def test_partitioned_small_and_empty_catalogues(catalogue) -> None:
    emb = _clustered(3, 8, 0)
    ids = np.array(["a", "b", "c"])
    layer = build_index(None, ids, emb, 10, "partitioned")  # k clamps to the catalogue
    scores, got = layer(emb[:2])
    assert got.shape == (2, 3) and sorted(got.numpy()[0].astype(str)) == ["a", "b", "c"]
    g = build_gated_index(ids, emb, emb, 10, "partitioned")
    assert g.k == 3 and g.recall == pytest.approx(1.0)
    # built the TFRS way, from tensors (string ids arrive as bytes)
    direct = PartitionedTopK(k=2).index(tf.constant(emb), tf.constant(ids))
    assert set(direct(emb[:1])[1].numpy()[0].astype(str)) <= {"a", "b", "c"}
    one = build_index(None, ids[:1], emb[:1], 5, "partitioned")
    s1, i1 = one(emb[:2], k=5)  # one item, five slots: one result, four pads
    assert [x.decode() for x in i1.numpy()[0]] == ["a", "", "", "", ""]
    assert np.isneginf(s1.numpy()[0, 1:]).all()
    dup = np.repeat(emb[:1], 40, axis=0)  # identical embeddings: k-means finds one cell
    dl = build_index(None, np.array([f"d{i}" for i in range(40)]), dup, 5, "partitioned")
    assert dl.params["num_clusters"] == 1 and dl(dup[:1])[1].shape == (1, 5)
    assert dl(np.zeros((0, 8), np.float32))[1].shape == (0, 5)  # an empty batch
    with pytest.raises(IndexBuildError, match="empty"):
        build_index(None, ids[:0], emb[:0], 5, "partitioned")
    with pytest.raises(IndexBuildError, match="empty"):
        build_gated_index(ids[:0], emb[:0], emb, 5, "partitioned")
