"""tf.data pipelines: entity tables -> feature tensors, interactions -> training batches.

Entity tables are held once as tensors and features are gathered per batch, so a
batch of interactions costs ``O(batch)`` whatever the catalogue size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.config import check_weight_transform
from tfrs_coldstart.data.schema import FeatureSpec, FeatureType
from tfrs_coldstart.data.split import Rows, entity_counts

#: Text cells are cut to this many characters before they enter tf.data. A text column reads
#: only its first few tokens (``features.columns.TEXT_LEN``), which sit far inside this; an
#: uncut 10 MB cell was copied into every batch row that gathered it (a `train` on the default
#: data with one 10 MB title: 7.5 GB peak and 8 min 47 s against 0.8 GB and 37 s).
TEXT_MAX_CHARS = 4096


def cut_text(values: pd.Series) -> pd.Series:
    """Text cells as strings of at most :data:`TEXT_MAX_CHARS` characters."""
    text = values.astype(str)
    return text.str.slice(0, TEXT_MAX_CHARS) if len(text) and (
        text.str.len().max() > TEXT_MAX_CHARS) else text


def feature_arrays(table: pd.DataFrame, specs: tuple[FeatureSpec, ...],
                   id_column: str) -> dict[str, np.ndarray]:
    """Columns of an entity table as arrays with the model's input dtypes.

    Returns ``{id_column: object[n], <feature>: object[n] | float32[n] | float32[n, dim]}``.
    The dtypes are the towers' served input specs (``features.columns``, whose
    ``to_array`` higher layers use); this switch on :class:`FeatureType` stays here because
    the tf.data pipelines below need it and data/ does not import features/.
    ``tests/test_features.py`` checks that the two agree for every feature type.
    """
    out: dict[str, np.ndarray] = {id_column: table[id_column].astype(str).to_numpy(dtype=object)}
    for spec in specs:
        col = table[spec.name]
        if spec.type is FeatureType.NUMERIC:
            out[spec.name] = col.to_numpy(dtype=np.float32)
        elif spec.type is FeatureType.DENSE_VECTOR:
            out[spec.name] = (np.stack(col.to_numpy()).astype(np.float32) if len(col)
                              else np.zeros((0, spec.dim or 0), np.float32))
        elif spec.type is FeatureType.TEXT:
            out[spec.name] = cut_text(col).to_numpy(dtype=object)
        else:
            out[spec.name] = col.astype(str).to_numpy(dtype=object)
    return out


def table_dataset(table: pd.DataFrame, specs: tuple[FeatureSpec, ...], id_column: str,
                  batch_size: int) -> tf.data.Dataset:
    """Batches of one entity table's feature dicts, in table order (for embedding)."""
    return tf.data.Dataset.from_tensor_slices(feature_arrays(table, specs, id_column)).batch(
        batch_size).prefetch(tf.data.AUTOTUNE)


def item_counts(counts: pd.Series | dict[str, int], item_ids: pd.Series) -> np.ndarray:
    """Count of each id in ``item_ids`` (0 when absent): ``float64 [n]``.

    ``counts`` maps item id -> count, e.g. ``train["item_id"].value_counts()``.
    """
    return item_ids.astype(str).map(counts).fillna(0).to_numpy(dtype=np.float64)


def item_probabilities(train: Rows, item_ids: pd.Series) -> np.ndarray:
    """Training frequency of each item in ``item_ids`` (the log-Q sampling probability);
    ``train``: a frame or a streamed part (:mod:`~tfrs_coldstart.data.split`)."""
    freq = entity_counts(train, "item", item_ids)
    return (freq / max(len(train), 1)).astype(np.float32)


def item_log_counts(train: Rows, items: pd.DataFrame) -> np.ndarray:
    """``log(1 + training count)`` per row of ``items``: the popularity prior's feature."""
    counts = entity_counts(train, "item", items["item_id"])
    return np.log1p(counts).astype(np.float32)


def interaction_weights(interactions: Rows, transform: str) -> np.ndarray | None:
    """Loss weight of each interaction from its ``weight`` column (a rating, a play count).

    ``none``: every interaction weighs 1 (returns None); ``raw``: the weight itself;
    ``log1p``: ``log(1 + weight)``; ``threshold:X``: 1 where the weight is at least X, else
    0 (the interaction stays an in-batch negative for others but teaches nothing as a
    positive). Weights are scaled to mean 1, so the learning rate means the same; an
    interactions table without a ``weight`` column gives None. A streamed part gives None:
    its batches weigh their rows themselves (``interaction_dataset(weight_transform=)``).
    """
    check_weight_transform(transform)
    if not isinstance(interactions, pd.DataFrame):
        return None
    if transform == "none" or "weight" not in interactions.columns:
        return None
    w = interactions["weight"].to_numpy(dtype=np.float64)
    if transform == "log1p":
        w = np.log1p(np.maximum(w, 0.0))
    elif transform.startswith("threshold:"):
        w = (w >= float(transform.split(":", 1)[1])).astype(np.float64)
    w = np.maximum(w, 0.0)
    mean = w.mean() if len(w) else 0.0
    if not mean > 0:
        raise ValueError(f"interaction weights ({transform}) are all zero: nothing to learn")
    return (w / mean).astype(np.float32)


