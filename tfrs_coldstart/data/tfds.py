"""TensorFlow Datasets' MovieLens ``*-ratings`` datasets as the three tables.

Users get ``u.user``'s columns (``age``, ``gender``, ``occupation``, ``zip_code``) and items
``movie_title`` and ``genres``; :data:`TFDS_SCHEMA` derives the features from them as the
MovieLens loader does (age band, zip prefix, title without its year, year from the title).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tfrs_coldstart.data.dataset import Dataset
from tfrs_coldstart.data.movielens import ML1M_SCHEMA, MOVIELENS_USER_FEATURES
from tfrs_coldstart.data.schema import DataError, Schema
from tfrs_coldstart.data.tables import load_tables, object_series

__all__ = ["TFDS_SCHEMA", "load_tfds"]

#: The TFDS datasets' schema: ML-100K's user features, ML-1M's item features (genres come
#: joined by "|"; the year only from the title).
TFDS_SCHEMA = Schema(MOVIELENS_USER_FEATURES, ML1M_SCHEMA.item_features)


def load_tfds(
    name: str = "movielens/100k-ratings",
    data_dir: str | None = None,
    download: bool = True,
    batch_size: int = 65_536,
) -> Dataset:
    """Build the three tables from a TFDS MovieLens ratings dataset (``tfds.load``).

    User features come from each user's first rating row; datasets without user features
    (e.g. ``movielens/25m-ratings``) give a featureless user side.
    """
    # Lazy (optional heavy extra): only this loader needs tensorflow_datasets, and importing
    # tfrs_coldstart.data must not load TensorFlow. The package __init__ (already run, since
    # this module lives in it) has set TF_USE_LEGACY_KERAS before TensorFlow loads.
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        ds, info = tfds.load(
            name, split="train", data_dir=data_dir, with_info=True, shuffle_files=False,
            download=download,
        )
    except Exception as e:
        raise DataError(
            f"tfds:{name}: could not load ({type(e).__name__}: {e}); check the dataset name "
            "(e.g. 'movielens/100k-ratings'), data_dir, and that it is downloaded"
        ) from None
    features = info.features
    needed = ("user_id", "movie_id", "movie_title", "movie_genres", "timestamp", "user_rating")
    missing = [f for f in needed if f not in features]
    if missing:
        raise DataError(
            f"tfds:{name}: feature(s) {missing} missing; use a MovieLens '*-ratings' dataset"
        )
    genre_names = tf.constant(list(features["movie_genres"].feature.names))
    has_users = all(
        f in features
        for f in ("user_gender", "bucketized_user_age", "user_occupation_text", "user_zip_code")
    )

    def _flatten(ex: dict[str, Any]) -> dict[str, Any]:
        out = {k: ex[k] for k in needed if k != "movie_genres"}
        out["movie_genres"] = tf.strings.reduce_join(
            tf.gather(genre_names, tf.cast(ex["movie_genres"], tf.int32)), separator="|"
        )
        if has_users:
            for k in ("user_gender", "bucketized_user_age", "user_occupation_text",
                      "user_zip_code"):
                out[k] = ex[k]
        return out

    columns: dict[str, list[np.ndarray]] = {}
    for batch in tfds.as_numpy(ds.map(_flatten).batch(batch_size)):
        for k, v in batch.items():
            columns.setdefault(k, []).append(v)
    if not columns:
        raise DataError(f"tfds:{name}: the dataset has no rows")
    cols = {k: np.concatenate(v) for k, v in columns.items()}

    def _text(a: np.ndarray) -> np.ndarray:
        return np.array([b.decode("utf-8", errors="replace") for b in a], dtype=object)

    uid, iid = _text(cols["user_id"]), _text(cols["movie_id"])
    inter = pd.DataFrame({"user_id": object_series(uid), "item_id": object_series(iid),
                          "timestamp": cols["timestamp"].astype(np.int64),
                          "weight": cols["user_rating"].astype(np.float32)})
    first_item = pd.Series(iid).drop_duplicates(keep="first").index.to_numpy()
    genres = _text(cols["movie_genres"][first_item])
    items = pd.DataFrame({
        "item_id": object_series(iid[first_item]),
        "movie_title": object_series(_text(cols["movie_title"][first_item])),
        "genres": [g or "unknown" for g in genres],  # TFDS's empty genre list
    })
    if has_users:
        first_user = pd.Series(uid).drop_duplicates(keep="first").index.to_numpy()
        users = pd.DataFrame({
            "user_id": object_series(uid[first_user]),
            "age": cols["bucketized_user_age"][first_user].astype(np.float32),
            "gender": np.where(cols["user_gender"][first_user], "M", "F"),
            "occupation": _text(cols["user_occupation_text"][first_user]),
            "zip_code": _text(cols["user_zip_code"][first_user]),
        })
        schema = TFDS_SCHEMA
    else:
        users = None
        schema = Schema(user_features=(), item_features=TFDS_SCHEMA.item_features)
    try:
        return load_tables(inter, users, items, schema, name=f"tfds:{name}")
    except DataError as e:
        raise DataError(f"tfds:{name}: {e}") from None

