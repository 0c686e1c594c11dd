"""Fit the teacher, distil the student: Keras fit with validation recall, early stopping,
checkpoints, TensorBoard and resume. Everything a fit keeps goes to its :class:`RunDir`.

Validation never touches the test segments: the protocol is applied again to the training
interactions (:func:`tfrs_coldstart.data.validation_split`) to get held-out warm interactions
and pseudo-cold users and items.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.config import RIDGE_ALPHAS, StudentConfig, TeacherConfig
from tfrs_coldstart.console import log, phase, warn_once
from tfrs_coldstart.data import SEGMENTS
from tfrs_coldstart.data.pipeline import (
    interaction_dataset,
    interaction_weights,
    item_log_counts,
    item_probabilities,
)
from tfrs_coldstart.errors import RunError, UserError
from tfrs_coldstart.evaluation import (
    Prepared,
    SegmentTask,
    fewshot_tasks,
    join_history,
    rank_metrics,
    servable,
    user_sequences,
)
from tfrs_coldstart.features.columns import HISTORY
from tfrs_coldstart.features.encoder import dummy_inputs
from tfrs_coldstart.fileio import atomic_write_text
from tfrs_coldstart.modeling.aligned import AlignedConfig, AlignedStudent, fit_aligned
from tfrs_coldstart.modeling.mapper import design_matrix, fit_ridge_tower, reliability, ridge
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
from tfrs_coldstart.modeling.towers import Tower
from tfrs_coldstart.modeling.unified import UnifiedRecommender
from tfrs_coldstart.runs import RECOMMEND, RunDir
from tfrs_coldstart.scoring import (
    Scorer,
    model_score_fn,
    tune_prior,
    tune_unified,
    unified_score_fn,
)

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


class NonFiniteLoss(UserError, ArithmeticError):
    """The training loss became NaN or infinite; nothing of the model is saved."""


class StopOnNonFiniteLoss(tf.keras.callbacks.Callback):
    """Stops a fit at the first NaN/Inf loss with one clear error (Keras' TerminateOnNaN
    stops silently, and the run would go on to save and evaluate a broken model)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise NonFiniteLoss(
                f"{self.name}: the training loss became {loss} at epoch {self.epoch + 1}, "
                f"batch {batch + 1}; lower the learning rate, raise the temperature or check "
                "the interaction weights (nothing was saved)")


