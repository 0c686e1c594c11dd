"""Fit the teacher, distil the student: callbacks, checkpoints, TensorBoard, resume.

Run folder layout (``RUN_DIR``)::

    config.yaml  schema.yaml  split.json (cold ids, training item counts)
    teacher/ preprocessing.json  weights/  checkpoints/last  backup/ (while running)  history.json
    student/ ...same, plus refit/ (the refit on all training data, see fit_student)...
    logs/<model>/            TensorBoard
    report.json report.md report.png

Validation never touches the test segments: the protocol is applied again to the
training interactions (:func:`validation_split`) to get held-out warm
interactions and pseudo-cold users and items.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.config import (
    RunConfig,
    StudentConfig,
    TeacherConfig,
    atomic_write_text,
    config_from_yaml_dict,
    save_config,
)
from tfrs_coldstart.data import (
    ColdStartSplit,
    Dataset,
    Schema,
    check_no_leakage,
    cold_start_split,
    load_dataset,
    validation_split,
)
from tfrs_coldstart.data.pipeline import (
    interaction_dataset,
    item_counts,
    item_log_counts,
    item_probabilities,
)
from tfrs_coldstart.evaluation import (
    SEGMENTS,
    ScoreFn,
    SegmentTask,
    embedding_score_fn,
    evaluate_scores,
    popularity_score_fn,
    rank_metrics,
    segment_tasks,
)
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


class RunError(ValueError):
    """A run folder is missing or does not hold what is asked for."""


@dataclass(frozen=True)
class Prepared:
    """A dataset with its test split, validation split and ranking tasks."""

    dataset: Dataset
    split: ColdStartSplit
    val: ColdStartSplit
    tasks: dict[str, SegmentTask]
    val_tasks: dict[str, SegmentTask]


def load_data(cfg: RunConfig) -> Dataset:
    d = cfg.data
    if d.format == "synthetic":
        return load_dataset("synthetic", n_users=d.synthetic_users, n_items=d.synthetic_items,
                            n_interactions=d.synthetic_interactions, seed=d.synthetic_seed)
    if d.format == "tfds":
        return load_dataset("tfds", name=d.tfds_name, data_dir=d.data_dir)
    return load_dataset(d.format, data_dir=d.data_dir, schema_path=d.schema)


def prepare(dataset: Dataset, cfg: RunConfig) -> Prepared:
    """Cold-start split (with the leakage guard) and the validation split carved from training."""
    d = cfg.data
    split = cold_start_split(dataset.interactions, dataset.users["user_id"],
                             dataset.items["item_id"], seed=d.split_seed,
                             cold_item_frac=d.cold_item_frac, cold_user_frac=d.cold_user_frac,
                             warm_test_frac=d.warm_test_frac)
    check_no_leakage(split)
    val = validation_split(split)
    return Prepared(dataset, split, val,
                    segment_tasks(split, dataset.users, dataset.items),
                    segment_tasks(val, dataset.users, dataset.items))


def _entities(table: pd.DataFrame, side: str, interactions: pd.DataFrame) -> pd.DataFrame:
    """Rows of an entity table that occur in ``interactions`` (what preprocessing may see)."""
    key = f"{side}_id"
    return table[table[key].astype(str).isin(set(interactions[key].astype(str)))]


class ValidationRecall(tf.keras.callbacks.Callback):
    """Adds ``val_recall@K`` (mean over the given validation segments) to the epoch logs."""

    def __init__(self, tasks: dict[str, SegmentTask], segments: tuple[str, ...],
                 prep: Prepared, k: int = 20) -> None:
        super().__init__()
        self.tasks = {s: tasks[s] for s in segments if len(tasks[s].user_rows)}
        self.prep = prep
        self.k = k

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        model: TwoTowerModel = self.model  # type: ignore[assignment]
        fn = model_score_fn(model, self.prep.dataset, self.prep.val.train)
        vals = {s: rank_metrics(t, fn, (self.k,))[f"recall@{self.k}"]
                for s, t in self.tasks.items()}
        if logs is not None:
            logs[f"val_recall@{self.k}"] = float(np.mean(list(vals.values()))) if vals else 0.0
            for s, v in vals.items():
                logs[f"val_{s}_recall@{self.k}"] = v


def _fit(model: TwoTowerModel, train_df: pd.DataFrame, prep: Prepared, lr: float,
         batch_size: int, epochs: int, patience: int, val_segments: tuple[str, ...],
         out: Path, log_dir: Path, seed: int, verbose: int | str = "auto") -> dict[str, Any]:
    """Keras fit with validation recall, early stopping, checkpoints, TensorBoard and resume."""
    ds = prep.dataset
    prob = item_probabilities(train_df, ds.items["item_id"].astype(str))
    data = interaction_dataset(train_df, ds.users, ds.items, ds.schema.user_features,
                               ds.schema.item_features, batch_size, shuffle=True, seed=seed,
                               item_prob=prob)
    for side in SIDES:  # create the variables now: BackupAndRestore needs a built model
        tower = model.tower(side)
        tower(dummy_inputs(tower.encoder.state))
    if isinstance(model, StudentModel):
        model.build_extras()
    model.built = True
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=lr))
    callbacks: list[tf.keras.callbacks.Callback] = []
    if val_segments:  # no segments: a refit for a fixed number of epochs
        callbacks += [
            ValidationRecall(prep.val_tasks, val_segments, prep),
            tf.keras.callbacks.EarlyStopping(monitor="val_recall@20", mode="max",
                                             patience=patience, restore_best_weights=True)]
    callbacks += [
        # The latest epoch's weights (overwritten each epoch: a 1M-item catalogue's ID table
        # per epoch would fill a disk); the best ones are saved apart as weights/.
        tf.keras.callbacks.ModelCheckpoint(str(out / "checkpoints" / "last"),
                                           save_weights_only=True),
        tf.keras.callbacks.BackupAndRestore(str(out / "backup")),
        tf.keras.callbacks.TensorBoard(str(log_dir), update_freq="epoch"),
    ]
    start = time.time()
    hist = model.fit(data, epochs=epochs, callbacks=callbacks, verbose=verbose)
    shutil.rmtree(out / "backup", ignore_errors=True)  # finished: nothing to resume
    h = {k: [float(x) for x in v] for k, v in hist.history.items()}
    best = int(np.argmax(h["val_recall@20"])) if h.get("val_recall@20") else len(h["loss"]) - 1
    return {"history": h, "best_epoch": best + 1, "epochs_run": len(h["loss"]),
            "seconds": time.time() - start}


def _save(model: TwoTowerModel, states: dict[str, Any], out: Path, info: dict[str, Any]) -> None:
    weights = out / "weights"
    tmp = out / ".weights.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_weights(str(tmp / "model"))
    shutil.rmtree(weights, ignore_errors=True)
    tmp.rename(weights)
    atomic_write_text(out / "preprocessing.json", json.dumps(states))
    atomic_write_text(out / "history.json", json.dumps(info, indent=1))


def fit_teacher(prep: Prepared, cfg: TeacherConfig, run_dir: Path, seed: int = 0,
                verbose: int | str = "auto", validation_only: bool = False) -> TeacherModel:
    """Teacher on training minus held-out warm validation; early stopping on its recall.

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
    out = run_dir / "teacher"
    info = _fit(model, train_df, prep, cfg.learning_rate, cfg.batch_size, cfg.epochs,
                cfg.patience, ("warm",), out, run_dir / "logs" / "teacher", seed, verbose)
    _save(model, states, out, info)
    return model


