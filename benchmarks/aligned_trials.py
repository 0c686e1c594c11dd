"""Students that map content into the teacher's space (issue 13), on the VALIDATION split only.

Unified scoring: a warm user or item (in the validation training part) gets the teacher's
embedding, an unseen one the student's. Score = u.i / teacher temperature + prior *
log(1 + training count); the prior is chosen per segment from a small grid (warm and
cold-user only) and reported. The test segments are never read.

The clean validation teacher (trained on the validation training part alone) is trained
once per (seed, teacher and data config) into a RunDir under ``--cache`` and reused.

Trials (``--trial``, space-separated):
  ``teacher``                       the teacher's own content path (IDs replaced by OOV)
  ``popularity``                    zero student vectors: cold-user is popularity alone
  ``ridge [alpha=A] [weight=W]``    closed-form ridge (modeling/mapper.py) in a linear tower;
                                    without ``alpha`` a grid, each side's alpha on validation;
                                    ``W``: none, sqrt or ``kind:scale`` (mapper.reliability)
  ``aligned [field=value ...]``     modeling.aligned.AlignedStudent; fields of AlignedConfig,
                                    ``tower.<field>`` for its tower, tuples comma-separated

    python benchmarks/aligned_trials.py --data-dir ../shared/data/ml-100k --seeds 0 \\
        --trial teacher --trial ridge --trial "aligned" --trial "aligned distill_lambda=0"
    python benchmarks/aligned_trials.py --format synthetic --set data.synthetic_users=150 \\
        --trial teacher --trial ridge
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
from common import emit_row  # benchmarks/ is the script's folder

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tfrs_coldstart.config import TowerConfig, load_config, to_dict
from tfrs_coldstart.console import log
from tfrs_coldstart.data import SEGMENTS
from tfrs_coldstart.data.pipeline import item_log_counts
from tfrs_coldstart.evaluation import Prepared, embedding_score_fn, prepare, rank_metrics
from tfrs_coldstart.features.encoder import build_state, dummy_inputs
from tfrs_coldstart.modeling.aligned import (
    AlignedConfig,
    AlignedStudent,
    build_aligned,
    fit_aligned,
)
from tfrs_coldstart.modeling.mapper import design_matrix, linear_tower_config, reliability, ridge
from tfrs_coldstart.modeling.models import SIDES, TeacherModel
from tfrs_coldstart.modeling.towers import Tower
from tfrs_coldstart.runs import CONFIG_FILE, VALIDATION_TEACHER, RunDir, load_data
from tfrs_coldstart.training import _entities, fit_teacher

PRIORS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
COLD = ("cold_item", "cold_user", "cold_both")
ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0)


class Context:
    """One seed's data, validation masks and teacher embeddings."""

    def __init__(self, prep: Prepared, teacher: TeacherModel) -> None:
        self.prep = prep
        ds = prep.dataset
        self.ds = ds
        tr = prep.val.train
        self.train_df = tr
        self.temp = teacher.temperature
        self.users = _entities(ds.users, "user", tr)
        self.items = _entities(ds.items, "item", tr)
        tables = {"user": ds.users, "item": ds.items}
        self.warm = {s: tables[s][f"{s}_id"].astype(str).isin(
            set(tr[f"{s}_id"].astype(str))).to_numpy() for s in SIDES}
        self.counts = {
            s: (tables[s][f"{s}_id"].astype(str).map(tr[f"{s}_id"].astype(str).value_counts())
                .fillna(0).to_numpy(np.float64)) for s in SIDES}
        self.logc = item_log_counts(tr, ds.items)
        self.ridge: dict[str, np.ndarray] | None = None
        self.teacher = {s: teacher.embed(s, tables[s], ds.schema) for s in SIDES}
        self.content_path = {s: teacher.embed(
            s, tables[s], ds.schema,
            view=lambda b, k=f"{s}_id": {**b, k: _blank(b[k])}) for s in SIDES}

    def evaluate(self, su: np.ndarray, si: np.ndarray, segments: tuple[str, ...] = SEGMENTS,
                 priors: tuple[float, ...] = PRIORS) -> tuple[dict[str, Any], dict[str, Any]]:
        """Unified validation recall@20 per segment (best prior of the grid) and the priors;
        None for a segment without users."""
        u = np.where(self.warm["user"][:, None], self.teacher["user"], su)
        i = np.where(self.warm["item"][:, None], self.teacher["item"], si)
        rec: dict[str, Any] = {}
        chosen: dict[str, Any] = {}
        for seg in segments:
            task = self.prep.val_tasks[seg]
            if not len(task.user_rows) or not len(task.candidate_rows):
                rec[seg], chosen[seg] = None, None
                continue
            grid = priors if seg in ("warm", "cold_user") else (0.0,)
            best = (-1.0, 0.0)
            for p in grid:
                fn = embedding_score_fn(u / self.temp, i, p * self.logc)
                r = rank_metrics(task, fn, (20,))["recall@20"]
                if r > best[0]:
                    best = (r, p)
            rec[seg], chosen[seg] = round(best[0], 4), best[1]
        return rec, chosen