def feature_gather(users: pd.DataFrame, items: pd.DataFrame,
                   user_specs: tuple[FeatureSpec, ...], item_specs: tuple[FeatureSpec, ...],
                   item_prob: np.ndarray) -> Callable[..., dict[str, Any]]:
    """``gather(user_rows int64 [b], item_rows int64 [b], [weight float32 [b]])`` -> one batch
    ``{"user": {...}, "item": {...}, "item_prob": float32 [b], ["weight"]}``.

    The entity tables are held once as constants (``item_prob`` aligned with ``items``), so a
    batch costs ``O(batch)`` whatever the catalogue size; shared by the in-memory and the
    streamed (``data/stream.py``) pipelines, so both give the model the same batches.
    """
    user_t = {k: tf.constant(v) for k, v in feature_arrays(users, user_specs, "user_id").items()}
    item_t = {k: tf.constant(v) for k, v in feature_arrays(items, item_specs, "item_id").items()}
    prob_t = tf.constant(np.maximum(item_prob, 1e-9).astype(np.float32))

    def gather(u: tf.Tensor, i: tf.Tensor, *w: tf.Tensor) -> dict[str, Any]:
        out = {"user": {k: tf.gather(v, u) for k, v in user_t.items()},
               "item": {k: tf.gather(v, i) for k, v in item_t.items()},
               "item_prob": tf.gather(prob_t, i)}
        if w:
            out["weight"] = w[0]
        return out

    return gather


def interaction_dataset(
    interactions: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    user_specs: tuple[FeatureSpec, ...],
    item_specs: tuple[FeatureSpec, ...],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    item_prob: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    epochs: tuple[int, int] | None = None,
    stream: Any = None,
    weight_transform: str = "none",
) -> tf.data.Dataset:
    """Batches ``{"user": {...}, "item": {...}, "item_prob": float32 [batch]}`` (plus
    ``"weight": float32 [batch]`` when ``weights`` are given, see :func:`interaction_weights`).

    ``users``/``items`` are the entity tables; ``item_prob`` is aligned with
    ``items`` rows (default: frequency in ``interactions``); ``weights`` with
    ``interactions`` rows.

    ``epochs=(start, stop)`` (with ``shuffle``): the batches of epochs ``start..stop-1`` in
    one finite dataset (``ceil(n / batch_size)`` batches each, for ``fit(steps_per_epoch=)``),
    epoch ``e`` in the order of a stateless shuffle seeded by ``(seed, e)``: an epoch's
    order does not depend on the epochs before it, so a fit resumed at epoch ``start`` sees
    the same batches as an uninterrupted one.

    ``stream`` (``data.format=stream``: the dataset's
    :class:`~tfrs_coldstart.data.stream.StreamedInteractions`): the same batches' rows, those of
    ``interactions`` (by index: file rows), are read shard by shard from the files instead of
    from the frame (per-epoch shard order and a shuffle buffer, not a global shuffle).
    ``interactions`` may be a streamed part (:class:`~tfrs_coldstart.data.stream.StreamPart`)
    instead: its role's rows, read the same way, weighted by ``weight_transform`` of their
    ``weight`` column (a frame's weights come as ``weights``).
    """
    if item_prob is None:
        item_prob = item_probabilities(interactions, items["item_id"].astype(str))
    if not isinstance(interactions, pd.DataFrame):
        return interactions.dataset(user_specs=user_specs, item_specs=item_specs,
                                    batch_size=batch_size, shuffle=shuffle, seed=seed,
                                    item_prob=item_prob, epochs=epochs,
                                    weight_transform=weight_transform)
    if stream is not None:
        return stream.dataset(rows=interactions.index.to_numpy(), row_weights=weights,
                              user_specs=user_specs, item_specs=item_specs,
                              batch_size=batch_size, shuffle=shuffle, seed=seed,
                              item_prob=item_prob, epochs=epochs)
    u_index = pd.Index(users["user_id"].astype(str))
    i_index = pd.Index(items["item_id"].astype(str))
    u_rows = u_index.get_indexer(interactions["user_id"].astype(str))
    i_rows = i_index.get_indexer(interactions["item_id"].astype(str))
    if (u_rows < 0).any() or (i_rows < 0).any():
        raise ValueError("interactions name users or items missing from the entity tables")
    gather = feature_gather(users, items, user_specs, item_specs, item_prob)
    cols: tuple[np.ndarray, ...] = (u_rows.astype(np.int64), i_rows.astype(np.int64))
    if weights is not None:
        if len(weights) != len(interactions):
            raise ValueError(f"{len(weights)} weights for {len(interactions)} interactions")
        cols += (np.asarray(weights, np.float32),)
    if shuffle and epochs is not None:
        tensors = tuple(tf.constant(c) for c in cols)
        n = len(u_rows)

        def epoch_batches(e: tf.Tensor) -> tf.data.Dataset:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e]))
            return tf.data.Dataset.from_tensor_slices(
                tuple(tf.gather(t, order) for t in tensors)).batch(batch_size)

        start, stop = epochs
        return tf.data.Dataset.range(start, stop).flat_map(epoch_batches).map(
            gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    ds = tf.data.Dataset.from_tensor_slices(cols)
    if shuffle:
        ds = ds.shuffle(min(len(u_rows), 1_000_000), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE)