def fit_student(prep: Prepared, teacher: TeacherModel | None, cfg: StudentConfig, run_dir: Path,
                seed: int = 0, verbose: int | str = "auto", name: str = "student") -> StudentModel:
    """Content-only student distilled from ``teacher``; early stopping on pseudo-cold validation.

    Trains on the validation split's training part, so the pseudo-cold users and items
    of the validation split are truly unseen when choosing the epoch.
    """
    tf.keras.utils.set_random_seed(seed + 1000)
    ds = prep.dataset
    sides = student_sides(ds.schema, cfg.distill_sides)
    train_df = prep.val.train
    states = student_states(ds.schema, _entities(ds.users, "user", train_df),
                            _entities(ds.items, "item", train_df), cfg.tower, sides,
                            cfg.item_id_sink, cfg.item_id_sink_dropout)
    model = build_student(states, cfg, teacher)
    model.cache_teacher(_entities(ds.users, "user", train_df),
                        _entities(ds.items, "item", train_df), ds.schema)
    val_segments = tuple(s for s in SEGMENTS if servable(s, sides))
    out = run_dir / name
    info = _fit(model, train_df, prep, cfg.learning_rate, cfg.batch_size, cfg.epochs,
                cfg.patience, val_segments, out, run_dir / "logs" / name, seed, verbose)
    info["sides"] = list(sides)
    prior = cfg.popularity_prior
    if prior is None:
        prior, info["prior_search"] = tune_popularity_prior(prep, model, val_segments)
    info["popularity_prior"] = model.popularity_prior = float(prior)
    if cfg.refit:
        # The epoch count is chosen; now use the pseudo-cold entities' data too (as the teacher).
        v = prep.val
        full = pd.concat([v.train, v.cold_item, v.cold_user, v.cold_both])
        tf.keras.utils.set_random_seed(seed + 2000)
        states = student_states(ds.schema, _entities(ds.users, "user", full),
                                _entities(ds.items, "item", full), cfg.tower, sides,
                                cfg.item_id_sink, cfg.item_id_sink_dropout)
        model = build_student(states, cfg, teacher)
        model.cache_teacher(_entities(ds.users, "user", full), _entities(ds.items, "item", full),
                            ds.schema)
        model.popularity_prior = float(prior)
        shutil.rmtree(out / "backup", ignore_errors=True)
        info["refit"] = _fit(model, full, prep, cfg.learning_rate, cfg.batch_size,
                             info["best_epoch"], 0, (), out / "refit",
                             run_dir / "logs" / f"{name}-refit", seed, verbose)
    _save(model, states, out, info)
    return model


