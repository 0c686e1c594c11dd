"""One model for every user and item: the teacher where it knows the ID, the student elsewhere.

The student maps content into the teacher's embedding space (same width), so a known user's
teacher embedding and a new user's student embedding are scored against one index: the
teacher's embeddings of training items and the student's of items unseen in training.

Which embedding a new entity gets is chosen per side on validation (``cold_paths``): the
student's (content mapped into the teacher's space) or the teacher's own content path (its
ID falls into the OOV bucket, so only its content features speak). Neither wins on every
data set (BENCHMARKS.md: the mapper on MovieLens users, the teacher's content path on the
synthetic default's items), so the run measures both and keeps the better per side.

Example::

    unified = UnifiedRecommender(teacher, student, {"user": "student", "item": "teacher"})
    users, known = unified.embed("user", ds.users, ds.schema)   # [n, dim], bool [n]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.data.schema import Schema
from tfrs_coldstart.features.columns import HISTORY, IdColumn
from tfrs_coldstart.modeling.models import TwoTowerModel
from tfrs_coldstart.modeling.towers import Tower

#: Where a new (cold) entity's embedding comes from: the student, or the teacher's content path.
COLD_PATHS = ("student", "teacher")
#: An ID no vocabulary holds: the teacher's content path of an entity whose ID it knows.
UNSEEN_ID = "\x00[unseen]"


def check_cold_paths(cold_paths: Mapping[str, str] | None) -> dict[str, str]:
    """``{"user": path, "item": path}`` with the default ``student`` for a missing side."""
    out = {"user": "student", "item": "student"}
    for side, path in (cold_paths or {}).items():
        if side not in out or path not in COLD_PATHS:
            raise ValueError(f"cold path {side}={path!r}: the sides are user and item, the "
                             f"paths {' or '.join(COLD_PATHS)}")
        out[side] = path
    return out


def _id_vocabulary(tower: Tower) -> set[str]:
    for col in tower.encoder.columns.values():
        if isinstance(col, IdColumn) and col.served:
            return set(col.vocabulary)
    raise ValueError("the teacher's tower reads no ID, so it cannot tell known entities apart; "
                     "train the teacher with IDs (teacher.tower.id_dim > 0)")


class UnifiedTower(tf.Module):
    """``dict[name -> tensor [batch]]`` -> ``float32 [batch, dim]``: per row, the teacher
    tower's output when the row's ID is in the teacher's vocabulary, else the student's.

    Both towers run on every row (a tower costs well under a millisecond); ``known`` tells
    which one was taken. Inputs: the union of both towers' inputs. Without a student tower
    (the side's cold path is the teacher's content path) the teacher's tower alone serves
    every row: an unseen ID falls into its OOV bucket.
    """

    def __init__(self, teacher_tower: Tower, student_tower: Tower | None,
                 name: str = "unified") -> None:
        super().__init__(name=name)
        t_dim = teacher_tower.cfg.output_dim
        s_dim = t_dim if student_tower is None else student_tower.cfg.output_dim
        if t_dim != s_dim:
            raise ValueError(f"the student's towers output {s_dim} dimensions, the teacher's "
                             f"{t_dim}: one index needs the student in the teacher's space "
                             "(student.space=teacher)")
        self.teacher_tower = teacher_tower
        self.student_tower = student_tower

    @property
    def towers(self) -> tuple[Tower, ...]:
        if self.student_tower is None:
            return (self.teacher_tower,)
        return self.teacher_tower, self.student_tower

    @property
    def output_dim(self) -> int:
        return int(self.teacher_tower.cfg.output_dim)

    def known(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """``bool [batch]``: whether the teacher knows each row's ID."""
        return self.teacher_tower.encoder.known(features)

    def history_count(self, features: dict[str, tf.Tensor]) -> tf.Tensor | None:
        """``float32 [batch]``: the known items of each row's request-time history, as the
        student's user tower reads it (None without one)."""
        if self.student_tower is None:
            return None
        return self.student_tower.encoder.history_count(features)

    def __call__(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        teacher = self.teacher_tower(features, training=training)
        if self.student_tower is None:
            return teacher
        known = self.known(features)
        student = self.student_tower(features, training=training)
        return tf.where(known[:, None], teacher, student)


class UnifiedRecommender:
    """The served model's embeddings in Python: the teacher's for known IDs, the cold path's
    (the student's, or the teacher's content path: ``cold_paths``) for the rest, on both
    sides (for evaluation and for building the index)."""

    def __init__(self, teacher: TwoTowerModel, student: TwoTowerModel,
                 cold_paths: Mapping[str, str] | None = None) -> None:
        self.teacher = teacher
        self.student = student
        self.cold_paths = check_cold_paths(cold_paths)
        self.towers = {side: UnifiedTower(
            teacher.tower(side),
            student.tower(side) if self.cold_paths[side] == "student" else None,
            name=f"unified_{side}") for side in ("user", "item")}
        self._vocab = {side: _id_vocabulary(teacher.tower(side)) for side in ("user", "item")}

    @property
    def temperature(self) -> float:
        """The served score's temperature: the teacher's (the student lives in its space)."""
        return float(self.teacher.temperature)

    def history_count(self, history: np.ndarray) -> np.ndarray:
        """``float64 [n]``: per request-time history (``string [n]``, IDs joined by
        HISTORY_SEPARATOR), the entries a new user's tower reads, counted by the served graph's
        own :meth:`UnifiedTower.history_count` (0 where that tower reads no history)."""
        cells = np.asarray(history, object).astype(str)
        n = self.towers["user"].history_count({HISTORY: tf.constant(cells)})
        return np.zeros(len(cells)) if n is None else n.numpy().astype(np.float64)

    def known(self, side: str, ids: pd.Series | np.ndarray) -> np.ndarray:
        """``bool [n]``: whether the teacher was trained on each ID."""
        vocab = self._vocab[side]
        return np.fromiter((str(i) in vocab for i in ids), bool, count=len(ids))

    def embed(self, side: str, table: pd.DataFrame, schema: Schema,
              batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """``(float32 [n_rows, dim], bool [n_rows])``: embeddings and which are the teacher's."""
        known = self.known(side, table[f"{side}_id"])
        if self.cold_paths[side] == "teacher":  # one tower: an unseen ID is its OOV row
            return self.teacher.embed(side, table, schema, batch_size), known
        out = self.cold_embed(side, table, schema, batch_size)
        if known.any():
            out[known] = self.teacher.embed(side, table[known], schema, batch_size)
        return out, known

    def cold_embed(self, side: str, table: pd.DataFrame, schema: Schema,
                   batch_size: int = 4096) -> np.ndarray:
        """``float32 [n_rows, dim]``: every row as if new to the teacher (the side's cold
        path), also rows whose ID the teacher knows (validation's pseudo-cold entities)."""
        if self.cold_paths[side] == "student":
            return self.student.embed(side, table, schema, batch_size)
        return self.teacher.embed(side, table.assign(**{f"{side}_id": UNSEEN_ID}), schema,
                                  batch_size)

    def param_count(self) -> dict[str, Any]:
        return {"teacher": self.teacher.param_count(), "student": self.student.param_count()}
