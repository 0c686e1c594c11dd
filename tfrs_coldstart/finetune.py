"""Keras fine-tuning: continue training a trained teacher or student on new interactions.

What :func:`finetune` does, and why:

- :func:`tfrs_coldstart.training.load_model` rebuilds the model from its run folder; its weights
  checkpoint also holds the Adam optimizer (step count and moment estimates, saved by Keras'
  ``save_weights`` because the model tracks its optimizer). :func:`compile_for_finetuning`
  compiles with Adam and builds it at once, which restores that state, so fine-tuning
  continues the original optimisation instead of restarting Adam's statistics.
- New interactions may name new users and items (given with their feature tables). The
  policy is **frozen vocabularies**: every ID and category/tag/word vocabulary stays as
  trained. An unseen ID maps to the lookup's OOV bucket (one embedding shared by all
  unseen IDs, trained like any other row), an unseen category value to its feature's OOV
  bucket; new users and items are otherwise represented by their content features. Rows
  of the given tables whose IDs already exist replace the old rows (newest features win).
- The result is a new run folder (the parent is never modified) whose config points at a
  merged copy of the data (old + new interactions, users and items), so
  ``tfrs-coldstart export NEW_RUN`` publishes it as a new version with the new items in
  the catalogue, and ``evaluate`` works as for any run.
- ``redistill=True`` (teacher only) then distils a fresh student from the fine-tuned teacher
  on the merged data with :func:`tfrs_coldstart.training.fit_student`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart import console
from tfrs_coldstart.config import RunConfig
from tfrs_coldstart.data import Dataset, Schema, load_tables
from tfrs_coldstart.data.pipeline import interaction_dataset, item_probabilities
from tfrs_coldstart.data.tables import TABLE_SUFFIXES, feature_table, read_table
from tfrs_coldstart.errors import UserError
from tfrs_coldstart.evaluation import SegmentTask, prepare, rank_metrics
from tfrs_coldstart.fileio import atomic_write_text
from tfrs_coldstart.modeling.models import TwoTowerModel
from tfrs_coldstart.runs import RunDir
from tfrs_coldstart.scoring import Scorer, model_score_fn
from tfrs_coldstart.training import fit_student

__all__ = [
    "FinetuneError",
    "FinetuneResult",
    "OOV_POLICY",
    "compile_for_finetuning",
    "find_tables",
    "finetune",
    "interaction_recall",
]

OOV_POLICY = ("frozen vocabularies: unseen user/item IDs share the ID lookup's OOV embedding "
              "and unseen category/tag/word values their feature's OOV embedding; new "
              "entities are otherwise represented by their content features")


class FinetuneError(UserError, ValueError):
    """Fine-tuning cannot run; the message names the run, file or option and what to do."""


@dataclass
class FinetuneResult:
    """The new run folder, the fine-tuned model (in memory) and the record in finetune.json."""

    run_dir: Path
    which: str
    model: TwoTowerModel
    info: dict[str, Any]


def compile_for_finetuning(model: TwoTowerModel, learning_rate: float | None = None) -> bool:
    """Compile ``model`` with Adam, restoring the optimizer state saved with its weights.

    Returns whether saved state was found (a model saved by this project's training always
    has it). Keras restores the saved learning rate too, so ``learning_rate`` (when given)
    is set afterwards.
    """
    opt = tf.keras.optimizers.Adam(learning_rate=learning_rate or 1e-3)
    model.compile(optimizer=opt)
    opt.build(model.trainable_variables)  # creates the slots now: the checkpoint fills them
    restored = int(opt.iterations.numpy()) > 0
    if learning_rate is not None:
        opt.learning_rate.assign(float(learning_rate))
    return restored


def interaction_recall(model: TwoTowerModel, dataset: Dataset, interactions: pd.DataFrame,
                       k: int = 20, history: pd.DataFrame | None = None,
                       scorer: Scorer | None = None) -> float:
    """Mean recall@k of ``interactions`` when each of their users ranks the whole catalogue.

    Scores are the model's served scores (``scorer``, default its plain ``u.i / temperature``;
    item popularity counted in ``history``); items the user has in ``history`` and that are not
    in ``interactions`` are never ranked (already known). ``dataset`` holds every user and
    item named.
    """
    history = history if history is not None else interactions.iloc[:0]
    u_index = pd.Index(dataset.users["user_id"].astype(str))
    i_index = pd.Index(dataset.items["item_id"].astype(str))
    seen = history.groupby(history["user_id"].astype(str))["item_id"].agg(list).to_dict()
    rows, relevant, excluded = [], [], []
    for uid, its in interactions.groupby(interactions["user_id"].astype(str))["item_id"]:
        rel = np.unique(i_index.get_indexer(its.astype(str)))
        rel = rel[rel >= 0]
        if not len(rel):
            continue
        ex = i_index.get_indexer(pd.Index(seen.get(uid, []), dtype=object).astype(str))
        rows.append(u_index.get_loc(uid))
        relevant.append(rel)
        excluded.append(np.setdiff1d(ex[ex >= 0], rel))
    # Only these users are embedded.
    sub = Dataset(dataset.name, history, dataset.users.iloc[rows], dataset.items, dataset.schema)
    fn = model_score_fn(model, scorer or Scorer(model.temperature), sub, history)
    task = SegmentTask("new", np.arange(len(rows), dtype=np.int64), np.arange(len(i_index)),
                       relevant, excluded)
    return float(rank_metrics(task, fn, (k,))[f"recall@{k}"])


# --------------------------------------------------------------------------------------------
# data


def find_tables(data: str | os.PathLike[str]) -> dict[str, Path | None]:
    """``--data``: an interactions file, or a folder with ``interactions.*`` and optionally
    ``users.*`` / ``items.*`` (CSV/TSV/Parquet)."""
    p = Path(data)
    if p.is_file():
        return {"interactions": p, "users": None, "items": None}
    if not p.is_dir():
        raise FinetuneError(f"{p}: no such file or folder; pass an interactions file or a "
                            "folder with interactions.* (and optionally users.*, items.*)")
    found: dict[str, Path | None] = {}
    for stem in ("interactions", "users", "items"):
        hits = sorted(f for f in p.iterdir() if f.is_file() and f.name.startswith(stem + ".")
                      and any(s in TABLE_SUFFIXES for s in (x.lower() for x in f.suffixes)))
        found[stem] = hits[0] if hits else None
    if found["interactions"] is None:
        raise FinetuneError(f"{p}: no interactions table (interactions.csv, .tsv or .parquet) "
                            "in the folder; add it or pass the file itself")
    return found


def _entities(obj: Any, side: str, schema: Schema) -> pd.DataFrame:
    df, src = read_table(obj, f"{side}s")
    return feature_table(df, src, side, schema.side(side))


def _merge(old: pd.DataFrame, new: pd.DataFrame | None, key: str) -> pd.DataFrame:
    """Old rows plus new ones; a new row replaces the old row with the same id."""
    if new is None or not len(new):
        return old.reset_index(drop=True)
    keep = ~old[key].astype(str).isin(set(new[key].astype(str)))
    return pd.concat([old[keep], new[old.columns]], ignore_index=True)


def _merge_interactions(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Old then new interactions with the columns of both filled consistently."""
    new = new.copy()
    old = old.copy()
    if "timestamp" in old.columns and "timestamp" not in new.columns:
        # new data comes after the old: later than every old timestamp, in file order
        new["timestamp"] = int(old["timestamp"].max()) + 1 + np.arange(len(new), dtype=np.int64)
    elif "timestamp" in new.columns and "timestamp" not in old.columns:
        new = new.drop(columns="timestamp")
    if "weight" in old.columns and "weight" not in new.columns:
        new["weight"] = np.float32(1.0)
    elif "weight" in new.columns and "weight" not in old.columns:
        old["weight"] = np.float32(1.0)
    return pd.concat([old, new[old.columns]], ignore_index=True)


