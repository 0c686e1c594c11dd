"""A served model's inputs: the source columns of its derived features, derived in the graph.

A tower reads its features by name (:meth:`FeatureColumn.input_spec`); a feature the schema
derives from source columns (``source`` + ``derive``) is computed from them inside the
exported model by :func:`tfrs_coldstart.data.derive.derive`, the same ops the loaders ran on
the training tables. :class:`SourceInputs` turns the tower's input specs into the served ones
and the served inputs back into the tower's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.data.derive import derive
from tfrs_coldstart.data.pipeline import feature_arrays
from tfrs_coldstart.data.schema import FeatureSpec, source_columns
from tfrs_coldstart.errors import UserError

__all__ = ["SourceInputError", "SourceInputs", "served_arrays"]


def served_arrays(table: pd.DataFrame, specs: tuple[FeatureSpec, ...],
                  id_column: str) -> dict[str, np.ndarray]:
    """Rows of a loaded users or items table as arrays of every input a served model may
    take: the id, each feature (``data.pipeline.feature_arrays``) and each source column of a
    derived feature (``object[n]`` of ``str``, or ``float32[n]`` for numeric sources)."""
    out = feature_arrays(table, specs, id_column)
    for col in source_columns(specs):
        out[col.name] = (table[col.name].to_numpy(dtype=np.float32) if col.numeric
                         else table[col.name].astype(str).to_numpy(dtype=object))
    return out


class SourceInputError(UserError, ValueError):
    """A schema's source columns cannot be served inputs (a name or dtype clash)."""


class SourceInputs:
    """The served inputs of one tower, given its side's schema features.

    ``features``: the tower's own inputs (name -> ``tf.TensorSpec``, batch first): its
    features, and the ID or request-time history where it reads them. Each input that the
    schema derives becomes its source columns (``tf.string [batch]``, or ``tf.float32
    [batch]`` for numeric sources); every other input stays as it is. :attr:`specs` are the
    served inputs, in the order of ``features`` (sources in the place of the first feature
    made from them); calling the object maps served inputs to the tower's.
    """

    def __init__(self, schema_features: Sequence[FeatureSpec],
                 features: Mapping[str, tf.TensorSpec]) -> None:
        by_name = {s.name: s for s in schema_features}
        self.features = dict(features)
        self.derived = {k: by_name[k] for k in features
                        if k in by_name and by_name[k].derive is not None}
        specs: dict[str, tf.TensorSpec] = {}
        for key, spec in features.items():
            if key not in self.derived:
                if key in specs and specs[key].dtype != spec.dtype:
                    raise SourceInputError(
                        f"input '{key}' is read as {spec.dtype.name} and, as a source column, "
                        f"as {specs[key].dtype.name}; use separate columns")
                specs[key] = spec
                continue
            fs = self.derived[key]
            dtype = tf.float32 if fs.numeric_sources else tf.string
            for col in fs.source:
                if col in specs and specs[col].dtype != dtype:
                    raise SourceInputError(
                        f"input '{col}' is read as {specs[col].dtype.name} and, as a source "
                        f"of '{key}', as {dtype.name}; use separate columns")
                specs.setdefault(col, tf.TensorSpec([None], dtype, name=col))
            if fs.takes_fill and fs.fill is None:
                raise SourceInputError(
                    f"feature '{key}' ({fs.derive}) has no saved 'fill'; the schema was not "
                    "written by a loader (load the tables with the schema, then export)")
        self.specs = specs

    @property
    def derives(self) -> bool:
        """Whether the served inputs differ from the tower's (some feature is derived)."""
        return bool(self.derived)

    def __call__(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Served inputs (:attr:`specs`) -> the tower's inputs (``features``): ``[batch]``
        each, derived features computed from their sources."""
        out = {}
        for key in self.features:
            fs = self.derived.get(key)
            out[key] = (inputs[key] if fs is None
                        else derive(fs, [inputs[c] for c in fs.source]))
        return out