def servable(segment: str, sides: tuple[str, ...]) -> bool:
    """Whether a content-only student can embed the unseen entities of a segment."""
    need = {"warm": (), "cold_item": ("item",), "cold_user": ("user",),
            "cold_both": ("user", "item")}[segment]
    return all(s in sides for s in need)


def model_score_fn(model: TwoTowerModel, ds: Dataset, train_df: pd.DataFrame) -> ScoreFn:
    """The served ranking score: ``u.i / temperature + prior * log(1 + training count)``."""
    bias = model.popularity_prior * item_log_counts(train_df, ds.items)
    return embedding_score_fn(model.embed("user", ds.users, ds.schema) / model.temperature,
                              model.embed("item", ds.items, ds.schema), bias)


def tune_popularity_prior(prep: Prepared, model: TwoTowerModel, segments: tuple[str, ...],
                          grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
                          k: int = 20) -> tuple[float, dict[str, float]]:
    """Weight of the item popularity prior that maximises mean validation recall@k."""
    ds = prep.dataset
    base = model.popularity_prior
    search = {}
    for w in grid:
        model.popularity_prior = w
        fn = model_score_fn(model, ds, prep.val.train)
        search[str(w)] = float(np.mean([rank_metrics(prep.val_tasks[s], fn, (k,))[f"recall@{k}"]
                                        for s in segments]))
    model.popularity_prior = base
    best = max(grid, key=lambda w: search[str(w)])
    return best, search


