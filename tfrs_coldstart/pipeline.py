"""The ``run``, ``train``, ``distill`` and ``evaluate`` commands: data -> split -> teacher ->
student -> evaluation -> report, each phase named in the log with its elapsed time."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow as tf

from tfrs_coldstart.config import RunConfig, load_config
from tfrs_coldstart.console import log, phase
from tfrs_coldstart.errors import ConfigError, RunError
from tfrs_coldstart.evaluation import (
    evaluate_mixed,
    evaluate_popularity,
    metrics_table,
    prepare,
    protocol,
)
from tfrs_coldstart.fileio import process_alive, writer_pid
from tfrs_coldstart.modeling.models import student_sides
from tfrs_coldstart.runs import RECOMMEND, VALIDATION_TEACHER, RunDir, load_data
from tfrs_coldstart.scoring import (
    evaluate_model,
    evaluate_unified,
    model_score_fn,
    unified_score_fn,
)
from tfrs_coldstart.training import (
    fit_student,
    fit_teacher,
    is_chief,
    make_strategy,
    strategy_scope,
    worker_name,
)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and the data and output options of ``run`` and ``train``."""
    p.add_argument("--config", help="YAML config file (keys as in config.yaml of any run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set teacher.epochs=10 (repeatable)")
    p.add_argument("--data-dir", help="MovieLens folder, or a folder with interactions/users/items")
    p.add_argument("--format", choices=["synthetic", "movielens", "tables", "tfds", "stream"],
                   help="data format (default: synthetic, the embedded default)")
    p.add_argument("--schema", help="schema YAML for --format tables")
    p.add_argument("--output", "-o",
                   help="run folder (default: runs/<format>; rerun an interrupted run to resume)")
    p.add_argument("--quiet", action="store_true", help="no Keras progress bars")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Defaults, ``--config``, ``--set`` and the data options, checked before any data is read."""
    overrides = list(args.overrides)
    if args.data_dir:  # absolute, so the saved config works from any folder
        overrides.append(f"data.data_dir={Path(args.data_dir).expanduser().resolve()}")
        if not args.format:
            overrides.append("data.format=movielens")
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.schema:
        overrides.append(f"data.schema={Path(args.schema).expanduser().resolve()}")
    cfg = load_config(args.config, overrides)
    if cfg.data.format in ("movielens", "tables") and not cfg.data.data_dir:
        raise ConfigError(f"--format {cfg.data.format} needs --data-dir")
    out = Path(args.output or f"runs/{cfg.data.format}")
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file; a run folder must be a folder (pass a new "
                       "path or the folder of an earlier run)")
    return dataclasses.replace(cfg, output_dir=str(out))


def _verbose(args: argparse.Namespace) -> int | str:
    return 0 if getattr(args, "quiet", False) else (1 if sys.stdout.isatty() else 2)


def _finish(report: dict[str, Any], run: RunDir, cfg: RunConfig,
            out_dir: str | Path | None = None) -> None:
    with phase("report"):
        paths = run.write_report(report, cfg.eval.headline_k, out_dir)
    print(metrics_table(report, cfg.eval.headline_k))
    print(f"report: {paths['md']} (json: {paths['json']}, chart: {paths['png']})")


def _trained(run: RunDir, which: str, strategy: tf.distribute.Strategy | None = None,
             done: bool | None = None) -> Any:
    """A model a killed run already finished (loaded, not trained again), else None.

    Read from :attr:`RunDir.resume_source` (a non-chief worker copies the chief's model into
    its scratch folder first, so all workers decide alike); loaded in ``strategy``'s scope,
    so the models built on it later are all of that scope. ``done``: the caller's decision
    (default: the model's save finished).
    """
    src = run.resume_source
    if not (src.has_finished(which) if done is None else done):
        return None
    run.copy_model_from(src, which)
    log(f"{which}: already trained in {src.path} (resumed run), loaded")
    with strategy_scope(strategy):
        return run.load_model(which)


def check_output(cfg: RunConfig) -> None:
    """Before any work: the run folder can be written, and an earlier run in it (a rerun
    resumes it) had the same config; :class:`RunError` otherwise, the folder untouched."""
    out = Path(cfg.output_dir)
    changed = RunDir(out).config_changes(cfg)
    # How training is laid out (train.strategy, train.communication) may change on a rerun:
    # a fit's backup is plain arrays and counts global steps of the global batch, so a run
    # started on 2 workers resumes in one process after a machine is lost (tested).
    layout = [k for k in changed if k.startswith("train.")]
    if layout:
        log(f"{out}: resuming with another training layout ({', '.join(layout)}); the "
            "remaining epochs split the global batch over this layout's replicas")
        changed = [k for k in changed if k not in layout]
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more"
                                          if len(changed) > 8 else "")
        raise RunError(f"{out} holds a run with another config (changed: {shown}); a rerun "
                       "resumes a run with its own settings only: use a new --output for "
                       "new settings (nothing was changed)")
    probe = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        why = ("a read-only file system" if _read_only(probe) else "no write permission")
        raise RunError(f"cannot write the run folder {out}: {probe} is not writable ({why}); "
                       "pass another --output")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def run_folder(cfg: RunConfig) -> Iterator[tuple[RunDir, tf.distribute.Strategy | None]]:
    """The run folder this process writes, and the strategy of ``cfg.train``.

    The output is checked first, then the strategy is made (``multi_worker`` must be made
    before TensorFlow runs an op). The chief (or the one process) writes ``cfg.output_dir``;
    a non-chief worker runs the same pipeline into a scratch folder, removed at the end,
    reading resumable state from the chief's folder (:class:`RunDir`), as TensorFlow's
    multi-worker docs advise: every worker saves (saving may involve collectives), only the
    chief's copy is kept.
    """
    check_output(cfg)
    strategy = make_strategy(cfg.train)
    if is_chief(strategy):
        yield RunDir(cfg.output_dir), strategy
        return
    prefix = f"tfrs-coldstart-{worker_name(strategy)}-"
    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*"):  # of workers killed before
        pid = writer_pid(old.name, prefix)
        if pid is not None and not process_alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    log(f"{worker_name(strategy)}: not the chief; the chief writes {cfg.output_dir}, this "
        f"worker writes to {scratch} (removed at the end)")
    try:
        yield RunDir(scratch, chief=cfg.output_dir), strategy
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_pipeline(cfg: RunConfig, student: bool = True, verbose: int | str = "auto",
                 run: RunDir | None = None, strategy: tf.distribute.Strategy | None = None
                 ) -> dict[str, Any]:
    """Train the teacher (and distil the student) into ``cfg.output_dir``; the report.

    Resumable: rerun with the same config after a crash or kill, phases already finished
    (a saved teacher, validation teacher or student) are loaded, a fit killed mid-way resumes
    at its last finished epoch (``training.FitBackup``), and the result equals an
    uninterrupted run's. ``run`` and ``strategy``: from :func:`run_folder` (default: the
    output folder, checked, and no strategy).
    """
    if run is None:
        check_output(cfg)
        run = RunDir(cfg.output_dir)
    k = cfg.eval.headline_k
    t0 = time.time()
    with phase(f"data ({cfg.data.format})"):
        ds = load_data(cfg)
    with phase("split"):
        prep = prepare(ds, cfg)
        run.write_metadata(cfg, prep)
    log(f"split: {prep.split.summary()}")
    with phase("teacher"):
        teacher = _trained(run, "teacher", strategy) or fit_teacher(
            prep, cfg.teacher, run, cfg.seed, verbose, k=k, strategy=strategy)
    with phase("evaluation: popularity, teacher"):
        models = {"popularity": evaluate_popularity(prep, cfg.eval.cutoffs),
                  "teacher": evaluate_model(prep, teacher, run.scorer("teacher"), cfg.eval.cutoffs)}
    report: dict[str, Any] = {"dataset": ds.name, "protocol": protocol(cfg, prep)}
    if student:
        val_teacher = None
        if cfg.student.method in ("ridge", "aligned"):  # choices on unseen entities
            with phase("validation teacher (validation training part only)"):
                val_teacher = _trained(run, VALIDATION_TEACHER, strategy) or fit_teacher(
                    prep, cfg.teacher, run, cfg.seed, verbose, validation_only=True, k=k,
                    name=VALIDATION_TEACHER, strategy=strategy)
        with phase("student"):
            src = run.resume_source
            done = src.has_finished("student") and (
                cfg.student.method == "own" or src.has_scorer(RECOMMEND))
            if done and src.has_scorer(RECOMMEND):
                run.copy_model_from(src, RECOMMEND)
            st = _trained(run, "student", strategy, done)
            st = st or fit_student(prep, teacher, cfg.student, run, cfg.seed, verbose, k=k,
                                   val_teacher=val_teacher, strategy=strategy)
        with phase("evaluation: student, recommend"):
            models["student"] = evaluate_model(
                prep, st, run.scorer("student"), cfg.eval.cutoffs,
                student_sides(ds.schema, cfg.student.distill_sides))
            report["mixed"] = {"teacher": evaluate_mixed(
                prep, model_score_fn(teacher, run.scorer("teacher"), ds, prep.split.train),
                cfg.eval.cutoffs, k)}
            if run.has_scorer(RECOMMEND):
                unified = run.load_unified(teacher, st)
                report["cold_paths"] = unified.cold_paths  # chosen on validation per side
                scorer = run.scorer(RECOMMEND)
                models[RECOMMEND] = evaluate_unified(prep, unified, scorer, cfg.eval.cutoffs)
                report["mixed"][RECOMMEND] = evaluate_mixed(
                    prep, unified_score_fn(unified, scorer, ds, prep.split),
                    cfg.eval.cutoffs, k)
    return {**report, "models": models, "seconds": round(time.time() - t0, 1)}


# ---- commands ---------------------------------------------------------------------------------


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def disk_summary(run: RunDir) -> str:
    """``8.1 MB on disk: teacher 3.6, teacher_val 3.3, logs 0.6, student 0.5, other 0.1``
    (the folders of at least 1 % of the total, largest first)."""
    use = run.disk_usage()
    total = use.pop("total")
    mb = 1024 * 1024
    parts = {k: v for k, v in sorted(use.items(), key=lambda kv: -kv[1])
             if run.model_dir(k).is_dir() and v >= 0.01 * total}
    parts["other"] = total - sum(parts.values())
    return f"{total / mb:.1f} MB on disk: " + ", ".join(f"{k} {v / mb:.1f}"
                                                        for k, v in parts.items())


def run_command(args: argparse.Namespace, student: bool = True) -> int:
    """``tfrs-coldstart run`` (``student=False``: ``train``); every worker of a multi-worker
    run runs the same command, and the chief writes the run folder."""
    cfg = resolve_config(args)
    with run_folder(cfg) as (run, strategy):
        report = run_pipeline(cfg, student, _verbose(args), run, strategy)
        if run.chief is not None:
            log(f"{worker_name(strategy)}: done; the chief writes the report to "
                f"{cfg.output_dir}")
            return 0
        _finish(report, run, cfg)
    print(f"run folder: {cfg.output_dir}  ({report['seconds']} s; {disk_summary(run)})")
    return 0


def train_command(args: argparse.Namespace) -> int:
    return run_command(args, student=False)


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="run folder holding a trained teacher")
    p.add_argument("--config", help="YAML config file applied over the run's config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")


def distill_command(args: argparse.Namespace) -> int:
    """``tfrs-coldstart distill --teacher RUN_DIR``: a student from a saved teacher."""
    run = RunDir.open(args.teacher)
    cfg = load_config(args.config, args.overrides, base=run.config)
    if cfg.train.strategy == "multi_worker":
        raise ConfigError("train.strategy=multi_worker runs with `tfrs-coldstart run` or "
                          "`train` (every worker runs the whole pipeline); distil on one "
                          "machine: --set train.strategy=mirrored (or none)")
    if cfg.eval.max_users != run.config.eval.max_users:  # the report's rows must compare
        raise ConfigError(f"eval.max_users={cfg.eval.max_users}: {args.teacher} evaluates "
                          f"with eval.max_users={run.config.eval.max_users}, and the student "
                          "joins that report; keep it (or train a new run with another cap)")
    strategy = make_strategy(cfg.train)
    with phase(f"data ({cfg.data.format})"):
        ds = run.load_dataset(cfg)  # the feature names the saved teacher was trained on
    with phase("split"):
        prep = prepare(ds, cfg)
    with strategy_scope(strategy):
        teacher = run.load_model("teacher")
    val_teacher = None
    if cfg.student.method in ("ridge", "aligned"):  # choices on unseen entities
        if run.has_model(VALIDATION_TEACHER):
            val_teacher = run.load_model(VALIDATION_TEACHER)
        else:
            with phase("validation teacher (validation training part only)"):
                val_teacher = fit_teacher(prep, cfg.teacher, run, cfg.seed, _verbose(args),
                                          validation_only=True, k=cfg.eval.headline_k,
                                          name=VALIDATION_TEACHER, strategy=strategy)
    with phase("student"):
        st = fit_student(prep, teacher, cfg.student, run, cfg.seed, _verbose(args),
                         k=cfg.eval.headline_k, val_teacher=val_teacher, strategy=strategy)
    run.write_config(cfg)
    report = run.report() or {"dataset": ds.name, "protocol": protocol(cfg, prep), "models": {}}
    with phase("evaluation: student"):
        report["models"]["student"] = evaluate_model(
            prep, st, run.scorer("student"), cfg.eval.cutoffs,
            student_sides(ds.schema, cfg.student.distill_sides))
    _finish(report, run, cfg)
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a trained run folder")
    p.add_argument("--output", "-o", help="report folder (default: the run folder)")


def evaluate_command(args: argparse.Namespace) -> int:
    """``tfrs-coldstart evaluate RUN_DIR``: the test-segment report of a run's models."""
    run = RunDir.open(args.run_dir)
    cfg = run.config
    with phase(f"data ({cfg.data.format})"):
        ds = run.load_dataset()  # as the run's schema reads it (older runs: their names)
    with phase("split"):
        prep = prepare(ds, cfg)
    with phase("evaluation"):
        models = {"popularity": evaluate_popularity(prep, cfg.eval.cutoffs)}
        loaded = {}
        for which in ("teacher", "student"):
            if run.has_model(which):
                sides = (student_sides(ds.schema, cfg.student.distill_sides)
                         if which == "student" else None)
                loaded[which] = run.load_model(which)
                models[which] = evaluate_model(prep, loaded[which], run.scorer(which),
                                               cfg.eval.cutoffs, sides)
        cold_paths = None
        if run.has_scorer(RECOMMEND) and len(loaded) == 2:
            unified = run.load_unified(loaded["teacher"], loaded["student"])
            cold_paths = unified.cold_paths
            models[RECOMMEND] = evaluate_unified(prep, unified, run.scorer(RECOMMEND),
                                                 cfg.eval.cutoffs)
    report = {"dataset": ds.name, "protocol": protocol(cfg, prep), "models": models}
    if cold_paths is not None:
        report["cold_paths"] = cold_paths
    _finish(report, run, cfg, args.output)
    return 0
