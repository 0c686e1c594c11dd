"""Data layer: schema, loaders (files, pandas, MovieLens, TFDS, synthetic) and the split."""

from __future__ import annotations

from tfrs_coldstart.data.schema import ID_COLUMNS, DataError, FeatureSpec, FeatureType, Schema
from tfrs_coldstart.data.sources import (
    MOVIELENS_SCHEMA,
    TABLE_SUFFIXES,
    Dataset,
    load_dataset,
    load_movielens,
    load_tables,
    load_tfds,
)
from tfrs_coldstart.data.split import (
    SEGMENTS,
    ColdStartSplit,
    LeakageError,
    check_no_leakage,
    cold_start_split,
    sort_ids,
    validation_split,
)
from tfrs_coldstart.data.synthetic import generate

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
    "generate",
    "load_dataset",
    "load_movielens",
    "load_tables",
    "load_tfds",
    "sort_ids",
    "validation_split",
]
