"""Few-shot cold users (issue 17): ML-100K, DESIGN.md split, Recall@20 by history length.

Each cold user's interactions (cold-user and cold-both, by timestamp) are split into the first
n (the request-time history) and the rest (the test, over the warm items minus the revealed
ones), n in {0, 1, 3, 5, 10}; users with fewer than n + 1 interactions are skipped at that n.

Rows:
- popularity (training counts; the revealed items are excluded like everywhere);
- implicit ALS (32 factors) on the training interactions, the history folded in with
  ``recalculate_user`` (popularity at n = 0); only if the ``implicit`` package is installed;
- item-kNN (cosine) and EASE fold-ins: item-item scores summed over the history, plus a
  popularity term; settings chosen on validation. Not servable in one index: they show how
  much a history can say on this split (the ceiling the targets are compared with);
- teacher-mean: the mean of the history items' teacher embeddings, half-and-half with the
  teacher's content-path user embedding (the issue's naive baseline);
- recommend, no history: the served model before issue 17 (``student.history=false``);
- recommend + history: the served model with the request-time history (the default).
Also the same for the served model on the validation split (pseudo-cold users, the
validation teacher): what chose the settings. ``--sweep`` fits extra history settings on
seed 0 and reports their validation numbers only.

    make bench-fewshot                      # = python benchmarks/fewshot.py --seeds 3
    python benchmarks/fewshot.py --seeds 1 --sweep
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
import pandas as pd

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tfrs_coldstart.config import load_config
from tfrs_coldstart.data.pipeline import item_log_counts
from tfrs_coldstart.evaluation import (
    FEWSHOT_NS,
    FewShotTask,
    Prepared,
    evaluate_fewshot,
    fewshot_tasks,
    popularity_score_fn,
    prepare,
)
from tfrs_coldstart.features.columns import HISTORY_SEPARATOR
from tfrs_coldstart.fileio import atomic_write_text
from tfrs_coldstart.modeling.unified import UnifiedRecommender
from tfrs_coldstart.runs import RECOMMEND, VALIDATION_TEACHER, RunDir, load_data
from tfrs_coldstart.scoring import Scorer, unified_history_scorer
from tfrs_coldstart.training import fit_student, fit_teacher

ROOT = Path(__file__).resolve().parent
KS = (10, 20, 50)


def _hist_lists(history: np.ndarray) -> list[list[str]]:
    return [[t for t in str(h).split(HISTORY_SEPARATOR) if t] for h in history]


def popularity_scorer(prep: Prepared):
    fn = popularity_score_fn(prep.split.train, prep.dataset.items)
    return lambda history: fn


def als_scorer(prep: Prepared, seed: int, factors: int = 32):
    """implicit's ALS on the training interactions; a history is folded in with
    ``recalculate_user``; no history: popularity. None when ``implicit`` is absent."""
    try:
        from implicit.als import AlternatingLeastSquares
    except ImportError:
        print("implicit is not installed (`pip install implicit`): skipping the ALS fold-in "
              "peer", file=sys.stderr)
        return None
    import scipy.sparse as sp

    ds, train = prep.dataset, prep.split.train
    m, i_index = _binary_matrix(ds, train, np.float32)
    u_index = pd.Index(ds.users["user_id"].astype(str))
    model = AlternatingLeastSquares(factors=factors, random_state=seed, num_threads=1)
    model.fit(m, show_progress=False)
    item_f = np.asarray(model.item_factors)
    pop = popularity_score_fn(train, ds.items)

    def make(history: np.ndarray):
        lists = _hist_lists(history)
        user_f = np.zeros((len(u_index), item_f.shape[1]), np.float32)
        has = np.zeros(len(u_index), bool)
        for row, items in enumerate(lists):
            cols = [c for c in i_index.get_indexer(items) if c >= 0]
            cols = [c for c in cols if m[:, c].nnz]  # items ALS was trained on
            if not cols:
                continue
            ui = sp.csr_matrix((np.ones(len(cols), np.float32), (np.zeros(len(cols)), cols)),
                               shape=(1, len(i_index)))
            user_f[row] = np.asarray(model.recalculate_user(0, ui)).ravel()
            has[row] = True

        def fn(u: np.ndarray, i: np.ndarray) -> np.ndarray:
            out = user_f[u] @ item_f[i].T
            no = ~has[u]
            if no.any():
                out[no] = pop(u[no], i)
            return out
        return fn
    return make


def _binary_matrix(ds, train: pd.DataFrame, dtype: Any = np.float64):
    """``(users x items CSR of 1 per user-item pair of train, the items' id index)``."""
    import scipy.sparse as sp

    u_index = pd.Index(ds.users["user_id"].astype(str))
    i_index = pd.Index(ds.items["item_id"].astype(str))
    m = sp.csr_matrix((np.ones(len(train), dtype),
                       (u_index.get_indexer(train["user_id"].astype(str)),
                        i_index.get_indexer(train["item_id"].astype(str)))),
                      shape=(len(u_index), len(i_index)))
    m.data[:] = 1.0
    return m, i_index


def item_item_scorer(ds, train: pd.DataFrame, kind: str, lam: float, pop_weight: float):
    """Item-to-item fold-in peers (not in one index, so not servable as ``recommend``): a
    history scores item j by sum_i S[i, j] over its items, plus ``pop_weight`` x normalised
    log-popularity (which alone ranks at n = 0). ``kind``: ``cosine`` (item-kNN, every
    neighbour) or ``ease`` (Steck 2019: the closed-form item-item regression, L2 ``lam``)."""
    m, i_index = _binary_matrix(ds, train)
    gram = (m.T @ m).toarray()
    if kind == "ease":
        gram[np.diag_indices_from(gram)] += lam
        inv = np.linalg.inv(gram)
        sim = -inv / np.diag(inv)
    else:
        norm = np.sqrt(np.diag(gram)) + 1e-9
        sim = gram / norm[:, None] / norm[None, :]
    np.fill_diagonal(sim, 0.0)
    sim = sim.astype(np.float32)
    pop = np.log1p(np.asarray(m.sum(0)).ravel())
    pop = (pop / max(pop.max(), 1e-12)).astype(np.float32)

    def make(history: np.ndarray):
        hist = np.zeros((len(history), len(i_index)), np.float32)
        for row, its in enumerate(_hist_lists(history)):
            cols = [c for c in i_index.get_indexer(its) if c >= 0]
            hist[row, cols] = 1.0
        scores = hist @ sim

        def fn(u: np.ndarray, i: np.ndarray) -> np.ndarray:
            return scores[u][:, i] + pop_weight * pop[i][None, :]
        return fn
    return make


#: The item-item peers' settings tried on validation (mean recall@20 over n >= 1 picks one).
ITEM_ITEM_GRID = {"cosine": [(0.0, w) for w in (0.0, 0.2, 1.0)],
                  "ease": [(lam, w) for lam in (50.0, 200.0, 500.0) for w in (0.0, 0.05, 0.2)]}


def chosen_item_item(prep: Prepared, val_tasks: dict[int, FewShotTask], kind: str
                     ) -> tuple[float, float, dict[str, float]]:
    """``(lam, pop_weight, search)`` of an item-item peer, chosen on the validation split's
    pseudo-cold users (fit on its training part)."""
    search = {}
    for lam, w in ITEM_ITEM_GRID[kind]:
        res = evaluate_fewshot(val_tasks, item_item_scorer(prep.dataset, prep.val.train, kind,
                                                           lam, w), (20,))
        search[f"lam={lam},w={w}"] = float(np.mean([v["recall@20"] for key, v in res.items()
                                                    if key != "n=0"]))
    best = max(ITEM_ITEM_GRID[kind], key=lambda x: search[f"lam={x[0]},w={x[1]}"])
    return best[0], best[1], search


def teacher_mean_scorer(prep: Prepared, teacher, scorer: Scorer):
    """Mean of the history items' teacher embeddings, half-and-half with the teacher's
    content-path user embedding (its user ID is unknown), renormalised; the teacher's score."""
    ds = prep.dataset
    users = teacher.embed("user", ds.users, ds.schema)  # cold users: the OOV ID + content
    items = teacher.embed("item", ds.items, ds.schema)
    warm = ds.items["item_id"].astype(str).isin(set(prep.split.train["item_id"].astype(str)))
    i_index = pd.Index(ds.items["item_id"].astype(str))
    counts = item_log_counts(prep.split.train, ds.items)

    def make(history: np.ndarray):
        u = users.copy()
        for row, its in enumerate(_hist_lists(history)):
            cols = [c for c in i_index.get_indexer(its) if c >= 0 and warm.iloc[c]]
            if cols:
                mean = items[cols].mean(0)
                mean /= max(np.linalg.norm(mean), 1e-12)
                v = 0.5 * u[row] + 0.5 * mean
                u[row] = v / max(np.linalg.norm(v), 1e-12)
        return scorer.score_fn(u, items, counts)
    return make


def _value(v: str) -> Any:
    """A --sweep value: bool, int, float or string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label)[:60]


def validation_student(prep: Prepared, vt, sc, alphas: dict[str, float],
                       maps: dict[str, str] | None = None):
    """The ridge student as chosen on validation: fit on the validation split's training
    part to the validation teacher (pseudo-cold users unseen), with the chosen alphas and
    maps (linear or kernel per side)."""
    from tfrs_coldstart.features.encoder import dummy_inputs
    from tfrs_coldstart.modeling.models import build_student, student_sides, student_states
    from tfrs_coldstart.training import (
        _entities,
        _fit_ridge_sides,
        fill_history_table,
        history_settings,
        kernel_widths,
    )

    ds, v = prep.dataset, prep.val
    sides = student_sides(ds.schema, sc.distill_sides)
    states = student_states(ds.schema, _entities(ds.users, "user", v.train),
                            _entities(ds.items, "item", v.train), sc.tower, sides,
                            history=history_settings(sc, vt) if sc.history else None)
    model = build_student(states, dataclasses.replace(sc, item_id_sink=0), vt,
                          kernel_widths(maps or {}, prep, v.train, sc))
    for side in sides:
        model.tower(side)(dummy_inputs(model.tower(side).encoder.state))
    fill_history_table(model, vt, ds.items, ds.schema)
    _fit_ridge_sides(model, vt, prep, v.train, sides, sc, alphas, maps)
    return model


def recall_row(res: dict[str, dict], k: int = 20) -> dict[str, float | None]:
    return {key: v[f"recall@{k}"] for key, v in res.items()}


def aggregate(per_seed: list[dict[str, dict]], k: int = 20) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for model in per_seed[0]:
        out[model] = {}
        for key in per_seed[0][model]:
            vals = [r[model][key][f"recall@{k}"] for r in per_seed if model in r]
            out[model][key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                               "trials": [round(float(v), 4) for v in vals],
                               "users": per_seed[0][model][key]["users"],
                               "skipped": per_seed[0][model][key].get("skipped", 0)}
    return out


def markdown(report: dict[str, Any]) -> str:
    ns = [f"n={n}" for n in FEWSHOT_NS]
    lines = [f"# Few-shot cold users (issue 17): Recall@20, {report['seeds']} seeds", "",
             f"- Command: `{report['command']}`", f"- Date: {report['date']}; machine: "
             f"{report['machine']}; wall time {report['seconds']} s",
             "- Protocol: DESIGN.md split (seed 42); each cold user's first n interactions "
             "(by timestamp) are the history, the rest over the warm items (minus the "
             "revealed ones) the test. Users per n: "
             + ", ".join(f"{k} {v['users']} (skipped {v['skipped']})"
                         for k, v in next(iter(report["test"].values())).items()), "",
             "## Test", "", "| model | " + " | ".join(ns) + " |",
             "|---|" + "---|" * len(ns)]
    for model, row in report["test"].items():
        lines.append(f"| {model} | " + " | ".join(
            f"{row[n]['mean']:.3f} ± {row[n]['std']:.3f}" if n in row else "n/a"
            for n in ns) + " |")
    lines += ["", "## Validation (pseudo-cold users, validation teacher)", "",
              "| model | " + " | ".join(ns) + " |", "|---|" + "---|" * len(ns)]
    for model, row in report["validation"].items():
        lines.append(f"| {model} | " + " | ".join(
            f"{row[n]['mean']:.3f} ± {row[n]['std']:.3f}" if n in row else "n/a"
            for n in ns) + " |")
    if report.get("targets"):
        lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
        for t in report["targets"]:
            met = "yes" if t["met"] else "no ({:+.3f})".format(t["gap"])
            lines.append(f"| {t['name']} | {t['value']:.3f} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data" / "ml-100k"))
    p.add_argument("--format", default="movielens")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default=str(ROOT / "results" / "fewshot"))
    p.add_argument("--no-als", action="store_true")
    p.add_argument("--sweep", action="append", default=[], metavar="a=1,b=2",
                   help="extra student settings (student.* fields) to compare on validation")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.format != "synthetic":
        overrides = [f"data.format={args.format}", f"data.data_dir={args.data_dir}", *overrides]
    cfg = load_config(None, overrides)
    out = Path(args.out)
    ds = load_data(cfg)
    prep = prepare(ds, cfg)
    test_tasks = fewshot_tasks(prep.split, ds.users, ds.items)
    val_tasks = fewshot_tasks(prep.val, ds.users, ds.items)
    known_val = set(prep.val.train["user_id"].astype(str))
    per_seed, per_seed_val = [], []
    item_item: dict[str, dict] = {}
    item_item_choice: dict[str, dict] = {}
    t_start = time.time()

    def ours(prep_tasks: dict[int, FewShotTask], teacher, student, scorer, split, known=None,
             cold_paths=None):
        # the served model: the run's cold paths (a warm item with no training interaction
        # is new to the teacher and takes the item cold path)
        fn = unified_history_scorer(UnifiedRecommender(teacher, student, cold_paths), scorer,
                                    ds, split, known)
        return evaluate_fewshot(prep_tasks, fn, KS)

    for seed in range(args.seeds):
        t0 = time.time()
        run = RunDir(out / "runs" / f"seed{seed}")
        c = dataclasses.replace(cfg, seed=seed, output_dir=str(run.path))
        run.write_metadata(c, prep)
        teacher = fit_teacher(prep, c.teacher, run, seed, verbose=0)
        vt = fit_teacher(prep, c.teacher, run, seed, verbose=0, validation_only=True,
                         name=VALIDATION_TEACHER)
        res: dict[str, dict] = {"popularity": evaluate_fewshot(test_tasks,
                                                               popularity_scorer(prep), KS)}
        if not args.no_als:
            als = als_scorer(prep, seed)
            if als is not None:
                res["implicit ALS (32 factors), fold-in"] = evaluate_fewshot(test_tasks, als, KS)
        if seed == 0:  # deterministic: the same on every seed
            for kind, label in (("cosine", "item-kNN (cosine), fold-in"),
                                ("ease", "EASE (item-item regression), fold-in")):
                lam, w, search = chosen_item_item(prep, val_tasks, kind)
                item_item[label] = evaluate_fewshot(
                    test_tasks, item_item_scorer(ds, prep.split.train, kind, lam, w), KS)
                item_item_choice[label] = {"lam": lam, "pop_weight": w, "search": search}
                print(f"{label}: lam {lam} pop weight {w} (validation {search})",
                      file=sys.stderr, flush=True)
        res.update(item_item)
        res["teacher-mean (half history mean, half content path)"] = evaluate_fewshot(
            test_tasks, teacher_mean_scorer(prep, teacher, run.scorer("teacher")), KS)
        val: dict[str, dict] = {}
        settings = {"recommend, no history": {"history": False},
                    "recommend + history (default)": {}}
        for spec in args.sweep if seed == 0 else []:
            kv = dict(x.split("=", 1) for x in spec.split(","))
            settings[f"sweep: {spec}"] = {k: _value(v) for k, v in kv.items()}
        for label, change in settings.items():
            sc = dataclasses.replace(c.student, method="ridge", **change)
            # each setting in a run folder of its own, so its tuned recommend score is kept
            srun = run if label.endswith("(default)") else RunDir(run.path / _slug(label))
            if srun is not run:
                srun.write_metadata(c, prep)
            st = fit_student(prep, teacher, sc, srun, seed, verbose=0, val_teacher=vt)
            rec = srun.scorer(RECOMMEND)
            info = srun.history("student")
            # validation: the student fit on the validation training part with the
            # validation teacher (as the settings were chosen), the same served score
            vstudent = validation_student(prep, vt, sc, info["alpha"], info.get("maps"))
            paths = srun.cold_paths()
            val[label] = ours(val_tasks, vt, vstudent, rec, prep.val, known_val, paths)
            val[label]["_alpha"] = info["alpha"]
            if not label.startswith("sweep"):
                res[label] = ours(test_tasks, teacher, st, rec, prep.split,
                                  cold_paths=paths)
            print(f"seed {seed} {label}: alpha {info['alpha']} scorer {rec.to_dict()} val "
                  f"{recall_row({k: v for k, v in val[label].items() if k != '_alpha'})}"
                  + (f" test {recall_row(res[label])}" if label in res else ""),
                  file=sys.stderr, flush=True)
            val[label].pop("_alpha")
        per_seed.append(res)
        per_seed_val.append(val)
        print(f"seed {seed} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    test = aggregate(per_seed)
    validation = aggregate(per_seed_val[:1] if args.sweep else per_seed_val)
    ours_row = test["recommend + history (default)"]
    base0 = test["recommend, no history"]["n=0"]["mean"]
    targets = [
        {"name": "n=5 >= 0.19", "value": ours_row["n=5"]["mean"],
         "met": ours_row["n=5"]["mean"] >= 0.19, "gap": ours_row["n=5"]["mean"] - 0.19},
        {"name": "n=10 >= 0.21", "value": ours_row["n=10"]["mean"],
         "met": ours_row["n=10"]["mean"] >= 0.21, "gap": ours_row["n=10"]["mean"] - 0.21},
        {"name": f"n=0 >= no-history model ({base0:.3f})", "value": ours_row["n=0"]["mean"],
         "met": ours_row["n=0"]["mean"] >= base0 - 1e-9,
         "gap": ours_row["n=0"]["mean"] - base0},
    ]
    report = {"dataset": ds.name, "seeds": args.seeds, "test": test, "validation": validation,
              "targets": targets, "item_item_peers": item_item_choice,
              "command": "python benchmarks/fewshot.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "seconds": round(time.time() - t_start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "per_seed.json", json.dumps({"test": per_seed,
                                                         "validation": per_seed_val}, indent=1))
    md = markdown(report)
    atomic_write_text(out / "report.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
