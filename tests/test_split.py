"""The cold-start benchmark protocol, its leakage guard and the validation split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tfrs_coldstart.data import (
    DataError,
    Dataset,
    LeakageError,
    check_no_leakage,
    cold_start_split,
    load_movielens,
    sort_ids,
    validation_split,
)


def _split(ds: Dataset, **kw):
    return cold_start_split(
        ds.interactions, user_ids=ds.users["user_id"], item_ids=ds.items["item_id"], **kw
    )


def test_movielens_100k_reference_counts(ml100k_dir: Path) -> None:
    ds = load_movielens(ml100k_dir)
    split = cold_start_split(ds.interactions)
    users = split.summary()["users"]
    assert (users["warm"], users["cold_item"], users["cold_user"], users["cold_both"]) == (
        717, 752, 189, 189)
    assert len(split.cold_items) == round(0.2 * 1682) and len(split.cold_users) == round(0.2 * 943)
    check_no_leakage(split)


def test_protocol_is_the_documented_one() -> None:
    """Literal protocol on a small table with integer ids (numeric, not string, order)."""
    inter = pd.DataFrame({
        "user_id": [str(u) for u in [1, 2, 3, 10, 11, 1, 2, 3, 10, 11] * 3],
        "item_id": [str(i) for i in range(1, 31)],
    })
    split = cold_start_split(inter, seed=7, cold_item_frac=0.2, cold_user_frac=0.4,
                             warm_test_frac=0.5)
    rng = np.random.default_rng(7)
    items = [str(i) for i in range(1, 31)]  # numeric order: "10" after "9"
    cold_items = set(rng.permutation(np.array(items, dtype=object))[:6])
    cold_users = set(rng.permutation(np.array(["1", "2", "3", "10", "11"], dtype=object))[:2])
    assert set(split.cold_items) == cold_items and set(split.cold_users) == cold_users
    ww = ~inter["item_id"].isin(cold_items) & ~inter["user_id"].isin(cold_users)
    marks = rng.random(int(ww.sum())) < 0.5
    assert split.warm_test.index.tolist() == inter.index[ww][marks].tolist()
    assert split.train.index.tolist() == inter.index[ww][~marks].tolist()


def test_sort_ids() -> None:
    assert sort_ids(["10", "9", "100", "9"]) == ["9", "10", "100"]
    assert sort_ids(["b10", "b9", "a"]) == ["a", "b10", "b9"]


def test_split_is_deterministic(tiny_dataset: Dataset) -> None:
    a, b = _split(tiny_dataset, seed=5), _split(tiny_dataset, seed=5)
    for name in ("train", "warm_test", "cold_item", "cold_user", "cold_both"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert a.cold_items == b.cold_items and a.summary() == b.summary()
    assert _split(tiny_dataset, seed=6).cold_items != a.cold_items


def test_split_partitions_without_leakage(tiny_dataset: Dataset) -> None:
    split = _split(tiny_dataset)
    check_no_leakage(split)
    n_users, n_items = tiny_dataset.n_users, tiny_dataset.n_items
    assert len(split.cold_items) == round(0.2 * n_items)
    assert len(split.cold_users) == round(0.2 * n_users)
    assert len(split.warm_items) + len(split.cold_items) == n_items
    parts = [split.train, *split.segments().values()]
    index = pd.Index(np.concatenate([p.index.to_numpy() for p in parts]))
    assert index.is_unique and len(index) == tiny_dataset.n_interactions
    assert not split.train["item_id"].isin(split.cold_items).any()
    assert not split.train["user_id"].isin(split.cold_users).any()
    summary = split.summary()
    assert summary["interactions"]["train"] == len(split.train)
    assert all(summary["users"][k] > 0 for k in ("warm", "cold_item", "cold_user", "cold_both"))


def test_catalogue_items_without_interactions_can_be_cold() -> None:
    inter = pd.DataFrame({"user_id": ["a", "b"] * 5, "item_id": list("vwxyz") * 2})
    split = cold_start_split(inter, item_ids=list("vwxyz") + ["q", "r", "s"], seed=1,
                             cold_item_frac=0.5)
    assert len(split.cold_items) + len(split.warm_items) == 8 and len(split.cold_items) == 4
    with pytest.raises(DataError, match="row 0"):
        cold_start_split(inter, item_ids=["w"])


def test_leak_of_cold_item_into_train_is_caught(tiny_dataset: Dataset) -> None:
    split = _split(tiny_dataset)
    leaked_row = split.cold_item.iloc[[0]]
    bad = dataclasses.replace(split, train=pd.concat([split.train, leaked_row]))
    with pytest.raises(LeakageError) as exc:
        check_no_leakage(bad)
    assert leaked_row["item_id"].iloc[0] in str(exc.value) and "train" in str(exc.value)


def test_leak_of_test_interaction_into_train_is_caught(tiny_dataset: Dataset) -> None:
    split = _split(tiny_dataset)
    leaked_row = split.warm_test.iloc[[3]]
    bad = dataclasses.replace(split, train=pd.concat([split.train, leaked_row]))
    with pytest.raises(LeakageError) as exc:
        check_no_leakage(bad)
    assert f"row {leaked_row.index[0]} " in str(exc.value) and "warm" in str(exc.value)


def test_leak_of_cold_user_id_into_warm_set_is_caught(tiny_dataset: Dataset) -> None:
    split = _split(tiny_dataset)
    bad = dataclasses.replace(split, warm_users=split.warm_users + split.cold_users[:1])
    with pytest.raises(LeakageError, match=split.cold_users[0]):
        check_no_leakage(bad)


def test_validation_split_is_carved_from_train_only(tiny_dataset: Dataset) -> None:
    split = _split(tiny_dataset)
    val = validation_split(split)
    check_no_leakage(val)
    assert val.seed == split.seed + 1
    val_rows = pd.Index(np.concatenate(
        [val.train.index.to_numpy()] + [s.index.to_numpy() for s in val.segments().values()]))
    test_rows = pd.Index(np.concatenate([s.index.to_numpy()
                                         for s in split.segments().values()]))
    assert not val_rows.isin(test_rows).any()
    assert val_rows.isin(split.train.index).all() and len(val_rows) == len(split.train)
    assert set(val.cold_items) <= set(split.warm_items)
    assert set(val.cold_users) <= set(split.warm_users)
    assert not set(val.warm_items) & set(split.cold_items)
    assert set(val.warm_items) | set(val.cold_items) == set(split.warm_items)
    assert validation_split(split, seed=99).seed == 99
