"""Shared fixtures: the real MovieLens-100K folder (or a clean skip) and a tiny synthetic set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tensorflow as tf  # tf.keras is resolved at first use, after tfrs_coldstart below

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any TF import)

REPO = Path(__file__).resolve().parents[1]


class Crash(BaseException):
    """A process dying at this instruction: no except/cleanup of the exporter runs (the
    publishing fault tests raise it from a patched rename)."""


def fail_rename(monkeypatch: pytest.MonkeyPatch, k: int, exc: BaseException) -> None:
    """The exporter's k-th ``os.rename`` raises ``exc`` (a full disk, or :class:`Crash`);
    the others rename. Configs are swapped by ``os.replace``, so they are not counted."""
    from tfrs_coldstart.serving import export as export_mod

    real, calls = os.rename, {"n": 0}

    def rename(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == k:
            raise exc
        real(src, dst)

    monkeypatch.setattr(export_mod.os, "rename", rename)


class TinyModule(tf.Module):
    """The smallest servable module for publishing tests: ``y = x * value``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.v = tf.Variable([value])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def f(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": x * self.v}

    def signatures(self) -> dict[str, Any]:
        return {"serving_default": self.f}


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """Raw ML-100K folder from $TFRS_COLDSTART_ML100K or <repo>/../shared/data/ml-100k."""
    env = os.environ.get("TFRS_COLDSTART_ML100K")
    path = Path(env) if env else REPO.parent / "shared" / "data" / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {path} (set TFRS_COLDSTART_ML100K)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset():
    """300 users, 200 items, 6000 interactions. Shared by the session: do not mutate it."""
    from tfrs_coldstart.data import generate

    return generate(n_users=300, n_items=200, n_interactions=6000, seed=0)


TINY_MODEL_OVERRIDES = (
    "teacher.epochs=2", "teacher.batch_size=512", "teacher.tower.id_dim=16",
    "teacher.tower.feature_dim=8", "teacher.tower.hidden=[32]", "teacher.tower.output_dim=16",
    "student.epochs=2", "student.batch_size=512", "student.refit=false",
    "student.tower.feature_dim=8", "student.tower.hidden=[16]", "student.tower.output_dim=8",
)


def make_tables_run(root: Path, *, n_users: int, n_items: int, n_interactions: int, seed: int,
                    dense_dim: int = 0, overrides: tuple[str, ...] = ()):
    """Write a synthetic dataset as Parquet tables under ``root/data`` and train a tiny
    teacher + student on them (the generic-tables path) into ``root/run``.

    Returns ``(run_dir, dataset, prep)``.
    """
    from tfrs_coldstart.config import load_config
    from tfrs_coldstart.data import generate
    from tfrs_coldstart.evaluation import prepare
    from tfrs_coldstart.runs import RunDir, load_data
    from tfrs_coldstart.training import fit_student, fit_teacher

    data = root / "data"
    data.mkdir()
    ds = generate(n_users=n_users, n_items=n_items, n_interactions=n_interactions, seed=seed,
                  dense_dim=dense_dim)
    ds.interactions.to_parquet(data / "interactions.parquet")
    ds.users.to_parquet(data / "users.parquet")
    ds.items.to_parquet(data / "items.parquet")
    ds.schema.to_yaml(data / "schema.yaml")
    run = root / "run"
    cfg = load_config(overrides=["data.format=tables", f"data.data_dir={data}",
                                 f"output_dir={run}", *TINY_MODEL_OVERRIDES, *overrides])
    dataset = load_data(cfg)
    prep = prepare(dataset, cfg)
    rd = RunDir(run)
    rd.write_metadata(cfg, prep)
    teacher = fit_teacher(prep, cfg.teacher, rd, cfg.seed, verbose=0)
    student = fit_student(prep, teacher, cfg.student, rd, cfg.seed, verbose=0)
    return run, dataset, prep, teacher, student


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ONE tiny trained run for the export, batch and fine-tuning tests: Parquet tables with
    every feature type (a 4-d dense vector too), teacher + student (2 epochs each), student
    popularity prior 0.5, the kernel item map, and a report.json. Read-only: copy it before
    changing it (:func:`copy_run`).

    Keys: ``root``, ``run`` (the run folder), ``ds`` (its Dataset), ``prep``.
    """
    import json

    from tfrs_coldstart.scoring import evaluate_model

    root = tmp_path_factory.mktemp("tiny_run")
    run, dataset, prep, _, student = make_tables_run(
        root, n_users=240, n_items=150, n_interactions=3600, seed=3, dense_dim=4,
        # the kernel item map (a hidden layer, every feature type through it), so the export,
        # serving, batch and fine-tuning tests cover it; the linear map: test_unified
        overrides=("student.popularity_prior=0.5", "eval.ks=[10,20]", "student.item_map=kernel"))
    from tfrs_coldstart.runs import RunDir

    report = {"dataset": dataset.name, "models": {
        "student": evaluate_model(prep, student, RunDir(run).scorer("student"), (10, 20))}}
    (run / "report.json").write_text(json.dumps(report))
    return {"root": root, "run": run, "ds": dataset, "prep": prep}


def copy_run(run: Path, dst: Path, student_prior: float | None = None) -> Path:
    """A copy of a run folder (its data tables stay where they are); optionally with another
    popularity prior for the student."""
    import shutil

    from tfrs_coldstart.runs import RunDir

    shutil.copytree(run, dst)
    if student_prior is not None:
        rd = RunDir(dst)
        rd.save_scorer("student", rd.scorer("student").with_prior(student_prior))
    return dst


def make_recommender(items: list[str], k: int, version: int, *, dim: int, buckets: int,
                     seed: int):
    """A small recommend-shaped ``tf.Module`` for the serving tests: a string ``age`` is hashed
    into one of ``buckets`` embeddings, scaled by a float ``activity``, and scored against a
    fixed ``[len(items), dim]`` table; ``recommend`` returns the top-``k`` ``item_ids`` and
    ``scores``, ``embed_user`` the user ``embedding``.

    Scores carry +1000 * version so each answer tells which version served it. Save it with
    ``signatures={"serving_default": m.recommend, "embed_user": m.embed_user}``.
    """
    import numpy as np
    import tensorflow as tf

    user_spec = [
        tf.TensorSpec([None], tf.string, name="age"),
        tf.TensorSpec([None], tf.float32, name="activity"),
    ]

    class _Recommender(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(seed)
            self.items = tf.constant(items)
            self.item_emb = tf.Variable(rng.normal(size=(len(items), dim)).astype("float32"))
            self.age_emb = tf.Variable(rng.normal(size=(buckets, dim)).astype("float32"))
            self.offset = tf.constant(1000.0 * version)

        def _user(self, age: tf.Tensor, activity: tf.Tensor) -> tf.Tensor:
            rows = tf.gather(self.age_emb, tf.strings.to_hash_bucket_fast(age, buckets))
            return rows * tf.expand_dims(1.0 + activity, -1)

        @tf.function(input_signature=user_spec)
        def recommend(self, age: tf.Tensor, activity: tf.Tensor) -> dict[str, tf.Tensor]:
            scores = tf.matmul(self._user(age, activity), self.item_emb, transpose_b=True)
            top = tf.math.top_k(scores, k=k)
            return {"item_ids": tf.gather(self.items, top.indices),
                    "scores": top.values + self.offset}

        @tf.function(input_signature=user_spec)
        def embed_user(self, age: tf.Tensor, activity: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"embedding": self._user(age, activity)}

    return _Recommender()


EXPORT_K = 20  # results per query of the session's exports


@pytest.fixture(scope="session")
def run_dir(tiny_run: dict) -> Path:
    """The session's tiny run folder (read-only)."""
    return tiny_run["run"]


@pytest.fixture(scope="session")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the Docker build context: Dockerfile, .dockerignore, serving/ (+ export/)."""
    import shutil

    ctx = tmp_path_factory.mktemp("docker_context")
    shutil.copy(REPO / "Dockerfile", ctx / "Dockerfile")
    shutil.copy(REPO / ".dockerignore", ctx / ".dockerignore")
    shutil.copytree(REPO / "serving", ctx / "serving")
    return ctx


@pytest.fixture(scope="session")
def exports(tiny_run: dict, context: Path) -> dict:
    """The tiny run exported into the Docker context's export/ with a ScaNN, a brute-force
    and a partitioned index (k = EXPORT_K; versions 1, 2 and 3)."""
    from tfrs_coldstart.serving.export import export_run

    base, run, dataset = context / "export", tiny_run["run"], tiny_run["ds"]
    scann = export_run(run, base, index="scann", k=EXPORT_K, dataset=dataset,
                       log=lambda m: None)
    bf = export_run(run, base, index="brute-force", k=EXPORT_K, dataset=dataset,
                    log=lambda m: None)
    part = export_run(run, base, index="partitioned", k=EXPORT_K, dataset=dataset,
                      log=lambda m: None)
    return {"base": base, "dataset": dataset,
            "scann": {m.name: m for m in scann}, "bf": {m.name: m for m in bf},
            "part": {m.name: m for m in part}}