class FitBackup(tf.keras.callbacks.Callback):
    """Everything a fit needs to resume exactly where it was killed, saved at each epoch end.

    Keras' ``BackupAndRestore`` restores the weights and the optimizer only: a resumed fit
    counted early stopping from the resume point and lost the history of the epochs before
    it. This backup holds, per finished epoch ``e``, in ``<folder>/epoch-<e>/``: the model's
    and the optimizer's variables (``state.npz``), early stopping's state (best value, best
    epoch, wait counter, stopped) with its best weights (``best.npz``, hard-linked from the
    previous epoch's folder while the best epoch does not change) and the history so far
    (``state.json``). ``<folder>/latest.json``, replaced atomically once the epoch's folder
    is complete, names the folder to resume from; older folders are then removed. A kill at
    any moment leaves ``latest.json`` naming a complete folder (or none: start afresh).

    With the per-epoch data order of ``interaction_dataset(epochs=...)`` (seeded by epoch, not
    by the epochs before), a resumed fit is bit-identical to an uninterrupted one unless the
    model draws random numbers while training (dropout, ``id_dropout``): those generators'
    states are not saved, so such fits resume equivalent, not identical.

    Place it after ``EarlyStopping`` (and the callbacks that add to the epoch logs): it reads
    their state at each epoch end and puts it back in ``on_train_begin``.
    """

    def __init__(self, folder: Path, early: tf.keras.callbacks.EarlyStopping | None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.early = early
        self.history: dict[str, list[float]] = {}
        self.start = 0  # the first epoch to train (epochs before it are restored)
        self.stopped = False
        self._early_state: dict[str, Any] | None = None
        self._best_weights: list[np.ndarray] | None = None

    # ---- restore ----------------------------------------------------------------------------

    def _latest(self) -> Path | None:
        try:
            name = json.loads((self.folder / "latest.json").read_text())["folder"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.folder / str(name)
        return path if (path / "state.json").is_file() and (path / "state.npz").is_file() \
            else None

    def restore(self, model: TwoTowerModel) -> int:
        """Load the latest backup into ``model`` (built and compiled); the epoch to start at
        (0 without a backup)."""
        path = self._latest()
        if path is None:
            return 0
        state = json.loads((path / "state.json").read_text())
        with np.load(path / "state.npz") as arrays:
            n_model = int(state["n_model"])
            values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        opt = model.optimizer
        opt.build(model.trainable_variables)
        opt_vars = opt.variables
        try:
            if len(opt_vars) != len(values) - n_model:
                raise ValueError("another number of optimizer variables")
            model.set_weights(values[:n_model])
        except ValueError as err:
            raise RunError(f"{self.folder} holds a backup of another model ({err}); remove it "
                           "to start this fit afresh") from None
        for var, value in zip(opt_vars, values[n_model:], strict=True):
            var.assign(value)
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.start = int(state["epoch"]) + 1
        self.stopped = bool(state.get("stopped", False))
        self._early_state = state.get("early")
        if (path / "best.npz").is_file():
            with np.load(path / "best.npz") as arrays:
                self._best_weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        return self.start

    def finish_restored(self) -> None:
        """For a backup taken after the fit's last epoch (or its early stop): end it as the
        fit would have (the best weights back in the model)."""
        if self.early is not None and self.early.restore_best_weights and self._best_weights:
            self.model.set_weights(self._best_weights)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        es, st = self.early, self._early_state
        if es is not None and st is not None:
            es.best = float(st["best"])
            es.best_epoch = int(st["best_epoch"])
            es.wait = int(st["wait"])
            es.stopped_epoch = int(st["stopped_epoch"])
            es.best_weights = self._best_weights

    # ---- save -------------------------------------------------------------------------------

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        previous = self._latest()
        out = self.folder / f"epoch-{epoch}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        weights = self.model.get_weights()
        opt_values = [v.numpy() for v in self.model.optimizer.variables]
        with open(out / "state.npz", "wb") as f:
            np.savez(f, *weights, *opt_values)
        es = self.early
        early = None
        if es is not None:
            early = {"best": float(es.best), "best_epoch": int(es.best_epoch),
                     "wait": int(es.wait), "stopped_epoch": int(es.stopped_epoch)}
            if es.best_weights is not None:
                old = previous / "best.npz" if previous is not None else None
                same = (old is not None and old.is_file() and self._early_state is not None
                        and int(self._early_state["best_epoch"]) == es.best_epoch)
                linked = False
                if same:
                    with contextlib.suppress(OSError):
                        os.link(old, out / "best.npz")  # type: ignore[arg-type]
                        linked = True
                if not linked:
                    with open(out / "best.npz", "wb") as f:
                        np.savez(f, *es.best_weights)
        self._early_state = early
        atomic_write_text(out / "state.json", json.dumps({
            "epoch": epoch, "n_model": len(weights), "history": self.history, "early": early,
            "stopped": bool(self.model.stop_training)}))
        atomic_write_text(self.folder / "latest.json", json.dumps({"folder": out.name}))
        for old in self.folder.glob("epoch-*"):
            if old.name != out.name:
                shutil.rmtree(old, ignore_errors=True)


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
    for side in SIDES:  # create the variables now: BackupAndRestore needs a built model
        tower = model.tower(side)
        tower(dummy_inputs(tower.encoder.state))
    if isinstance(model, StudentModel):
        model.build_extras()
    model.built = True
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=lr,
                                                     weight_decay=weight_decay or None))
    monitor = f"val_recall@{k}"
    callbacks: list[tf.keras.callbacks.Callback] = [StopOnNonFiniteLoss(name)]
    early = None
    if val_segments:
        early = tf.keras.callbacks.EarlyStopping(monitor=monitor, mode="max",
                                                 patience=patience, restore_best_weights=True)
        callbacks += [ValidationRecall(prep, val_segments, k), early]
    backup = FitBackup(out / "backup", early)
    first = backup.restore(model)
    if first:
        log(f"resuming {name} at epoch {first + 1} of {epochs} ({first} done; early "
            "stopping state and history restored)")
    callbacks += [
        backup,
        # The latest epoch's weights (overwritten each epoch: a 1M-item catalogue's ID table
        # per epoch would fill a disk); the best ones are saved apart as weights/.
        tf.keras.callbacks.ModelCheckpoint(str(out / "checkpoints" / "last"),
                                           save_weights_only=True),
        tf.keras.callbacks.TensorBoard(str(run.log_dir(name)), update_freq="epoch"),
    ]
    start = time.time()
    if first < epochs and not backup.stopped:
        data = interaction_dataset(train_df, ds.users, ds.items, ds.schema.user_features,
                                   ds.schema.item_features, batch_size, shuffle=True, seed=seed,
                                   item_prob=prob, weights=weights, epochs=(first, epochs))
        model.fit(data, epochs=epochs, initial_epoch=first,
                  steps_per_epoch=-(-len(train_df) // batch_size), callbacks=callbacks,
                  verbose=verbose)
    else:  # killed after the last epoch's backup: only the fit's ending is left
        backup.set_model(model)
        backup.finish_restored()
    shutil.rmtree(out / "backup", ignore_errors=True)  # finished: nothing to resume
    h = backup.history
    best = int(np.argmax(h[monitor])) if h.get(monitor) else len(h["loss"]) - 1
    return {"history": h, "best_epoch": best + 1, "epochs_run": len(h["loss"]),
            "seconds": time.time() - start}


def fit_teacher(prep: Prepared, cfg: TeacherConfig, run: RunDir, seed: int = 0,
                verbose: int | str = "auto", validation_only: bool = False,
                k: int = 20, name: str = "teacher") -> TeacherModel:
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
                cfg.patience, ("warm",), run, name, seed, verbose, k, cfg.weight_decay,
                cfg.interaction_weight)
    run.save_model(name, model, states, info, Scorer(cfg.temperature))
    return model


