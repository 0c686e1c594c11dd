"""The cold-start benchmark split (fixed protocol, so numbers compare across runs and papers).

Protocol (see DESIGN.md), with ``rng = np.random.default_rng(seed)``:

1. cold items = the first ``round(cold_item_frac * n_items)`` of
   ``rng.permutation(sorted unique item ids)``;
2. then cold users = the first ``round(cold_user_frac * n_users)`` of
   ``rng.permutation(sorted unique user ids)``;
3. then among warm-user x warm-item interactions (file order), ``rng.random(n) <
   warm_test_frac`` marks warm test; the rest is training.

"Sorted" means: numerically when every id is an integer literal (MovieLens), otherwise
lexicographically. Numeric order is the one that reproduces the reference MovieLens-100K
counts (717 warm-test, 752 cold-item, 189 cold-user, 189 cold-both users); string order
gives 727 warm-test users.

Segment frames keep the index of the input interactions (the file row after
:func:`~tfrs_coldstart.data.tables.load_tables`), so an interaction can be traced and a
row that lands in two places is detected by :func:`check_no_leakage`.

A split's training part is a frame, or, for streamed interactions (``data.format=stream``),
a :class:`~tfrs_coldstart.data.stream.StreamPart`: the rows of one role of the shards, never
held whole. Code that reads a training part goes through the few functions here
(:func:`entity_counts`, :func:`known_ids`, :func:`n_entities`, :func:`seen_rows`) instead of
indexing it as a frame. :func:`sample_users` caps the users a split's segments are evaluated
on (``eval.max_users``), the same users for both kinds of training part.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tfrs_coldstart.data.schema import DataError

__all__ = [
    "ColdStartSplit",
    "LeakageError",
    "check_no_leakage",
    "cold_start_split",
    "entity_counts",
    "known_ids",
    "n_entities",
    "pick_users",
    "sample_users",
    "seen_rows",
    "sort_ids",
    "validation_split",
]

SEGMENTS = ("warm", "cold_item", "cold_user", "cold_both")
INT_RE = re.compile(r"^[+-]?\d+$")  # an integer literal (ids sort numerically)


class LeakageError(AssertionError):
    """A cold entity or a test interaction is visible to training."""


def sort_ids(ids: Iterable[Any]) -> list[str]:
    """Unique ids as str, sorted numerically if all are integers, else lexicographically."""
    uniq = list(dict.fromkeys(str(i) for i in ids))
    if uniq and all(INT_RE.match(i) for i in uniq):
        return sorted(uniq, key=lambda i: (int(i), i))
    return sorted(uniq)


# A training part: a frame of interactions, or a streamed role (data.stream.StreamPart), which
# has no rows in memory but answers the functions below (duck-typed: stream.py imports this).
Rows = Any


def entity_counts(rows: Rows, side: str, ids: pd.Series) -> np.ndarray:
    """``float64 [len(ids)]``: interactions of each user (``side="user"``) or item of ``ids``
    in ``rows`` (0 for an id without any)."""
    if not isinstance(rows, pd.DataFrame):
        return rows.counts_for(side, ids)
    key = f"{side}_id"
    return ids.astype(str).map(rows[key].astype(str).value_counts()).fillna(0).to_numpy(
        np.float64)


def known_ids(rows: Rows, side: str) -> set[str]:
    """The users or items with at least one interaction in ``rows``."""
    if not isinstance(rows, pd.DataFrame):
        return rows.known(side)
    return set(rows[f"{side}_id"].astype(str))


def n_entities(rows: Rows, side: str) -> int:
    """How many users or items have at least one interaction in ``rows``."""
    if not isinstance(rows, pd.DataFrame):
        return rows.n_entities(side)
    return int(rows[f"{side}_id"].nunique())


def seen_rows(rows: Rows) -> pd.DataFrame:
    """The training interactions of the users a split evaluates (what warm ranking excludes):
    all of ``rows`` for a frame; for a streamed part, the ones read for its sampled users."""
    return rows if isinstance(rows, pd.DataFrame) else rows.seen


@dataclass(frozen=True, eq=False)
class ColdStartSplit:
    """Training interactions, the four test segments and the warm/cold id sets."""

    train: Rows  # a frame, or a streamed part (see the module docstring)
    warm_test: pd.DataFrame
    cold_item: pd.DataFrame
    cold_user: pd.DataFrame
    cold_both: pd.DataFrame
    warm_users: tuple[str, ...]
    warm_items: tuple[str, ...]
    cold_users: tuple[str, ...]
    cold_items: tuple[str, ...]
    seed: int
    cold_item_frac: float = 0.2
    cold_user_frac: float = 0.2
    warm_test_frac: float = 0.1
    # sample_users: the split before its segments were cut to the drawn users (what the
    # teacher trains on must not shrink with the evaluation's sample)
    unsampled: ColdStartSplit | None = dataclasses.field(default=None, repr=False)

    def segments(self) -> dict[str, pd.DataFrame]:
        """Test segments by name: warm, cold_item, cold_user, cold_both."""
        return {
            "warm": self.warm_test,
            "cold_item": self.cold_item,
            "cold_user": self.cold_user,
            "cold_both": self.cold_both,
        }

    def relevant_warm(self) -> pd.DataFrame:
        """Warm-test interactions that are rankable: not also a training (user, item) pair.

        Warm ranking excludes each user's training items, so a repeated pair cannot be a hit.
        """
        wt = self.warm_test
        seen = pd.MultiIndex.from_frame(seen_rows(self.train)[["user_id", "item_id"]])
        pairs = pd.MultiIndex.from_frame(wt[["user_id", "item_id"]])
        return wt[~pairs.isin(seen)]

    def summary(self) -> dict[str, Any]:
        """Interaction counts and counts of users with >= 1 relevant item, per segment."""
        segs = self.segments()
        relevant = dict(segs, warm=self.relevant_warm())
        return {
            "seed": self.seed,
            "n_warm_users": len(self.warm_users),
            "n_warm_items": len(self.warm_items),
            "n_cold_users": len(self.cold_users),
            "n_cold_items": len(self.cold_items),
            "interactions": {"train": len(self.train), **{k: len(v) for k, v in segs.items()}},
            "users": {
                "train": n_entities(self.train, "user"),
                **{k: int(v["user_id"].nunique()) for k, v in relevant.items()},
            },
        }


    def with_pseudo_cold(self) -> Rows:
        """Training plus the cold segments' rows: on a validation split, every training row of
        the test split but the held-out warm ones (what the teacher trains on)."""
        if not isinstance(self.train, pd.DataFrame):
            return self.train.with_pseudo_cold()
        whole = self.unsampled or self
        return pd.concat([whole.train, whole.cold_item, whole.cold_user, whole.cold_both])


def pick_users(ordered: Sequence[str], max_users: int, seed: Sequence[int]) -> list[str]:
    """At most ``max_users`` of ``ordered`` (all when 0 or fewer are there), a uniform draw
    seeded by ``seed``, in their order."""
    if max_users <= 0 or len(ordered) <= max_users:
        return list(ordered)
    idx = np.sort(np.random.default_rng(list(seed)).choice(len(ordered), max_users,
                                                           replace=False))
    return [ordered[i] for i in idx]


def sample_users(split: ColdStartSplit, max_users: int) -> ColdStartSplit:
    """``split`` with its four segments cut to the rows of at most ``max_users`` warm users
    (of the warm-test and cold-item segments) and ``max_users`` cold users (of the cold-user
    and cold-both ones), drawn by :func:`pick_users` from the split's seed: every held-out
    row of a drawn user stays, so each segment and the mixed catalogue are exact for them;
    training rows stay whole (:meth:`ColdStartSplit.with_pseudo_cold` reads ``unsampled``).
    ``max_users`` 0: the split as it is. A streamed split draws the same users."""
    if max_users <= 0:
        return split
    keep = set()
    for order, segs, k in ((split.warm_users, (split.warm_test, split.cold_item), 0),
                           (split.cold_users, (split.cold_user, split.cold_both), 1)):
        present = set().union(*(set(s["user_id"].astype(str)) for s in segs))
        keep.update(pick_users([u for u in order if u in present], max_users, (split.seed, k)))

    def cut(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["user_id"].astype(str).isin(keep).to_numpy()]

    return dataclasses.replace(split, warm_test=cut(split.warm_test),
                               cold_item=cut(split.cold_item), cold_user=cut(split.cold_user),
                               cold_both=cut(split.cold_both),
                               unsampled=split.unsampled or split)


def _check_frac(name: str, v: float) -> None:
    if not (0.0 <= float(v) < 1.0):
        raise DataError(f"cold_start_split: {name} must be in [0, 1), got {v!r}")


def _catalogue(given: Iterable[Any] | None, present: pd.Series, column: str) -> list[str]:
    ids = sort_ids(present.unique() if given is None else given)
    if given is not None:
        known = set(ids)
        bad = ~present.isin(known).to_numpy()
        if bad.any():
            pos = int(np.argmax(bad))
            raise DataError(
                f"cold_start_split: interactions column '{column}', row {pos}: id "
                f"{present.iloc[pos]!r} is not in the given {column} catalogue; pass every id "
                "that appears in the interactions"
            )
    if not ids:
        raise DataError(f"cold_start_split: no {column} values; the interactions are empty")
    return ids


def cold_start_split(
    interactions: pd.DataFrame,
    user_ids: Iterable[Any] | None = None,
    item_ids: Iterable[Any] | None = None,
    seed: int = 42,
    cold_item_frac: float = 0.2,
    cold_user_frac: float = 0.2,
    warm_test_frac: float = 0.1,
) -> ColdStartSplit:
    """Split interactions by the benchmark protocol (module docstring).

    ``user_ids``/``item_ids`` default to the ids in ``interactions``; pass the full catalogue
    when some users/items have no interactions (they take part in the cold draw).
    """
    for col in ("user_id", "item_id"):
        if col not in interactions.columns:
            raise DataError(
                f"cold_start_split: interactions have no '{col}' column (columns: "
                f"{list(interactions.columns)}); load them with load_tables first"
            )
    _check_frac("cold_item_frac", cold_item_frac)
    _check_frac("cold_user_frac", cold_user_frac)
    _check_frac("warm_test_frac", warm_test_frac)
    inter = interactions
    if not inter.index.is_unique:  # row labels identify interactions in check_no_leakage
        inter = inter.reset_index(drop=True)
    if inter["user_id"].dtype != object or inter["item_id"].dtype != object:
        inter = inter.assign(
            user_id=inter["user_id"].astype(str).astype(object),
            item_id=inter["item_id"].astype(str).astype(object),
        )
    users = _catalogue(user_ids, inter["user_id"], "user_id")
    items = _catalogue(item_ids, inter["item_id"], "item_id")

    rng = np.random.default_rng(seed)
    perm_items = rng.permutation(np.array(items, dtype=object))
    cold_item_set = set(perm_items[: int(round(cold_item_frac * len(items)))].tolist())
    perm_users = rng.permutation(np.array(users, dtype=object))
    cold_user_set = set(perm_users[: int(round(cold_user_frac * len(users)))].tolist())

    item_cold = inter["item_id"].isin(cold_item_set).to_numpy()
    user_cold = inter["user_id"].isin(cold_user_set).to_numpy()
    warm_warm = ~item_cold & ~user_cold
    marks = rng.random(int(warm_warm.sum())) < warm_test_frac
    is_test = np.zeros(len(inter), dtype=bool)
    is_test[np.flatnonzero(warm_warm)[marks]] = True

    return ColdStartSplit(
        train=inter[warm_warm & ~is_test],
        warm_test=inter[is_test],
        cold_item=inter[~user_cold & item_cold],
        cold_user=inter[user_cold & ~item_cold],
        cold_both=inter[user_cold & item_cold],
        warm_users=tuple(u for u in users if u not in cold_user_set),
        warm_items=tuple(i for i in items if i not in cold_item_set),
        cold_users=tuple(u for u in users if u in cold_user_set),
        cold_items=tuple(i for i in items if i in cold_item_set),
        seed=int(seed),
        cold_item_frac=float(cold_item_frac),
        cold_user_frac=float(cold_user_frac),
        warm_test_frac=float(warm_test_frac),
    )


def validation_split(split: ColdStartSplit, seed: int | None = None) -> ColdStartSplit:
    """The same protocol on ``split.train`` over the warm ids only (default seed + 1).

    Gives pseudo-cold users/items and held-out warm interactions for tuning, so the test
    segments stay untouched until the final report.
    """
    return cold_start_split(
        split.train,
        user_ids=split.warm_users,
        item_ids=split.warm_items,
        seed=split.seed + 1 if seed is None else seed,
        cold_item_frac=split.cold_item_frac,
        cold_user_frac=split.cold_user_frac,
        warm_test_frac=split.warm_test_frac,
    )


def _label(x: Any) -> Any:
    """Row label as a plain Python value (prints as 5, not np.int64(5))."""
    return x.item() if isinstance(x, np.generic) else x


def _first_in(df: pd.DataFrame, column: str, ids: set[str]) -> tuple[Any, str] | None:
    hit = df[column].isin(ids).to_numpy()
    if not hit.any():
        return None
    pos = int(np.argmax(hit))
    return _label(df.index[pos]), df[column].iloc[pos]


def check_no_leakage(split: ColdStartSplit) -> None:
    """Raise :class:`LeakageError` naming the first leaked id or interaction.

    Checks: warm and cold id sets are disjoint; training holds no cold user or item; each
    segment holds only the users/items its name says; no interaction row (by index) is in
    both training and a test segment.
    """
    cold_u, cold_i = set(split.cold_users), set(split.cold_items)
    warm_u, warm_i = set(split.warm_users), set(split.warm_items)
    both_u = cold_u & warm_u
    if both_u:
        raise LeakageError(f"user {sorted(both_u)[0]!r} is both warm and cold")
    both_i = cold_i & warm_i
    if both_i:
        raise LeakageError(f"item {sorted(both_i)[0]!r} is both warm and cold")

    train = seen_rows(split.train)
    if not isinstance(split.train, pd.DataFrame):  # streamed: no rows, but counts per id
        for side, cold in (("user", cold_u), ("item", cold_i)):
            ids = pd.Series(sorted(cold), dtype=object)
            hit = entity_counts(split.train, side, ids) > 0
            if hit.any():
                raise LeakageError(f"train has interactions of {side} {ids[np.argmax(hit)]!r}, "
                                   f"a cold {side} (its interactions must not be in training)")
    # (frame name, frame, column, forbidden ids, what the forbidden ids are)
    rules: list[tuple[str, pd.DataFrame, str, set[str], str]] = [
        ("train", train, "user_id", cold_u, "cold user"),
        ("train", train, "item_id", cold_i, "cold item"),
        ("warm_test", split.warm_test, "user_id", cold_u, "cold user"),
        ("warm_test", split.warm_test, "item_id", cold_i, "cold item"),
        ("cold_item", split.cold_item, "user_id", cold_u, "cold user"),
        ("cold_item", split.cold_item, "item_id", warm_i, "warm item"),
        ("cold_user", split.cold_user, "user_id", warm_u, "warm user"),
        ("cold_user", split.cold_user, "item_id", cold_i, "cold item"),
        ("cold_both", split.cold_both, "user_id", warm_u, "warm user"),
        ("cold_both", split.cold_both, "item_id", warm_i, "warm item"),
    ]
    for frame_name, df, column, forbidden, what in rules:
        hit = _first_in(df, column, forbidden)
        if hit is not None:
            row, value = hit
            raise LeakageError(
                f"{frame_name} interaction at row {row!r} has {column} {value!r}, a {what}"
                + (" (its interactions must not be in training)" if frame_name == "train"
                   else f" (not allowed in the {frame_name} segment)")
            )
    # Users/items outside both sets would escape the rules above.
    for frame_name, df in (("train", train), *split.segments().items()):
        for column, known in (("user_id", cold_u | warm_u), ("item_id", cold_i | warm_i)):
            unknown = ~df[column].isin(known).to_numpy()
            if unknown.any():
                pos = int(np.argmax(unknown))
                raise LeakageError(
                    f"{frame_name} interaction at row {_label(df.index[pos])!r} has {column} "
                    f"{df[column].iloc[pos]!r}, which is in neither the warm nor the cold set"
                )
    train_rows = train.index
    for seg_name, seg in split.segments().items():
        shared = seg.index.isin(train_rows)
        if shared.any():
            pos = int(np.argmax(shared))
            user, item = seg["user_id"].iloc[pos], seg["item_id"].iloc[pos]
            raise LeakageError(
                f"interaction at row {_label(seg.index[pos])!r} (user {user!r}, item {item!r}) "
                f"is in both train and the {seg_name} test segment"
            )
