"""Cold-start quality benchmark (issue: distilled student): ML-100K, DESIGN.md protocol.

Models: popularity, teacher, student (distilled), student with lambda = 0 (the ablation), and
LightFM hybrid with the same features (optional: skipped with a message when not installed).
Several training seeds; mean and standard deviation. Writes report.json, report.md and PNG charts
under benchmarks/results/coldstart/. Not part of the test suite.

``--shape items-only`` / ``users-only`` drops the other side's content features, giving the
one-sided shapes of real data (featureless users, as in paper/tag data; featureless items, as
in social data) on the same split: the student distils the content side only and the other
side's unseen entities fall back to popularity, for the student and LightFM alike (marked †).

    make bench-quality ARGS="--data-dir ../shared/data/ml-100k --seeds 3"
    make bench-quality ARGS="--seeds 3 --shape items-only \
        --out benchmarks/results/coldstart_items_only"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tfrs_coldstart.config import load_config
from tfrs_coldstart.data import Dataset, Schema
from tfrs_coldstart.evaluation import (
    Prepared,
    aggregate,
    evaluate_popularity,
    evaluate_score_fn,
    metrics_table,
    prepare,
    protocol,
    write_report,
)
from tfrs_coldstart.modeling.models import student_sides
from tfrs_coldstart.runs import RunDir, load_data
from tfrs_coldstart.scoring import evaluate_model
from tfrs_coldstart.training import fit_student, fit_teacher

ROOT = Path(__file__).resolve().parent


def lightfm_scores(prep: Prepared, seed: int, epochs: int = 30):
    """LightFM hybrid (WARP) with the same user/item features, one-hot encoded; None if absent."""
    try:
        from lightfm import LightFM
    except ImportError:
        print("LightFM is not installed: `pip install --no-build-isolation lightfm` to add the "
              "peer baseline; skipping it", file=sys.stderr)
        return None
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    ds = prep.dataset
    train_df = prep.split.train

    def side_features(table: pd.DataFrame, side: str) -> sp.csr_matrix:
        """Identity (warm ids only) + one-hot content features, rows L1-normalised."""
        key = f"{side}_id"
        warm = set(train_df[key])
        tokens: list[list[str]] = []
        for _, row in table.iterrows():
            toks = [f"id={row[key]}"] if row[key] in warm else []
            for spec in ds.schema.side(side):
                v = row[spec.name]
                t = spec.type.value
                if t == "multi_hot":
                    toks += [f"{spec.name}={x}" for x in str(v).split(spec.separator) if x]
                elif t == "text":
                    toks += [f"{spec.name}:{w}" for w in str(v).lower().split()]
                elif t == "numeric":
                    toks.append(f"{spec.name}={int(float(v)) // 5 * 5}")
                elif t == "categorical":
                    toks.append(f"{spec.name}={v}")
            tokens.append(toks)
        vocab = {t: i for i, t in enumerate(sorted({t for ts in tokens for t in ts}))}
        rows = [i for i, ts in enumerate(tokens) for _ in ts]
        cols = [vocab[t] for ts in tokens for t in ts]
        m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                          shape=(len(table), len(vocab)))
        norm = np.asarray(m.sum(axis=1)).ravel()
        norm[norm == 0] = 1
        return sp.diags(1 / norm) @ m

    uf, itf = side_features(ds.users, "user"), side_features(ds.items, "item")
    u_index = pd.Index(ds.users["user_id"])
    i_index = pd.Index(ds.items["item_id"])
    inter = sp.coo_matrix((np.ones(len(train_df), np.float32),
                           (u_index.get_indexer(train_df["user_id"]),
                            i_index.get_indexer(train_df["item_id"]))),
                          shape=(len(u_index), len(i_index)))
    model = LightFM(loss="warp", no_components=64, learning_rate=0.05, random_state=seed)
    model.fit(inter, user_features=uf, item_features=itf, epochs=epochs, num_threads=2)
    _, ue = model.get_user_representations(uf)
    _, ie = model.get_item_representations(itf)
    ub, ib = model.get_user_representations(uf)[0], model.get_item_representations(itf)[0]
    return lambda u, i: ue[u] @ ie[i].T + ib[i][None, :] + ub[u][:, None]


SHAPES = {"both": ("user", "item"), "items-only": ("item",), "users-only": ("user",)}


def with_shape(ds: Dataset, shape: str) -> Dataset:
    """``ds`` with content features kept only on the sides ``shape`` names."""
    keep = SHAPES[shape]
    if keep == ("user", "item"):
        return ds
    schema = Schema(user_features=ds.schema.user_features if "user" in keep else (),
                    item_features=ds.schema.item_features if "item" in keep else ())
    return dataclasses.replace(
        ds, name=f"{ds.name} ({shape})", schema=schema,
        users=ds.users[["user_id", *(f.name for f in schema.user_features)]],
        items=ds.items[["item_id", *(f.name for f in schema.item_features)]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data" / "ml-100k"))
    p.add_argument("--format", default="movielens")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default=str(ROOT / "results" / "coldstart"))
    p.add_argument("--no-lightfm", action="store_true")
    p.add_argument("--shape", choices=sorted(SHAPES), default="both",
                   help="keep content features on both sides or on one side only")
    args = p.parse_args(argv)
    overrides = [f"data.format={args.format}", f"data.data_dir={args.data_dir}", *args.overrides]
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    ds = with_shape(load_data(cfg), args.shape)
    prep = prepare(ds, cfg)
    sides = student_sides(ds.schema, cfg.student.distill_sides)
    ks = cfg.eval.cutoffs
    per_seed = []
    t_start = time.time()
    for seed in range(args.seeds):
        run = RunDir(out / "runs" / f"seed{seed}")
        c = dataclasses.replace(cfg, seed=seed, output_dir=str(run.path))
        run.write_metadata(c, prep)
        res = {"popularity": evaluate_popularity(prep, ks)}
        t0 = time.time()
        teacher = fit_teacher(prep, c.teacher, run, seed, verbose=2)
        t1 = time.time()
        res["teacher"] = evaluate_model(prep, teacher, run.scorer("teacher"), ks, sides)
        student = fit_student(prep, teacher, c.student, run, seed, verbose=2)
        t2 = time.time()
        res["student"] = evaluate_model(prep, student, run.scorer("student"), ks, sides)
        ablation = dataclasses.replace(c.student, distill_lambda=0.0, align_weight=0.0)
        st0 = fit_student(prep, None if sides == ("user", "item") else teacher, ablation,
                          run, seed, verbose=2, name="student_lambda0")
        res["student (lambda=0)"] = evaluate_model(prep, st0, run.scorer("student_lambda0"), ks,
                                                   sides)
        if not args.no_lightfm:
            fn = lightfm_scores(prep, seed)
            if fn is not None:  # a side without features has nothing for its unseen entities
                res["lightfm (hybrid, WARP)"] = evaluate_score_fn(prep, fn, ks, sides)
        res["_timing"] = {"teacher_s": t1 - t0, "student_s": t2 - t1}
        per_seed.append(res)
        print(f"seed {seed} done in {time.time() - t0:.0f} s", file=sys.stderr)
    timing = [r.pop("_timing") for r in per_seed]
    report = {
        "dataset": ds.name, "protocol": protocol(cfg, prep),
        "models": aggregate(per_seed),
        "params": {"teacher": teacher.param_count(), "student": student.param_count(),
                   "student_with_training_only_id_sink": student.param_count(training=True)},
        "timing": timing,
        "command": "python benchmarks/coldstart.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or ''} "
                   f"{__import__('os').cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - t_start, 1),
    }
    write_report(report, out, cfg.eval.headline_k)
    (out / "per_seed.json").write_text(json.dumps(per_seed, indent=1))
    print(metrics_table(report, cfg.eval.headline_k))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
