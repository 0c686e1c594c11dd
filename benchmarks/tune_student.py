"""Choose student hyper-parameters on the *validation* split (pseudo-cold users/items carved
from training); the test segments are never looked at.

The distilling teacher is trained here on the validation split's training part only: a
teacher that saw the pseudo-cold users and items would leak them into the student through
the distillation term. Each trial trains a student on the same part (early stopping on
validation recall, popularity prior chosen on validation, no refit) and prints its validation
recall@20 per segment at the chosen prior. Trials that change ``teacher.*`` get their own
teacher.

    python benchmarks/tune_student.py --data-dir ../shared/data/ml-100k \\
        --trial "student.distill_lambda=0" --trial "student.distill_temperature=4"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit_row  # benchmarks/ is the script's folder

import tfrs_coldstart  # noqa: F401
from tfrs_coldstart.config import load_config
from tfrs_coldstart.evaluation import prepare, rank_metrics
from tfrs_coldstart.modeling.models import TeacherModel
from tfrs_coldstart.runs import RunDir, load_data
from tfrs_coldstart.scoring import model_score_fn
from tfrs_coldstart.training import fit_student, fit_teacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="a MovieLens folder (default: the config's data)")
    p.add_argument("--config", help="base YAML config")
    p.add_argument("--set", action="append", default=[], help="base override a.b=value")
    p.add_argument("--trial", action="append", default=[], help="space-separated overrides")
    p.add_argument("--out", default=None, help="JSON lines file for the results")
    args = p.parse_args(argv)
    sets = list(args.set)
    if args.data_dir:
        sets += ["data.format=movielens", f"data.data_dir={args.data_dir}"]
    base = load_config(args.config, sets)
    ds = load_data(base)
    prep = prepare(ds, base)
    teachers: dict[str, TeacherModel] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, trial in enumerate(args.trial or [""]):
            cfg = load_config(None, trial.split(), base=base)
            t0 = time.time()
            key = json.dumps(dataclasses.asdict(cfg.teacher), sort_keys=True)
            needs_teacher = (cfg.student.method != "own" or cfg.student.distill_lambda > 0
                             or cfg.student.align_weight > 0)
            if key not in teachers and needs_teacher:
                teachers[key] = fit_teacher(
                    prep, cfg.teacher, RunDir(Path(tmp) / f"t{len(teachers)}"), cfg.seed,
                    verbose=0, validation_only=True)
            student_cfg = dataclasses.replace(cfg.student, refit=False)
            run = RunDir(Path(tmp) / f"s{i}")
            teacher = teachers.get(key)
            model = fit_student(prep, teacher, student_cfg, run, cfg.seed, verbose=0,
                                val_teacher=teacher)
            info = run.history("student")
            fn = model_score_fn(model, run.scorer("student"), ds, prep.val.train)
            val = {s: round(rank_metrics(t, fn, (20,))["recall@20"], 4)
                   for s, t in prep.val_tasks.items() if len(t.user_rows)}
            row = {"trial": trial, "best_epoch": info["best_epoch"],
                   "prior": info["popularity_prior"], "mean": round(float(np.mean(
                       list(val.values()))), 4), **val,
                   "seconds": round(time.time() - t0, 1)}
            emit_row(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