def _load_new(interactions: Any, users: Any, items: Any, base: Dataset,
              schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Validated new interactions plus merged users/items tables and counts of new ids."""
    new_users = _entities(users, "user", schema) if users is not None else None
    new_items = _entities(items, "item", schema) if items is not None else None
    users_all = _merge(base.users, new_users, "user_id")
    items_all = _merge(base.items, new_items, "item_id")
    data = load_tables(interactions, users_all, items_all, schema, name="finetune")
    counts = {
        "interactions": len(data.interactions),
        "new_users": int((~users_all["user_id"].isin(set(base.users["user_id"]))).sum()),
        "new_items": int((~items_all["item_id"].isin(set(base.items["item_id"]))).sum()),
    }
    return data.interactions, users_all, items_all, counts


# --------------------------------------------------------------------------------------------
# the run folder


def _default_out(run_dir: Path) -> Path:
    n = 1
    while (out := run_dir.parent / f"{run_dir.name}-ft{n}").exists():
        n += 1
    return out


def _write_data(dst: Path, ds: Dataset) -> None:
    dst.mkdir(parents=True)
    ds.interactions.to_parquet(dst / "interactions.parquet", index=False)
    ds.users.to_parquet(dst / "users.parquet", index=False)
    ds.items.to_parquet(dst / "items.parquet", index=False)
    ds.schema.to_yaml(dst / "schema.yaml")


def _save_model(model: TwoTowerModel, src: RunDir, dst: RunDir, which: str,
                record: dict[str, Any]) -> None:
    """Weights (with the optimizer state), the unchanged preprocessing and scorer, history +
    record."""
    states = json.loads((src.model_dir(which) / "preprocessing.json").read_text())
    info = src.history(which)
    info.setdefault("finetunes", []).append(record)
    dst.save_model(which, model, states, info, src.scorer(which))


# --------------------------------------------------------------------------------------------
# fine-tuning


def finetune(
    run_dir: str | os.PathLike[str],
    interactions: Any,
    users: Any = None,
    items: Any = None,
    epochs: int = 3,
    out_dir: str | os.PathLike[str] | None = None,
    which: str = "teacher",
    redistill: bool = False,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    k: int = 20,
    verbose: int | str = 0,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Continue training a run's ``teacher`` or ``student`` on new interactions.

    ``interactions``/``users``/``items``: paths (CSV/TSV/Parquet) or DataFrames in the data
    contract; users/items only for new or changed entities (see the module docstring for
    the policy on new IDs and category values). ``learning_rate``: default the one saved
    with the optimizer; ``batch_size``: default the run's (in-batch negatives: smaller
    batches mean easier negatives). Writes a new run folder ``out_dir`` (default
    ``<run_dir>-ft<N>``) with ``finetune.json`` recording recall@k on the new interactions
    before and after, and whether the optimizer state was restored. Nothing is written on
    failure.
    """
    log = log or console.log
    run_dir = Path(run_dir)
    if which not in ("teacher", "student"):
        raise FinetuneError(f"which must be teacher or student, not {which!r}")
    if redistill and which != "teacher":
        raise FinetuneError("re-distillation distils the student from a fine-tuned teacher: "
                            "use which='teacher' (--model teacher) with redistill")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise FinetuneError(f"epochs must be a positive integer, got {epochs!r}")
    if not run_dir.is_dir():
        raise FinetuneError(f"run folder {run_dir} does not exist; train one with "
                            "`tfrs-coldstart run --output RUN_DIR`")
    run = RunDir.open(run_dir)
    cfg: RunConfig = run.config
    if not run.has_model(which):
        raise FinetuneError(f"{run_dir} holds no trained {which} ({run_dir / which}/weights "
                            "is missing); train it first")
    out = Path(out_dir) if out_dir is not None else _default_out(run_dir)
    if out.exists() and (out.resolve() == run_dir.resolve() or any(out.iterdir())):
        raise FinetuneError(f"{out} already exists; fine-tuning writes a new run folder and "
                            "never overwrites one: pass another --out")
    schema = run.schema
    log(f"loading the data of {run_dir} ...")
    base = run.load_dataset()
    if base.stream is not None:  # streamed: the merged data is a whole new table, read it all
        base = dataclasses.replace(base, interactions=base.stream.interactions())
    if base.schema.to_dict() != schema.to_dict():
        raise FinetuneError(f"the data named by {run_dir}/config.yaml no longer has the schema "
                            f"the run was trained on ({run_dir}/schema.yaml); point data.* back "
                            "at the training data")
    new, users_all, items_all, counts = _load_new(interactions, users, items, base, schema)
    merged = Dataset(f"{base.name}+ft", _merge_interactions(base.interactions, new), users_all,
                     items_all, schema)

    model = run.load_model(which)
    scorer = run.scorer(which)
    model_cfg = cfg.teacher if which == "teacher" else cfg.student
    restored = compile_for_finetuning(model, learning_rate)
    model.built = True
    bs = int(batch_size or model_cfg.batch_size)
    tf.keras.utils.set_random_seed(seed)
    before = interaction_recall(model, merged, new, k, base.interactions, scorer)
    log(f"{which}: recall@{k} on the {len(new)} new interactions before fine-tuning: "
        f"{before:.4f}")
    prob = item_probabilities(new, items_all["item_id"].astype(str))
    data = interaction_dataset(new, users_all, items_all, schema.user_features,
                               schema.item_features, bs, shuffle=True, seed=seed, item_prob=prob)
    start = time.time()
    hist = model.fit(data, epochs=epochs, verbose=verbose)
    seconds = time.time() - start
    after = interaction_recall(model, merged, new, k, base.interactions, scorer)
    log(f"{which}: recall@{k} after {epochs} epoch(s): {after:.4f}")

    new_cfg = dataclasses.replace(
        cfg, output_dir=str(out),
        data=dataclasses.replace(cfg.data, format="tables", data_dir=str(out.resolve() / "data"),
                                 schema=None))
    record = {"parent": str(run_dir.resolve()), "model": which, "epochs": epochs,
              "learning_rate": float(model.optimizer.learning_rate.numpy()),
              "batch_size": bs, "seed": seed, **counts,
              "optimizer_state_restored": restored,
              "optimizer_iterations": int(model.optimizer.iterations.numpy()),
              f"recall@{k}_before": before, f"recall@{k}_after": after,
              "policy": OOV_POLICY, "seconds": round(seconds, 2),
              "history": {key: [float(x) for x in v] for key, v in hist.history.items()},
              "redistilled": bool(redistill)}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        new_run = RunDir(tmp)
        run.copy_models_to(new_run)
        new_run.add_item_counts(new)
        _write_data(tmp / "data", merged)
        new_run.write_config(new_cfg)
        _save_model(model, run, new_run, which, record)
        if redistill:
            log("re-distilling the student from the fine-tuned teacher ...")
            prep = prepare(merged, new_cfg)
            shutil.rmtree(tmp / "student", ignore_errors=True)
            fit_student(prep, model, new_cfg.student, new_run, seed, verbose,
                        k=new_cfg.eval.headline_k)
            new_run.write_metadata(new_cfg, prep)
        atomic_write_text(tmp / "finetune.json", json.dumps(record, indent=1))
        if out.exists():  # an empty folder given as --out
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"fine-tuned run: {out} (export it: tfrs-coldstart export {out})")
    return FinetuneResult(out, which, model, record)


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tfrs-coldstart finetune``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run folder")
    p.add_argument("--data", required=True,
                   help="new interactions file, or a folder with interactions.* and optionally "
                        "users.* / items.* for new or changed users and items")
    p.add_argument("--model", choices=("teacher", "student"), default="teacher",
                   help="which model to fine-tune (default teacher)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default=None, help="new run folder (default RUN_DIR-ft<N>)")
    p.add_argument("--redistill", action="store_true",
                   help="then distil a fresh student from the fine-tuned teacher")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="default: the one saved with the optimizer state")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--k", type=int, default=20, help="K of the recall reported before/after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no Keras progress bars")


def run(args: argparse.Namespace) -> int:
    """``tfrs-coldstart finetune RUN_DIR --data DIR_or_file [--epochs N] [--out RUN_DIR2]``."""
    tables = find_tables(args.data)
    res = finetune(args.run_dir, tables["interactions"], tables["users"], tables["items"],
                   epochs=args.epochs, out_dir=args.out, which=args.model,
                   redistill=args.redistill, learning_rate=args.learning_rate,
                   batch_size=args.batch_size, seed=args.seed, k=args.k,
                   verbose=0 if args.quiet else (1 if sys.stdout.isatty() else 2))
    i = res.info
    print(f"{res.which} fine-tuned on {i['interactions']} interactions "
          f"({i['new_users']} new users, {i['new_items']} new items): recall@{args.k} "
          f"{i[f'recall@{args.k}_before']:.4f} -> {i[f'recall@{args.k}_after']:.4f}")
    print(f"run folder: {res.run_dir}  (publish: tfrs-coldstart export {res.run_dir})")
    return 0
