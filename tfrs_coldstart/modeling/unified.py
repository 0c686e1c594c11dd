"""One model for every user and item: the teacher where it knows the ID, the student elsewhere.

The student maps content into the teacher's embedding space (same width), so a known user's
teacher embedding and a new user's student embedding are scored against one index: the
teacher's embeddings of training items and the student's of items unseen in training.

Example::

    unified = UnifiedRecommender(teacher, student)
    users, known = unified.embed("user", ds.users, ds.schema)   # [n, dim], bool [n]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.data.schema import Schema
from tfrs_coldstart.features.columns import IdColumn
from tfrs_coldstart.modeling.models import TwoTowerModel
from tfrs_coldstart.modeling.towers import Tower


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
    which one was taken. Inputs: the union of both towers' inputs.
    """

    def __init__(self, teacher_tower: Tower, student_tower: Tower, name: str = "unified") -> None:
        super().__init__(name=name)
        t_dim, s_dim = teacher_tower.cfg.output_dim, student_tower.cfg.output_dim
        if t_dim != s_dim:
            raise ValueError(f"the student's towers output {s_dim} dimensions, the teacher's "
                             f"{t_dim}: one index needs the student in the teacher's space "
                             "(student.space=teacher)")
        self.teacher_tower = teacher_tower
        self.student_tower = student_tower

    @property
    def towers(self) -> tuple[Tower, Tower]:
        return self.teacher_tower, self.student_tower

    @property
    def output_dim(self) -> int:
        return int(self.teacher_tower.cfg.output_dim)

    def known(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """``bool [batch]``: whether the teacher knows each row's ID."""
        return self.teacher_tower.encoder.known(features)

    def __call__(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        known = self.known(features)
        teacher = self.teacher_tower(features, training=training)
        student = self.student_tower(features, training=training)
        return tf.where(known[:, None], teacher, student)


class UnifiedRecommender:
    """The served model's embeddings in Python: the teacher's for known IDs, the student's
    for the rest, on both sides (for evaluation and for building the index)."""

    def __init__(self, teacher: TwoTowerModel, student: TwoTowerModel) -> None:
        self.teacher = teacher
        self.student = student
        self.towers = {side: UnifiedTower(teacher.tower(side), student.tower(side),
                                          name=f"unified_{side}")
                       for side in ("user", "item")}
        self._vocab = {side: _id_vocabulary(teacher.tower(side)) for side in ("user", "item")}

    @property
    def temperature(self) -> float:
        """The served score's temperature: the teacher's (the student lives in its space)."""
        return float(self.teacher.temperature)

    def known(self, side: str, ids: pd.Series | np.ndarray) -> np.ndarray:
        """``bool [n]``: whether the teacher was trained on each ID."""
        vocab = self._vocab[side]
        return np.fromiter((str(i) in vocab for i in ids), bool, count=len(ids))

    def embed(self, side: str, table: pd.DataFrame, schema: Schema,
              batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """``(float32 [n_rows, dim], bool [n_rows])``: embeddings and which are the teacher's."""
        known = self.known(side, table[f"{side}_id"])
        out = self.student.embed(side, table, schema, batch_size)
        if known.any():
            out[known] = self.teacher.embed(side, table[known], schema, batch_size)
        return out, known

    def param_count(self) -> dict[str, Any]:
        return {"teacher": self.teacher.param_count(), "student": self.student.param_count()}