def fit_student(prep: Prepared, teacher: TeacherModel | None, cfg: StudentConfig, run: RunDir,
                seed: int = 0, verbose: int | str = "auto", name: str = "student",
                k: int = 20, val_teacher: TeacherModel | None = None) -> StudentModel:
    """Content-only student distilled from ``teacher``; early stopping on pseudo-cold validation.

    ``method=ridge``: see :func:`fit_ridge_student`. ``method=own``, three phases: a search
    fit on the validation split's training part (so its pseudo-cold
    users and items are truly unseen when choosing the epoch), the popularity prior's weight
    chosen on the same validation data, then (``cfg.refit``) a refit on all training data for
    the chosen number of epochs.
    """
    if cfg.method == "ridge":
        return fit_ridge_student(prep, teacher, cfg, run, name=name, k=k,
                                 val_teacher=val_teacher)
    if cfg.method == "aligned":
        return fit_aligned_student(prep, teacher, cfg, run, seed, verbose, name, k,
                                   val_teacher)
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


# ---- the closed-form student in the teacher's space (student.method=ridge) -------------------


def _counts(train_df: pd.DataFrame, side: str, ids: pd.Series) -> np.ndarray:
    key = f"{side}_id"
    return ids.astype(str).map(train_df[key].astype(str).value_counts()).fillna(0).to_numpy(
        np.float64)


def has_history(tower: Tower) -> bool:
    """Whether a (user) tower reads the request-time history (issue 17)."""
    return HISTORY in tower.encoder.columns


def history_settings(cfg: StudentConfig, teacher: TeacherModel) -> dict[str, Any]:
    """``features.columns.history_column``'s arguments for ``cfg`` and ``teacher``."""
    return {"shrinkage": cfg.history_shrinkage, "scale": cfg.history_scale,
            "table": cfg.history_table,
            "dim": (int(teacher.item_tower.cfg.output_dim) if cfg.history_table == "embedding"
                    else 0)}


def fill_history_table(model: StudentModel, teacher: TeacherModel, items: pd.DataFrame,
                       schema: Any) -> None:
    """Write ``teacher``'s embeddings of the items its ID lookup knows into the user tower's
    history table (``history_table=embedding``; row 0, the OOV row, stays zeros)."""
    tower = model.tower("user")
    col = tower.encoder.columns.get(HISTORY)
    if col is None or col.table != "embedding":
        return
    layers = tower.encoder._parts[HISTORY]
    vocab = [str(v) for v in layers["lookup"].get_vocabulary()]
    rows = pd.Index(items["item_id"].astype(str)).get_indexer(vocab[1:])
    if (rows < 0).any():
        raise ValueError("the teacher's item vocabulary holds IDs the items table lacks")
    table = np.zeros((len(vocab), col.dim), np.float32)
    table[1:] = teacher.embed("item", items.iloc[rows], schema)
    layers["emb"].set_weights([table])


