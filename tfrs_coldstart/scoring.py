"""The served ranking score, defined once.

``score(u, i) = u . i / temperature + prior * log(1 + training count of i)``

Content alone under-predicts popularity, so a student ranks better with a popularity prior
(its weight is chosen on validation; 0 for the teacher). Evaluation, the prior search in
training, the export (index vectors and query vectors), batch retrieval and the benchmarks
all score through :class:`Scorer`, so the served scores are the evaluated ones.

Example::

    scorer = Scorer(temperature=0.05, prior=0.5)
    fn = scorer.score_fn(user_emb, item_emb, log_counts)      # for evaluation.rank_metrics
    index_emb = scorer.index_vectors(item_emb, log_counts)    # [n_items, dim + 1]
    queries = scorer.query_vectors(user_emb)                  # [n_users, dim + 1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tfrs_coldstart.data import Dataset
from tfrs_coldstart.data.pipeline import item_counts
from tfrs_coldstart.evaluation import (
    Prepared,
    ScoreFn,
    embedding_score_fn,
    evaluate_score_fn,
    rank_metrics,
)
from tfrs_coldstart.modeling.models import TwoTowerModel

PRIOR_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def log_counts(counts: Mapping[str, int] | pd.Series, item_ids: pd.Series) -> np.ndarray:
    """``log(1 + count)`` of each id in ``item_ids`` (0 for unseen ids): ``float32 [n]``."""
    return np.log1p(item_counts(counts, item_ids)).astype(np.float32)


def training_log_counts(train: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """:func:`log_counts` of ``items`` from a training interactions frame."""
    return log_counts(train["item_id"].astype(str).value_counts(), items["item_id"])


@dataclass(frozen=True)
class Scorer:
    """The ranking score of one model: its temperature and the popularity prior's weight."""

    temperature: float
    prior: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def with_prior(self, prior: float) -> Scorer:
        return dataclasses.replace(self, prior=float(prior))

    def item_bias(self, item_log_counts: np.ndarray) -> np.ndarray:
        """``prior * log(1 + count)``: ``float32 [n_items]``."""
        return (self.prior * np.asarray(item_log_counts, np.float32)).astype(np.float32)

    def score_fn(self, user_emb: np.ndarray, item_emb: np.ndarray,
                 item_log_counts: np.ndarray) -> ScoreFn:
        """Scores for :func:`evaluation.rank_metrics`; rows index the embedding tables."""
        bias = self.item_bias(item_log_counts) if self.prior else None
        return embedding_score_fn(user_emb / self.temperature, item_emb, bias)

    def scores(self, user_emb: np.ndarray, item_emb: np.ndarray,
               item_log_counts: np.ndarray) -> np.ndarray:
        """Dense ``float32 [n_users, n_items]`` scores."""
        out = user_emb @ item_emb.T / self.temperature
        if self.prior:
            out = out + self.item_bias(item_log_counts)[None, :]
        return out.astype(np.float32)

    # The index form: one inner product gives the served score, so any top-k index (ScaNN,
    # brute force) ranks exactly as evaluated. Without a prior the index holds the plain
    # embeddings (the ranking is the same; scores are u.i, unscaled).
    @property
    def query_scale(self) -> float | None:
        """Factor on the query embedding inside the served graph; None: no prior column."""
        return 1.0 / self.temperature if self.prior else None

    def index_vectors(self, item_emb: np.ndarray, item_log_counts: np.ndarray) -> np.ndarray:
        """``[item_emb, prior * log(1 + count)]`` with a prior, else ``item_emb``."""
        if not self.prior:
            return np.asarray(item_emb, np.float32)
        return np.concatenate([item_emb, self.item_bias(item_log_counts)[:, None]],
                              axis=1).astype(np.float32)

    def query_vectors(self, user_emb: np.ndarray) -> np.ndarray:
        """``[user_emb / temperature, 1]`` with a prior, else ``user_emb``."""
        if not self.prior:
            return np.asarray(user_emb, np.float32)
        ones = np.ones((len(user_emb), 1), np.float32)
        return np.concatenate([user_emb / self.temperature, ones], axis=1).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Scorer:
        return cls(float(values["temperature"]), float(values.get("prior", 0.0)))


def model_score_fn(model: TwoTowerModel, scorer: Scorer, ds: Dataset,
                   train: pd.DataFrame) -> ScoreFn:
    """The served score of ``model`` over every user and item of ``ds``; counts from ``train``."""
    return scorer.score_fn(model.embed("user", ds.users, ds.schema),
                           model.embed("item", ds.items, ds.schema),
                           training_log_counts(train, ds.items))


def tune_prior(model: TwoTowerModel, scorer: Scorer, prep: Prepared, segments: tuple[str, ...],
               grid: tuple[float, ...] = PRIOR_GRID, k: int = 20
               ) -> tuple[Scorer, dict[str, float]]:
    """The prior weight that maximises mean validation recall@k over ``segments``.

    Embeds once and scores every weight of ``grid``; the model is not changed.
    """
    ds = prep.dataset
    users = model.embed("user", ds.users, ds.schema)
    items = model.embed("item", ds.items, ds.schema)
    counts = training_log_counts(prep.val.train, ds.items)
    search = {}
    for w in grid:
        fn = scorer.with_prior(w).score_fn(users, items, counts)
        search[str(w)] = float(np.mean([
            rank_metrics(prep.val_tasks[s], fn, (k,))[f"recall@{k}"] for s in segments]))
    best = max(grid, key=lambda w: search[str(w)])
    return scorer.with_prior(best), search


def evaluate_model(prep: Prepared, model: TwoTowerModel, scorer: Scorer, ks: tuple[int, ...],
                   sides: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Test-segment metrics of a model's served score (see :func:`evaluate_score_fn`)."""
    fn = model_score_fn(model, scorer, prep.dataset, prep.split.train)
    return evaluate_score_fn(prep, fn, ks, sides)
