"""Fit the teacher, distil the student: Keras fit with validation recall, early stopping,
checkpoints, TensorBoard and resume. Everything a fit keeps goes to its :class:`RunDir`.

Validation never touches the test segments: the protocol is applied again to the training
interactions (:func:`tfrs_coldstart.data.validation_split`) to get held-out warm interactions
and pseudo-cold users and items.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.config import StudentConfig, TeacherConfig
from tfrs_coldstart.console import log, phase, warn_once
from tfrs_coldstart.data import SEGMENTS
from tfrs_coldstart.data.pipeline import (
    interaction_dataset,
    interaction_weights,
    item_probabilities,
)
from tfrs_coldstart.evaluation import Prepared, SegmentTask, rank_metrics, servable
from tfrs_coldstart.features.encoder import dummy_inputs
from tfrs_coldstart.modeling.models import (
    SIDES,
    StudentModel,
    TeacherModel,
    TwoTowerModel,
    build_student,
    build_teacher,
    student_sides,
    student_states,
    teacher_states,
)
from tfrs_coldstart.runs import RunDir
from tfrs_coldstart.scoring import Scorer, model_score_fn, tune_prior

__all__ = ["fit_student", "fit_teacher", "log"]


def _entities(table: pd.DataFrame, side: str, interactions: pd.DataFrame) -> pd.DataFrame:
    """Rows of an entity table that occur in ``interactions`` (what preprocessing may see)."""
    key = f"{side}_id"
    return table[table[key].astype(str).isin(set(interactions[key].astype(str)))]


class ValidationRecall(tf.keras.callbacks.Callback):
    """Adds ``val_recall@K`` (mean over the given validation segments) to the epoch logs.

    Scored without the popularity prior (it is chosen after the fit): ``u.i / temperature``.
    """

    def __init__(self, prep: Prepared, segments: tuple[str, ...], k: int = 20) -> None:
        super().__init__()
        self.tasks: dict[str, SegmentTask] = {
            s: prep.val_tasks[s] for s in segments if len(prep.val_tasks[s].user_rows)}
        self.prep = prep
        self.k = k

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        model: TwoTowerModel = self.model  # type: ignore[assignment]
        fn = model_score_fn(model, Scorer(model.temperature), self.prep.dataset,
                            self.prep.val.train)
        vals = {s: rank_metrics(t, fn, (self.k,))[f"recall@{self.k}"]
                for s, t in self.tasks.items()}
        if logs is not None:
            logs[f"val_recall@{self.k}"] = float(np.mean(list(vals.values()))) if vals else 0.0
            for s, v in vals.items():
                logs[f"val_{s}_recall@{self.k}"] = v


def _fit(model: TwoTowerModel, train_df: pd.DataFrame, prep: Prepared, lr: float,
         batch_size: int, epochs: int, patience: int, val_segments: tuple[str, ...],
         run: RunDir, name: str, seed: int, verbose: int | str = "auto",
         k: int = 20, weight_decay: float = 0.0,
         interaction_weight: str = "none") -> dict[str, Any]:
    """Keras fit with validation recall@k, early stopping, checkpoints, TensorBoard and resume.

    Checkpoints go to ``<run>/<name>/``; no ``val_segments``: a refit for a fixed number of
    epochs.
    """
    ds = prep.dataset
    out = run.model_dir(name)
    prob = item_probabilities(train_df, ds.items["item_id"].astype(str))
    weights = interaction_weights(train_df, interaction_weight)
    if interaction_weight != "none" and weights is None:
        warn_once(f"interaction_weight={interaction_weight} has no effect: the interactions "
                  "have no weight column")
    data = interaction_dataset(train_df, ds.users, ds.items, ds.schema.user_features,
                               ds.schema.item_features, batch_size, shuffle=True, seed=seed,
                               item_prob=prob, weights=weights)
    for side in SIDES:  # create the variables now: BackupAndRestore needs a built model
        tower = model.tower(side)
        tower(dummy_inputs(tower.encoder.state))
    if isinstance(model, StudentModel):
        model.build_extras()
    model.built = True
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=lr,
                                                     weight_decay=weight_decay or None))
    monitor = f"val_recall@{k}"
    callbacks: list[tf.keras.callbacks.Callback] = []
    if val_segments:
        callbacks += [
            ValidationRecall(prep, val_segments, k),
            tf.keras.callbacks.EarlyStopping(monitor=monitor, mode="max",
                                             patience=patience, restore_best_weights=True)]
    callbacks += [
        # The latest epoch's weights (overwritten each epoch: a 1M-item catalogue's ID table
        # per epoch would fill a disk); the best ones are saved apart as weights/.
        tf.keras.callbacks.ModelCheckpoint(str(out / "checkpoints" / "last"),
                                           save_weights_only=True),
        tf.keras.callbacks.BackupAndRestore(str(out / "backup")),
        tf.keras.callbacks.TensorBoard(str(run.log_dir(name)), update_freq="epoch"),
    ]
    start = time.time()
    hist = model.fit(data, epochs=epochs, callbacks=callbacks, verbose=verbose)
    shutil.rmtree(out / "backup", ignore_errors=True)  # finished: nothing to resume
    h = {key: [float(x) for x in v] for key, v in hist.history.items()}
    best = int(np.argmax(h[monitor])) if h.get(monitor) else len(h["loss"]) - 1
    return {"history": h, "best_epoch": best + 1, "epochs_run": len(h["loss"]),
            "seconds": time.time() - start}


def fit_teacher(prep: Prepared, cfg: TeacherConfig, run: RunDir, seed: int = 0,
                verbose: int | str = "auto", validation_only: bool = False,
                k: int = 20) -> TeacherModel:
    """Teacher on training minus held-out warm validation; early stopping on its recall@k.

    ``validation_only`` trains on the validation split's training part alone, without the
    pseudo-cold users' and items' interactions: the teacher to tune students with, since a
    teacher that saw the pseudo-cold entities would leak them into a student through the
    distillation term and flatter its validation recall.
    """
    tf.keras.utils.set_random_seed(seed)
    v = prep.val
    train_df = (v.train if validation_only
                else pd.concat([v.train, v.cold_item, v.cold_user, v.cold_both]))
    ds = prep.dataset
    states = teacher_states(ds.schema, _entities(ds.users, "user", train_df),
                            _entities(ds.items, "item", train_df), cfg.tower)
    model = build_teacher(states, cfg)
    info = _fit(model, train_df, prep, cfg.learning_rate, cfg.batch_size, cfg.epochs,
                cfg.patience, ("warm",), run, "teacher", seed, verbose, k, cfg.weight_decay,
                cfg.interaction_weight)
    run.save_model("teacher", model, states, info, Scorer(cfg.temperature))
    return model


def fit_student(prep: Prepared, teacher: TeacherModel | None, cfg: StudentConfig, run: RunDir,
                seed: int = 0, verbose: int | str = "auto", name: str = "student",
                k: int = 20) -> StudentModel:
    """Content-only student distilled from ``teacher``; early stopping on pseudo-cold validation.

    Three phases: a search fit on the validation split's training part (so its pseudo-cold
    users and items are truly unseen when choosing the epoch), the popularity prior's weight
    chosen on the same validation data, then (``cfg.refit``) a refit on all training data for
    the chosen number of epochs.
    """
    tf.keras.utils.set_random_seed(seed + 1000)
    ds = prep.dataset
    sides = student_sides(ds.schema, cfg.distill_sides)
    if cfg.item_id_sink and "item" not in sides:
        warn_once("student.item_id_sink has no effect: the items have no content features, so "
                  "the student keeps the teacher's item tower")
    train_df = prep.val.train
    val_segments = tuple(s for s in SEGMENTS if servable(s, sides))
    with phase(f"{name}: search fit"):
        states = student_states(ds.schema, _entities(ds.users, "user", train_df),
                                _entities(ds.items, "item", train_df), cfg.tower, sides,
                                cfg.item_id_sink, cfg.item_id_sink_dropout)
        model = build_student(states, cfg, teacher)
        model.cache_teacher(_entities(ds.users, "user", train_df),
                            _entities(ds.items, "item", train_df), ds.schema)
        info = _fit(model, train_df, prep, cfg.learning_rate, cfg.batch_size, cfg.epochs,
                    cfg.patience, val_segments, run, name, seed, verbose, k,
                    interaction_weight=cfg.interaction_weight)
    info["sides"] = list(sides)
    scorer = Scorer(cfg.temperature, float(cfg.popularity_prior or 0.0))
    if cfg.popularity_prior is None:
        with phase(f"{name}: prior search"):
            segs = tuple(s for s in val_segments if len(prep.val_tasks[s].user_rows))
            scorer, info["prior_search"] = tune_prior(model, scorer, prep, segs, k=k)
    info["popularity_prior"] = scorer.prior
    if cfg.refit:
        # The epoch count is chosen; now use the pseudo-cold entities' data too (as the teacher).
        with phase(f"{name}: refit ({info['best_epoch']} epochs on all training data)"):
            v = prep.val
            full = pd.concat([v.train, v.cold_item, v.cold_user, v.cold_both])
            tf.keras.utils.set_random_seed(seed + 2000)
            states = student_states(ds.schema, _entities(ds.users, "user", full),
                                    _entities(ds.items, "item", full), cfg.tower, sides,
                                    cfg.item_id_sink, cfg.item_id_sink_dropout)
            model = build_student(states, cfg, teacher)
            model.cache_teacher(_entities(ds.users, "user", full),
                                _entities(ds.items, "item", full), ds.schema)
            shutil.rmtree(run.model_dir(name) / "backup", ignore_errors=True)
            info["refit"] = _fit(model, full, prep, cfg.learning_rate, cfg.batch_size,
                                 info["best_epoch"], 0, (), run, f"{name}/refit", seed, verbose,
                                 k, interaction_weight=cfg.interaction_weight)
    run.save_model(name, model, states, info, scorer)
    return model