def history_rows(table: pd.DataFrame, train_df: pd.DataFrame, cfg: StudentConfig,
                 seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The ridge fit's user rows with histories (issue 17): each user of ``table`` once with
    no history, then ``cfg.history_copies`` times with its ``train_df`` interactions (in time
    order) truncated at a length drawn uniformly from ``1..cfg.history_max`` (at most its
    count). Returns ``(rows with a HISTORY column, source row of each, row weight factors)``.
    """
    seqs = user_sequences(train_df)
    rng = np.random.default_rng(seed)
    ids = table["user_id"].astype(str).to_numpy()
    source = [np.arange(len(table))]
    hist = [np.full(len(table), "", dtype=object)]
    factor = [np.ones(len(table))]
    for _ in range(cfg.history_copies):
        lengths = rng.integers(1, cfg.history_max + 1, size=len(table))
        hist.append(np.array([join_history(seqs.get(u, [])[:n]) for u, n in zip(ids, lengths,
                                                                                  strict=True)],
                             dtype=object))
        source.append(np.arange(len(table)))
        factor.append(np.full(len(table), cfg.history_weight))
    src = np.concatenate(source)
    rows = table.iloc[src].reset_index(drop=True).assign(**{HISTORY: np.concatenate(hist)})
    return rows, src, np.concatenate(factor)


def _fit_ridge_sides(model: StudentModel, teacher: TeacherModel, prep: Prepared,
                     train_df: pd.DataFrame, sides: tuple[str, ...], cfg: StudentConfig,
                     alphas: dict[str, float]) -> dict[str, Any]:
    """Fit each content side's linear tower to ``teacher``'s embeddings of the entities of
    ``train_df``, weighted by the reliability of each (a function of its count there); a
    user tower with a history also gets each user's truncated-history rows."""
    ds = prep.dataset
    out = {}
    for side in sides:
        table = _entities(ds.users if side == "user" else ds.items, side, train_df)
        weights = reliability(_counts(train_df, side, table[f"{side}_id"]), cfg.reliability,
                              cfg.reliability_scale)
        targets = teacher.embed(side, table, ds.schema)
        if side == "user" and has_history(model.tower(side)):
            table, src, factor = history_rows(table, train_df, cfg)
            targets, weights = targets[src], weights[src] * factor
        out[side] = fit_ridge_tower(model.tower(side), table, ds.schema.side(side),
                                    f"{side}_id", targets, weights, alphas[side])
    return out


def _history_alpha_search(model: StudentModel, vt: TeacherModel, prep: Prepared,
                          cfg: StudentConfig, grid: tuple[float, ...], k: int,
                          emb: dict[str, np.ndarray], counts: np.ndarray,
                          ) -> dict[str, dict[str, float]]:
    """The user alpha of a tower with a history: validation recall of the pseudo-cold users
    at each history length of FEWSHOT_NS (0: the cold-user segment), best of a few priors."""
    ds, v = prep.dataset, prep.val
    tower = model.tower("user")
    table = _entities(ds.users, "user", v.train)
    weights = reliability(_counts(v.train, "user", table["user_id"]), cfg.reliability,
                          cfg.reliability_scale)
    rows, src, factor = history_rows(table, v.train, cfg)
    x, _ = design_matrix(tower, rows, ds.schema.user_features, "user_id")
    y, w = vt.embed("user", table, ds.schema), weights
    tasks = fewshot_tasks(v, ds.users, ds.items)
    designs = {n: design_matrix(tower, ds.users.assign(**{HISTORY: t.history}),
                                ds.schema.user_features, "user_id")[0]
               for n, t in tasks.items()}
    search: dict[str, dict[str, float]] = {}
    for alpha in grid:
        coef, bias = ridge(x, y[src], w[src] * factor, alpha)
        per_n = {}
        for n, t in tasks.items():
            mapped = designs[n] @ coef + bias
            mapped /= np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-12)
            best = 0.0
            for prior in (0.0, 1.0, 4.0):
                fn = Scorer(vt.temperature, prior).score_fn(mapped.astype(np.float32),
                                                            emb["item"], counts)
                if len(t.task.user_rows):
                    best = max(best, float(rank_metrics(t.task, fn, (k,))[f"recall@{k}"]))
            per_n[f"n={n}"] = best
        per_n["mean"] = float(np.mean(list(per_n.values())))
        search[str(alpha)] = per_n
    return search


