"""The run folder: one owner for everything a run writes and every reader of it.

Layout of ``RUN_DIR``::

    config.yaml  schema.yaml  split.json (seed, cold ids, training item counts, catalogue)
    <model>/     teacher | teacher_val | student | recommend (a scorer only)
        preprocessing.json  weights/ (the one copy: model + optimizer)  history.json
        scorer.json  backup/ (only while a fit runs; refit/backup/ for the student's refit)
    logs/<model>/      TensorBoard
    report.json  report.md  report.png

A student's weights hold the student's own variables only: the frozen teacher is loaded
from ``teacher/`` when the student is.

Training, evaluation, export, batch, fine-tuning and the CLI read and write runs through
:class:`RunDir` only, so the layout lives in this file.

Example::

    run = RunDir.open("runs/synthetic")
    model = run.load_model("student")
    scorer = run.scorer("student")          # temperature and popularity prior
    counts = run.item_log_counts(items)     # log(1 + training count) per catalogue row
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from tfrs_coldstart.config import RunConfig, config_from_yaml_dict, save_config, to_dict
from tfrs_coldstart.data import Dataset, Schema, entity_counts, load_dataset
from tfrs_coldstart.data.tables import conform
from tfrs_coldstart.errors import RunError
from tfrs_coldstart.evaluation import Prepared, write_report
from tfrs_coldstart.features.encoder import dummy_inputs
from tfrs_coldstart.fileio import atomic_write_text
from tfrs_coldstart.modeling.models import SIDES, TwoTowerModel, build_student, build_teacher
from tfrs_coldstart.modeling.unified import UnifiedRecommender, check_cold_paths
from tfrs_coldstart.scoring import Scorer, log_counts, new_item_mask

MODELS = ("teacher", "student")
RECOMMEND = "recommend"  # the unified model: the teacher and the student, one scorer
VALIDATION_TEACHER = "teacher_val"  # trained on the validation split's training part only
TEACHERS = ("teacher", VALIDATION_TEACHER)
CONFIG_FILE, SCHEMA_FILE, SPLIT_FILE = "config.yaml", "schema.yaml", "split.json"
_MODEL_FILES = ("preprocessing.json", "history.json", "scorer.json")


def load_data(cfg: RunConfig) -> Dataset:
    """The dataset a config names (synthetic, MovieLens, tables or TFDS)."""
    d = cfg.data
    if d.format == "synthetic":
        return load_dataset("synthetic", n_users=d.synthetic_users, n_items=d.synthetic_items,
                            n_interactions=d.synthetic_interactions, seed=d.synthetic_seed)
    if d.format == "tfds":
        return load_dataset("tfds", name=d.tfds_name, data_dir=d.data_dir)
    if d.format == "stream":  # sharded interactions, read shard by shard (data/stream.py)
        return load_dataset("stream", d.data_dir, d.schema, interactions=d.interactions,
                            seed=d.split_seed, cold_item_frac=d.cold_item_frac,
                            cold_user_frac=d.cold_user_frac, warm_test_frac=d.warm_test_frac,
                            chunk_rows=d.stream_chunk_rows,
                            shuffle_buffer=d.stream_shuffle_buffer,
                            beam=None if d.stream_beam is None else shlex.split(d.stream_beam),
                            beam_dir=d.stream_beam_dir,
                            # the scan counts the weight means the fits divide by
                            weight_transforms=(cfg.teacher.interaction_weight,
                                               cfg.student.interaction_weight))
    return load_dataset(d.format, data_dir=d.data_dir, schema_path=d.schema)


class RunDir:
    """A run folder. ``RunDir(path)`` for a new run, :meth:`open` for an existing one.

    ``RunDir(scratch, chief=run_folder)``: what a non-chief worker of a multi-worker fit
    (``train.strategy=multi_worker``) writes to: every write goes to its scratch folder, and
    what resuming reads (backups, finished models) comes from the chief's ``run_folder``
    (:attr:`resume_source`), so all workers resume from the same state.
    """

    def __init__(self, path: str | Path, chief: str | Path | None = None) -> None:
        self.path = Path(path)
        self.chief = RunDir(chief) if chief is not None else None

    def __repr__(self) -> str:
        chief = f", chief={str(self.chief.path)!r}" if self.chief is not None else ""
        return f"RunDir({str(self.path)!r}{chief})"

    @property
    def resume_source(self) -> RunDir:
        """The run folder resumable state is read from: the chief's, else this one."""
        return self.chief or self

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run; :class:`RunError` says how to make one when ``path`` is not."""
        run = cls(path)
        if not (run.path / CONFIG_FILE).is_file():
            raise RunError(f"{run.path} is not a run folder (no {CONFIG_FILE}); create one with "
                           "`tfrs-coldstart train` or `tfrs-coldstart run`")
        return run

    # ---- run-level files ------------------------------------------------------------------

    @property
    def config(self) -> RunConfig:
        path = self.path / CONFIG_FILE
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RunError(f"cannot read {path}: {e}") from None
        return config_from_yaml_dict(RunConfig, values or {})

    @property
    def schema(self) -> Schema:
        return Schema.from_yaml(self.path / SCHEMA_FILE)

    def write_config(self, cfg: RunConfig) -> None:
        save_config(cfg, self.path / CONFIG_FILE)

    def write_metadata(self, cfg: RunConfig, prep: Prepared) -> None:
        """``config.yaml``, ``schema.yaml`` and ``split.json`` (cold ids, item counts and the
        training catalogue: the counted items plus ``catalogue_uncounted``)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg)
        prep.dataset.schema.to_yaml(self.path / SCHEMA_FILE)
        ids = prep.dataset.items["item_id"].astype(str)
        counts = entity_counts(prep.split.train, "item", ids)
        catalogue = ~new_item_mask(prep.dataset.items, prep.split.warm_items)
        atomic_write_text(self.path / SPLIT_FILE, json.dumps(
            {"seed": prep.split.seed, "cold_users": list(prep.split.cold_users),
             "cold_items": list(prep.split.cold_items),
             "item_counts": {k: int(v) for k, v in zip(ids, counts, strict=True) if v > 0},
             # the training catalogue = the counted items and these (held out, not new)
             "catalogue_uncounted": ids[catalogue & (counts == 0)].tolist()}))

    def _split_meta(self) -> dict[str, Any]:
        path = self.path / SPLIT_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def item_counts(self) -> dict[str, int] | None:
        """Training interactions per item id (None for runs saved without counts)."""
        return self._split_meta().get("item_counts")

    def item_log_counts(self, items: pd.DataFrame) -> np.ndarray | None:
        """``log(1 + training count)`` per row of ``items``; items never trained on count 0."""
        counts = self.item_counts()
        return None if counts is None else log_counts(counts, items["item_id"])

    def item_new(self, items: pd.DataFrame) -> np.ndarray | None:
        """``new(i)`` of the served score per row of ``items`` (``bool [n]``): not in the
        training catalogue (:func:`scoring.new_item_mask`). Items added later (``add-items``)
        and the split's cold items are new. None for runs saved without counts; a run saved
        before the catalogue was recorded counts its uncounted items as new."""
        meta = self._split_meta()
        counts = meta.get("item_counts")
        if counts is None:
            return None
        return new_item_mask(items, set(counts) | set(meta.get("catalogue_uncounted", ())))

    def add_item_counts(self, interactions: pd.DataFrame) -> None:
        """Add new interactions to the training item counts (the popularity prior's input)."""
        meta = self._split_meta()
        counts = meta.get("item_counts", {})
        for item, n in interactions["item_id"].astype(str).value_counts().items():
            counts[item] = int(counts.get(item, 0)) + int(n)
        meta["item_counts"] = counts
        atomic_write_text(self.path / SPLIT_FILE, json.dumps(meta))

    def load_dataset(self, config: RunConfig | None = None) -> Dataset:
        """The run's data (or ``config``'s, e.g. a ``distill`` with new ``--set data.*``), as
        the run's saved schema reads it (``data.tables.conform``: a run saved before its loader
        declared derivations keeps its feature names, which its models were trained on)."""
        ds = load_data(config or self.config)
        return conform(ds, self.schema) if (self.path / SCHEMA_FILE).is_file() else ds

    # ---- models -----------------------------------------------------------------------------

    def model_dir(self, which: str) -> Path:
        return self.path / which

    def log_dir(self, which: str) -> Path:
        return self.path / "logs" / which

    def has_model(self, which: str) -> bool:
        out = self.model_dir(which)
        return (out / "preprocessing.json").is_file() and (out / "weights").is_dir()

    def has_finished(self, which: str) -> bool:
        """Whether a model's save ran to its end (weights, preprocessing, history and, last,
        scorer.json: :meth:`save_model` removes scorer.json first), so a resumed run loads it
        instead of training it again."""
        out = self.model_dir(which)
        return self.has_model(which) and all((out / f).is_file() for f in _MODEL_FILES)

    def config_changes(self, cfg: RunConfig) -> list[str]:
        """The dotted keys whose values differ between this run's ``config.yaml`` and ``cfg``
        (``output_dir`` aside: the same folder may be named another way); ``[]`` for a folder
        without a config yet."""
        if not (self.path / CONFIG_FILE).is_file():
            return []

        def flat(d: Any, prefix: str = "") -> dict[str, Any]:
            if not isinstance(d, dict):
                return {prefix: d}
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
            return out

        old, new = flat(to_dict(self.config)), flat(to_dict(cfg))
        return sorted(k for k in old.keys() | new.keys()
                      if k != "output_dir" and old.get(k) != new.get(k))

    def save_model(self, which: str, model: TwoTowerModel, states: dict[str, Any],
                   info: dict[str, Any], scorer: Scorer) -> None:
        """Weights (swapped in whole), preprocessing state, history and the served score."""
        out = self.model_dir(which)
        (out / "scorer.json").unlink(missing_ok=True)  # written last: marks a finished save
        weights, tmp = out / "weights", out / ".weights.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_weights(str(tmp / "model"))
        shutil.rmtree(weights, ignore_errors=True)
        tmp.rename(weights)
        atomic_write_text(out / "preprocessing.json", json.dumps(states))
        atomic_write_text(out / "history.json", json.dumps(info, indent=1))
        atomic_write_text(out / "scorer.json", json.dumps(scorer.to_dict()))

    def history(self, which: str) -> dict[str, Any]:
        path = self.model_dir(which) / "history.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_history(self, which: str, info: dict[str, Any]) -> None:
        atomic_write_text(self.model_dir(which) / "history.json", json.dumps(info, indent=1))

    def scorer(self, which: str) -> Scorer:
        """The model's served score; runs saved before scorer.json keep the prior in history."""
        path = self.model_dir(which) / "scorer.json"
        if path.is_file():
            return Scorer.from_dict(json.loads(path.read_text()))
        cfg = self.config
        temperature = cfg.teacher.temperature if which == "teacher" else cfg.student.temperature
        return Scorer(temperature, float(self.history(which).get("popularity_prior", 0.0)))

    def has_scorer(self, which: str) -> bool:
        """Whether a model's served score was saved (``recommend`` has no weights of its own:
        it is the teacher and the student with a scorer tuned for them together)."""
        return (self.model_dir(which) / "scorer.json").is_file()

    def save_scorer(self, which: str, scorer: Scorer, info: dict[str, Any] | None = None
                    ) -> None:
        """The served score of ``which`` (and, optionally, how it was chosen: history.json)."""
        if info is not None:
            self.write_history(which, info)
        atomic_write_text(self.model_dir(which) / "scorer.json", json.dumps(scorer.to_dict()))

    def cold_paths(self) -> dict[str, str]:
        """Where the ``recommend`` model takes a new user's / item's embedding from (chosen
        on validation, saved with its score); runs saved before the choice: the student."""
        return check_cold_paths(self.history(RECOMMEND).get("cold_paths"))

    def load_unified(self, teacher: TwoTowerModel | None = None,
                     student: TwoTowerModel | None = None) -> UnifiedRecommender:
        """The ``recommend`` model (teacher, student and the saved cold paths); pass models
        already loaded to reuse them."""
        return UnifiedRecommender(teacher or self.load_model("teacher"),
                                  student or self.load_model("student"), self.cold_paths())

    def load_model(self, which: str = "student") -> TwoTowerModel:
        """Rebuild a trained teacher or student, weights restored; ``compile`` + ``fit``
        continue training it."""
        cfg = self.config
        if which not in (*MODELS, *TEACHERS) and not self.model_dir(which).is_dir():
            raise RunError(f"unknown model {which!r}: use teacher or student")
        out = self.model_dir(which)
        if not self.has_model(which):
            raise RunError(f"{out} holds no trained {which}; train it first "
                           f"(`tfrs-coldstart {'train' if which == 'teacher' else 'distill'}`)")
        states = json.loads((out / "preprocessing.json").read_text())
        if which in TEACHERS:
            model: TwoTowerModel = build_teacher(states, cfg.teacher)
        else:
            teacher = self.load_model("teacher") if self.has_model("teacher") else None
            # the method it was made with (a benchmark's extra students differ from config)
            record = self.history(which)
            method = record.get("method", "own")
            model = build_student(states, dataclasses.replace(cfg.student, method=method),
                                  teacher, record.get("kernel"))
        for side in SIDES:
            tower = model.tower(side)
            tower(dummy_inputs(tower.encoder.state))
        model.load_weights(str(out / "weights" / "model")).expect_partial()
        return model

    def copy_model_from(self, src: RunDir, which: str) -> None:
        """One finished model's weights and records from ``src`` into this folder (a worker
        resuming a run takes the models the chief finished before)."""
        if src.path.resolve() == self.path.resolve():
            return
        frm, out = src.model_dir(which), self.model_dir(which)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if (frm / "weights").is_dir():
            shutil.copytree(frm / "weights", out / "weights")
        for name in _MODEL_FILES:
            if (frm / name).is_file():
                shutil.copy2(frm / name, out / name)

    def disk_usage(self) -> dict[str, int]:
        """Bytes on disk under each top-level entry of the folder (``total``: all of them);
        hard links are counted once."""
        seen: set[tuple[int, int]] = set()
        out: dict[str, int] = {}
        for top in sorted(self.path.iterdir()) if self.path.is_dir() else []:
            size = 0
            for p in (top, *top.rglob("*")) if top.is_dir() else (top,):
                try:
                    st = p.lstat()
                except OSError:  # removed meanwhile
                    continue
                if p.is_file() and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_size
            out[top.name] = size
        out["total"] = sum(out.values())
        return out

    def copy_models_to(self, dst: RunDir) -> None:
        """Config, schema, split and each model's weights and records (no checkpoints, backups
        or logs) into a new run folder ``dst`` (fine-tuning starts from this copy)."""
        dst.path.mkdir(parents=True)
        for name in (CONFIG_FILE, SCHEMA_FILE, SPLIT_FILE):
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, dst.path / name)
        for which in MODELS:
            if not self.has_model(which):
                continue
            src, out = self.model_dir(which), dst.model_dir(which)
            out.mkdir()
            shutil.copytree(src / "weights", out / "weights")
            for name in _MODEL_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, out / name)
        if self.has_scorer(RECOMMEND):  # the unified model's score (no weights of its own)
            dst.model_dir(RECOMMEND).mkdir()
            for name in ("scorer.json", "history.json"):
                if (self.model_dir(RECOMMEND) / name).is_file():
                    shutil.copy2(self.model_dir(RECOMMEND) / name, dst.model_dir(RECOMMEND) / name)

    # ---- report -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any] | None:
        path = self.path / "report.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None

    def write_report(self, report: dict[str, Any], headline_k: int = 20,
                     out_dir: str | Path | None = None) -> dict[str, Path]:
        """``report.json``, ``report.md`` and ``report.png`` (in ``out_dir`` if given)."""
        return write_report(report, out_dir or self.path, headline_k)


def load_model(run_dir: str | Path, which: str = "student") -> TwoTowerModel:
    """``RunDir.open(run_dir).load_model(which)``: a trained model from its run folder."""
    return RunDir.open(run_dir).load_model(which)
