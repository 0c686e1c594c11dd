"""Fit the teacher, distil the student: Keras fit with validation recall, early stopping,
checkpoints, TensorBoard and resume. Everything a fit keeps goes to its :class:`RunDir`.

Validation never touches the test segments: the protocol is applied again to the training
interactions (:func:`tfrs_coldstart.data.validation_split`) to get held-out warm interactions
and pseudo-cold users and items.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.config import RIDGE_ALPHAS, StudentConfig, TeacherConfig, TrainConfig
from tfrs_coldstart.console import log, phase, warn_once
from tfrs_coldstart.data import SEGMENTS, entity_counts, known_ids
from tfrs_coldstart.data.pipeline import (
    interaction_dataset,
    interaction_weights,
    item_log_counts,
    item_probabilities,
)
from tfrs_coldstart.data.split import Rows
from tfrs_coldstart.errors import ConfigError, RunError, UserError
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
from tfrs_coldstart.modeling.mapper import (
    design_matrix,
    fit_kernel_tower,
    fit_ridge_tower,
    kernel_apply,
    kernel_ridge,
    landmark_rows,
    reliability,
    ridge,
    search_alphas,
)
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
    tune_history_prior,
    tune_prior,
    tune_unified,
    unified_score_fn,
    unified_validation_recalls,
)

__all__ = ["fit_student", "fit_teacher", "is_chief", "log", "make_strategy", "strategy_scope",
           "worker_name"]


def _entities(table: pd.DataFrame, side: str, interactions: Rows) -> pd.DataFrame:
    """Rows of an entity table that occur in ``interactions`` (what preprocessing may see);
    ``interactions``: a frame or a streamed part (data/split.py)."""
    return table[entity_counts(interactions, side, table[f"{side}_id"]) > 0]


# ---- tf.distribute (train.strategy) ----------------------------------------------------------


def make_strategy(cfg: TrainConfig) -> tf.distribute.Strategy | None:
    """The ``tf.distribute`` strategy ``train.strategy`` names (None for ``none``).

    ``mirrored``: one replica per GPU, or per logical CPU device without a GPU (one, unless
    the process split its CPU with ``tf.config.set_logical_device_configuration``).
    ``multi_worker``: the cluster and this process's task from ``TF_CONFIG``; it must be
    made before TensorFlow runs an op in this process (it sets up the collective ops), so
    the pipeline makes it before reading any data.
    """
    if cfg.strategy == "none":
        return None
    if cfg.strategy == "mirrored":
        devices = ([d.name for d in tf.config.list_logical_devices("GPU")]
                   or [d.name for d in tf.config.list_logical_devices("CPU")])
        strategy = tf.distribute.MirroredStrategy(devices)
        log(f"train.strategy=mirrored: {strategy.num_replicas_in_sync} replica(s) on "
            f"{', '.join(devices)}")
        return strategy
    _check_tf_config()
    impl = tf.distribute.experimental.CommunicationImplementation
    options = tf.distribute.experimental.CommunicationOptions(
        implementation={"auto": impl.AUTO, "ring": impl.RING, "nccl": impl.NCCL}[cfg.communication])
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (RuntimeError, ValueError) as err:
        raise RunError(f"train.strategy=multi_worker could not start ({err}); it must be set up "
                       "before TensorFlow runs anything: start it as its own process "
                       "(`tfrs-coldstart run`)") from None
    tasks = strategy.cluster_resolver.cluster_spec().as_dict()
    n_workers = len(tasks.get("chief", [])) + len(tasks.get("worker", []))
    log(f"train.strategy=multi_worker: this is {worker_name(strategy)} of {n_workers} "
        f"worker(s), {strategy.num_replicas_in_sync} replica(s) in all")
    return strategy


_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host0:2222", "host1:2222"]}, '
                      '"task": {"type": "worker", "index": 0}}')


def _check_tf_config() -> None:
    """``TF_CONFIG`` names a cluster and this process's place in it (one error line if not)."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise ConfigError("train.strategy=multi_worker reads the cluster from the TF_CONFIG "
                          "environment variable, which is not set (the Kubeflow TFJob operator "
                          f"sets it; by hand: TF_CONFIG='{_TF_CONFIG_EXAMPLE}' on each worker, "
                          "its own index on each)")
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config["task"]
        hosts = cluster[task["type"]]
        ok = (isinstance(hosts, list) and isinstance(task["index"], int)
              and 0 <= task["index"] < len(hosts))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"TF_CONFIG is not a cluster with this process's task in it "
                          f"(got {raw[:200]!r}); expected e.g. {_TF_CONFIG_EXAMPLE}")


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether this process writes the run folder: every process but the non-chief workers
    of ``multi_worker`` (they write to a scratch folder, as TensorFlow's docs advise)."""
    return strategy is None or bool(strategy.extended.should_checkpoint)


def worker_name(strategy: tf.distribute.Strategy | None) -> str:
    """``worker1``, ``chief0``...: this process's task in the cluster (``local`` without one)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "local"
    return f"{resolver.task_type}{resolver.task_id}"


def strategy_scope(strategy: tf.distribute.Strategy | None) -> contextlib.AbstractContextManager:
    """Where models and optimizers are built: the strategy's scope (their variables mirrored)."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _agree(strategy: tf.distribute.Strategy | None, value: int, what: str) -> None:
    """All workers of ``multi_worker`` reach this point and hold the same ``value``: a
    barrier (the chief removes a backup only after every worker has restored from it) and
    a check (workers that resumed at different epochs would hang in their collectives).

    Mean of ``[value, value**2]`` over the replicas: its variance is 0 iff all agree, and
    every worker gets the same mean, so all of them stop or none does.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    x = tf.constant([float(value), float(value) ** 2], tf.float64)

    @tf.function  # collectives run eagerly are slow and warn
    def mean_over_replicas() -> tf.Tensor:
        return strategy.reduce(tf.distribute.ReduceOp.MEAN,
                               strategy.run(lambda: tf.identity(x)), axis=None)

    mean = mean_over_replicas().numpy()
    if mean[1] - mean[0] ** 2 > 1e-6:
        raise RunError(f"the workers disagree on {what} (this one: {value}; mean over the "
                       f"workers: {mean[0]:g}): each must see the chief's run folder on shared "
                       "storage; rerun all of them")


def _distributable_options(strategy: tf.distribute.Strategy | None) -> tf.data.Options | None:
    """``tf.data`` options of in-memory input under a strategy (None without one): auto-shard
    policy DATA. Every worker builds the same global batches (their order seeded by the
    epoch) and keeps its replicas' slices of each (Keras splits each global batch across
    the replicas), so the global batch means what it means in one process."""
    if strategy is None:
        return None
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _distributable(data: tf.data.Dataset, strategy: tf.distribute.Strategy | None
                   ) -> tf.data.Dataset:
    """``data`` with :func:`_distributable_options`; a dataset that chose its auto-shard
    policy already (e.g. FILE, for sharded files) keeps it."""
    options = _distributable_options(strategy)
    if options is None or data.options().experimental_distribute.auto_shard_policy \
            != tf.data.experimental.AutoShardPolicy.AUTO:
        return data
    return data.with_options(options)


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
    epoch, wait counter, stopped) and the history so far (``state.json``). Early stopping's
    best weights are the model part of ``state.npz`` when epoch ``e`` is the best one, else
    ``best.npz``: a hard link to the best epoch's file (written once, when no link can be
    made). ``<folder>/latest.json``, replaced atomically once the epoch's folder is
    complete, names the folder to resume from; older folders are then removed. A kill at
    any moment leaves ``latest.json`` naming a complete folder (or none: start afresh). One
    epoch writes the model and optimizer state once (no other per-epoch copy: nothing
    else is needed to resume); :func:`_fit` removes the backup when the fit ends.

    ``restore_from``: the folder to resume from when it is not ``folder``: a non-chief
    worker of ``train.strategy=multi_worker`` writes its backups to a scratch folder and
    restores from the chief's (TensorFlow's rule for multi-worker checkpoints).

    With the per-epoch data order of ``interaction_dataset(epochs=...)`` (seeded by epoch, not
    by the epochs before), a resumed fit is bit-identical to an uninterrupted one unless the
    model draws random numbers while training (dropout, ``id_dropout``): those generators'
    states are not saved, so such fits resume equivalent, not identical.

    Place it after ``EarlyStopping`` (and the callbacks that add to the epoch logs): it reads
    their state at each epoch end and puts it back in ``on_train_begin``.
    """

    def __init__(self, folder: Path, early: tf.keras.callbacks.EarlyStopping | None,
                 restore_from: Path | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.restore_from = Path(restore_from) if restore_from is not None else self.folder
        self.early = early
        self.history: dict[str, list[float]] = {}
        self.start = 0  # the first epoch to train (epochs before it are restored)
        self.stopped = False
        self._early_state: dict[str, Any] | None = None
        self._best_file: str | None = None  # where the latest backup keeps the best weights
        self._best_weights: list[np.ndarray] | None = None

    # ---- restore ----------------------------------------------------------------------------

    @staticmethod
    def _latest(folder: Path) -> Path | None:
        try:
            name = json.loads((folder / "latest.json").read_text())["folder"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = folder / str(name)
        return path if (path / "state.json").is_file() and (path / "state.npz").is_file() \
            else None

    def restore(self, model: TwoTowerModel) -> int:
        """Load the latest backup into ``model`` (built and compiled); the epoch to start at
        (0 without a backup)."""
        path = self._latest(self.restore_from)
        if path is None:
            return 0
        state = json.loads((path / "state.json").read_text())
        n_model = int(state["n_model"])
        with np.load(path / "state.npz") as arrays:
            values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        opt = model.optimizer
        opt.build(model.trainable_variables)
        opt_vars = opt.variables
        try:
            if len(opt_vars) != len(values) - n_model:
                raise ValueError("another number of optimizer variables")
            model.set_weights(values[:n_model])
        except ValueError as err:
            raise RunError(f"{self.restore_from} holds a backup of another model ({err}); "
                           "remove it to start this fit afresh") from None
        for var, value in zip(opt_vars, values[n_model:], strict=True):
            var.assign(value)
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.start = int(state["epoch"]) + 1
        self.stopped = bool(state.get("stopped", False))
        self._early_state = state.get("early")
        # backups written before "best_file" was recorded always kept best.npz
        best = state.get("best_file", "best.npz" if (path / "best.npz").is_file() else None)
        self._best_file = best
        if best == "state.npz":
            self._best_weights = values[:n_model]
        elif best is not None:
            with np.load(path / best) as arrays:
                self._best_weights = [arrays[f"arr_{i}"] for i in range(n_model)]
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

    def _save_best(self, es: tf.keras.callbacks.EarlyStopping, epoch: int, out: Path,
                   previous: Path | None) -> str | None:
        """Where this epoch's backup keeps early stopping's best weights (see the class)."""
        if es.best_weights is None:
            return None
        if es.best_epoch == epoch:  # they are this epoch's weights, in state.npz already
            return "state.npz"
        same = (previous is not None and self._best_file is not None
                and self._early_state is not None
                and int(self._early_state["best_epoch"]) == es.best_epoch)
        if same:
            with contextlib.suppress(OSError):
                os.link(previous / self._best_file, out / "best.npz")  # type: ignore[operator]
                return "best.npz"
        with open(out / "best.npz", "wb") as f:
            np.savez(f, *es.best_weights)
        return "best.npz"

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        previous = self._latest(self.folder)
        out = self.folder / f"epoch-{epoch}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        weights = self.model.get_weights()
        opt_values = [v.numpy() for v in self.model.optimizer.variables]
        with open(out / "state.npz", "wb") as f:
            np.savez(f, *weights, *opt_values)
        es = self.early
        early = best_file = None
        if es is not None:
            early = {"best": float(es.best), "best_epoch": int(es.best_epoch),
                     "wait": int(es.wait), "stopped_epoch": int(es.stopped_epoch)}
            best_file = self._save_best(es, epoch, out, previous)
        self._early_state, self._best_file = early, best_file
        atomic_write_text(out / "state.json", json.dumps({
            "epoch": epoch, "n_model": len(weights), "history": self.history, "early": early,
            "best_file": best_file, "stopped": bool(self.model.stop_training)}))
        atomic_write_text(self.folder / "latest.json", json.dumps({"folder": out.name}))
        for old in self.folder.glob("epoch-*"):
            if old.name != out.name:
                shutil.rmtree(old, ignore_errors=True)


def _fit(model: TwoTowerModel, train_df: Rows, prep: Prepared, lr: float,
         batch_size: int, epochs: int, patience: int, val_segments: tuple[str, ...],
         run: RunDir, name: str, seed: int, verbose: int | str = "auto",
         k: int = 20, weight_decay: float = 0.0, interaction_weight: str = "none",
         strategy: tf.distribute.Strategy | None = None) -> dict[str, Any]:
    """Keras fit with validation recall@k, early stopping, a resumable backup, TensorBoard.

    The backup lives in ``<run>/<name>/backup/`` while the fit runs (removed when it ends;
    the caller saves the model's weights once, with :meth:`RunDir.save_model`); no
    ``val_segments``: a refit for a fixed number of epochs. ``strategy``: variables and the
    optimizer are made in its scope, ``batch_size`` is the global batch (split across its
    replicas); ``model`` must have been built in the same scope.
    """
    ds = prep.dataset
    out = run.model_dir(name)
    prob = item_probabilities(train_df, ds.items["item_id"].astype(str))
    weights = interaction_weights(train_df, interaction_weight)
    streamed = not isinstance(train_df, pd.DataFrame)  # a StreamPart weighs its own rows
    if interaction_weight != "none" and weights is None and not (
            streamed and train_df.has_weights):
        warn_once(f"interaction_weight={interaction_weight} has no effect: the interactions "
                  "have no weight column")
    with strategy_scope(strategy):  # the variables and the optimizer's slots: mirrored
        for side in SIDES:  # create the variables now: the backup restores into a built model
            tower = model.tower(side)
            tower(dummy_inputs(tower.encoder.state))
        if isinstance(model, StudentModel):
            model.build_extras()
        model.built = True
        model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=lr,
                                                         weight_decay=weight_decay or None))
        # Its slots now, not in the first step: a train function that creates variables is
        # traced twice, and under a strategy one trace costs several seconds.
        model.optimizer.build(model.trainable_variables)
    monitor = f"val_recall@{k}"
    callbacks: list[tf.keras.callbacks.Callback] = [StopOnNonFiniteLoss(name)]
    early = None
    if val_segments:
        early = tf.keras.callbacks.EarlyStopping(monitor=monitor, mode="max",
                                                 patience=patience, restore_best_weights=True)
        callbacks += [ValidationRecall(prep, val_segments, k), early]
    backup = FitBackup(out / "backup", early,
                       restore_from=run.resume_source.model_dir(name) / "backup")
    with strategy_scope(strategy):
        first = backup.restore(model)
    _agree(strategy, first, f"the epoch {name} resumes at")
    if first:
        log(f"resuming {name} at epoch {first + 1} of {epochs} ({first} done; early "
            "stopping state and history restored)")
    callbacks += [
        backup,
        tf.keras.callbacks.TensorBoard(str(run.log_dir(name)), update_freq="epoch"),
    ]
    start = time.time()
    if first < epochs and not backup.stopped:
        data = interaction_dataset(train_df, ds.users, ds.items, ds.schema.user_features,
                                   ds.schema.item_features, batch_size, shuffle=True, seed=seed,
                                   item_prob=prob, weights=weights, epochs=(first, epochs),
                                   stream=ds.stream, weight_transform=interaction_weight)
        # fit enters the strategy's scope itself (the model was built in it)
        model.fit(_distributable(data, strategy), epochs=epochs, initial_epoch=first,
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
                k: int = 20, name: str = "teacher",
                strategy: tf.distribute.Strategy | None = None) -> TeacherModel:
    """Teacher on training minus held-out warm validation; early stopping on its recall@k.

    ``validation_only`` trains on the validation split's training part alone, without the
    pseudo-cold users' and items' interactions: the teacher to tune students with, since a
    teacher that saw the pseudo-cold entities would leak them into a student through the
    distillation term and flatter its validation recall. ``strategy``: see
    :func:`make_strategy` (the model is built and trained in its scope).
    """
    tf.keras.utils.set_random_seed(seed)
    v = prep.val
    train_df = v.train if validation_only else v.with_pseudo_cold()
    ds = prep.dataset
    states = teacher_states(ds.schema, _entities(ds.users, "user", train_df),
                            _entities(ds.items, "item", train_df), cfg.tower)
    with strategy_scope(strategy):
        model = build_teacher(states, cfg)
    info = _fit(model, train_df, prep, cfg.learning_rate, cfg.batch_size, cfg.epochs,
                cfg.patience, ("warm",), run, name, seed, verbose, k, cfg.weight_decay,
                cfg.interaction_weight, strategy)
    run.save_model(name, model, states, info, Scorer(cfg.temperature))
    return model


