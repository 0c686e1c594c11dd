"""Data layer: schema, loaders (files, pandas, MovieLens, TFDS, synthetic) and the split.

One concern per module: ``schema`` (feature types, ``DataError``), ``dataset`` (the
:class:`Dataset` every loader returns), ``tables`` (read, validate, normalise), ``movielens``,
``tfds``, ``synthetic``, ``load`` (:func:`load_dataset` by format name), ``split`` (the
cold-start protocol), ``pipeline`` (tf.data input) and ``derive`` (a schema's derivations in
TensorFlow ops); the last two import TensorFlow, so they are not imported here.
"""

from __future__ import annotations

from tfrs_coldstart.data.dataset import Dataset
from tfrs_coldstart.data.load import load_dataset
from tfrs_coldstart.data.movielens import MOVIELENS_SCHEMA, load_movielens
from tfrs_coldstart.data.schema import ID_COLUMNS, DataError, FeatureSpec, FeatureType, Schema
from tfrs_coldstart.data.split import (
    SEGMENTS,
    ColdStartSplit,
    LeakageError,
    check_no_leakage,
    cold_start_split,
    entity_counts,
    known_ids,
    sample_users,
    seen_rows,
    sort_ids,
    validation_split,
)
from tfrs_coldstart.data.synthetic import generate
from tfrs_coldstart.data.tables import TABLE_SUFFIXES, load_tables
from tfrs_coldstart.data.tfds import load_tfds

__all__ = [
    "ColdStartSplit",
    "DataError",
    "Dataset",
    "FeatureSpec",
    "FeatureType",
    "ID_COLUMNS",
    "LeakageError",
    "MOVIELENS_SCHEMA",
    "SEGMENTS",
    "Schema",
    "TABLE_SUFFIXES",
    "check_no_leakage",
    "cold_start_split",
    "entity_counts",
    "generate",
    "known_ids",
    "load_dataset",
    "load_movielens",
    "load_tables",
    "load_tfds",
    "sample_users",
    "seen_rows",
    "sort_ids",
    "validation_split",
]