def _ridge_alpha_search(model: StudentModel, vt: TeacherModel, prep: Prepared,
                        sides: tuple[str, ...], cfg: StudentConfig, grid: tuple[float, ...],
                        k: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each side's ridge alpha on the validation segment that side alone serves, in numpy:
    the design matrices and the teacher's embeddings are computed once."""
    ds, v = prep.dataset, prep.val
    tables = {"user": ds.users, "item": ds.items}
    known = {s: tables[s][f"{s}_id"].astype(str).isin(set(v.train[f"{s}_id"].astype(str)))
             .to_numpy() for s in SIDES}
    emb = {s: vt.embed(s, tables[s], ds.schema) for s in SIDES}
    counts = item_log_counts(v.train, ds.items)
    segment = {"item": "cold_item", "user": "cold_user"}
    search: dict[str, dict[str, float]] = {side: {} for side in sides}
    history_search = None
    if "user" in sides and has_history(model.tower("user")):
        history_search = _history_alpha_search(model, vt, prep, cfg, grid, k, emb, counts)
        search["user"] = {a: r["mean"] for a, r in history_search.items()}
    for side in sides:
        if side == "user" and history_search is not None:
            continue
        x, _ = design_matrix(model.tower(side), tables[side], ds.schema.side(side),
                             f"{side}_id")
        rows = known[side]
        weights = reliability(_counts(v.train, side, tables[side][f"{side}_id"][rows]),
                              cfg.reliability, cfg.reliability_scale)
        task = prep.val_tasks[segment[side]]
        for alpha in grid:
            coef, bias = ridge(x[rows], emb[side][rows], weights, alpha)
            mapped = x @ coef + bias
            mapped /= np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-12)
            both = dict(emb)
            both[side] = np.where(rows[:, None], emb[side], mapped).astype(np.float32)
            best = 0.0
            for prior in ((0.0,) if side == "item" else (0.0, 1.0, 4.0)):
                fn = Scorer(vt.temperature, prior).score_fn(both["user"], both["item"], counts)
                if len(task.user_rows):
                    best = max(best, float(rank_metrics(task, fn, (k,))[f"recall@{k}"]))
            search[side][str(alpha)] = best
    alphas = {side: max(grid, key=lambda a, s=side: search[s][str(a)]) for side in sides}
    if history_search is not None:
        search["user_history"] = history_search
    return alphas, search