def fit_student(prep: Prepared, teacher: TeacherModel | None, cfg: StudentConfig, run: RunDir,
                seed: int = 0, verbose: int | str = "auto", name: str = "student",
                k: int = 20, val_teacher: TeacherModel | None = None,
                strategy: tf.distribute.Strategy | None = None) -> StudentModel:
    """Content-only student distilled from ``teacher``; early stopping on pseudo-cold validation.

    ``method=ridge``: see :func:`fit_ridge_student` (closed form in numpy: ``strategy`` plays
    no part). ``method=own``, three phases: a search fit on the validation split's training
    part (so its pseudo-cold users and items are truly unseen when choosing the epoch), the
    popularity prior's weight chosen on the same validation data, then (``cfg.refit``) a
    refit on all training data for the chosen number of epochs; both fits (and
    ``method=aligned``'s) run under ``strategy`` (:func:`make_strategy`).
    """
    if cfg.method == "ridge":
        return fit_ridge_student(prep, teacher, cfg, run, name=name, k=k,
                                 val_teacher=val_teacher)
    if cfg.method == "aligned":
        return fit_aligned_student(prep, teacher, cfg, run, seed, verbose, name, k,
                                   val_teacher, strategy)
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
        with strategy_scope(strategy):
            model = build_student(states, cfg, teacher)
            model.cache_teacher(_entities(ds.users, "user", train_df),
                                _entities(ds.items, "item", train_df), ds.schema)
        info = _fit(model, train_df, prep, cfg.learning_rate, cfg.batch_size, cfg.epochs,
                    cfg.patience, val_segments, run, name, seed, verbose, k,
                    interaction_weight=cfg.interaction_weight, strategy=strategy)
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
            full = prep.val.with_pseudo_cold()
            tf.keras.utils.set_random_seed(seed + 2000)
            states = student_states(ds.schema, _entities(ds.users, "user", full),
                                    _entities(ds.items, "item", full), cfg.tower, sides,
                                    cfg.item_id_sink, cfg.item_id_sink_dropout)
            with strategy_scope(strategy):
                model = build_student(states, cfg, teacher)
                model.cache_teacher(_entities(ds.users, "user", full),
                                    _entities(ds.items, "item", full), ds.schema)
            shutil.rmtree(run.model_dir(name) / "backup", ignore_errors=True)
            info["refit"] = _fit(model, full, prep, cfg.learning_rate, cfg.batch_size,
                                 info["best_epoch"], 0, (), run, f"{name}/refit", seed, verbose,
                                 k, interaction_weight=cfg.interaction_weight,
                                 strategy=strategy)
            with contextlib.suppress(OSError):  # empty once its backup is gone
                (run.model_dir(name) / "refit").rmdir()
    run.save_model(name, model, states, info, scorer)
    return model


