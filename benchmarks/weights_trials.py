"""Which transform of the interaction ``weight`` column (issue 13) trains the better teacher,
on the *validation* split only: a teacher per transform, trained on the validation split's
training part, early-stopped on its held-out warm interactions; prints the best validation
recall@20 of each (every interaction still counts as a positive when scoring).

    python benchmarks/weights_trials.py --data-dir ../shared/data/ml-100k \\
        --transform none --transform log1p --transform threshold:4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from common import emit_row  # benchmarks/ is the script's folder

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tfrs_coldstart.config import load_config
from tfrs_coldstart.evaluation import prepare
from tfrs_coldstart.runs import RunDir, load_data
from tfrs_coldstart.training import fit_teacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="a MovieLens folder (ratings as weights)")
    p.add_argument("--transform", action="append", default=[],
                   help="teacher.interaction_weight values to try")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON lines file for the results")
    args = p.parse_args(argv)
    base = load_config(None, ["data.format=movielens", f"data.data_dir={args.data_dir}",
                              f"seed={args.seed}"])
    prep = prepare(load_data(base), base)
    for transform in args.transform or ["none"]:
        cfg = load_config(None, [f"teacher.interaction_weight={transform}"], base=base)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            run = RunDir(tmp)
            fit_teacher(prep, cfg.teacher, run, cfg.seed, verbose=0, validation_only=True)
            hist = run.history("teacher")
        val = hist["history"]["val_recall@20"]
        row = {"transform": transform, "seed": args.seed,
               "best_val_warm_recall@20": round(max(val), 4), "best_epoch": hist["best_epoch"],
               "seconds": round(time.time() - t0, 1)}
        emit_row(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
