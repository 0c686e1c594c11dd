"""``tfrs-coldstart`` command line: run | train | distill | evaluate | export | serve | ...

Every failure the user can fix prints one line, ``error: ...``, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set teacher.epochs=10 (repeatable)")
    p.add_argument("--data-dir", help="MovieLens folder, or a folder with interactions/users/items")
    p.add_argument("--format", choices=["synthetic", "movielens", "tables", "tfds"],
                   help="data format (default: synthetic, the embedded default)")
    p.add_argument("--schema", help="schema YAML for --format tables")
    p.add_argument("--output", "-o",
                   help="run folder (default: runs/<format>; rerun an interrupted run to resume)")
    p.add_argument("--quiet", action="store_true", help="no Keras progress bars")


def _resolve_config(args: argparse.Namespace) -> Any:
    from tfrs_coldstart.config import load_config

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
        raise ValueError(f"--format {cfg.data.format} needs --data-dir")
    out = args.output or f"runs/{cfg.data.format}"
    import dataclasses

    return dataclasses.replace(cfg, output_dir=out)


def _verbose(args: argparse.Namespace) -> int | str:
    return 0 if getattr(args, "quiet", False) else (1 if sys.stdout.isatty() else 2)


def cmd_run(args: argparse.Namespace, student: bool = True) -> int:
    from tfrs_coldstart import training as train
    from tfrs_coldstart.evaluation import metrics_table, write_report

    cfg = _resolve_config(args)
    run_dir = Path(cfg.output_dir)
    t0 = time.time()
    train.log(f"loading data ({cfg.data.format}) ...")
    ds = train.load_data(cfg)
    prep = train.prepare(ds, cfg)
    train.save_run_metadata(cfg, prep, run_dir)
    summary = prep.split.summary()
    train.log(f"split: {summary}")
    train.log("training the teacher ...")
    teacher = train.fit_teacher(prep, cfg.teacher, run_dir, cfg.seed, _verbose(args))
    models = {"popularity": train.evaluate_popularity(prep, cfg.eval.ks),
              "teacher": train.evaluate_model(prep, teacher, cfg.eval.ks)}
    if student:
        train.log("distilling the student ...")
        st = train.fit_student(prep, teacher, cfg.student, run_dir, cfg.seed, _verbose(args))
        from tfrs_coldstart.modeling.models import student_sides

        models["student"] = train.evaluate_model(
            prep, st, cfg.eval.ks, student_sides(ds.schema, cfg.student.distill_sides))
    report = {"dataset": ds.name, "protocol": train.protocol(cfg, prep), "models": models,
              "seconds": round(time.time() - t0, 1)}
    paths = write_report(report, run_dir, cfg.eval.headline_k)
    print(metrics_table(report, cfg.eval.headline_k))
    print(f"report: {paths['md']} (json: {paths['json']}, chart: {paths['png']})")
    print(f"run folder: {run_dir}  ({report['seconds']} s)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import json

    from tfrs_coldstart import training as train
    from tfrs_coldstart.config import load_config
    from tfrs_coldstart.evaluation import metrics_table, write_report
    from tfrs_coldstart.modeling.models import student_sides

    run_dir = Path(args.teacher)
    base = train.load_run_config(run_dir)
    cfg = load_config(args.config, args.overrides, base=base)
    ds = train.load_data(cfg)
    prep = train.prepare(ds, cfg)
    teacher = train.load_model(run_dir, "teacher")
    st = train.fit_student(prep, teacher, cfg.student, run_dir, cfg.seed, _verbose(args))
    from tfrs_coldstart.config import save_config

    save_config(cfg, run_dir / "config.yaml")
    rp = run_dir / "report.json"
    report = json.loads(rp.read_text()) if rp.is_file() else {
        "dataset": ds.name, "protocol": train.protocol(cfg, prep), "models": {}}
    report["models"]["student"] = train.evaluate_model(
        prep, st, cfg.eval.ks, student_sides(ds.schema, cfg.student.distill_sides))
    paths = write_report(report, run_dir, cfg.eval.headline_k)
    print(metrics_table(report, cfg.eval.headline_k))
    print(f"report: {paths['md']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tfrs_coldstart import training as train
    from tfrs_coldstart.evaluation import metrics_table, write_report
    from tfrs_coldstart.modeling.models import student_sides

    run_dir = Path(args.run_dir)
    cfg = train.load_run_config(run_dir)
    ds = train.load_data(cfg)
    prep = train.prepare(ds, cfg)
    models = {"popularity": train.evaluate_popularity(prep, cfg.eval.ks)}
    for which in ("teacher", "student"):
        if (run_dir / which / "weights").is_dir():
            m = train.load_model(run_dir, which)
            sides = (student_sides(ds.schema, cfg.student.distill_sides)
                     if which == "student" else None)
            models[which] = train.evaluate_model(prep, m, cfg.eval.ks, sides)
    report = {"dataset": ds.name, "protocol": train.protocol(cfg, prep), "models": models}
    paths = write_report(report, Path(args.output or run_dir), cfg.eval.headline_k)
    print(metrics_table(report, cfg.eval.headline_k))
    print(f"report: {paths['md']} (json: {paths['json']}, chart: {paths['png']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfrs-coldstart", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="data -> split -> teacher -> student -> evaluate")
    _config_args(r)
    t = sub.add_parser("train", help="data -> split -> teacher -> evaluate")
    _config_args(t)
    d = sub.add_parser("distill", help="train the student from a saved teacher run")
    d.add_argument("--teacher", required=True, help="run folder holding a trained teacher")
    d.add_argument("--config")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--quiet", action="store_true")
    e = sub.add_parser("evaluate", help="evaluate a run's models; writes report.json/md/png")
    e.add_argument("run_dir")
    e.add_argument("--output", "-o", help="report folder (default: the run folder)")
    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (see `tfrs-coldstart {name} --help`)", add_help=False)
    return p


# Commands whose module owns its argument parser: (module, function, help).
DELEGATED = {
    "export": ("tfrs_coldstart.serving.export", "export_main",
               "export a run as TF Serving SavedModels (recommend + item encoder)"),
    "serve": ("tfrs_coldstart.serving.devserver", "main",
              "local server with TF Serving's REST and gRPC APIs (production: TF Serving)"),
    "recommend": ("tfrs_coldstart.serving.client", "recommend_main",
                  "ask a TF Serving (or `serve`) server for one user's recommendations"),
    "batch": ("tfrs_coldstart.batch.local", "batch_main",
              "offline top-k for a users table (CSV/Parquet) -> Parquet; in-process or Beam"),
    "add-items": ("tfrs_coldstart.batch.local", "add_items_main",
                  "embed new items and publish a new version with them in the index"),
    "finetune": ("tfrs_coldstart.finetune", "finetune_main",
                 "continue training a run on new interactions (then `export`)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module, func, _ = DELEGATED[argv[0]]
        try:
            return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
        except (ValueError, FileNotFoundError, PermissionError) as e:
            return _fail(e)
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"run": cmd_run, "train": lambda a: cmd_run(a, student=False),
                "distill": cmd_distill, "evaluate": cmd_evaluate}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as e:
        return _fail(e)


def _fail(e: BaseException) -> int:
    """One line for the user; DataError, ConfigError, RunError, ... are ValueErrors whose
    message says what to do. ``TFRS_COLDSTART_DEBUG=1`` re-raises with the traceback."""
    import os

    if os.environ.get("TFRS_COLDSTART_DEBUG"):
        raise e
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
