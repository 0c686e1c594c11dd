"""Choose student hyper-parameters on the *validation* split (pseudo-cold users/items carved
from training); the test segments are never looked at.

    python benchmarks/tune_student.py --teacher RUN_DIR --trial "student.distill_lambda=0" \
        --trial "student.tower.dropout=0.2 student.distill_temperature=4"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import tfrs_coldstart  # noqa: F401
from tfrs_coldstart import train
from tfrs_coldstart.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="run folder with a trained teacher")
    p.add_argument("--trial", action="append", default=[], help="space-separated overrides")
    p.add_argument("--out", default=None, help="JSON lines file for the results")
    args = p.parse_args(argv)
    base = train.load_run_config(args.teacher)
    ds = train.load_data(base)
    prep = train.prepare(ds, base)
    teacher = train.load_model(args.teacher, "teacher")
    for trial in args.trial or [""]:
        cfg = load_config(None, trial.split(), base=base)
        student_cfg = dataclasses.replace(cfg.student, refit=False)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            train.fit_student(prep, teacher if student_cfg.distill_lambda > 0 else teacher,
                              student_cfg, Path(tmp), cfg.seed, verbose=0)
            info = json.loads((Path(tmp) / "student" / "history.json").read_text())
        h, best = info["history"], info["best_epoch"] - 1
        row = {"trial": trial, "best_epoch": best + 1, "seconds": round(time.time() - t0, 1),
               **{k: round(v[best], 4) for k, v in h.items() if k.startswith("val_")}}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
