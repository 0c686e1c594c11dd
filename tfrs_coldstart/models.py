"""Teacher and student two-tower models (``tfrs.Model`` subclasses) and the distillation loss.

Batches are ``{"user": {name: [batch]}, "item": {name: [batch]}, "item_prob": [batch]}``
as made by :func:`tfrs_coldstart.data.pipeline.interaction_dataset`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_coldstart.config import StudentConfig, TeacherConfig, TowerConfig
from tfrs_coldstart.data.pipeline import table_dataset
from tfrs_coldstart.data.schema import Schema
from tfrs_coldstart.features import build_state
from tfrs_coldstart.towers import Tower

SIDES = ("user", "item")
_NEG = -1e9


def _logq(prob: tf.Tensor) -> tf.Tensor:
    return tf.math.log(tf.clip_by_value(prob, 1e-9, 1.0))


def in_batch_logits(query: tf.Tensor, candidates: tf.Tensor, temperature: float,
                    item_prob: tf.Tensor | None = None,
                    candidate_ids: tf.Tensor | None = None) -> tf.Tensor:
    """In-batch score matrix ``[batch, batch]`` as ``tfrs.tasks.Retrieval`` forms it.

    Scores are divided by ``temperature``, log-Q corrected when ``item_prob`` is
    given, and accidental hits (the same item at another column) are masked out.
    """
    logits = tf.matmul(query, candidates, transpose_b=True) / temperature
    if item_prob is not None:
        logits -= _logq(item_prob)[None, :]
    if candidate_ids is not None:
        same = tf.equal(candidate_ids[:, None], candidate_ids[None, :])
        hit = tf.logical_and(same, tf.logical_not(tf.eye(tf.shape(logits)[0], dtype=tf.bool)))
        logits = tf.where(hit, tf.cast(_NEG, logits.dtype), logits)
    return logits


def distillation_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
                      temperature: float) -> tf.Tensor:
    """Mean over rows of ``KL(softmax(t / T) || softmax(s / T))``: ``[batch, n]`` -> scalar.

    Multiply by ``T**2`` (as the caller does) to keep gradient scale independent of T.
    """
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    p = tf.nn.softmax(t, axis=1)
    kl = tf.reduce_sum(p * (tf.nn.log_softmax(t, axis=1) - tf.nn.log_softmax(s, axis=1)), axis=1)
    return tf.reduce_mean(kl)


class TwoTowerModel(tfrs.Model):
    """Shared parts: two towers, an in-batch softmax retrieval task, embedding helpers."""

    def __init__(self, user_tower: Tower, item_tower: Tower, temperature: float,
                 logq_correction: bool, remove_accidental_hits: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user_tower = user_tower
        self.item_tower = item_tower
        self.temperature = temperature
        self.logq_correction = logq_correction
        self.remove_hits = remove_accidental_hits
        self.task = tfrs.tasks.Retrieval(temperature=temperature,
                                         remove_accidental_hits=remove_accidental_hits)
        # Ranking adds ``popularity_prior * log(1 + training count)`` to ``u.i / temperature``;
        # chosen on validation (students) since content alone under-predicts popularity.
        self.popularity_prior = 0.0

    def tower(self, side: str) -> Tower:
        return self.user_tower if side == "user" else self.item_tower

    def retrieval_loss(self, q: tf.Tensor, c: tf.Tensor, features: dict[str, Any],
                       training: bool) -> tf.Tensor:
        return self.task(
            q, c,
            candidate_sampling_probability=features["item_prob"] if self.logq_correction else None,
            candidate_ids=features["item"]["item_id"] if self.remove_hits else None,
            compute_metrics=not training,
        )

    def compute_loss(self, features: dict[str, Any], training: bool = False) -> tf.Tensor:
        q = self.user_tower(features["user"], training=training)
        c = self.item_tower(features["item"], training=training)
        return self.retrieval_loss(q, c, features, training)

    def embed(self, side: str, table: pd.DataFrame, schema: Schema,
              batch_size: int = 4096) -> np.ndarray:
        """Embeddings of every row of an entity table: ``float32 [n_rows, dim]``."""
        tower = self.tower(side)
        ds = table_dataset(table, schema.side(side), f"{side}_id", batch_size)
        parts = [tower(b, training=False).numpy() for b in ds]
        if not parts:
            return np.zeros((0, tower.cfg.output_dim), np.float32)
        return np.concatenate(parts).astype(np.float32)

    def param_count(self) -> int:
        return self.user_tower.param_count() + self.item_tower.param_count()


class TeacherModel(TwoTowerModel):
    """IDs plus content in both towers; in-batch softmax with log-Q correction."""


class StudentModel(TwoTowerModel):
    """Content-only towers trained with ``L_C + lambda * T^2 * KL(teacher || student)``.

    A side with no content features keeps the teacher's (frozen) ID tower; see
    :func:`build_student`.
    """

    def __init__(self, user_tower: Tower, item_tower: Tower, teacher: TeacherModel | None,
                 cfg: StudentConfig, **kwargs: Any) -> None:
        super().__init__(user_tower, item_tower, cfg.temperature, cfg.logq_correction,
                         cfg.remove_accidental_hits, **kwargs)
        self.cfg = cfg
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
        if teacher is not None and cfg.align_weight > 0:
            self.align_user = tf.keras.layers.Dense(teacher.user_tower.cfg.output_dim,
                                                    use_bias=False)
            self.align_item = tf.keras.layers.Dense(teacher.item_tower.cfg.output_dim,
                                                    use_bias=False)

    def build_extras(self) -> None:
        """Create the alignment variables before the optimizer sees the model."""
        if hasattr(self, "align_user"):
            self.align_user(tf.zeros([1, self.user_tower.cfg.output_dim]))
            self.align_item(tf.zeros([1, self.item_tower.cfg.output_dim]))

    @staticmethod
    def _teacher_view(inputs: dict[str, tf.Tensor], id_key: str, keep_ids: bool) -> dict:
        """The teacher's input; without IDs it scores from content alone (its cold-start view)."""
        if keep_ids or id_key not in inputs:
            return inputs
        return {**inputs, id_key: tf.fill(tf.shape(inputs[id_key]), "")}

    def compute_loss(self, features: dict[str, Any], training: bool = False) -> tf.Tensor:
        q = self.user_tower(features["user"], training=training)
        c = self.item_tower(features["item"], training=training)
        loss = self.retrieval_loss(q, c, features, training)
        if self.teacher is None or (self.cfg.distill_lambda <= 0 and self.cfg.align_weight <= 0):
            return loss
        tq = tf.stop_gradient(self.teacher.user_tower(
            self._teacher_view(features["user"], "user_id", self.cfg.distill_user_ids),
            training=False))
        tc = tf.stop_gradient(self.teacher.item_tower(
            self._teacher_view(features["item"], "item_id", self.cfg.distill_item_ids),
            training=False))
        prob = features["item_prob"] if self.logq_correction else None
        ids = features["item"]["item_id"] if self.remove_hits else None
        if self.cfg.distill_lambda > 0:
            t_logits = in_batch_logits(tq, tc, self.teacher.temperature, prob, ids)
            s_logits = in_batch_logits(q, c, self.temperature, prob, ids)
            temp = self.cfg.distill_temperature
            loss += self.cfg.distill_lambda * temp**2 * distillation_loss(t_logits, s_logits, temp)
        if self.cfg.align_weight > 0:
            au = tf.math.l2_normalize(self.align_user(q), axis=1)
            ai = tf.math.l2_normalize(self.align_item(c), axis=1)
            align = tf.reduce_mean(1.0 - tf.reduce_sum(au * tq, axis=1)) + tf.reduce_mean(
                1.0 - tf.reduce_sum(ai * tc, axis=1))
            loss += self.cfg.align_weight * align
        return loss


