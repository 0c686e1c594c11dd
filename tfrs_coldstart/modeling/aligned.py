"""A content-only student that maps content into the *teacher's* embedding space (issue 13).

The served model is one model: a warm user (ID known) gets the teacher's user embedding,
an unseen one the student's; the index holds the teacher's embeddings of training items
and the student's of unseen items. So the student's towers must output vectors that score
well *against the teacher's other side*: teacher user . student item (cold-item),
student user . teacher item (cold-user), student . student (cold-both).

:class:`AlignedStudent` trains two content-only towers (width = the teacher's) with

    L = contrastive_weight * L_C + lambda * (kl_weight * T^2 * KL + align_weight * ALIGN)

* ``L_C``: in-batch softmax (log-Q correction, accidental-hit masking, summed over the batch
  like ``tfrs.tasks.Retrieval``) of the cross terms named in ``cfg.contrastive``:
  ``tu_si`` (frozen teacher user . student item), ``su_ti`` (student user . frozen teacher
  item), ``su_si`` (student . student).
* ``KL`` (ALDI, SIGIR 2023): for each term, ``KL(softmax(teacher/T) || softmax(student/T))``
  over the same in-batch candidates: per item over the batch's users for ``tu_si`` (it
  trains the item tower), per user over the batch's items for ``su_ti`` and ``su_si``.
* ``ALIGN``: ``1 - cos(student, teacher)`` (or squared distance) of each entity's embedding.

Each KL row and each alignment term is weighted by the reliability of the teacher's
embedding of its entity (:func:`tfrs_coldstart.modeling.mapper.reliability` of its training count),
normalised to mean 1 over the batch. The teacher is frozen and cached (embedded once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.data.pipeline import interaction_dataset, item_probabilities, table_dataset
from tfrs_coldstart.data.schema import Schema
from tfrs_coldstart.features.encoder import Untracked, dummy_inputs
from tfrs_coldstart.modeling.losses import accidental_hits, in_batch_logits
from tfrs_coldstart.modeling.mapper import reliability
from tfrs_coldstart.modeling.models import student_states
from tfrs_coldstart.modeling.towers import Tower

TERMS = ("tu_si", "su_ti", "su_si")


@dataclass(frozen=True)
class AlignedConfig:
    """Hyper-parameters of :class:`AlignedStudent` (``tower.output_dim``: the teacher's)."""

    tower: TowerConfig = field(default_factory=lambda: TowerConfig(
        id_dim=0, feature_dim=16, hidden=(64,), output_dim=64, dropout=0.3))
    contrastive: tuple[str, ...] = ("tu_si", "su_ti")
    contrastive_weight: float = 1.0  # weight of L_C (0: the terms feed the KL only)
    distill_lambda: float = 1.0  # 0: the ablation (L_C alone)
    kd_temperature: float = 2.0
    kl_weight: float = 1.0
    align_weight: float = 1.0
    align: str = "cos"  # cos | mse
    reliability: str = "tanh"  # tanh | linear | log | none (see mapper.reliability)
    reliability_scale: float = 10.0
    temperature: float | None = None  # None: the teacher's (the served score's)
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    item_id_sink: int = 0  # training-only item ID embedding width (models.student_states)
    # "ridge": the towers learn a residual on a content-only base embedding of every entity
    # (set with AlignedStudent.set_base, e.g. mapper.RidgeMapper's): s = normalize(base +
    # base_mix * tower(x)). "none": s = tower(x).
    base: str = "none"
    base_mix: float = 0.5
    learning_rate: float = 0.005
    batch_size: int = 1024
    epochs: int = 40
    patience: int = 4

    def __post_init__(self) -> None:
        bad = [t for t in self.contrastive if t not in TERMS]
        if bad or not self.contrastive:
            raise ValueError(f"contrastive terms must be a non-empty subset of {TERMS}, got "
                             f"{self.contrastive}")
        if self.align not in ("cos", "mse"):
            raise ValueError(f"align must be cos or mse, not {self.align!r}")
        reliability(np.zeros(1), self.reliability, self.reliability_scale)  # checks the name


def _kl_rows(teacher_logits: tf.Tensor, student_logits: tf.Tensor, t: float) -> tf.Tensor:
    """Per row ``KL(softmax(teacher / t) || softmax(student / t))``: ``[n, m]`` -> ``[n]``."""
    p = tf.stop_gradient(tf.nn.softmax(teacher_logits / t, axis=1))
    return (tf.nn.softmax_cross_entropy_with_logits(labels=p, logits=student_logits / t)
            - tf.nn.softmax_cross_entropy_with_logits(labels=p, logits=teacher_logits / t))


def _normalised(w: tf.Tensor) -> tf.Tensor:
    return w / tf.maximum(tf.reduce_mean(w), 1e-6)


class AlignedStudent(tfrs.Model):
    """Content-only user and item towers in the teacher's space; see the module docstring.

    ``compute_loss`` expects the batches of :func:`interaction_dataset`:
    ``{"user": {"user_id", features...}, "item": {"item_id", features...}, "item_prob"}``;
    every user and item of a batch must be in the teacher cache (:meth:`cache_teacher`).
    """

    def __init__(self, user_tower: Tower, item_tower: Tower, teacher_temperature: float,
                 cfg: AlignedConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user_tower = user_tower
        self.item_tower = item_tower
        self.cfg = cfg
        self.temperature = cfg.temperature or teacher_temperature
        self.teacher_temperature = teacher_temperature

    def tower(self, side: str) -> Tower:
        return self.user_tower if side == "user" else self.item_tower

    def cache_teacher(self, side: str, ids: np.ndarray, embeddings: np.ndarray,
                      counts: np.ndarray) -> None:
        """The frozen teacher's embeddings of one side's training entities and their counts."""
        ids = np.asarray([str(i) for i in ids], dtype=object)
        lookup = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids, tf.string), tf.range(len(ids), dtype=tf.int64)), -1)
        w = reliability(counts, self.cfg.reliability, self.cfg.reliability_scale)
        cache = dict(getattr(self, "_cache", Untracked({})).value)
        cache[side] = (lookup, tf.Variable(np.asarray(embeddings, np.float32), trainable=False),
                       tf.Variable(w.astype(np.float32), trainable=False))
        self._cache = Untracked(cache)

    def set_base(self, side: str, ids: np.ndarray, base: np.ndarray) -> None:
        """Content-only base embeddings of *every* entity of one side (rows aligned with ids)."""
        ids = np.asarray([str(i) for i in ids], dtype=object)
        lookup = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids, tf.string), tf.range(len(ids), dtype=tf.int64)), -1)
        bases = dict(getattr(self, "_base", Untracked({})).value)
        bases[side] = (lookup, tf.Variable(np.asarray(base, np.float32), trainable=False))
        self._base = Untracked(bases)

    def student(self, side: str, inputs: dict[str, tf.Tensor], training: bool = False
                ) -> tf.Tensor:
        """The student's embedding of a batch of one side's raw features."""
        out = self.tower(side)(inputs, training=training)
        bases = getattr(self, "_base", None)
        if bases is None or side not in bases.value:
            return out
        lookup, emb = bases.value[side]
        base = tf.gather(emb, lookup.lookup(inputs[f"{side}_id"]))
        return tf.math.l2_normalize(base + self.cfg.base_mix * out, axis=1)

    def _teacher(self, features: dict[str, Any], side: str) -> tuple[tf.Tensor, tf.Tensor]:
        lookup, emb, w = self._cache.value[side]
        rows = lookup.lookup(features[side][f"{side}_id"])
        tf.debugging.assert_non_negative(rows, message=f"a {side} is missing from the cache")
        return tf.gather(emb, rows), tf.gather(w, rows)

    def compute_loss(self, features: dict[str, Any], training: bool = False) -> tf.Tensor:
        cfg = self.cfg
        su = self.student("user", features["user"], training=training)
        si = self.student("item", features["item"], training=training)
        tu, wu = self._teacher(features, "user")
        ti, wi = self._teacher(features, "item")
        prob = features["item_prob"] if cfg.logq_correction else None
        hits_i = hits_u = None
        if cfg.remove_accidental_hits:
            hits_i = accidental_hits(tf.strings.to_hash_bucket_fast(
                features["item"]["item_id"], tf.int64.max))
            hits_u = accidental_hits(tf.strings.to_hash_bucket_fast(
                features["user"]["user_id"], tf.int64.max))
        temp = self.temperature
        n = tf.shape(su)[0]
        labels = tf.eye(n)
        pairs = {"tu_si": (tu, si), "su_ti": (su, ti), "su_si": (su, si)}
        distil = cfg.distill_lambda > 0
        t_logits = in_batch_logits(tu, ti, temp, prob, hits=hits_i) if distil else None
        loss = tf.constant(0.0)
        kl = tf.constant(0.0)
        for name in cfg.contrastive:
            q, c = pairs[name]
            s_logits = in_batch_logits(q, c, temp, prob, hits=hits_i)
            if cfg.contrastive_weight > 0:
                loss += cfg.contrastive_weight * tf.reduce_sum(
                    tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=s_logits))
            if not distil or cfg.kl_weight <= 0:
                continue
            if name == "tu_si":  # trains items: per item, a distribution over the batch's users
                rows = _kl_rows(in_batch_logits(ti, tu, temp, hits=hits_u),
                                in_batch_logits(si, tu, temp, hits=hits_u), cfg.kd_temperature)
                kl += tf.reduce_sum(_normalised(wi) * rows)
            else:
                rows = _kl_rows(t_logits, s_logits, cfg.kd_temperature)
                kl += tf.reduce_sum(_normalised(wu) * rows)
        if distil:
            loss += cfg.distill_lambda * cfg.kl_weight * cfg.kd_temperature**2 * kl
            if cfg.align_weight > 0:
                if cfg.align == "cos":
                    du = 1.0 - tf.reduce_sum(su * tu, axis=1)
                    di = 1.0 - tf.reduce_sum(si * ti, axis=1)
                else:
                    du = tf.reduce_sum(tf.square(su - tu), axis=1)
                    di = tf.reduce_sum(tf.square(si - ti), axis=1)
                align = tf.reduce_sum(_normalised(wu) * du) + tf.reduce_sum(_normalised(wi) * di)
                loss += cfg.distill_lambda * cfg.align_weight * align
        return loss

    def embed(self, side: str, table: pd.DataFrame, schema: Schema,
              batch_size: int = 4096) -> np.ndarray:
        """Student embeddings of every row of an entity table: ``float32 [n_rows, dim]``."""
        ds = table_dataset(table, schema.side(side), f"{side}_id", batch_size)
        return np.concatenate([self.student(side, b).numpy() for b in ds]).astype(np.float32)


