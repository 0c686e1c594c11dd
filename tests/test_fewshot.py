"""Issue 17: the request-time history. The few-shot protocol, the history column (unknown IDs
ignored, shrinkage), the ridge student's history rows, and the `recommend` contract in a
clean interpreter (TensorFlow's graph-mode loader) for empty, short and long histories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfrs_coldstart.data.split import ColdStartSplit
from tfrs_coldstart.evaluation import fewshot_tasks, user_sequences
from tfrs_coldstart.features.columns import (
    HISTORY,
    HISTORY_SEPARATOR,
    IdsOfColumn,
    column_from_dict,
    history_column,
)


def test_user_sequences_by_timestamp_then_file_order() -> None:
    df = pd.DataFrame({"user_id": ["a", "a", "a", "b"], "item_id": ["3", "1", "2", "9"],
                       "timestamp": [5, 1, 5, 0]})
    assert user_sequences(df) == {"a": ["1", "3", "2"], "b": ["9"]}
    assert user_sequences(df.drop(columns="timestamp"))["a"] == ["3", "1", "2"]


def _split() -> tuple[ColdStartSplit, pd.DataFrame, pd.DataFrame]:
    users = pd.DataFrame({"user_id": ["w", "c1", "c2"]})
    items = pd.DataFrame({"item_id": ["i1", "i2", "i3", "i4", "x"]})
    inter = pd.DataFrame({"user_id": ["w", "c1", "c1", "c1", "c1", "c2", "c2"],
                          "item_id": ["i1", "i2", "x", "i3", "i4", "i1", "i2"],
                          "timestamp": [0, 4, 1, 2, 3, 0, 1]})
    e = inter.iloc[:0]
    split = ColdStartSplit(train=inter.iloc[:1], warm_test=e,
                           cold_item=e, cold_user=inter[(inter.user_id != "w")
                                                        & (inter.item_id != "x")],
                           cold_both=inter[inter.item_id == "x"],
                           warm_users=("w",), warm_items=("i1", "i2", "i3", "i4"),
                           cold_users=("c1", "c2"), cold_items=("x",), seed=0)
    return split, users, items


def test_fewshot_tasks_reveal_the_first_n_and_rank_the_rest() -> None:
    split, users, items = _split()
    tasks = fewshot_tasks(split, users, items, ns=(0, 1, 2, 4))
    t0 = tasks[0]
    assert list(t0.task.user_rows) == [1, 2] and set(t0.history) == {""}
    # c1 in time order: x (cold item), i3, i4, i2; candidates are the warm items i1..i4
    t2 = tasks[2]
    assert t2.history[1] == HISTORY_SEPARATOR.join(["x", "i3"])
    pos = {p: i for i, p in enumerate(items["item_id"].iloc[t2.task.candidate_rows])}
    row = list(t2.task.user_rows).index(1)
    assert sorted(t2.task.relevant[row]) == sorted([pos["i4"], pos["i2"]])
    assert list(t2.task.excluded[row]) == [pos["i3"]]  # the cold item is no candidate
    assert t2.skipped == 1  # c2 has 2 interactions, fewer than n + 1 = 3
    assert tasks[4].skipped == 2 and not len(tasks[4].task.user_rows)


def test_history_column_ignores_unknown_ids_and_shrinks() -> None:
    import tensorflow as tf

    lookup = tf.keras.layers.StringLookup(vocabulary=["a", "b"], num_oov_indices=1)
    emb = tf.keras.layers.Embedding(3, 2)
    emb.build((None,))
    emb.set_weights([np.array([[100.0, 100.0], [1.0, 0.0], [0.0, 1.0]], np.float32)])
    layers = {"lookup": lookup, "emb": emb}
    x = tf.constant(["a|zzz", "", "zzz", "a|b"])
    col = history_column(0.0)
    out = col.encode(layers, {HISTORY: x}, training=False).numpy()
    np.testing.assert_allclose(out, [[1, 0], [0, 0], [0, 0], [0.5, 0.5]])
    shrunk = history_column(1.0).encode(layers, {HISTORY: x}, training=False).numpy()
    np.testing.assert_allclose(shrunk, [[0.5, 0], [0, 0], [0, 0], [1 / 3, 1 / 3]], rtol=1e-6)
    # the existing ids_of behaviour stays: unknown IDs average in the OOV row
    old = IdsOfColumn("friends", ids_of="item").encode(layers, {"friends": x}, training=False)
    np.testing.assert_allclose(old.numpy()[0], [50.5, 50.0])
    assert column_from_dict(HISTORY, col.to_dict()) == col
    assert "ignore_unknown" not in IdsOfColumn("f").to_dict()  # old states unchanged


def test_history_rows_truncate_by_time() -> None:
    from tfrs_coldstart.config import StudentConfig
    from tfrs_coldstart.training import history_rows

    table = pd.DataFrame({"user_id": ["u", "v"]})
    train = pd.DataFrame({"user_id": ["u"] * 4 + ["v"], "item_id": ["4", "3", "2", "1", "9"],
                          "timestamp": [4, 3, 2, 1, 0]})
    cfg = StudentConfig(history_copies=3, history_max=2, history_weight=0.5)
    rows, src, factor = history_rows(table, train, cfg)
    assert len(rows) == 8 and list(src) == [0, 1] * 4
    assert list(rows[HISTORY][:2]) == ["", ""] and list(factor) == [1, 1] + [0.5] * 6
    for h, s in zip(rows[HISTORY][2:], src[2:], strict=True):
        seq = ["1", "2"] if s == 0 else ["9"]
        parts = h.split(HISTORY_SEPARATOR)
        assert 1 <= len(parts) <= 2 and parts == seq[:len(parts)]


# --------------------------------------------------------------------------------------------
# the served contract (the session's tiny run and its exports)


@pytest.mark.slow
def test_recommend_takes_a_history_in_a_clean_interpreter(
        exports: dict[str, Any], tiny_run: dict, tmp_path: Path) -> None:
    from test_export import _clean_load

    from tfrs_coldstart.data.pipeline import feature_arrays
    from tfrs_coldstart.runs import RunDir

    ds = tiny_run["ds"]
    rec = next(m for m in exports["bf"].values() if m.kind == "recommend")
    specs = rec.module.specs
    assert HISTORY in specs and specs[HISTORY].dtype.name == "string"
    warm = list(tiny_run["prep"].split.warm_items)
    n = 3
    rows = feature_arrays(ds.users.iloc[:n], ds.schema.user_features, "user_id")
    rows["user_id"] = np.array([f"new-user-{i}" for i in range(n)], dtype=object)
    # the top results of a new user with no history: a history made of them must drop them
    base = {k: [str(x) if isinstance(x, str) else (x.tolist() if isinstance(x, np.ndarray)
                                                     else float(x)) for x in rows[k]]
            for k in specs if k != HISTORY}
    empty = rec.module({**base, HISTORY: [""] * n})
    top = [[t.decode() for t in r] for r in empty["item_ids"].numpy()]
    short = [HISTORY_SEPARATOR.join(r[:2] + ["never-seen-item"]) for r in top]
    long = [HISTORY_SEPARATOR.join(warm[:40] + r[:10]) for r in top]
    requests = {"empty": ("serving_default", {**base, HISTORY: [""] * n}),
                "short": ("serving_default", {**base, HISTORY: short}),
                "long": ("serving_default", {**base, HISTORY: long}),
                "embed_short": ("embed_user", {**base, HISTORY: short})}

    class _M:  # what _clean_load reads of an export
        def __init__(self, m: Any) -> None:
            self.name, self.kind, self.path, self.module = m.name, m.kind, m.path, m.module

    m = _M(rec)
    import test_export

    orig = test_export._requests
    test_export._requests = lambda model, d: requests
    try:
        out = _clean_load(tmp_path, [m], ds, import_scann=False)
    finally:
        test_export._requests = orig
    res = out["models"][rec.name]["results"]
    assert out["project_importable"] is False
    assert HISTORY in out["models"][rec.name]["signatures"]["serving_default"]["inputs"]
    k = len(top[0])
    assert res["empty"]["item_ids"] == top
    for key, hist in (("short", short), ("long", long)):
        ids = res[key]["item_ids"]
        for r, h in zip(ids, hist, strict=True):
            assert len(r) == k and len(set(r)) == k
            assert not set(r) & set(h.split(HISTORY_SEPARATOR))  # history items dropped
            assert "" not in r  # k real items (50 extra fetched)
        scores = np.asarray(res[key]["scores"])
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # the served embedding is the student's on (content, history), as in Python
    run = RunDir(tiny_run["run"])
    unified = run.load_unified()
    table = ds.users.iloc[:n].assign(user_id=rows["user_id"], **{HISTORY: short})
    emb, known = unified.embed("user", table, ds.schema)
    assert not known.any()
    np.testing.assert_allclose(np.asarray(res["embed_short"]["embedding"]), emb, atol=1e-5)
    no_hist, _ = unified.embed("user", table.drop(columns=HISTORY), ds.schema)
    assert not np.allclose(no_hist, emb)  # the history moves the query


@pytest.mark.slow
def test_served_prior_shrinks_with_the_known_history_items(tiny_run: dict,
                                                           tmp_path: Path) -> None:
    """``history_half``: a new user's prior is ``cold_user_prior * h / (h + n)`` for the n
    history items the teacher knows, in the served graph as in Python (Scorer.score_fn)."""
    from conftest import copy_run

    from tfrs_coldstart.data.pipeline import feature_arrays
    from tfrs_coldstart.runs import RECOMMEND, RunDir
    from tfrs_coldstart.serving.export import export_run

    ds = tiny_run["ds"]
    run = RunDir(copy_run(tiny_run["run"], tmp_path / "run"))
    scorer = run.scorer(RECOMMEND).replace(prior=0.5, cold_user_prior=4.0, history_half=2.0)
    run.save_scorer(RECOMMEND, scorer)
    rec = next(m for m in export_run(run.path, tmp_path / "export", models=("recommend",),
                                     index="brute-force", k=10, dataset=ds,
                                     log=lambda m: None) if m.kind == "recommend")
    # the manifest counts the items outside the training catalogue, whatever the bias
    assert rec.manifest["new_to_catalogue"] == int(run.item_new(ds.items).sum()) > 0
    warm = list(tiny_run["prep"].split.warm_items)
    n = 4
    rows = feature_arrays(ds.users.iloc[:n], ds.schema.user_features, "user_id")
    rows["user_id"] = np.array([f"new-user-{i}" for i in range(n)], dtype=object)
    history = np.array(["", HISTORY_SEPARATOR.join(warm[:2] + ["never-seen-item"]),
                        HISTORY_SEPARATOR.join(warm[:6]), HISTORY_SEPARATOR.join(warm[:30])],
                       dtype=object)
    feats = {k: (history if k == HISTORY else rows[k]) for k in rec.module.specs}
    out = rec.module(feats)
    unified = run.load_unified()
    lengths = unified.history_count(history)
    np.testing.assert_array_equal(lengths[:2], [0, 2])  # "" and the unknown ID count nothing
    table = ds.users.iloc[:n].assign(user_id=rows["user_id"], **{HISTORY: history})
    users, known = unified.embed("user", table, ds.schema)
    items, _ = unified.embed("item", ds.items, ds.schema)
    fn = scorer.score_fn(users, items, run.item_log_counts(ds.items), known,
                         run.item_new(ds.items), lengths)
    want = fn(np.arange(n), np.arange(len(ds.items)))
    pos = {str(i): j for j, i in enumerate(ds.items["item_id"].astype(str))}
    for r in range(n):
        ids = [t.decode() for t in out["item_ids"].numpy()[r] if t]
        served = out["scores"].numpy()[r][:len(ids)]
        np.testing.assert_allclose(served, want[r, [pos[i] for i in ids]], rtol=1e-4, atol=1e-3)
    # and the prior did shrink: without it the long history's scores differ
    flat = scorer.replace(history_half=None).score_fn(
        users, items, run.item_log_counts(ds.items), known, run.item_new(ds.items), lengths)
    assert not np.allclose(flat(np.arange(n), np.arange(len(ds.items)))[3], want[3])