def teacher_states(schema: Schema, users: pd.DataFrame, items: pd.DataFrame,
                   cfg: TowerConfig) -> dict[str, dict[str, Any]]:
    """Preprocessing state for both teacher towers from the *training* entity tables."""
    return {side: build_state(schema.side(side), table, f"{side}_id", cfg.id_dim > 0, cfg)
            for side, table in (("user", users), ("item", items))}


def student_sides(schema: Schema, override: str = "auto") -> tuple[str, ...]:
    """Which sides get a content-only tower: the sides with content features, unless overridden."""
    if override == "auto":
        sides = tuple(s for s in SIDES if schema.side(s))
    elif override == "both":
        sides = SIDES
    elif override in SIDES:
        sides = (override,)
    else:
        raise ValueError(
            f"student.distill_sides must be auto, both, user or item, not {override!r}")
    for s in sides:
        if not schema.side(s):
            raise ValueError(
                f"student.distill_sides asks for a content-only {s} tower, but the schema has no "
                f"{s} features; use distill_sides=auto")
    if not sides:
        raise ValueError("neither users nor items have content features: a content-only student "
                         "cannot be built; add features to the schema")
    return sides


def student_states(schema: Schema, users: pd.DataFrame, items: pd.DataFrame, cfg: TowerConfig,
                   sides: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Content-only state for the distilled sides (never an ``__id__`` entry)."""
    no_ids = dataclasses.replace(cfg, id_dim=0)
    return {side: build_state(schema.side(side), table, f"{side}_id", False, no_ids)
            for side, table in (("user", users), ("item", items)) if side in sides}


def build_teacher(states: dict[str, dict[str, Any]], cfg: TeacherConfig) -> TeacherModel:
    return TeacherModel(Tower(states["user"], cfg.tower, name="user_tower"),
                        Tower(states["item"], cfg.tower, name="item_tower"),
                        cfg.temperature, cfg.logq_correction, cfg.remove_accidental_hits)


def build_student(states: dict[str, dict[str, Any]], cfg: StudentConfig,
                  teacher: TeacherModel | None) -> StudentModel:
    """Content-only towers for the sides in ``states``; the teacher's ID tower for the others."""
    towers = {}
    tower_cfg = cfg.tower
    if teacher is not None and len(states) < len(SIDES):
        # The ID side is the teacher's: the content side must embed into the same space size.
        other = next(s for s in SIDES if s not in states)
        tower_cfg = dataclasses.replace(cfg.tower, output_dim=teacher.tower(other).cfg.output_dim)
    for side in SIDES:
        if side in states:
            towers[side] = Tower(states[side], tower_cfg, name=f"{side}_tower")
        elif teacher is not None:
            towers[side] = teacher.tower(side)
        else:
            raise ValueError(f"the {side} side has no content features: the student needs the "
                             "teacher's ID tower for it, so pass a teacher")
    return StudentModel(towers["user"], towers["item"], teacher, cfg)