def _blank(x: Any) -> Any:
    import tensorflow as tf

    return tf.fill(tf.shape(x), "")


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None


def teacher_for(prep: Prepared, cfg: Any, seed: int, cache: Path) -> TeacherModel:
    """The clean validation teacher of (seed, teacher and data config): trained once into a
    RunDir under ``cache`` (model ``teacher_val``), then loaded."""
    key = hashlib.sha1(json.dumps({"teacher": to_dict(cfg.teacher), "data": to_dict(cfg.data),
                                   "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
    run = RunDir(cache / f"s{seed}-{key}")
    if (run.path / CONFIG_FILE).is_file() and run.history(VALIDATION_TEACHER) \
            and run.has_model(VALIDATION_TEACHER):
        model = run.load_model(VALIDATION_TEACHER)
        log(f"loaded teacher {run.path}")
        return model  # type: ignore[return-value]
    t0 = time.time()
    run.write_metadata(dataclasses.replace(cfg, seed=seed, output_dir=str(run.path)), prep)
    model = fit_teacher(prep, cfg.teacher, run, seed, verbose=0, validation_only=True,
                        name=VALIDATION_TEACHER)
    log(f"trained teacher {run.path} in {time.time() - t0:.0f} s")
    return model


def _convert(value: str, default: Any, tp: Any = None) -> Any:
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        conv = int if (default and isinstance(default[0], int)) or "int" in str(tp) else str
        return tuple(conv(v) for v in value.split(",") if v)
    if default is None:
        return None if value.lower() == "none" else float(value)
    return type(default)(value)


def aligned_config(overrides: list[str]) -> AlignedConfig:
    """AlignedConfig with ``field=value`` / ``tower.field=value`` overrides."""
    cfg = AlignedConfig()
    tower: dict[str, Any] = {}
    top: dict[str, Any] = {}
    hints = typing.get_type_hints(TowerConfig)
    for kv in overrides:
        k, v = kv.split("=", 1)
        if k.startswith("tower."):
            name = k.split(".", 1)[1]
            tower[name] = _convert(v, getattr(cfg.tower, name), hints.get(name))
        else:
            top[k] = _convert(v, getattr(cfg, k))
    if tower:
        top["tower"] = dataclasses.replace(cfg.tower, **tower)
    return dataclasses.replace(cfg, **top)


def run_teacher_row(ctx: Context) -> dict[str, Any]:
    rec, pri = ctx.evaluate(ctx.content_path["user"], ctx.content_path["item"])
    return {"rec": rec, "prior": pri}


def _weights(counts: np.ndarray, spec: str) -> np.ndarray | None:
    if spec == "none":
        return None
    if spec == "sqrt":
        return np.sqrt(counts)
    kind, scale = spec.split(":")
    return reliability(counts, kind, float(scale))


def ridge_maps(ctx: Context, side: str, alphas: list[float], wspec: str
               ) -> dict[float, np.ndarray]:
    """normalise(X W + b) of every row of a side per alpha: a linear tower at the teacher's
    width on the validation-training entities, ridge on the warm rows."""
    ds = ctx.ds
    cfg = linear_tower_config(ctx.teacher[side].shape[1])
    train = ctx.users if side == "user" else ctx.items
    table = ds.users if side == "user" else ds.items
    specs = ds.schema.side(side)
    tower = Tower(build_state(specs, train, f"{side}_id", False, cfg), cfg,
                  name=f"{side}_tower")
    tower(dummy_inputs(tower.encoder.state))
    x, _ = design_matrix(tower, table, specs, f"{side}_id")
    rows = ctx.warm[side]
    w = _weights(ctx.counts[side][rows], wspec)
    out = {}
    for a in alphas:
        coef, bias = ridge(x[rows], ctx.teacher[side][rows], w, a)
        m = np.asarray(x @ coef) + bias
        out[a] = (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).astype(
            np.float32)
    return out


def run_ridge(ctx: Context, opts: dict[str, str]) -> dict[str, Any]:
    alphas = [float(opts["alpha"])] if "alpha" in opts else list(ALPHAS)
    wspec = opts.get("weight", "none")
    maps = {side: ridge_maps(ctx, side, alphas, wspec) for side in SIDES}

    def on(seg: str, su: np.ndarray, si: np.ndarray) -> float:
        return ctx.evaluate(su, si, (seg,))[0][seg] or 0.0

    # Each side's alpha on the segment it alone decides; then all four segments.
    best_item = max(alphas, key=lambda a: on("cold_item", maps["user"][alphas[0]],
                                             maps["item"][a]))
    best_user = max(alphas, key=lambda a: on("cold_user", maps["user"][a],
                                             maps["item"][alphas[0]]))
    ctx.ridge = {"user": maps["user"][best_user], "item": maps["item"][best_item]}
    rec, pri = ctx.evaluate(ctx.ridge["user"], ctx.ridge["item"])
    return {"rec": rec, "prior": pri, "alpha_user": best_user, "alpha_item": best_item,
            "weight": wspec}


def run_aligned(ctx: Context, cfg: AlignedConfig, seed: int) -> dict[str, Any]:
    ds = ctx.ds
    model = build_aligned(ds.schema, ctx.users, ctx.items, cfg, ctx.teacher["user"].shape[1],
                          ctx.temp)
    if cfg.base == "ridge":
        if ctx.ridge is None:
            run_ridge(ctx, {"weight": "tanh:10"})
        assert ctx.ridge is not None
        for side, table in (("user", ds.users), ("item", ds.items)):
            model.set_base(side, table[f"{side}_id"].astype(str).to_numpy(), ctx.ridge[side])
    for side, table in (("user", ds.users), ("item", ds.items)):
        rows = ctx.warm[side]
        model.cache_teacher(side, table[f"{side}_id"].astype(str).to_numpy()[rows],
                            ctx.teacher[side][rows], ctx.counts[side][rows])

    def score(m: AlignedStudent) -> dict[str, float]:
        rec, _ = ctx.evaluate(m.embed("user", ds.users, ds.schema),
                              m.embed("item", ds.items, ds.schema), COLD)
        return {f"val_{k}": v for k, v in rec.items() if v is not None} | {
            "val_cold_mean": _mean(list(rec.values())) or 0.0}

    info = fit_aligned(model, ctx.train_df, ds.users, ds.items, ds.schema, seed, score)
    rec, pri = ctx.evaluate(model.embed("user", ds.users, ds.schema),
                            model.embed("item", ds.items, ds.schema))
    return {"rec": rec, "prior": pri, "best_epoch": info["best_epoch"],
            "epochs_run": info["epochs_run"],
            "val_cold_mean_by_epoch": [round(v, 3) for v in info["history"]["val_cold_mean"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="the data folder (needed unless --format synthetic)")
    p.add_argument("--format", default="movielens", help="data.format (movielens, synthetic...)")
    p.add_argument("--config", default=None, help="base YAML config")
    p.add_argument("--set", action="append", default=[], help="base override a.b=value")
    p.add_argument("--seeds", default="0", help="comma-separated config seeds")
    p.add_argument("--teacher", default="", help="space-separated teacher.* overrides")
    p.add_argument("--trial", action="append", default=[])
    p.add_argument("--cache", default="runs/aligned_teachers", help="saved teachers")
    p.add_argument("--out", default="benchmarks/results/aligned/trials.jsonl")
    args = p.parse_args(argv)
    data = [f"data.format={args.format}"]
    if args.format != "synthetic":
        if not args.data_dir:
            p.error(f"--data-dir is needed for --format {args.format}")
        data.append(f"data.data_dir={args.data_dir}")
    cache = Path(args.cache)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = load_config(args.config, [*data, *args.set, f"seed={seed}",
                                        *args.teacher.split()])
        prep = prepare(load_data(cfg), cfg)
        teacher = teacher_for(prep, cfg, seed, cache)
        ctx = Context(prep, teacher)
        for trial in args.trial:
            t0 = time.time()
            kind, *rest = trial.split()
            if kind == "teacher":
                res = run_teacher_row(ctx)
            elif kind == "popularity":  # zero student vectors: cold users rank by count alone
                zeros = {k: np.zeros_like(v) for k, v in ctx.teacher.items()}
                rec, pri = ctx.evaluate(zeros["user"], zeros["item"], priors=(1.0,))
                res = {"rec": rec, "prior": pri}
            elif kind == "ridge":
                res = run_ridge(ctx, dict(kv.split("=", 1) for kv in rest))
            elif kind == "aligned":
                res = run_aligned(ctx, aligned_config(rest), seed)
            else:
                raise SystemExit(f"unknown trial kind {kind!r}")
            rec = res.pop("rec")
            pri = res.pop("prior")
            row = {"seed": seed, "teacher": args.teacher, "trial": trial, **rec,
                   "cold_mean": _mean([rec[s] for s in COLD]),
                   "prior_warm": pri["warm"], "prior_cold_user": pri["cold_user"], **res,
                   "seconds": round(time.time() - t0, 1)}
            emit_row(row, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