def fit_ridge_student(prep: Prepared, teacher: TeacherModel | None, cfg: StudentConfig,
                      run: RunDir, name: str = "student", k: int = 20,
                      val_teacher: TeacherModel | None = None) -> StudentModel:
    """The closed-form student in the teacher's space, and the unified model's score.

    Validation (``val_teacher``: a teacher trained on the validation split's training part
    alone, so pseudo-cold users and items are unseen by every model): each side's ridge
    ``alpha`` is chosen on the segment that side alone serves (cold-item for items,
    cold-user for users, unified scoring), then the popularity priors and the new-item bias
    of the ``recommend`` score (:func:`scoring.tune_unified`) and the student's own prior.
    Then the map is fit again on every training entity with the final ``teacher``.
    Without ``val_teacher`` the final teacher is used for validation too (it saw the
    pseudo-cold entities' interactions, so validation is flattered; the log says so).
    """
    if teacher is None:
        raise ValueError("student.method=ridge maps content into the teacher's space: train "
                         "the teacher first")
    ds, v = prep.dataset, prep.val
    sides = student_sides(ds.schema, cfg.distill_sides)
    if val_teacher is None:
        warn_once("no validation teacher given: the student's settings are chosen with the "
                  "final teacher, which saw the pseudo-cold validation entities")
    vt = val_teacher or teacher
    no_sink = dataclasses.replace(cfg, item_id_sink=0)
    info: dict[str, Any] = {"method": "ridge", "sides": list(sides),
                            "reliability": [cfg.reliability, cfg.reliability_scale]}
    history = None
    if cfg.history and "user" in sides:
        if teacher.tower("item").encoder.uses_ids:
            history = history_settings(cfg, teacher)
            info["history"] = {"max": cfg.history_max, "copies": cfg.history_copies,
                               "weight": cfg.history_weight, **history}
        else:
            warn_once("student.history needs a teacher with item IDs (its item ID table "
                      "embeds the history): the user tower reads no history")
    with phase(f"{name}: ridge alpha search (validation)"):
        states = student_states(ds.schema, _entities(ds.users, "user", v.train),
                                _entities(ds.items, "item", v.train), cfg.tower, sides,
                                history=history)
        model = build_student(states, no_sink, vt)
        for side in sides:
            model.tower(side)(dummy_inputs(model.tower(side).encoder.state))
        fill_history_table(model, vt, ds.items, ds.schema)
        grid = (cfg.ridge_alpha,) if cfg.ridge_alpha is not None else RIDGE_ALPHAS
        alphas, search = _ridge_alpha_search(model, vt, prep, sides, cfg, grid, k)
        info["alpha"], info["alpha_search"] = alphas, search
        _fit_ridge_sides(model, vt, prep, v.train, sides, cfg, alphas)
    with phase(f"{name}: score search (validation)"):
        rec_scorer, rec_info = tune_unified(UnifiedRecommender(vt, model), prep, k=k)
        val_segments = tuple(s for s in SEGMENTS if servable(s, sides)
                             and len(prep.val_tasks[s].user_rows))
        own = Scorer(vt.temperature, float(cfg.popularity_prior or 0.0))
        if cfg.popularity_prior is None:
            own, info["prior_search"] = tune_prior(model, own, prep, val_segments, k=k)
        info["popularity_prior"] = own.prior
    with phase(f"{name}: ridge fit on all training data"):
        full = prep.split.train
        states = student_states(ds.schema, _entities(ds.users, "user", full),
                                _entities(ds.items, "item", full), cfg.tower, sides,
                                history=history)
        model = build_student(states, no_sink, teacher)
        for side in sides:
            model.tower(side)(dummy_inputs(model.tower(side).encoder.state))
        fill_history_table(model, teacher, ds.items, ds.schema)
        info["fit"] = _fit_ridge_sides(model, teacher, prep, full, sides, cfg, alphas)
    info["best_epoch"] = info["epochs_run"] = 0
    run.save_model(name, model, states, info, Scorer(teacher.temperature, own.prior))
    if name == "student":  # a benchmark's extra students do not replace the served one
        run.save_scorer(RECOMMEND, rec_scorer, {"student": name, **rec_info})
    return model


# ---- the trained student in the teacher's space (student.method=aligned) ---------------------


def aligned_config(cfg: StudentConfig) -> AlignedConfig:
    """The :class:`AlignedConfig` of a student config (method=aligned)."""
    return AlignedConfig(
        tower=cfg.tower, contrastive=tuple(cfg.aligned_terms), distill_lambda=cfg.distill_lambda,
        kd_temperature=cfg.distill_temperature, kl_weight=cfg.kl_weight,
        align_weight=cfg.align_weight, reliability=cfg.reliability,
        reliability_scale=cfg.reliability_scale, logq_correction=cfg.logq_correction,
        remove_accidental_hits=cfg.remove_accidental_hits, item_id_sink=cfg.item_id_sink,
        learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, epochs=cfg.epochs,
        patience=cfg.patience)


