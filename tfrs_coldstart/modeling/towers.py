"""One tower: raw features -> MLP -> L2-normalised embedding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.features.columns import SharedIds
from tfrs_coldstart.features.encoder import FeatureEncoder


class Tower(tf.keras.Model):
    """``dict[name -> tensor [batch, ...]]`` -> ``float32 [batch, cfg.output_dim]``, unit L2 norm.

    ``state`` comes from :func:`tfrs_coldstart.features.encoder.build_state`; whether the
    tower uses IDs is decided there (a served :class:`~tfrs_coldstart.features.IdColumn`),
    so a content-only tower has no ID lookup at all. ``shared_ids`` (side -> the teacher's
    ID layers) is passed to a student's tower whose ``ids_of`` features embed through them.
    """

    def __init__(self, state: dict[str, Any], cfg: TowerConfig,
                 shared_ids: SharedIds | None = None,
                 activation: str | Callable[[tf.Tensor], tf.Tensor] = "relu",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.encoder = FeatureEncoder(state, cfg, shared_ids)
        layers: list[tf.keras.layers.Layer] = []
        for width in cfg.hidden:  # activation: a kernel map's squares its hidden layer
            layers.append(tf.keras.layers.Dense(width, activation=activation))
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
        x = self.encoder(inputs, training=training)
        return tf.math.l2_normalize(self.mlp(x, training=training), axis=1)

    def param_count(self, training: bool = False) -> int:
        """Parameters a served tower needs (frozen ones too); ``training`` adds the ID sink."""
        skip = set() if training else {id(w) for w in self.encoder.train_only_weights}
        return int(sum(np.prod(v.shape) for v in self.weights if id(v) not in skip))