def build_aligned(schema: Schema, users: pd.DataFrame, items: pd.DataFrame, cfg: AlignedConfig,
                  teacher_dim: int, teacher_temperature: float) -> AlignedStudent:
    """Content-only towers (preprocessing adapted on ``users`` / ``items``, the training ones)."""
    tower_cfg = dataclasses.replace(cfg.tower, output_dim=teacher_dim, id_dim=0)
    states = student_states(schema, users, items, tower_cfg, ("user", "item"), cfg.item_id_sink)
    model = AlignedStudent(Tower(states["user"], tower_cfg, name="user_tower"),
                           Tower(states["item"], tower_cfg, name="item_tower"),
                           teacher_temperature, cfg)
    for side in ("user", "item"):
        model.tower(side)(dummy_inputs(model.tower(side).encoder.state))
    return model


class EpochScore(tf.keras.callbacks.Callback):
    """Adds ``score(model)``'s values to the epoch logs (e.g. unified validation recall)."""

    def __init__(self, score: Callable[[AlignedStudent], dict[str, float]]) -> None:
        super().__init__()
        self.score = score

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        vals = self.score(self.model)  # type: ignore[arg-type]
        if logs is not None:
            logs.update(vals)


def fit_aligned(model: AlignedStudent, train_df: Any, users: pd.DataFrame,
                items: pd.DataFrame, schema: Schema, seed: int,
                score: Callable[[AlignedStudent], dict[str, float]] | None = None,
                monitor: str = "val_cold_mean", verbose: int = 0,
                data_options: tf.data.Options | None = None) -> dict[str, Any]:
    """Adam on ``train_df``; with ``score``, early stopping on ``monitor`` (best weights kept).
    ``data_options``: applied to the input (e.g. a distribution strategy's sharding)."""
    cfg = model.cfg
    tf.keras.utils.set_random_seed(seed + 1000)
    prob = item_probabilities(train_df, items["item_id"].astype(str))
    data = interaction_dataset(train_df, users, items, schema.user_features,
                               schema.item_features, cfg.batch_size, shuffle=True, seed=seed,
                               item_prob=prob)
    if data_options is not None:
        data = data.with_options(data_options)
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=cfg.learning_rate))
    callbacks: list[tf.keras.callbacks.Callback] = []
    if score is not None:
        callbacks = [EpochScore(score), tf.keras.callbacks.EarlyStopping(
            monitor=monitor, mode="max", patience=cfg.patience, restore_best_weights=True)]
    hist = model.fit(data, epochs=cfg.epochs, callbacks=callbacks, verbose=verbose)
    h = {k: [float(x) for x in v] for k, v in hist.history.items()}
    best = int(np.argmax(h[monitor])) if monitor in h else len(h["loss"]) - 1
    return {"history": h, "best_epoch": best + 1, "epochs_run": len(h["loss"])}
