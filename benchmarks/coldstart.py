"""Cold-start quality benchmark (issue 13): ML-100K (or any data), DESIGN.md protocol.

Rows: popularity; the teacher (IDs + content; on cold segments its ID falls into the OOV
bucket: its content path); the closed-form ridge mapper (the served student: content mapped
linearly into the teacher's space); the aligned student (content towers trained in the
teacher's space with L_C + lambda * (KL + alignment)) and its lambda = 0 ablation; today's
own-space student; the unified ``recommend`` model (teacher for known users and items, the
ridge student for new ones, one score); LightFM hybrid with the same features (optional).
Several training seeds, mean and standard deviation, and a mixed-catalogue report (warm users
ranking warm and new items together: recall and the new items' share of the top K). Writes
report.json, report.md and report.png under ``--out``. Not part of the test suite.

``--shape items-only`` / ``users-only`` drops the other side's content features (featureless
users, as in paper/tag data; featureless items, as in social data): the students map the
content side only, the other side keeps the teacher's ID tower, and unseen entities of the
featureless side fall back to popularity (marked †). The aligned students need both sides.

    make bench-quality ARGS="--seeds 3"
    make bench-quality ARGS="--seeds 3 --shape items-only \
        --out benchmarks/results/coldstart_items_only"
    make bench-quality ARGS="--format synthetic --seeds 3 --no-lightfm \
        --out benchmarks/results/coldstart_synthetic"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tfrs_coldstart.config import load_config
from tfrs_coldstart.data import Dataset, Schema
from tfrs_coldstart.evaluation import (
    Prepared,
    aggregate,
    evaluate_mixed,
    evaluate_popularity,
    evaluate_score_fn,
    metrics_table,
    prepare,
    protocol,
    write_report,
)
from tfrs_coldstart.modeling.models import student_sides
from tfrs_coldstart.runs import RECOMMEND, VALIDATION_TEACHER, RunDir, load_data
from tfrs_coldstart.scoring import (
    evaluate_model,
    evaluate_unified,
    model_score_fn,
    unified_score_fn,
)
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


def trained(reuse: bool, run: RunDir, saved_as: str, fit: Any, *args: Any, **kwargs: Any
            ) -> Any:
    """``fit(*args, **kwargs)``, or with ``reuse`` the model an earlier run saved as
    ``saved_as``."""
    if reuse and run.has_model(saved_as):
        print(f"reusing {run.path / saved_as}", file=sys.stderr)
        return run.load_model(saved_as)
    return fit(*args, **kwargs)


def student_cfg(base: Any, **changes: Any) -> Any:
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data" / "ml-100k"))
    p.add_argument("--format", default="movielens")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default=str(ROOT / "results" / "coldstart"))
    p.add_argument("--no-lightfm", action="store_true")
    p.add_argument("--no-aligned", action="store_true", help="skip the trained aligned students")
    p.add_argument("--reuse", action="store_true",
                   help="load the teachers and trained students an earlier run of this command "
                        "saved under --out/runs (same seeds and config) instead of training them "
                        "again; the closed-form student and every score are redone")
    p.add_argument("--shape", choices=sorted(SHAPES), default="both",
                   help="keep content features on both sides or on one side only")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.format != "synthetic":
        overrides = [f"data.format={args.format}", f"data.data_dir={args.data_dir}", *overrides]
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    saved = RunDir(out / "runs" / "seed0")
    if args.reuse and (saved.path / "schema.yaml").is_file():
        # the reused models read the data as they were trained on it (the run's saved schema:
        # a run saved before a loader change names its features as then; data loaded with
        # today's default schema would feed them other columns)
        ds = with_shape(saved.load_dataset(cfg), args.shape)
    else:
        ds = with_shape(load_data(cfg), args.shape)
    prep = prepare(ds, cfg)
    sides = student_sides(ds.schema, cfg.student.distill_sides)
    ks = cfg.eval.cutoffs
    k = cfg.eval.headline_k
    per_seed, mixed_seed = [], []
    cold_paths: list[dict[str, str]] = []
    t_start = time.time()
    for seed in range(args.seeds):
        run = RunDir(out / "runs" / f"seed{seed}")
        c = dataclasses.replace(cfg, seed=seed, output_dir=str(run.path))
        if not args.reuse:
            run.write_metadata(c, prep)
        res: dict[str, Any] = {"popularity": evaluate_popularity(prep, ks)}
        timing: dict[str, float] = {}
        t0 = time.time()
        reuse = args.reuse
        teacher = trained(reuse, run, "teacher", fit_teacher, prep, c.teacher, run, seed,
                          verbose=2, k=k)
        vt = trained(reuse, run, VALIDATION_TEACHER, fit_teacher, prep, c.teacher, run, seed,
                     verbose=2, k=k, validation_only=True, name=VALIDATION_TEACHER)
        timing["teachers_s"] = time.time() - t0
        res["teacher"] = evaluate_model(prep, teacher, run.scorer("teacher"), ks, sides)
        # the served student (the product default, chosen on validation): closed-form ridge
        t1 = time.time()
        ridge = fit_student(prep, teacher, student_cfg(c.student, method="ridge"), run, seed,
                            verbose=2, k=k, val_teacher=vt)
        timing["ridge_s"] = time.time() - t1
        res["ridge mapper (closed form)"] = evaluate_model(prep, ridge, run.scorer("student"),
                                                           ks, sides)
        unified = run.load_unified(teacher, ridge)  # with the cold paths chosen on validation
        cold_paths.append(run.cold_paths())
        rec = run.scorer(RECOMMEND)
        res["recommend (unified)"] = evaluate_unified(prep, unified, rec, ks)
        mixed = {"teacher": evaluate_mixed(prep, model_score_fn(
                     teacher, run.scorer("teacher"), ds, prep.split.train), ks, k),
                 "recommend (unified)": evaluate_mixed(prep, unified_score_fn(
                     unified, rec, ds, prep.split), ks, k)}
        if sides == ("user", "item") and not args.no_aligned:
            for label, name, lam in (("aligned student (trained)", "student_aligned", None),
                                     ("aligned student, lambda=0", "student_aligned_l0", 0.0)):
                t1 = time.time()
                sc = student_cfg(c.student, method="aligned",
                                 **({} if lam is None else {"distill_lambda": lam}))
                st = trained(reuse, run, name, fit_student, prep, teacher, sc, run, seed,
                             verbose=2, name=name, k=k, val_teacher=vt)
                timing[f"{name}_s"] = time.time() - t1
                res[label] = evaluate_model(prep, st, run.scorer(name), ks, sides)
        # today's student, in a space of its own (method=own)
        t1 = time.time()
        own = trained(reuse, run, "student_own", fit_student, prep, teacher,
                      student_cfg(c.student, method="own"), run, seed, verbose=2,
                      name="student_own", k=k)
        timing["own_s"] = time.time() - t1
        res["own-space student"] = evaluate_model(prep, own, run.scorer("student_own"), ks,
                                                  sides)
        if not args.no_lightfm:
            fn = lightfm_scores(prep, seed)
            if fn is not None:  # a side without features has nothing for its unseen entities
                res["lightfm (hybrid, WARP)"] = evaluate_score_fn(prep, fn, ks, sides)
        per_seed.append(res)
        mixed_seed.append(mixed)
        print(f"seed {seed} done in {time.time() - t0:.0f} s {timing}", file=sys.stderr)
        res["_timing"] = timing
    timing_all = [r.pop("_timing") for r in per_seed]
    report = {
        "dataset": ds.name, "protocol": protocol(cfg, prep),
        "models": aggregate(per_seed),
        "mixed": aggregate_mixed(mixed_seed, k),
        "params": {"teacher": teacher.param_count(), "ridge student": ridge.param_count()},
        "timing": timing_all,
        "cold_paths_per_seed": cold_paths,  # recommend's, chosen on validation
        "command": "python benchmarks/coldstart.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or ''} "
                   f"{__import__('os').cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - t_start, 1),
    }
    write_report(report, out, cfg.eval.headline_k)
    (out / "per_seed.json").write_text(json.dumps({"segments": per_seed, "mixed": mixed_seed},
                                                  indent=1))
    print(metrics_table(report, cfg.eval.headline_k))
    print("recommend cold paths per seed (chosen on validation):", cold_paths)
    print(f"report: {out / 'report.md'}")
    return 0


def aggregate_mixed(per_seed: list[dict[str, dict]], k: int) -> dict[str, dict]:
    """Mean over seeds of the mixed-catalogue metrics (recall and the cold-item share)."""
    out: dict[str, dict] = {}
    for model in per_seed[0]:
        vals = [r[model] for r in per_seed]
        entry: dict[str, Any] = {key: float(np.mean([v[key] for v in vals]))
                                 for key in vals[0] if "@" in key and vals[0][key] is not None}
        share = [v["cold_share"] for v in vals]
        entry["cold_share"] = {key: (float(np.mean([s[key] for s in share]))
                                     if all(s[key] is not None for s in share) else None)
                               for key in ("top_k", "held_out", "ratio")}
        entry["seeds"] = len(vals)
        out[model] = entry
    return out


if __name__ == "__main__":
    sys.exit(main())