def evaluate_model(prep: Prepared, model: TwoTowerModel, ks: tuple[int, ...],
                   sides: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Test-segment metrics; segments a one-sided student cannot serve use popularity (marked)."""
    return evaluate_score_fn(prep, model_score_fn(model, prep.dataset, prep.split.train), ks,
                             sides)


def evaluate_score_fn(prep: Prepared, fn: ScoreFn, ks: tuple[int, ...],
                      sides: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Test-segment metrics of any scorer; segments ``sides`` cannot serve use popularity."""
    fns = {s: (fn if sides is None or servable(s, sides) else None) for s in prep.tasks}
    return evaluate_scores(prep.tasks, fns, ks,
                           popularity_score_fn(prep.split.train, prep.dataset.items))


def evaluate_popularity(prep: Prepared, ks: tuple[int, ...]) -> dict[str, dict]:
    fn = popularity_score_fn(prep.split.train, prep.dataset.items)
    return evaluate_scores(prep.tasks, dict.fromkeys(prep.tasks, fn), ks)


def protocol(cfg: RunConfig, prep: Prepared) -> dict[str, Any]:
    d = cfg.data
    return {"split_seed": d.split_seed, "cold_item_frac": d.cold_item_frac,
            "cold_user_frac": d.cold_user_frac, "warm_test_frac": d.warm_test_frac,
            "ks": list(cfg.eval.ks), "segments": prep.split.summary()}


def save_run_metadata(cfg: RunConfig, prep: Prepared, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    prep.dataset.schema.to_yaml(run_dir / "schema.yaml")
    counts = prep.split.train["item_id"].astype(str).value_counts()
    atomic_write_text(run_dir / "split.json", json.dumps(
        {"seed": prep.split.seed, "cold_users": list(prep.split.cold_users),
         "cold_items": list(prep.split.cold_items),
         "item_counts": {k: int(v) for k, v in counts.items()}}))


def add_item_counts(run_dir: Path, interactions: pd.DataFrame) -> None:
    """Add new interactions to a run's training item counts (the popularity prior's input)."""
    path = Path(run_dir) / "split.json"
    meta = json.loads(path.read_text())
    counts = meta.get("item_counts", {})
    for item, n in interactions["item_id"].astype(str).value_counts().items():
        counts[item] = int(counts.get(item, 0)) + int(n)
    meta["item_counts"] = counts
    atomic_write_text(path, json.dumps(meta))


def run_item_log_counts(run_dir: Path, items: pd.DataFrame) -> np.ndarray | None:
    """``log(1 + training count)`` per row of ``items`` from the run's saved counts.

    Items the run never trained on (cold, or added later) count 0. None for runs saved
    without counts.
    """
    path = Path(run_dir) / "split.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    if "item_counts" not in meta:
        return None
    return np.log1p(item_counts(meta["item_counts"], items["item_id"])).astype(np.float32)


def load_run_config(run_dir: str | Path) -> RunConfig:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml); "
                       "create one with `tfrs-coldstart train` or `tfrs-coldstart run`")
    return config_from_yaml_dict(RunConfig, yaml.safe_load(path.read_text()))


def load_model(run_dir: str | Path, which: str = "student") -> TwoTowerModel:
    """Rebuild a trained teacher or student from its run folder, weights restored.

    The result is a compiled-ready Keras model: ``compile`` and ``fit`` continue training.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if which not in ("teacher", "student") and not (run_dir / which).is_dir():
        raise RunError(f"unknown model {which!r}: use teacher or student")
    out = run_dir / which
    if not (out / "preprocessing.json").is_file() or not (out / "weights").is_dir():
        raise RunError(f"{out} holds no trained {which}; train it first "
                       f"(`tfrs-coldstart {'train' if which == 'teacher' else 'distill'}`)")
    states = json.loads((out / "preprocessing.json").read_text())
    if which == "teacher":
        model: TwoTowerModel = build_teacher(states, cfg.teacher)
    else:
        teacher = load_model(run_dir, "teacher") if (run_dir / "teacher").is_dir() else None
        model = build_student(states, cfg.student, teacher)
    for side in SIDES:
        tower = model.tower(side)
        tower(dummy_inputs(tower.encoder.state))
    model.load_weights(str(out / "weights" / "model")).expect_partial()
    info = json.loads((out / "history.json").read_text())
    model.popularity_prior = float(info.get("popularity_prior", 0.0))
    return model


def load_schema(run_dir: str | Path) -> Schema:
    return Schema.from_yaml(Path(run_dir) / "schema.yaml")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
