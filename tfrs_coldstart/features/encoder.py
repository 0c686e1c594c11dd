"""One tower's input encoder, built from its preprocessing state (adapted on training entities).

The preprocessing *state* (vocabularies, means, bucket boundaries) is plain data
(:func:`build_state`), saved as JSON next to a run, so a model can be rebuilt and
its checkpoint restored in another process (fine-tuning, export) without
re-reading the training data. Each entry is one typed column
(:mod:`tfrs_coldstart.features.columns`), which owns its layers, its encode step and its
served input spec; this module only puts the columns of one side together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import tensorflow as tf

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.data.schema import FeatureSpec
from tfrs_coldstart.features.columns import (
    HISTORY,
    ID_FEATURE,
    FeatureColumn,
    IdColumn,
    IdsOfColumn,
    SharedIds,
    build_columns,
    columns_from_state,
    columns_to_state,
)

__all__ = ["ID_FEATURE", "FeatureEncoder", "Untracked", "build_state", "dummy_inputs"]

#: One side's preprocessing state: state key -> a column's JSON form (preprocessing.json).
State = dict[str, dict[str, Any]]


def build_state(
    specs: tuple[FeatureSpec, ...],
    table: pd.DataFrame,
    id_column: str,
    use_ids: bool,
    cfg: TowerConfig,
    id_features: str = "learned",
) -> State:
    """Vocabularies and statistics of one side, from the training entities' rows only.

    ``id_features``: how ``ids_of`` features are embedded (see :func:`build_columns`; a
    student passes its ``TowerConfig.id_features``, the teacher keeps ``learned``).
    """
    return columns_to_state(build_columns(specs, table, id_column, use_ids, cfg, id_features))


class Untracked:
    """A value Keras must not wrap or track."""

    def __init__(self, value: Any) -> None:
        self.value = value


class FeatureEncoder(tf.keras.layers.Layer):
    """Encodes one side's raw feature dict into a single dense vector.

    Input: ``dict[name -> tensor]`` (each column's :meth:`~FeatureColumn.input_spec`); extra
    keys are ignored, so a content-only encoder never sees an ID even when one is passed.
    Output: ``float32 [batch, output_width]``, the columns' blocks in state order.
    ``shared_ids`` (side -> the teacher's ID layers, see :meth:`id_layers`) is what a
    student's ``ids_of`` columns embed through; other encoders need none.
    """

    def __init__(self, state: Mapping[str, Mapping[str, Any]], cfg: TowerConfig,
                 shared_ids: SharedIds | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Held outside Keras' attribute tracking: vocabularies can hold a million ids.
        self._holder = Untracked(state)
        self._columns = Untracked(columns_from_state(state))
        self.cfg = cfg
        # Layers by state key and role: ``_parts/<key>/<role>`` are the checkpoint paths.
        self._parts: dict[str, Mapping[str, Any]] = {}
        for name, col in self.columns.items():
            self._parts[name] = col.build_layers(cfg, shared_ids)

    @property
    def state(self) -> Mapping[str, Mapping[str, Any]]:
        """The preprocessing state this encoder was built from (its JSON form)."""
        return self._holder.value

    @property
    def columns(self) -> dict[str, FeatureColumn]:
        """The typed columns, by state key, in state order (read-only)."""
        return self._columns.value

    @property
    def uses_ids(self) -> bool:
        """Whether the served encoder reads the entity's ID (a training-only sink does not)."""
        return any(isinstance(c, IdColumn) and c.served for c in self.columns.values())

    @property
    def train_only_weights(self) -> list[tf.Variable]:
        """Variables read in training only (a student's ID sink); not needed to serve."""
        return [w for name, col in self.columns.items() if not col.served
                for layer in self._parts[name].values() if isinstance(layer, tf.keras.layers.Layer)
                for w in layer.weights]

    def drop_train_only(self) -> None:
        """Forget the training-only parts, so an exported model does not carry them: the ID
        sink of a million-item catalogue is a 128 MB table and a million-string lookup that
        inference never reads. Outputs are unchanged; the encoder can no longer train them."""
        for name, col in self.columns.items():
            if not col.served:
                self._parts[name] = col.serving_layers(self._parts[name])

    def id_layers(self) -> dict[str, tf.keras.layers.Layer] | None:
        """The served ID column's ``{"lookup": StringLookup, "emb": Embedding}`` (None without
        one): what a student's ``ids_of`` features of this side embed through."""
        for name, col in self.columns.items():
            if isinstance(col, IdColumn) and col.served:
                return dict(self._parts[name])
        return None

    def known(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """``bool [batch]``: whether each row's ID is in the training vocabulary (not OOV).

        The unified served model asks this of the teacher: a known ID gets the teacher's
        embedding, an unseen one the student's.
        """
        for name, col in self.columns.items():
            if isinstance(col, IdColumn) and col.served:
                return self._parts[name]["lookup"](inputs[col.column]) > 0  # 0: the OOV bucket
        raise ValueError("this encoder reads no ID: it cannot tell known entities apart")

    def history_count(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        """``float32 [batch]``: the known items of each row's request-time history (None
        when this encoder reads no history): what the served score's prior shrinks with."""
        col = self.columns.get(HISTORY)
        if not isinstance(col, IdsOfColumn):
            return None
        return col.count(self._parts[HISTORY], inputs)

    @property
    def feature_names(self) -> list[str]:
        """The raw input keys this encoder reads (the ID column included if it uses IDs)."""
        return [col.input_key for col in self.columns.values() if col.served]

    def column_outputs(self, inputs: Mapping[str, tf.Tensor],
                       training: bool = False) -> list[tf.Tensor]:
        """Each column's output ``[batch, width]``, in column order (what :meth:`call`
        concatenates): a kernel map's tower sums them instead."""
        return [col.encode(self._parts[name], inputs, training)
                for name, col in self.columns.items()]

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        cols = list(self.columns.items())
        outs = self.column_outputs(inputs, training)
        if not outs:
            raise ValueError("a tower needs at least one input: this side has no features "
                             "and no IDs")
        rate = self.cfg.feature_dropout
        if training and rate > 0:
            # Blank whole features per example (ID entries excepted): a missing-feature
            # dropout, not Keras' unit dropout, which never removes a feature entirely.
            n = tf.shape(outs[0])[0]
            outs = [o * tf.cast(tf.random.uniform([n, 1]) >= rate, o.dtype) if col.content
                    else o for o, (_, col) in zip(outs, cols, strict=True)]
        return tf.concat(outs, axis=1)


def dummy_inputs(state: Mapping[str, Mapping[str, Any]]) -> dict[str, tf.Tensor]:
    """A one-row input dict for ``state``: builds a tower's variables before restoring weights."""
    return {col.input_key: col.dummy() for col in columns_from_state(state).values()
            if col.served}
