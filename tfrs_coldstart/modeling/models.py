"""Teacher and student two-tower models (``tfrs.Model`` subclasses) and the distillation loss.

Batches are ``{"user": {name: [batch]}, "item": {name: [batch]}, "item_prob": [batch]}``
as made by :func:`tfrs_coldstart.data.pipeline.interaction_dataset`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_coldstart.config import StudentConfig, TeacherConfig, TowerConfig
from tfrs_coldstart.data.pipeline import feature_arrays
from tfrs_coldstart.data.schema import Schema
from tfrs_coldstart.features.columns import IdColumn, history_column
from tfrs_coldstart.features.encoder import Untracked, build_state
from tfrs_coldstart.modeling.losses import contrastive_and_kl
from tfrs_coldstart.modeling.mapper import (
    kernel_tower_config,
    linear_tower_config,
)
from tfrs_coldstart.modeling.towers import Tower

SIDES = ("user", "item")


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

    def tower(self, side: str) -> Tower:
        return self.user_tower if side == "user" else self.item_tower

    def candidate_keys(self, features: dict[str, Any]) -> tf.Tensor | None:
        """The batch's item ids as 64-bit fingerprints ``int64 [batch]`` (None: hits kept).

        Accidental-hit removal compares every pair of a batch (a million pairs at batch
        1024); integers compare several times faster than strings, and a fingerprint
        collision between two of a batch's items is vanishingly rare.
        """
        if not self.remove_hits:
            return None
        return tf.strings.to_hash_bucket_fast(features["item"]["item_id"], tf.int64.max)

    def retrieval_loss(self, q: tf.Tensor, c: tf.Tensor, features: dict[str, Any],
                       training: bool, keys: tf.Tensor | None = None) -> tf.Tensor:
        return self.task(
            q, c,
            candidate_sampling_probability=features["item_prob"] if self.logq_correction else None,
            candidate_ids=keys if keys is not None else self.candidate_keys(features),
            sample_weight=features.get("weight"),
            compute_metrics=not training,
        )

    def compute_loss(self, features: dict[str, Any], training: bool = False) -> tf.Tensor:
        q = self.user_tower(features["user"], training=training)
        c = self.item_tower(features["item"], training=training)
        return self.retrieval_loss(q, c, features, training)

    def embed(self, side: str, table: pd.DataFrame, schema: Schema, batch_size: int = 4096,
              view: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]] | None = None
              ) -> np.ndarray:
        """Embeddings of every row of an entity table: ``float32 [n_rows, dim]``.

        ``view`` rewrites each batch of raw features first (e.g. blanks the IDs).
        """
        tower = self.tower(side)
        arrays = feature_arrays(table, schema.side(side), f"{side}_id")
        for key in tower.encoder.feature_names:  # a column outside the schema (the history)
            if key not in arrays:
                arrays[key] = (table[key].astype(str).to_numpy(dtype=object)
                               if key in table.columns
                               else np.full(len(table), "", dtype=object))
        ds = tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)
        parts = [tower(view(b) if view else b, training=False).numpy() for b in ds]
        if not parts:
            return np.zeros((0, tower.cfg.output_dim), np.float32)
        return np.concatenate(parts).astype(np.float32)

    def param_count(self, training: bool = False) -> int:
        """Both towers' parameters; ``training`` adds training-only ones (the ID sink)."""
        return self.user_tower.param_count(training) + self.item_tower.param_count(training)


