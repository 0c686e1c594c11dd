"""One tower: raw features -> MLP -> L2-normalised embedding."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.features.columns import IdColumn, IdsOfColumn, NumericColumn, SharedIds
from tfrs_coldstart.features.encoder import FeatureEncoder


class KernelHidden(tf.keras.layers.Layer):
    """A kernel map's hidden layer: ``(1 + sum of the column outputs)^2`` where a column
    embeds at the layer's width (its table holds its block of the landmarks' design rows),
    and a weight only for the parts that do not (a number's z-score, an ``ids_of`` column's
    teacher-space mean). Why not a ``Dense`` over the concatenation: its kernel would be
    identity blocks, ``n_columns x m x m`` stored floats (5.2M of the 8.0M parameters of the
    MovieLens item tower at 1,320 landmarks).

    ``kinds`` per column: ``identity`` (width ``units``), ``identity+1`` (``units`` then one
    weighted unit: a numeric column) or ``dense`` (all weighted).
    """

    def __init__(self, units: int, kinds: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units, self.kinds = units, list(kinds)

    def build(self, input_shape: list[tf.TensorShape]) -> None:
        self.blocks: list[tf.Variable | None] = []
        for i, (kind, shape) in enumerate(zip(self.kinds, input_shape, strict=True)):
            width = int(shape[-1])
            extra = {"identity": 0, "identity+1": width - self.units, "dense": width}[kind]
            if kind != "dense" and width - extra != self.units:
                raise ValueError(f"column {i} of a kernel tower is {width} wide, not {self.units}")
            self.blocks.append(self.add_weight(name=f"block_{i}", shape=(extra, self.units),
                                               initializer="zeros") if extra else None)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="ones")

    def call(self, outputs: list[tf.Tensor]) -> tf.Tensor:
        total = self.bias
        for kind, out, w in zip(self.kinds, outputs, self.blocks, strict=True):
            if kind == "dense":
                total = total + tf.matmul(out, w)
            else:
                total = total + out[:, :self.units]
                if w is not None:
                    total = total + tf.matmul(out[:, self.units:], w)
        return tf.math.square(total)

    def assign_blocks(self, blocks: list[np.ndarray], bias: np.ndarray) -> None:
        """The weighted parts, in column order (a ``Dense`` over the concatenated columns
        minus its identity blocks), and the bias."""
        weights = [w for w in self.blocks if w is not None]
        if len(blocks) != len(weights):
            raise ValueError(f"{len(blocks)} blocks for the {len(weights)} weighted parts of "
                             "a kernel tower")
        for w, b in zip(weights, blocks, strict=True):
            w.assign(b)
        self.bias.assign(bias)


def kernel_kinds(encoder: FeatureEncoder) -> list[str]:
    """:class:`KernelHidden`'s ``kinds`` for ``encoder``'s columns."""
    kinds = []
    for col in encoder.columns.values():
        if not col.served or isinstance(col, IdColumn):
            raise ValueError(f"a kernel tower cannot read column '{col.name}' (an ID)")
        kinds.append("dense" if isinstance(col, IdsOfColumn)
                     else "identity+1" if isinstance(col, NumericColumn) else "identity")
    return kinds


class Tower(tf.keras.Model):
    """``dict[name -> tensor [batch, ...]]`` -> ``float32 [batch, cfg.output_dim]``, unit L2 norm.

    ``state`` comes from :func:`tfrs_coldstart.features.encoder.build_state`; whether the
    tower uses IDs is decided there (a served :class:`~tfrs_coldstart.features.IdColumn`),
    so a content-only tower has no ID lookup at all. ``shared_ids`` (side -> the teacher's
    ID layers) is passed to a student's tower whose ``ids_of`` features embed through them.
    ``kernel``: the tower of a closed-form kernel map (``modeling.mapper``): its one hidden
    layer is a :class:`KernelHidden` of width ``cfg.hidden[0]``.
    """

    def __init__(self, state: dict[str, Any], cfg: TowerConfig,
                 shared_ids: SharedIds | None = None, kernel: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.encoder = FeatureEncoder(state, cfg, shared_ids)
        self.kernel = (KernelHidden(cfg.hidden[0], kernel_kinds(self.encoder))
                       if kernel else None)
        layers: list[tf.keras.layers.Layer] = []
        for width in () if kernel else cfg.hidden:
            layers.append(tf.keras.layers.Dense(width, activation="relu"))
            if cfg.dropout:
                layers.append(tf.keras.layers.Dropout(cfg.dropout))
        layers.append(tf.keras.layers.Dense(cfg.output_dim))
        self.mlp = tf.keras.Sequential(layers)

    @property
    def feature_names(self) -> list[str]:
        """Raw input keys this tower reads (its serving signature's inputs)."""
        return self.encoder.feature_names

    @property
    def uses_ids(self) -> bool:
        """Whether the served tower reads the entity's ID (the training-only sink does not)."""
        return self.encoder.uses_ids

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        if self.kernel is not None:
            x = self.kernel(self.encoder.column_outputs(inputs))
        else:
            x = self.encoder(inputs, training=training)
        return tf.math.l2_normalize(self.mlp(x, training=training), axis=1)

    def param_count(self, training: bool = False) -> int:
        """Parameters a served tower needs (frozen ones too); ``training`` adds the ID sink."""
        skip = set() if training else {id(w) for w in self.encoder.train_only_weights}
        return int(sum(np.prod(v.shape) for v in self.weights if id(v) not in skip))