# ---- the closed-form student in the teacher's space (student.method=ridge) -------------------


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


def history_rows(table: pd.DataFrame, train_df: Rows, cfg: StudentConfig,
                 seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The ridge fit's user rows with histories (issue 17): each user of ``table`` once with
    no history, then ``cfg.history_copies`` times with its ``train_df`` interactions (in time
    order) truncated at a length drawn uniformly from ``1..cfg.history_max`` (at most its
    count). Returns ``(rows with a HISTORY column, source row of each, row weight factors)``.
    """
    # streamed: each user's first history_max items, read from the shards
    seqs = (user_sequences(train_df) if isinstance(train_df, pd.DataFrame)
            else train_df.sequences(cfg.history_max))
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


def kernel_widths(maps: dict[str, str], prep: Prepared, train_df: Rows,
                  cfg: StudentConfig) -> dict[str, int]:
    """The landmarks of each side whose map is the kernel one: its warm entities in
    ``train_df``, at most ``cfg.kernel_landmarks`` (``build_student``'s ``kernel``)."""
    tables = {"user": prep.dataset.users, "item": prep.dataset.items}
    return {side: min(cfg.kernel_landmarks, len(_entities(tables[side], side, train_df)))
            for side, kind in maps.items() if kind == "kernel"}


def _fit_ridge_sides(model: StudentModel, teacher: TeacherModel, prep: Prepared,
                     train_df: Rows, sides: tuple[str, ...], cfg: StudentConfig,
                     alphas: dict[str, float], maps: dict[str, str] | None = None
                     ) -> dict[str, Any]:
    """Fit each content side's tower to ``teacher``'s embeddings of the entities of
    ``train_df``, weighted by the reliability of each (a function of its count there): a
    linear map, or the kernel map where ``maps`` says so (the tower built for it, see
    :func:`kernel_widths`); a user tower with a history also gets each user's
    truncated-history rows."""
    ds = prep.dataset
    out = {}
    for side in sides:
        table = _entities(ds.users if side == "user" else ds.items, side, train_df)
        weights = reliability(entity_counts(train_df, side, table[f"{side}_id"]), cfg.reliability,
                              cfg.reliability_scale)
        targets = teacher.embed(side, table, ds.schema)
        if side == "user" and has_history(model.tower(side)):
            table, src, factor = history_rows(table, train_df, cfg)
            targets, weights = targets[src], weights[src] * factor
        if (maps or {}).get(side) == "kernel":
            out[side] = fit_kernel_tower(model.tower(side), table, ds.schema.side(side),
                                         f"{side}_id", targets, weights, alphas[side],
                                         landmark_rows(len(table), cfg.kernel_landmarks))
        else:
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
    weights = reliability(entity_counts(v.train, "user", table["user_id"]), cfg.reliability,
                          cfg.reliability_scale)
    rows, src, factor = history_rows(table, v.train, cfg)
    x, _ = design_matrix(tower, rows, ds.schema.user_features, "user_id")
    y, w = vt.embed("user", table, ds.schema), weights
    tasks = fewshot_tasks(v, ds.users, ds.items)
    designs = {n: design_matrix(tower, ds.users.assign(**{HISTORY: t.history}),
                                ds.schema.user_features, "user_id")[0]
               for n, t in tasks.items()}

    def score(alpha: float) -> dict[str, float]:
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
        return per_n

    found = search_alphas(score, grid, key=lambda r: r["mean"])
    return {str(a): r for a, r in found.items()}


def _linear_map(alpha: float, x: Any, rows: np.ndarray, y: np.ndarray,
                weights: np.ndarray) -> np.ndarray:
    """Every row of ``x`` mapped by the ridge fit on ``rows`` at ``alpha``."""
    coef, bias = ridge(x[rows], y, weights, alpha)
    return np.asarray(x @ coef + bias)


def _kernel_map(alpha: float, x: Any, rows: np.ndarray, y: np.ndarray, weights: np.ndarray,
                landmarks: np.ndarray) -> np.ndarray:
    """Every row of ``x`` mapped by the kernel ridge fit on ``rows`` at ``alpha``."""
    xr = x[rows]
    beta, bias = kernel_ridge(xr, y, weights, alpha, landmarks)
    return kernel_apply(x, xr[landmarks], beta, bias)


def _side_alpha_score(alpha: float, side: str, fit: Any, rows: np.ndarray, task: Any,
                      emb: dict[str, np.ndarray], counts: np.ndarray, temperature: float,
                      k: int) -> float:
    """Validation recall@k of ``task`` with ``side``'s unseen entities (``~rows``) mapped by
    ``fit(alpha)`` (the user side: best of a few popularity priors)."""
    mapped = fit(alpha)
    mapped /= np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-12)
    both = dict(emb)
    both[side] = np.where(rows[:, None], emb[side], mapped).astype(np.float32)
    best = 0.0
    for prior in ((0.0,) if side == "item" else (0.0, 1.0, 4.0)):
        fn = Scorer(temperature, prior).score_fn(both["user"], both["item"], counts)
        if len(task.user_rows):
            best = max(best, float(rank_metrics(task, fn, (k,))[f"recall@{k}"]))
    return best


def _ridge_alpha_search(model: StudentModel, vt: TeacherModel, prep: Prepared,
                        sides: tuple[str, ...], cfg: StudentConfig, grid: tuple[float, ...],
                        k: int
                        ) -> tuple[dict[str, float], dict[str, str], dict[str, dict[str, float]]]:
    """Each side's ridge alpha on the validation segment that side alone serves, in numpy:
    the design matrices and the teacher's embeddings are computed once. The item side also
    tries the kernel map (``cfg.item_map``); returns the alphas, each side's map (linear or
    kernel) and the searches."""
    ds, v = prep.dataset, prep.val
    tables = {"user": ds.users, "item": ds.items}
    known = {s: tables[s][f"{s}_id"].astype(str).isin(known_ids(v.train, s))
             .to_numpy() for s in SIDES}
    emb = {s: vt.embed(s, tables[s], ds.schema) for s in SIDES}
    counts = item_log_counts(v.train, ds.items)
    segment = {"item": "cold_item", "user": "cold_user"}
    search: dict[str, dict[str, float]] = {}
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
        weights = reliability(entity_counts(v.train, side, tables[side][f"{side}_id"][rows]),
                              cfg.reliability, cfg.reliability_scale)
        task = prep.val_tasks[segment[side]]
        kinds = ("linear", "kernel") if side == "item" else ("linear",)
        if side == "item" and cfg.item_map != "auto":
            kinds = (cfg.item_map,)
        for kind in kinds:
            fit = (functools.partial(_linear_map, x=x, rows=rows, y=emb[side][rows],
                                     weights=weights) if kind == "linear" else
                   functools.partial(_kernel_map, x=x, rows=rows, y=emb[side][rows],
                                     weights=weights,
                                     landmarks=landmark_rows(int(rows.sum()),
                                                             cfg.kernel_landmarks)))
            score = functools.partial(_side_alpha_score, side=side, fit=fit, rows=rows,
                                      task=task, emb=emb, counts=counts,
                                      temperature=vt.temperature, k=k)
            key = side if kind == "linear" else f"{side}_kernel"
            search[key] = {str(a): r for a, r in search_alphas(score, grid).items()}
    # the best alpha of each side's search (the first of equals: the searches are in order);
    # the item side's map: the kernel only where it beats the linear one
    alphas, maps = {}, {}
    for side in sides:
        options = [(kind, search[key]) for kind, key in (("linear", side),
                                                        ("kernel", f"{side}_kernel"))
                   if search.get(key)]
        kind, found = max(options, key=lambda o: max(o[1].values()))
        alphas[side], maps[side] = float(max(found, key=found.get)), kind
    if history_search is not None:
        search["user_history"] = history_search
    return alphas, maps, search


COLD_SEGMENTS = ("cold_item", "cold_user", "cold_both")


def choose_cold_paths(vt: TeacherModel, model: StudentModel, prep: Prepared,
                      cfg: StudentConfig, sides: tuple[str, ...], k: int = 20,
                      validated: bool = True) -> tuple[Scorer, dict[str, Any]]:
    """The ``recommend`` model's cold path per side and its score, on validation.

    Each side the student serves may take a new entity's embedding from the student or from
    the teacher's own content path (``student.cold_path_*``; ``auto``: both are tried). Each
    combination gets its score tuned (:func:`scoring.tune_unified`) and the one with the best
    mean validation recall@k over the cold segments wins (ties: the student). Without a
    validation teacher (``validated=False``: ``vt`` saw the pseudo-cold entities, which would
    flatter its content path) ``auto`` keeps the student. A user tower that reads the history
    then gets its ``history_half`` (:func:`scoring.tune_history_prior`). Returns the score and
    how it was chosen (``cold_paths``; ``cold_path_search`` when more than one combination was
    tried; ``history_half_search``; the tuning's info).
    """
    options: dict[str, tuple[str, ...]] = {}
    for side in SIDES:
        fixed = getattr(cfg, f"cold_path_{side}")
        if side not in sides:
            options[side] = ("student",)  # no content tower: the student is the teacher there
        elif fixed != "auto":
            options[side] = (fixed,)
        elif side == "user" and has_history(model.tower("user")):
            options[side] = ("student",)  # the request-time history is read by the student
        elif not validated:
            options[side] = ("student",)
            warn_once("no validation teacher: recommend's cold paths stay the student's (the "
                      "final teacher saw the validation entities, so its content path would be "
                      "flattered)")
        else:
            options[side] = ("student", "teacher")
    segments = tuple(s for s in COLD_SEGMENTS if len(prep.val_tasks[s].user_rows))
    search: dict[str, dict[str, float]] = {}
    best: tuple[float, dict[str, str], Scorer, dict[str, Any]] | None = None
    for user_path in options["user"]:
        for item_path in options["item"]:
            paths = {"user": user_path, "item": item_path}
            unified = UnifiedRecommender(vt, model, paths)
            scorer, info = tune_unified(unified, prep, k=k)
            if len(options["user"]) * len(options["item"]) == 1:
                best = (0.0, paths, scorer, info)
                break
            per = unified_validation_recalls(unified, scorer, prep, segments, k)
            value = float(np.mean(list(per.values()))) if per else 0.0
            search[f"user={user_path},item={item_path}"] = {**per, "mean": value}
            if best is None or value > best[0] + 1e-9:
                best = (value, paths, scorer, info)
    assert best is not None
    _, paths, scorer, info = best
    if search:
        log(f"cold path: users {paths['user']}, items {paths['item']} (validation recall@{k} "
            "over the cold segments: "
            + ", ".join(f"{key} {v['mean']:.4f}" for key, v in search.items()) + ")")
        info = {"cold_path_search": search, **info}
    if paths["user"] == "student" and "user" in sides and has_history(model.tower("user")):
        # how fast a new user's prior gives way to their history: the few-shot tasks (the
        # cold segments above have no history, so the choice of paths does not depend on it)
        scorer, half = tune_history_prior(UnifiedRecommender(vt, model, paths), scorer, prep,
                                          k=k)
        if half:
            info = {**info, "history_half_search": half}
            log(f"new users' prior with a history: halves at n = {scorer.history_half} "
                f"(validation few-shot recall@{k}, n >= 1: "
                + ", ".join(f"{h} {r:.4f}" for h, r in half.items()) + ")")
    return scorer, {"cold_paths": paths, **info}


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
        alphas, maps, search = _ridge_alpha_search(model, vt, prep, sides, cfg, grid, k)
        info["alpha"], info["alpha_search"], info["maps"] = alphas, search, maps
        if kernel := kernel_widths(maps, prep, v.train, cfg):
            model = build_student(states, no_sink, vt, kernel)
            for side in sides:
                model.tower(side)(dummy_inputs(model.tower(side).encoder.state))
            fill_history_table(model, vt, ds.items, ds.schema)
            linear = max(search.get("item", {}).values(), default=float("nan"))
            log(f"{name}: the item side's map is the kernel one (validation recall@{k} "
                f"{max(search['item_kernel'].values()):.4f}, the linear map's {linear:.4f})")
        _fit_ridge_sides(model, vt, prep, v.train, sides, cfg, alphas, maps)
    with phase(f"{name}: cold path and score search (validation)"):
        rec_scorer, rec_info = choose_cold_paths(vt, model, prep, cfg, sides, k,
                                                   validated=val_teacher is not None)
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
        info["kernel"] = kernel_widths(maps, prep, full, cfg)
        model = build_student(states, no_sink, teacher, info["kernel"])
        for side in sides:
            model.tower(side)(dummy_inputs(model.tower(side).encoder.state))
        fill_history_table(model, teacher, ds.items, ds.schema)
        info["fit"] = _fit_ridge_sides(model, teacher, prep, full, sides, cfg, alphas, maps)
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


def _aligned(prep: Prepared, teacher: TeacherModel, cfg: StudentConfig, train_df: Rows,
             strategy: tf.distribute.Strategy | None = None
             ) -> tuple[AlignedStudent, dict[str, Any]]:
    """An aligned student on ``train_df``'s entities with ``teacher``'s embeddings cached
    (built in ``strategy``'s scope)."""
    ds = prep.dataset
    acfg = aligned_config(cfg)
    users, items = _entities(ds.users, "user", train_df), _entities(ds.items, "item", train_df)
    tower_cfg = dataclasses.replace(cfg.tower, output_dim=teacher.user_tower.cfg.output_dim,
                                    id_dim=0)
    states = student_states(ds.schema, users, items, tower_cfg, SIDES, cfg.item_id_sink,
                            cfg.item_id_sink_dropout)
    embeddings = {side: teacher.embed(side, table, ds.schema)
                  for side, table in (("user", users), ("item", items))}
    with strategy_scope(strategy):
        model = AlignedStudent(Tower(states["user"], tower_cfg, name="user_tower"),
                               Tower(states["item"], tower_cfg, name="item_tower"),
                               teacher.temperature, acfg)
        for side, table in (("user", users), ("item", items)):
            model.tower(side)(dummy_inputs(model.tower(side).encoder.state))
            ids = table[f"{side}_id"]
            model.cache_teacher(side, ids.astype(str).to_numpy(), embeddings[side],
                                entity_counts(train_df, side, ids))
    return model, states


def fit_aligned_student(prep: Prepared, teacher: TeacherModel | None, cfg: StudentConfig,
                        run: RunDir, seed: int = 0, verbose: int | str = "auto",
                        name: str = "student", k: int = 20,
                        val_teacher: TeacherModel | None = None,
                        strategy: tf.distribute.Strategy | None = None) -> StudentModel:
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
    known = {s: known_ids(v.train, s) for s in SIDES}
    cold = tuple(s for s in ("cold_item", "cold_user", "cold_both")
                 if len(prep.val_tasks[s].user_rows))
    with phase(f"{name}: search fit (validation)"):
        model, _ = _aligned(prep, vt, cfg, v.train, strategy)

        def score(m: AlignedStudent) -> dict[str, float]:
            fn = unified_score_fn(UnifiedRecommender(vt, m), Scorer(vt.temperature), ds,
                                  v, known["user"], known["item"])
            vals = {s: float(rank_metrics(prep.val_tasks[s], fn, (k,))[f"recall@{k}"])
                    for s in cold}
            return {f"val_{s}_recall@{k}": x for s, x in vals.items()} | {
                "val_cold_mean": float(np.mean(list(vals.values()))) if vals else 0.0}

        with strategy_scope(strategy):
            info = fit_aligned(model, v.train, ds.users, ds.items, ds.schema, seed, score,
                               verbose=0 if verbose == "auto" else int(verbose),
                               data_options=_distributable_options(strategy))
    info["method"] = "aligned"
    with phase(f"{name}: cold path and score search (validation)"):
        rec_scorer, rec_info = choose_cold_paths(vt, model, prep, cfg, SIDES, k,
                                                   validated=val_teacher is not None)
        own, info["prior_search"] = tune_prior(model, Scorer(vt.temperature), prep,
                                               tuple(s for s in SEGMENTS
                                                     if len(prep.val_tasks[s].user_rows)), k=k)
        info["popularity_prior"] = own.prior
    with phase(f"{name}: refit ({info['best_epoch']} epochs on all training data)"):
        model, states = _aligned(prep, teacher, cfg, prep.split.train, strategy)
        refit = dataclasses.replace(model.cfg, epochs=info["best_epoch"])
        model.cfg = refit
        with strategy_scope(strategy):
            info["refit"] = fit_aligned(model, prep.split.train, ds.users, ds.items,
                                        ds.schema, seed + 2000, None,
                                        verbose=0 if verbose == "auto" else int(verbose),
                                        data_options=_distributable_options(strategy))
    run.save_model(name, model, states, info, Scorer(teacher.temperature, own.prior))
    if name == "student":  # a benchmark's extra students do not replace the served one
        run.save_scorer(RECOMMEND, rec_scorer, {"student": name, **rec_info})
    loaded = build_student(states, cfg, teacher)  # the served form: a StudentModel
    for side in SIDES:
        tower = loaded.tower(side)
        tower(dummy_inputs(tower.encoder.state))  # create the variables, then copy them
        tower.set_weights(model.tower(side).get_weights())
    return loaded