class TeacherModel(TwoTowerModel):
    """IDs plus content in both towers; in-batch softmax with log-Q correction.

    With ``id_dropout`` > 0, training replaces each example's user ID and (independently)
    item ID by ``""`` (the OOV ID) with that probability, so the content path learns too.
    """

    def __init__(self, *args: Any, id_dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id_dropout = id_dropout

    def _drop_ids(self, inputs: dict[str, tf.Tensor], key: str) -> dict[str, tf.Tensor]:
        if key not in inputs:
            return inputs
        ids = inputs[key]
        drop = tf.random.uniform(tf.shape(ids)) < self.id_dropout
        return {**inputs, key: tf.where(drop, tf.fill(tf.shape(ids), ""), ids)}

    def compute_loss(self, features: dict[str, Any], training: bool = False) -> tf.Tensor:
        if not (training and self.id_dropout > 0):
            return super().compute_loss(features, training)
        q = self.user_tower(self._drop_ids(features["user"], "user_id"), training=training)
        c = self.item_tower(self._drop_ids(features["item"], "item_id"), training=training)
        # Accidental hits and log-Q still use the real item ids.
        return self.retrieval_loss(q, c, features, training)


class StudentModel(TwoTowerModel):
    """Content-only towers: with ``method=own`` trained with
    ``L_C + lambda * T^2 * KL(teacher || student)`` in a space of their own; with
    ``method=ridge`` linear towers in the teacher's space, fit in closed form
    (:mod:`tfrs_coldstart.modeling.mapper`), scored at the teacher's temperature.

    A side with no content features keeps the teacher's (frozen) ID tower; see
    :func:`build_student`.
    """

    def __init__(self, user_tower: Tower, item_tower: Tower, teacher: TeacherModel | None,
                 cfg: StudentConfig, temperature: float | None = None, **kwargs: Any) -> None:
        super().__init__(user_tower, item_tower, temperature or cfg.temperature,
                         cfg.logq_correction, cfg.remove_accidental_hits, **kwargs)
        self.cfg = cfg
        # Untracked: the frozen teacher is saved in its own folder, not again (with its Adam
        # slots) in every student checkpoint; loading a student passes the teacher in.
        self._teacher = Untracked(teacher)
        if teacher is not None:
            teacher.trainable = False
        if teacher is not None and cfg.align_weight > 0:
            self.align_user = tf.keras.layers.Dense(teacher.user_tower.cfg.output_dim,
                                                    use_bias=False)
            self.align_item = tf.keras.layers.Dense(teacher.item_tower.cfg.output_dim,
                                                    use_bias=False)

    @property
    def teacher(self) -> TeacherModel | None:
        return self._teacher.value

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

    @property
    def distils(self) -> bool:
        """Whether the loss needs the teacher (KL or alignment term on)."""
        return self.teacher is not None and (self.cfg.distill_lambda > 0
                                             or self.cfg.align_weight > 0)

    def cache_teacher(self, users: pd.DataFrame, items: pd.DataFrame, schema: Schema,
                      batch_size: int = 4096) -> None:
        """Embed ``users`` and ``items`` once with the frozen teacher (in its distillation view).

        The teacher is frozen and runs in inference mode, so its embeddings do not change
        during training: a training step then gathers them (``O(batch)``) instead of
        running both teacher towers on every batch. Pass the entities of the training
        interactions; the cache is exact, so the loss is unchanged.
        """
        if not self.distils:
            return
        assert self.teacher is not None
        cache = {}
        for side, table, keep in (("user", users, self.cfg.distill_user_ids),
                                  ("item", items, self.cfg.distill_item_ids)):
            key = f"{side}_id"
            emb = self.teacher.embed(side, table, schema, batch_size,
                                     view=lambda b, k=key, v=keep: self._teacher_view(b, k, v))
            ids = table[key].astype(str).to_numpy(dtype=object)
            lookup = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(ids, tf.string), tf.range(len(ids), dtype=tf.int64)), -1)
            # A non-trainable variable, not a constant: a constant of a large catalogue would
            # be copied into the training graph (GraphDef is capped at 2 GB).
            cache[side] = (lookup, tf.Variable(emb.astype(np.float32), trainable=False))
        self._teacher_cache = Untracked(cache)  # not model state: never saved with the weights

    def _teacher_embeddings(self, features: dict[str, Any], side: str) -> tf.Tensor:
        key = f"{side}_id"
        cache = getattr(self, "_teacher_cache", None)
        if cache is not None:
            lookup, emb = cache.value[side]
            rows = lookup.lookup(features[side][key])
            tf.debugging.assert_non_negative(
                rows, message=f"a {side} of the batch is missing from the teacher cache")
            return tf.gather(emb, rows)
        assert self.teacher is not None
        keep = self.cfg.distill_user_ids if side == "user" else self.cfg.distill_item_ids
        return self.teacher.tower(side)(self._teacher_view(features[side], key, keep),
                                        training=False)

    def compute_loss(self, features: dict[str, Any], training: bool = False) -> tf.Tensor:
        q = self.user_tower(features["user"], training=training)
        c = self.item_tower(features["item"], training=training)
        ids = self.candidate_keys(features)
        if not self.distils:
            return self.retrieval_loss(q, c, features, training, ids)
        assert self.teacher is not None
        tq = tf.stop_gradient(self._teacher_embeddings(features, "user"))
        tc = tf.stop_gradient(self._teacher_embeddings(features, "item"))
        prob = features["item_prob"] if self.logq_correction else None
        batch = tf.cast(tf.shape(q)[0], tf.float32)
        if self.cfg.distill_lambda > 0:
            contrastive, kl = contrastive_and_kl(q, c, tq, tc, prob, ids, self.temperature,
                                                  self.teacher.temperature,
                                                  self.cfg.distill_temperature,
                                                  features.get("weight"))
            temp = self.cfg.distill_temperature
            # L_C from tfrs.tasks.Retrieval is a *sum* over the batch's queries (its loss uses
            # Reduction.SUM), so the KL is summed over the same queries: lambda = 1 weighs
            # one query's KL like its contrastive term, whatever the batch size.
            loss = contrastive + self.cfg.distill_lambda * temp**2 * batch * kl
        else:
            loss = self.retrieval_loss(q, c, features, training, ids)
        if self.cfg.align_weight > 0:
            au = tf.math.l2_normalize(self.align_user(q), axis=1)
            ai = tf.math.l2_normalize(self.align_item(c), axis=1)
            align = tf.reduce_sum(1.0 - tf.reduce_sum(au * tq, axis=1)) + tf.reduce_sum(
                1.0 - tf.reduce_sum(ai * tc, axis=1))  # summed over the batch, as L_C
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
                   sides: tuple[str, ...], item_id_sink: int = 0,
                   item_id_sink_dropout: float = 0.0,
                   history: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Content-only state for the distilled sides.

    With ``item_id_sink`` > 0 the item side gets a *training-only* ``__id__`` entry of that
    width: read in training, zeros at inference, never an input of the served tower.
    With ``history`` (the keyword arguments of ``features.columns.history_column``) the user
    side also reads the request-time history (issue 17).
    """
    no_ids = dataclasses.replace(cfg, id_dim=0)
    states = {side: build_state(schema.side(side), table, f"{side}_id", False, no_ids,
                                cfg.id_features)
              for side, table in (("user", users), ("item", items)) if side in sides}
    if item_id_sink > 0 and "item" in states:
        sink = IdColumn.from_ids("item_id", items["item_id"]).as_sink(item_id_sink,
                                                                       item_id_sink_dropout)
        states["item"] = {**states["item"], sink.name: sink.to_dict()}
    if history is not None and "user" in states:
        hist = history_column(**history)
        states["user"] = {**states["user"], hist.name: hist.to_dict()}
    return states


def build_teacher(states: dict[str, dict[str, Any]], cfg: TeacherConfig) -> TeacherModel:
    return TeacherModel(Tower(states["user"], cfg.tower, name="user_tower"),
                        Tower(states["item"], cfg.tower, name="item_tower"),
                        cfg.temperature, cfg.logq_correction, cfg.remove_accidental_hits,
                        id_dropout=cfg.id_dropout)


def build_student(states: dict[str, dict[str, Any]], cfg: StudentConfig,
                  teacher: TeacherModel | None,
                  kernel: Mapping[str, int] | None = None) -> StudentModel:
    """Content-only towers for the sides in ``states``; the teacher's ID tower for the others.

    A student's ``ids_of`` features embed through the teacher's ID layers (shared_ids).
    ``kernel`` (side -> landmarks; ridge students only) makes that side's tower a kernel
    map's (``modeling.mapper.kernel_tower_config``) instead of a linear one.
    """
    kernel = dict(kernel or {})
    if kernel and cfg.method != "ridge":
        raise ValueError("a kernel map is a closed-form student's (student.method=ridge)")
    towers = {}
    shared_ids = None
    if teacher is not None:
        shared_ids = {s: layers for s in SIDES
                      if (layers := teacher.tower(s).encoder.id_layers()) is not None}
    tower_cfg = cfg.tower
    temperature = None
    if cfg.method == "ridge":
        if teacher is None:
            raise ValueError("student.method=ridge maps content into the teacher's space: "
                             "it needs the teacher")
        tower_cfg = linear_tower_config(teacher.user_tower.cfg.output_dim, cfg.tower)
        temperature = teacher.temperature
    elif cfg.method == "aligned":
        if teacher is None:
            raise ValueError("student.method=aligned lives in the teacher's space: it needs "
                             "the teacher")
        tower_cfg = dataclasses.replace(cfg.tower, id_dim=0,
                                        output_dim=teacher.user_tower.cfg.output_dim)
        temperature = teacher.temperature
    elif teacher is not None and len(states) < len(SIDES):
        # The ID side is the teacher's: the content side must embed into the same space size.
        other = next(s for s in SIDES if s not in states)
        tower_cfg = dataclasses.replace(cfg.tower, output_dim=teacher.tower(other).cfg.output_dim)
    for side in SIDES:
        if side in states and kernel.get(side):
            towers[side] = Tower(states[side],
                                 kernel_tower_config(tower_cfg.output_dim, kernel[side], cfg.tower),
                                 shared_ids, kernel=True, name=f"{side}_tower")
        elif side in states:
            towers[side] = Tower(states[side], tower_cfg, shared_ids, name=f"{side}_tower")
        elif teacher is not None:
            towers[side] = teacher.tower(side)
        else:
            raise ValueError(f"the {side} side has no content features: the student needs the "
                             "teacher's ID tower for it, so pass a teacher")
    return StudentModel(towers["user"], towers["item"], teacher, cfg, temperature)