def _aligned(prep: Prepared, teacher: TeacherModel, cfg: StudentConfig, train_df: pd.DataFrame
             ) -> tuple[AlignedStudent, dict[str, Any]]:
    """An aligned student on ``train_df``'s entities with ``teacher``'s embeddings cached."""
    ds = prep.dataset
    acfg = aligned_config(cfg)
    users, items = _entities(ds.users, "user", train_df), _entities(ds.items, "item", train_df)
    tower_cfg = dataclasses.replace(cfg.tower, output_dim=teacher.user_tower.cfg.output_dim,
                                    id_dim=0)
    states = student_states(ds.schema, users, items, tower_cfg, SIDES, cfg.item_id_sink,
                            cfg.item_id_sink_dropout)
    model = AlignedStudent(Tower(states["user"], tower_cfg, name="user_tower"),
                           Tower(states["item"], tower_cfg, name="item_tower"),
                           teacher.temperature, acfg)
    for side, table in (("user", users), ("item", items)):
        model.tower(side)(dummy_inputs(model.tower(side).encoder.state))
        model.cache_teacher(side, table[f"{side}_id"].astype(str).to_numpy(),
                            teacher.embed(side, table, ds.schema),
                            _counts(train_df, side, table[f"{side}_id"]))
    return model, states


def fit_aligned_student(prep: Prepared, teacher: TeacherModel | None, cfg: StudentConfig,
                        run: RunDir, seed: int = 0, verbose: int | str = "auto",
                        name: str = "student", k: int = 20,
                        val_teacher: TeacherModel | None = None) -> StudentModel:
    """Content towers trained *in the teacher's space* (:class:`AlignedStudent`).

    Search: trained on the validation split's training part against ``val_teacher``, early
    stopping on the unified model's mean validation recall@k over the cold segments; the
    ``recommend`` score and the student's own prior are chosen on validation; then a refit on
    all training data against ``teacher`` for the chosen number of epochs.
    """
    if teacher is None:
        raise ValueError("student.method=aligned learns the teacher's space: train the "
                         "teacher first")
    ds, v = prep.dataset, prep.val
    if student_sides(ds.schema, cfg.distill_sides) != SIDES:
        raise ValueError("student.method=aligned needs content features on both sides; use "
                         "student.method=ridge for one-sided data")
    vt = val_teacher or teacher
    known = {s: set(v.train[f"{s}_id"].astype(str)) for s in SIDES}
    cold = tuple(s for s in ("cold_item", "cold_user", "cold_both")
                 if len(prep.val_tasks[s].user_rows))
    with phase(f"{name}: search fit (validation)"):
        model, _ = _aligned(prep, vt, cfg, v.train)

        def score(m: AlignedStudent) -> dict[str, float]:
            fn = unified_score_fn(UnifiedRecommender(vt, m), Scorer(vt.temperature), ds,
                                  v.train, known["user"], known["item"])
            vals = {s: float(rank_metrics(prep.val_tasks[s], fn, (k,))[f"recall@{k}"])
                    for s in cold}
            return {f"val_{s}_recall@{k}": x for s, x in vals.items()} | {
                "val_cold_mean": float(np.mean(list(vals.values()))) if vals else 0.0}

        info = fit_aligned(model, v.train, ds.users, ds.items, ds.schema, seed, score,
                           verbose=0 if verbose == "auto" else int(verbose))
    info["method"] = "aligned"
    with phase(f"{name}: score search (validation)"):
        rec_scorer, rec_info = tune_unified(UnifiedRecommender(vt, model), prep, k=k)
        own, info["prior_search"] = tune_prior(model, Scorer(vt.temperature), prep,
                                               tuple(s for s in SEGMENTS
                                                     if len(prep.val_tasks[s].user_rows)), k=k)
        info["popularity_prior"] = own.prior
    with phase(f"{name}: refit ({info['best_epoch']} epochs on all training data)"):
        model, states = _aligned(prep, teacher, cfg, prep.split.train)
        refit = dataclasses.replace(model.cfg, epochs=info["best_epoch"])
        model.cfg = refit
        info["refit"] = fit_aligned(model, prep.split.train, ds.users, ds.items, ds.schema,
                                    seed + 2000, None,
                                    verbose=0 if verbose == "auto" else int(verbose))
    run.save_model(name, model, states, info, Scorer(teacher.temperature, own.prior))
    if name == "student":  # a benchmark's extra students do not replace the served one
        run.save_scorer(RECOMMEND, rec_scorer, {"student": name, **rec_info})
    loaded = build_student(states, cfg, teacher)  # the served form: a StudentModel
    for side in SIDES:
        tower = loaded.tower(side)
        tower(dummy_inputs(tower.encoder.state))  # create the variables, then copy them
        tower.set_weights(model.tower(side).get_weights())
    return loaded
