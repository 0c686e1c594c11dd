"""SavedModels for TF Serving: ``recommend`` (user features -> top-k items) and ``item_encoder``.

What is written (DESIGN.md, serving contract)::

    <base_dir>/<name>/<version>/        one SavedModel per version, never overwritten
        saved_model.pb  variables/  fingerprint.pb
        assets.extra/tf_serving_warmup_requests   PredictionLog records of real rows
        manifest.json                              schema, config, metrics, index, recall

Names (defaults from the run's ``export`` config): ``student`` and ``teacher`` for the
``recommend`` models with a ScaNN index; ``student_part`` and ``teacher_part`` with a
partitioned index, ``student_bf`` and ``teacher_bf`` with a brute-force index (so a stock TF
Serving never meets a ScaNN version under the same name); ``student_items`` for the
student's item encoder. Explicit ``names`` are used
as given.

Served inputs are the source's own columns: a feature the run's schema derives (``zip_prefix``
from ``zip_code``, ...) is computed inside the model from its source columns
(``features.sources.SourceInputs``, the ops the loaders ran), so ``serving_default`` and
``embed_user`` take e.g. a MovieLens ``u.user`` row as it is. Such a model also has
``serving_derived`` and ``embed_user_derived``, which take the derived features themselves
(the inputs of a run without derivations). A run saved before schemas declared derivations
exports as it always did: its signatures take its features.

Each version is written to a hidden temporary folder beside its final place and renamed
into place once every model of the export is complete, so TF Serving (which only loads
folders named by an integer) never sees half a model, and a failed export leaves nothing.
The models hold only TensorFlow ops (plus ScaNN's ``Scann>*`` ops in the ScaNN variant; the
partitioned and brute-force variants hold TensorFlow's own ops only):
nothing of this project is needed to serve them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from tfrs_coldstart import __version__
from tfrs_coldstart.config import RunConfig, to_dict
from tfrs_coldstart.data.pipeline import item_log_counts
from tfrs_coldstart.data.schema import FeatureSpec
from tfrs_coldstart.data.tables import conform
from tfrs_coldstart.errors import RunError, UserError
from tfrs_coldstart.evaluation import prepare
from tfrs_coldstart.features.columns import HISTORY, HISTORY_SEPARATOR, history_hits
from tfrs_coldstart.features.sources import SourceInputError, SourceInputs, served_arrays
from tfrs_coldstart.fileio import atomic_write_text
from tfrs_coldstart.runs import RunDir
from tfrs_coldstart.scoring import Scorer, new_item_mask
from tfrs_coldstart.serving.index import (
    INDEX_KINDS,
    GatedIndex,
    IndexBuildError,
    build_gated_index,
    partitioned_params,
    scann_params,
)
from tfrs_coldstart.serving.saved_model import (
    DEFAULT_SERVING_BASE,
    MANIFEST_FILE,
    MODELS_CONFIG,
    RELEASE_PREFIX,
    STAGING_PREFIX,
    WARMUP_FILE,
    check_serving_base,
    configured_versions,
    list_versions,
    recover_releases,
    write_models_config,
)

MODELS = ("recommend", "student", "teacher")
#: The signatures of a model whose schema derives features that take those features
#: themselves (``serving_default`` and ``embed_user`` take the source columns).
DERIVED_SIGNATURES = {"serving_default": "serving_derived", "embed_user": "embed_user_derived"}
BRUTE_FORCE_SUFFIX = "_bf"
PARTITIONED_SUFFIX = "_part"
#: Model-name suffix by index kind: one name never holds versions needing different servers.
INDEX_SUFFIXES = {"scann": "", "partitioned": PARTITIONED_SUFFIX,
                  "brute-force": BRUTE_FORCE_SUFFIX}
#: What fills result slots an approximate search could not fill (never seen in practice
#: once the recall gate passed, but the output shape is always ``[batch, k]``).
PAD_ID = ""
PAD_SCORE = float(np.finfo(np.float32).min)
#: A model reading the request-time history (issue 17) asks its index for k + HISTORY_EXTRA
#: results, drops the history's items and keeps k: a request whose history holds more than
#: HISTORY_EXTRA of the top results may get fewer than k (padded with PAD_ID).
HISTORY_EXTRA = 50
_SAVE_OPTIONS = {"scann": tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]),
                 "partitioned": tf.saved_model.SaveOptions(),
                 "brute-force": tf.saved_model.SaveOptions()}


class ExportError(UserError, ValueError):
    """An export cannot be made; the message names the run, model or path and what to do."""


# --------------------------------------------------------------------------------------------
# signatures and modules


def input_specs(tower: Any) -> dict[str, tf.TensorSpec]:
    """The raw inputs a served tower reads, by name, batch first: each served column's
    :meth:`~tfrs_coldstart.features.FeatureColumn.input_spec`, in state order (a student's
    training-only ID sink is not an input: it gives zeros when serving). A unified tower
    (``.towers``: the teacher's and the student's) reads the union of its towers' inputs."""
    specs: dict[str, tf.TensorSpec] = {}
    towers = getattr(tower, "towers", (tower,))
    for col in (c for t in towers for c in t.encoder.columns.values()):
        if not col.served:
            continue
        specs[col.input_key] = col.input_spec()
    _check_names(specs)
    return specs


def _check_names(specs: dict[str, tf.TensorSpec]) -> None:
    for key in specs:
        if not key.isidentifier():
            raise ExportError(
                f"column '{key}' cannot be a TF Serving signature input name; rename the "
                "column (letters, digits and underscores, not starting with a digit) in the "
                "data and schema, and retrain")


def _served_inputs(schema_features: Sequence[FeatureSpec],
                   features: dict[str, tf.TensorSpec]) -> SourceInputs:
    """The served inputs of a tower reading ``features``: derived ones replaced by their
    source columns (``schema_features``: the side's schema; empty: none derived)."""
    try:
        sources = SourceInputs(schema_features, features)
    except SourceInputError as e:
        raise ExportError(f"cannot serve the source columns: {e}") from None
    _check_names(sources.specs)
    return sources


def _describe(fn: Any) -> dict[str, Any]:
    """Input and output names, dtypes and shapes of a concrete function (for the manifest)."""
    def spec(s: Any) -> dict[str, Any]:
        return {"dtype": s.dtype.name, "shape": [-1 if d is None else int(d) for d in s.shape]}

    return {"inputs": {k: spec(s) for k, s in sorted(fn.structured_input_signature[1].items())},
            "outputs": {k: spec(s) for k, s in sorted(fn.structured_outputs.items())}}


class RecommendModule(tf.Module):
    """User tower + top-k index over the whole catalogue.

    Signatures: ``serving_default`` (user inputs -> ``item_ids`` string ``[batch, k]``,
    ``scores`` float32 ``[batch, k]``, best first) and ``embed_user`` (-> ``embedding``).
    The inputs (:attr:`specs`) are the source columns of the features ``schema_features``
    derives (see :class:`~tfrs_coldstart.features.sources.SourceInputs`) and the tower's
    other inputs; when some feature is derived, ``serving_derived`` and
    ``embed_user_derived`` take the tower's own inputs (:attr:`feature_specs`).
    Calling the module in Python runs the same concrete functions.
    """

    def __init__(self, user_tower: Any, index: tf.keras.Model, k: int,
                 scorer: Scorer | None = None, fetch: int | None = None,
                 schema_features: Sequence[FeatureSpec] = ()) -> None:
        super().__init__(name="recommend")
        self.user_tower = user_tower  # a Tower, or a UnifiedTower (teacher or student per row)
        self.index = index
        self.k = k
        # With a ``history`` input (issue 17: item IDs joined by HISTORY_SEPARATOR, "" for
        # none) the index returns ``fetch`` >= k results, the history's items are dropped and
        # the best k kept; unknown IDs in a history match nothing.
        self.fetch = max(k, fetch or k)
        self.feature_specs = input_specs(user_tower)
        self.sources = _served_inputs(schema_features, self.feature_specs)
        self.specs = self.sources.specs
        # The index holds scoring.Scorer.index_vectors: [item_emb, log(1 + count), new], and
        # the query is [user_emb / temperature, w(user), new_item_bias] (Scorer.query_vectors,
        # in-graph), so the index's scores are the evaluated ranking scores.
        self.scorer = scorer

        def query(features: dict[str, tf.Tensor]) -> tf.Tensor:
            q = self.user_tower(features, training=False)
            sc = self.scorer
            if sc is None or not sc.extra_columns:
                return q
            cols = [q / sc.temperature]
            ones = tf.ones_like(q[:, :1])
            if sc.uses_counts:
                if hasattr(self.user_tower, "known") and (sc.cold_prior != sc.prior
                                                          or sc.history_half):
                    known = self.user_tower.known(features)[:, None]
                    cold = sc.cold_prior * ones
                    n = self.user_tower.history_count(features) if sc.history_half else None
                    if n is not None:  # Scorer.user_prior: shrinks with the history
                        cold = cold * (sc.history_half / (sc.history_half + n[:, None]))
                    cols.append(tf.where(known, sc.prior * ones, cold))
                else:
                    cols.append(sc.prior * ones)
            if sc.new_item_bias:
                cols.append(sc.new_item_bias * ones)
            return tf.concat(cols, axis=1)

        def drop_history(scores: tf.Tensor, ids: tf.Tensor, history: tf.Tensor
                         ) -> tuple[tf.Tensor, tf.Tensor]:
            # ragged: memory follows the history IDs, not batch x k x the longest history
            hit = history_hits(ids, history, HISTORY_SEPARATOR)  # bool [b, k]
            masked = tf.where(hit, tf.fill(tf.shape(scores), np.nan), scores)
            keep = tf.minimum(self.k, tf.shape(scores)[1])
            order = tf.math.top_k(tf.where(tf.math.is_nan(masked), -np.inf, masked),
                                  k=keep).indices
            return (tf.gather(masked, order, batch_dims=1),
                    tf.gather(ids, order, batch_dims=1))

        def serve_features(**features: tf.Tensor) -> dict[str, tf.Tensor]:
            scores, ids = self.index(query(features), k=self.fetch)
            if HISTORY in features:
                scores, ids = drop_history(scores, ids, features[HISTORY])
            ok = tf.math.is_finite(scores)  # ScaNN marks slots it could not fill with NaN
            ids = tf.where(ok, ids, PAD_ID)
            scores = tf.where(ok, scores, PAD_SCORE)
            short = [[0, 0], [0, self.k - tf.shape(ids)[1]]]
            ids = tf.ensure_shape(tf.pad(ids, short, constant_values=PAD_ID), [None, self.k])
            scores = tf.ensure_shape(tf.pad(scores, short, constant_values=PAD_SCORE),
                                     [None, self.k])
            return {"item_ids": ids, "scores": scores}

        def embed_features(**features: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"embedding": self.user_tower(features, training=False)}

        # The tower is traced once, on its own inputs; the source-column signatures call
        # that function after the derivation ops (no second trace of the tower).
        serve_f = tf.function(serve_features).get_concrete_function(**self.feature_specs)
        embed_f = tf.function(embed_features).get_concrete_function(**self.feature_specs)
        self._derived: dict[str, Any] = {}
        if self.sources.derives:
            self._derived = {DERIVED_SIGNATURES["serving_default"]: serve_f,
                             DERIVED_SIGNATURES["embed_user"]: embed_f}
            self._serve = tf.function(lambda **x: serve_f(**self.sources(x))
                                      ).get_concrete_function(**self.specs)
            self._embed = tf.function(lambda **x: embed_f(**self.sources(x))
                                      ).get_concrete_function(**self.specs)
        else:
            self._serve, self._embed = serve_f, embed_f

    def signatures(self) -> dict[str, Any]:
        return {"serving_default": self._serve, "embed_user": self._embed, **self._derived}

    def __call__(self, features: dict[str, Any]) -> dict[str, tf.Tensor]:
        return self._serve(**_as_tensors(features, self.specs))

    def embed_user(self, features: dict[str, Any]) -> dict[str, tf.Tensor]:
        return self._embed(**_as_tensors(features, self.specs))

    def call_derived(self, features: dict[str, Any]) -> dict[str, tf.Tensor]:
        """``serving_default`` on the tower's own inputs (derived features included)."""
        fn = self._derived.get(DERIVED_SIGNATURES["serving_default"], self._serve)
        return fn(**_as_tensors(features, self.feature_specs))


class ItemEncoderModule(tf.Module):
    """Item tower alone: ``serving_default`` maps item features to ``embedding``, for indexing
    new items without re-exporting."""

    def __init__(self, item_tower: tf.keras.Model,
                 schema_features: Sequence[FeatureSpec] = ()) -> None:
        super().__init__(name="item_encoder")
        item_tower.encoder.drop_train_only()  # a student's ID sink: zeros when serving anyway
        self.item_tower = item_tower
        self.feature_specs = input_specs(item_tower)
        self.sources = _served_inputs(schema_features, self.feature_specs)
        self.specs = self.sources.specs

        def encode_features(**features: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"embedding": self.item_tower(features, training=False)}

        encode_f = tf.function(encode_features).get_concrete_function(**self.feature_specs)
        self._derived: dict[str, Any] = {}
        self._encode = encode_f
        if self.sources.derives:  # as RecommendModule: the tower traced once
            self._derived = {DERIVED_SIGNATURES["serving_default"]: encode_f}
            self._encode = tf.function(lambda **x: encode_f(**self.sources(x))
                                       ).get_concrete_function(**self.specs)

    def signatures(self) -> dict[str, Any]:
        return {"serving_default": self._encode, **self._derived}

    def __call__(self, features: dict[str, Any]) -> dict[str, tf.Tensor]:
        return self._encode(**_as_tensors(features, self.specs))


def _as_tensors(features: dict[str, Any], specs: dict[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
    missing = [k for k in specs if k not in features]
    if missing:
        raise ExportError(f"missing input feature(s) {missing}; the model takes {list(specs)}")
    return {k: tf.convert_to_tensor(np.asarray(features[k]) if s.dtype != tf.string
                                    else np.asarray(features[k], dtype=object), s.dtype)
            for k, s in specs.items()}


# --------------------------------------------------------------------------------------------
# warm-up records and manifest


def warmup_records(name: str, specs: dict[str, tf.TensorSpec], rows: dict[str, np.ndarray],
                   signature_names: Sequence[str],
                   batch_sizes: Sequence[int] = (1, 4)) -> list[bytes]:
    """Serialized ``PredictionLog`` records: one request per signature and batch size.

    TF Serving replays them at load (``--enable_model_warmup``, on by default) so the first
    real request does not pay for graph initialisation and the ScaNN searcher build.
    """
    n = len(next(iter(rows.values())))
    out = []
    for sig in signature_names:
        for b in sorted({min(max(1, b), n) for b in batch_sizes}):
            req = predict_pb2.PredictRequest()
            req.model_spec.name = name
            req.model_spec.signature_name = sig
            for key, spec in specs.items():
                req.inputs[key].CopyFrom(tf.make_tensor_proto(rows[key][:b], dtype=spec.dtype))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=req))
            out.append(log.SerializeToString())
    return out


def _rows(table: pd.DataFrame, ds: Any, side: str,
          specs: dict[str, tf.TensorSpec]) -> dict[str, np.ndarray]:
    """Rows of ``table`` as the arrays of the inputs ``specs`` (features, or the source
    columns a loaded table also holds)."""
    arrays = served_arrays(table, ds.schema.side(side), f"{side}_id")
    if HISTORY in specs and HISTORY not in arrays:  # warm-up requests: no history
        arrays[HISTORY] = np.full(len(table), "", dtype=object)
    return {k: arrays[k] for k in specs}


def _warmup(name: str, module: Any, rows: dict[str, np.ndarray]) -> list[bytes]:
    """Warm-up records for every signature of ``module``: the source-column ones with the
    served inputs, the derived ones with the tower's."""
    sigs = list(module.signatures())
    derived = [s for s in sigs if s in DERIVED_SIGNATURES.values()]
    out = warmup_records(name, module.specs, rows, [s for s in sigs if s not in derived])
    if derived:
        out += warmup_records(name, module.feature_specs, rows, derived)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "items"):
        return dict(o.items())
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def _versions(library: str) -> dict[str, str]:
    """Versions of the libraries the export was made with (for the manifest)."""
    out = {"tensorflow": tf.__version__}
    for dist in ("tensorflow-recommenders", "scann", "tfrs-coldstart"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    out.setdefault("tfrs-coldstart", library)
    return out


# --------------------------------------------------------------------------------------------
# the export


@dataclass
class ExportedModel:
    """One published SavedModel; ``module`` is the in-process object that was saved."""

    name: str
    version: int
    path: Path
    kind: str  # recommend | item_encoder
    model: str  # student | teacher
    index: str | None
    manifest: dict[str, Any]
    module: tf.Module | None = dataclasses.field(default=None, repr=False)


@dataclass
class _Planned:
    name: str
    kind: str
    model: str
    module: tf.Module
    manifest: dict[str, Any]
    warmup: list[bytes]
    tmp: Path | None = None
    final: Path | None = None


def default_names(cfg: RunConfig, index: str) -> dict[str, str]:
    """Model names by role (``recommend``, ``student``, ``teacher``, ``student_items``) for
    one index kind."""
    e = cfg.export
    suffix = INDEX_SUFFIXES.get(index, "")
    return {"recommend": e.recommend_name + suffix, "student": e.student_name + suffix,
            "teacher": e.teacher_name + suffix, "student_items": e.item_encoder_name}


def _open_run(run_dir: Path) -> RunDir:
    if not run_dir.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist; train one with "
                          "`tfrs-coldstart run --output RUN_DIR` first")
    try:
        run = RunDir.open(run_dir)
        run.config  # noqa: B018 - read now, so a broken config fails before any work
    except UserError as e:
        raise ExportError(f"cannot export {run_dir}: {e}") from None
    return run


def _load_model(run: RunDir, which: str) -> Any:
    try:
        return run.load_model(which)
    except RunError as e:
        raise ExportError(str(e)) from None
    except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError,
            tf.errors.OpError) as e:
        raise ExportError(
            f"cannot export the {which} of {run.path}: its saved model does not match its "
            f"config/preprocessing ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            f"retrain it") from None


def _check_dataset(ds: Any, run: RunDir) -> Any:
    """``ds`` in the form the run was trained on (see :func:`data.tables.conform`), checked."""
    run_dir = run.path
    try:
        schema = run.schema
    except UserError as e:
        raise ExportError(f"cannot export {run_dir}: {e}") from None
    ds = conform(ds, schema)
    saved = schema.to_dict()
    if saved != ds.schema.to_dict():
        raise ExportError(
            f"the dataset named by {run_dir}/config.yaml has another schema than the run was "
            f"trained on ({run_dir}/schema.yaml): trained on {saved}, found "
            f"{ds.schema.to_dict()}; point data.* back at the training data or retrain")
    if len(ds.items) == 0:
        raise ExportError(f"the item catalogue of {run_dir} is empty: there is nothing to "
                          "index; check the items table")
    if len(ds.users) == 0:
        raise ExportError(f"the users table of {run_dir} is empty: no real queries to check "
                          "the index with or to warm the server up with")
    return ds


def _check_inputs(tower: Any, table: pd.DataFrame, side: str, which: str,
                  schema_features: Sequence[FeatureSpec]) -> dict[str, tf.TensorSpec]:
    specs = input_specs(tower)
    served = _served_inputs(schema_features, specs).specs
    cols = set(table.columns)
    missing = [k for k in {**specs, **served} if k not in cols and k != HISTORY]  # per request
    if missing:
        raise ExportError(f"the {which}'s {side} tower reads {missing}, which the {side}s "
                          f"table lacks (columns: {sorted(cols)}); export with the training data")
    return specs


def export_run(
    run_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
    models: Sequence[str] | None = None,
    index: str | None = None,
    k: int | None = None,
    version: int | None = None,
    names: dict[str, str] | None = None,
    ann_recall_gate: float | None = None,
    scann: dict[str, int | None] | None = None,
    partitioned: dict[str, int | None] | None = None,
    item_encoder: bool = True,
    n_queries: int = 1000,
    dataset: Any = None,
    log: Any = None,
) -> list[ExportedModel]:
    """Export a trained run's ``recommend`` models (and the student's item encoder).

    ``models``: roles to export (default: every one the run has): ``recommend`` (the one
    model a client needs: the teacher for known users and items, the student for new ones,
    in one index), ``student`` (content only) and ``teacher`` (IDs + content).

    ``None`` arguments come from the run's ``export`` config (``base_dir``, ``index``,
    ``k``, ``ann_recall_gate``; ``scann`` keys ``num_leaves``, ``num_leaves_to_search``,
    ``num_reordering_candidates`` override ``scann_*``; ``partitioned`` keys
    ``num_clusters``, ``leaves_to_search`` override ``partitioned_*``). ``version``: the
    integer version for every model of this export (default: one more than the highest
    existing version of any of them). ``dataset``: the run's data, already loaded
    (default: loaded from the run's config). Raises :class:`ExportError` (or the index's
    ``AnnRecallError``) and leaves nothing behind on any failure.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    run = _open_run(run_dir)
    cfg = run.config
    e = cfg.export
    base = Path(base_dir if base_dir is not None else e.base_dir)
    index = index or e.index
    k = int(k if k is not None else e.k)
    gate = float(ann_recall_gate if ann_recall_gate is not None else e.ann_recall_gate)
    if models is None:
        models = tuple(m for m in MODELS if (run.has_scorer(m) if m == "recommend"
                                             else run.has_model(m)))
        if not models:
            raise ExportError(f"{run_dir} holds no trained teacher or student; train them "
                              "first (`tfrs-coldstart run --output RUN_DIR`)")
    models = tuple(models)
    if index not in INDEX_KINDS:
        raise ExportError(f"unknown index {index!r}; use one of {', '.join(INDEX_KINDS)}")
    if not models or any(m not in MODELS for m in models) or len(set(models)) != len(models):
        raise ExportError(f"models must be a non-empty subset of {list(MODELS)}, got "
                          f"{list(models)}")
    if k < 1:
        raise ExportError(f"k must be at least 1, got {k}")
    if version is not None and (isinstance(version, bool) or int(version) < 1):
        raise ExportError(f"version must be a positive integer, got {version!r}")
    unknown = sorted(set(names or {}) - {*MODELS, "student_items"})
    if unknown:
        raise ExportError(f"unknown model role(s) {unknown} in names; roles are recommend, "
                          "student, teacher and student_items")
    role_names = {**default_names(cfg, index), **(names or {})}
    roles = [m for m in models] + (["student_items"] if item_encoder and (
        "student" in models or "recommend" in models) else [])
    chosen = {r: role_names[r] for r in roles}
    if len(set(chosen.values())) != len(chosen):
        raise ExportError(f"two models of this export share a name: {chosen}")
    for r, n in chosen.items():
        if not n or not all(c.isalnum() or c in "_-." for c in n) or n.startswith("."):
            raise ExportError(f"model name {n!r} (for {r}) must be letters, digits, '_', '-', "
                              "'.' and not start with '.'")
    recover_releases(base, log)  # what killed exports left: before the versions are read
    taken = {n: list_versions(base / n, complete_only=False) for n in chosen.values()}
    if version is None:
        version = 1 + max([v for vs in taken.values() for v in vs], default=0)
    version = int(version)
    clash = [str(base / n / str(version)) for n, vs in taken.items() if version in vs]
    if clash:
        raise ExportError(f"version {version} already exists at {', '.join(clash)}; versions are "
                          "never overwritten: pass another --version or omit it for the next "
                          "free one")

    if dataset is None:
        log(f"loading the run's data ({cfg.data.format}) ...")
        try:
            dataset = run.load_dataset()
        except UserError as err:
            raise ExportError(f"cannot load the data {run_dir} was trained on: {err}") from None
    ds = _check_dataset(dataset, run)
    scann_over = {"num_leaves": e.scann_num_leaves, "num_leaves_to_search":
                  e.scann_leaves_to_search, "num_reordering_candidates": e.scann_reorder,
                  **(scann or {})}
    part_over = {"num_clusters": e.partitioned_num_clusters,
                 "leaves_to_search": e.partitioned_leaves_to_search, **(partitioned or {})}
    rng = np.random.default_rng(0)
    q_rows = np.sort(rng.choice(len(ds.users), size=min(n_queries, len(ds.users)),
                                replace=False))
    w_rows = np.sort(rng.choice(len(ds.users), size=min(4, len(ds.users)), replace=False))
    report = run.report()
    item_ids = ds.items["item_id"].astype(str).to_numpy()
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    common = {"format_version": 1, "created": created, "run_dir": str(run_dir.resolve()),
              "version": version, "schema": ds.schema.to_dict(), "config": to_dict(cfg),
              "dataset": ds.summary(), "libraries": _versions(__version__)}

    planned: list[_Planned] = []
    loaded: dict[str, Any] = {}

    def load(which: str) -> Any:
        if which not in loaded:
            loaded[which] = _load_model(run, which)
        return loaded[which]

    # The served score's inputs, as evaluated: log(1 + training count) (new items count 0)
    # and new(i), outside the training catalogue (scoring.new_item_mask)
    log_counts, item_new = run.item_log_counts(ds.items), run.item_new(ds.items)
    if item_new is None:  # a run saved before counts were recorded: its split says
        split = prepare(ds, cfg).split
        log_counts = item_log_counts(split.train, ds.items)
        item_new = new_item_mask(ds.items, split.warm_items)

    for which in models:
        name = chosen[which]
        user_known = item_known = None
        if which == "recommend":
            if not run.has_scorer("recommend"):
                raise ExportError(f"{run_dir} has no tuned `recommend` score (recommend/"
                                  "scorer.json): it was trained before the unified model or "
                                  "without a student in the teacher's space; retrain it with "
                                  "`tfrs-coldstart run` (student.space=teacher)")
            try:
                model = run.load_unified(load("teacher"), load("student"))
            except ValueError as err:
                raise ExportError(f"cannot export recommend from {run_dir}: {err}") from None
            user_tower, item_tower = model.towers["user"], model.towers["item"]
        else:
            model = load(which)
            user_tower, item_tower = model.user_tower, model.item_tower
        scorer = run.scorer(which)
        u_specs = _check_inputs(user_tower, ds.users, "user", which, ds.schema.user_features)
        _check_inputs(item_tower, ds.items, "item", which, ds.schema.item_features)
        log(f"{which}: embedding {len(item_ids)} catalogue items ...")
        if which == "recommend":
            item_emb, item_known = model.embed("item", ds.items, ds.schema)
            queries, user_known = model.embed("user", ds.users.iloc[q_rows], ds.schema)
            source = ("the teacher's content path" if model.cold_paths["item"] == "teacher"
                      else "the student")
            log(f"{which}: {int(item_known.sum())} items from the teacher, "
                f"{int((~item_known).sum())} new ones from {source}")
        else:
            item_emb = model.embed("item", ds.items, ds.schema)
            queries = model.embed("user", ds.users.iloc[q_rows], ds.schema)
        # The served score (scoring.Scorer) through one inner product, as evaluated.
        index_emb = scorer.index_vectors(item_emb, log_counts, item_new)
        index_queries = scorer.query_vectors(queries, user_known)
        params = None
        if index == "scann":
            try:
                params = scann_params(len(item_ids), index_emb.shape[1], k, **{
                    kk: (int(v) if v is not None else None) for kk, v in scann_over.items()})
            except TypeError as err:
                raise ExportError(f"unknown ScaNN parameter: {err}") from None
        elif index == "partitioned":
            try:
                params = partitioned_params(len(item_ids), index_emb.shape[1], k, **{
                    kk: (int(v) if v is not None else None) for kk, v in part_over.items()})
            except TypeError as err:
                raise ExportError(f"unknown partitioned-index parameter: {err}") from None
        log(f"{which}: building the {index} index (k={min(k, len(item_ids))}) ...")
        try:
            gated = build_gated_index(item_ids, index_emb, index_queries, k, index, gate,
                                      params)
        except IndexBuildError as err:
            raise type(err)(f"{name}: {err}") from None
        if gated.recall is not None:
            log(f"{which}: ANN recall@{gated.k} = {gated.recall:.4f} (gate {gate})")
        fetch = min(gated.k + HISTORY_EXTRA, len(item_ids)) if HISTORY in u_specs else gated.k
        module = RecommendModule(user_tower, gated.layer, gated.k, scorer, fetch,
                                 ds.schema.user_features)
        manifest = {**common, "name": name, "kind": "recommend", "model": which,
                    # where new users' / items' embeddings come from (chosen on validation)
                    "cold_paths": run.cold_paths() if which == "recommend" else None,
                    "popularity_prior": scorer.prior, "temperature": scorer.temperature,
                    "scorer": scorer.to_dict(),
                    "new_items": (None if item_known is None else int((~item_known).sum())),
                    # items outside the training catalogue (lifted when new_item_bias != 0)
                    "new_to_catalogue": int(item_new.sum()),
                    "index": index, "k": gated.k, "k_requested": k,
                    "index_fetch": fetch,
                    "catalogue_size": int(len(item_ids)),
                    "embedding_dim": int(item_emb.shape[1]),
                    "index_params": gated.params, "ann_recall": _recall_info(gated),
                    "serving": _serving_note(index),
                    "signatures": {s: _describe(f) for s, f in module.signatures().items()},
                    "metrics": (report.get("models", {}).get(which) if report else None),
                    "pad": {"item_id": PAD_ID, "score": PAD_SCORE}}
        rows = _rows(ds.users.iloc[w_rows], ds, "user", {**module.specs, **u_specs})
        planned.append(_Planned(name, "recommend", which, module, manifest,
                                _warmup(name, module, rows)))
        if "student_items" in chosen and which == ("student" if "student" in models
                                                   else "recommend"):
            # the content-only student's item tower, whatever recommend's cold path (a
            # `teacher` item cold path is in recommend's manifest; add-items follows it)
            enc = ItemEncoderModule(load("student").item_tower, ds.schema.item_features)
            iname = chosen["student_items"]
            i_rows = _rows(ds.items.iloc[:4], ds, "item", {**enc.specs, **enc.feature_specs})
            planned.append(_Planned(iname, "item_encoder", which, enc, {
                **common, "name": iname, "kind": "item_encoder", "model": which, "index": None,
                "embedding_dim": int(item_emb.shape[1]), "serving": _serving_note("brute-force"),
                "signatures": {s: _describe(f) for s, f in enc.signatures().items()},
                "metrics": (report.get("models", {}).get(which) if report else None)},
                _warmup(iname, enc, i_rows)))
    return _publish(planned, base, version, index, log)


def _recall_info(g: GatedIndex) -> dict[str, Any] | None:
    if g.recall is None:
        return {"recall": 1.0, "exact": True, "k": g.k}
    return {"recall": g.recall, "exact": False, "k": g.k, "gate": g.gate,
            "queries": g.n_queries, "query_source": "sampled rows of the users table",
            "trials": g.trials}


def _serving_note(index: str) -> str:
    if index == "scann":
        return ("needs TF Serving built with the ScaNN ops (Dockerfile default target); in "
                "Python, `import scann` before loading")
    return "stock TF Serving (tensorflow/serving:2.20.0); stock TensorFlow ops only"


def _save_quietly(module: Any, path: Path, options: tf.saved_model.SaveOptions) -> None:
    """``tf.saved_model.save`` without Keras's warnings about the towers' constructor args
    (the SavedModel's signatures never rebuild the Keras objects)."""
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        tf.saved_model.save(module, str(path), signatures=module.signatures(), options=options)
    finally:
        tf_logger.setLevel(level)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk. Folders that cannot be synced
    (some network file systems) are skipped: they give no ordering to rely on anyway."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file of a staged version, then its folders, bottom up."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _publish(planned: list[_Planned], base: Path, version: int, index: str,
             log: Any) -> list[ExportedModel]:
    """Publish a release (every model of one export, one version) all or nothing.

    TF Serving loads a version when a folder ``<name>/<version>`` appears, one model at a
    time, and several folders cannot be renamed at once. So:

    1. stage: each model is written to a hidden folder ``<name>/.tmp-<version>-<pid>-<id>``
       beside its final place (TF Serving ignores non-integer folders); its manifest names
       the release (``"release": {"version": v, "models": [...]}``);
    2. decide: once every model is staged and flushed to disk, a release record
       ``<base>/.release-<version>-<pid>-<id>.json`` listing each (staged, final) pair is
       written atomically and flushed. Before it exists nothing is published, and a crash
       leaves only hidden folders, removed by the next export or ``serve`` start;
    3. rename each staged folder to its version (back to back, nothing else in between),
       flush the model folders;
    4. switch: rewrite ``<base>/models.config`` (and ``models.stock.config``) in one durable
       rename (:func:`saved_model.write_models_config`), pinning every model to the versions
       of its two newest whole releases (``specific`` policy): this release and the one
       before for its models. This rename is the commit point. Then the record is removed.

    The flushes order what a power loss can leave: files before the record, the record
    before any rename, every rename before the config, the config before the record goes.

    An error before 4 completes (a rename or the config write refused) renames back or
    removes what was renamed: none of the release stays and the config still names the old
    one. A crash before 4 (kill -9, power loss) leaves the record, and the next export,
    ``add-items`` or ``serve`` start, or the dev server's next poll, completes the renames and
    rewrites the config (:func:`saved_model.recover_releases`: every model is complete on
    disk, so the release is rolled forward; rolled back only if a model of it was removed).

    What a server sees meanwhile: a TF Serving started with ``--model_config_file=<base>/
    models.config`` (the Docker images, ``serving/k8s``) loads only the versions the config
    names, so it ignores the new folders until the switch: a crash anywhere before it leaves
    the old release served, and after it every model of the new one is aspired in the same
    file-system poll. What remains: TF Serving then loads and warms the new versions model by
    model (seconds), so for that long a request without a version may get the new release
    from one model and the old from another; the previous release stays pinned and loaded,
    so a client needing one release across models pins a version (``/versions/N``) that
    every model reports available. A TF Serving polling version folders without this
    config (``latest`` policy) still sees the renames one by one. The dev server loads a
    version only when every model of its release has it on disk
    (:func:`saved_model.release_missing`), with or without the config.
    """
    created_dirs: list[Path] = []
    for d in [base] + [base / p.name for p in planned]:
        if not d.exists():
            created_dirs.append(d)
    tag = f"{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    record = base / f"{RELEASE_PREFIX}{tag}.json"
    release = {"version": version, "models": [p.name for p in planned]}
    published: list[_Planned] = []
    try:
        for p in planned:
            model_dir = base / p.name
            p.tmp = model_dir / f"{STAGING_PREFIX}{tag}"
            p.final = model_dir / str(version)
            p.manifest = {**p.manifest, "release": release}
            log(f"writing {p.name} ({p.kind}) ...")
            try:
                model_dir.mkdir(parents=True, exist_ok=True)
                _save_quietly(p.module, p.tmp,
                              _SAVE_OPTIONS[index if p.kind == "recommend" else "brute-force"])
                warmup_path = p.tmp / WARMUP_FILE
                warmup_path.parent.mkdir(exist_ok=True)
                with tf.io.TFRecordWriter(str(warmup_path)) as w:
                    for rec in p.warmup:
                        w.write(rec)
                (p.tmp / MANIFEST_FILE).write_text(
                    json.dumps(p.manifest, indent=1, default=_json_default))
            except (OSError, tf.errors.OpError) as err:
                raise ExportError(f"cannot write {p.name} under {model_dir}: {err}; nothing was "
                                  "published") from None
        for p in planned:
            assert p.final is not None
            if p.final.exists():
                raise ExportError(f"{p.final} appeared while exporting (another export?); "
                                  "versions are never overwritten, nothing was published: "
                                  "export again")
        for p in planned:
            try:
                _fsync_tree(p.tmp)  # type: ignore[arg-type]
                _fsync(base / p.name)
            except OSError as err:
                raise ExportError(f"cannot flush {p.tmp} to disk: {err}; nothing was "
                                  "published") from None
        try:
            atomic_write_text(record, json.dumps({"version": version, "models": [
                {"staged": f"{p.name}/{p.tmp.name}", "final": f"{p.name}/{version}"}  # type: ignore[union-attr]
                for p in planned]}))
            _fsync(record)
            _fsync(base)
        except OSError as err:
            raise ExportError(f"cannot write the release record {record}: {err}; nothing was "
                              "published") from None
        for p in planned:
            assert p.tmp is not None and p.final is not None
            try:
                if p.final.exists():
                    raise FileExistsError(p.final)
                os.rename(p.tmp, p.final)
            except OSError as err:
                raise ExportError(f"cannot publish {p.final} ({err}); versions are never "
                                  "overwritten, nothing was published: export again") from None
            published.append(p)
        for p in planned:
            with contextlib.suppress(OSError):  # renamed already; a failed flush is no undo
                _fsync(base / p.name)
        try:  # the switch: a TF Serving on the config moves to this release here, at once
            write_models_config(base, log=log)
        except (OSError, UserError) as err:
            if _switched(base, planned, version):  # models.config done, the stock one failed
                raise ExportError(
                    f"published version {version} (models.config names it), but the stock "
                    f"config could not be written ({err}); the next export, add-items or "
                    "serve start rewrites it") from None
            raise ExportError(f"cannot write {base / MODELS_CONFIG} ({err}); nothing was "
                              "published: export again") from None
    except (Exception, KeyboardInterrupt):
        if published and _switched(base, planned, version):
            raise  # the config names this release (the commit point passed): nothing to undo
        # Undo (a crash that skips this is finished by recover_releases at the next start).
        undone = True
        for p in reversed(published):
            try:
                os.rename(p.final, p.tmp)  # type: ignore[arg-type]
            except OSError:
                shutil.rmtree(p.final, ignore_errors=True)  # type: ignore[arg-type]
                undone = undone and not p.final.exists()  # type: ignore[union-attr]
        for p in planned:
            if p.tmp is not None:
                shutil.rmtree(p.tmp, ignore_errors=True)
        if undone:
            record.unlink(missing_ok=True)
        for d in reversed(created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    with contextlib.suppress(OSError):  # left over, recover_releases removes it later
        record.unlink()
    out = []
    for p in planned:
        assert p.final is not None
        log(f"published {p.final}")
        out.append(ExportedModel(p.name, version, p.final, p.kind, p.model,
                                 index if p.kind == "recommend" else None, p.manifest, p.module))
    return out


def _switched(base: Path, planned: list[_Planned], version: int) -> bool:
    """Whether ``<base>/models.config`` already pins this release's version for every model
    of it (the switch happened: undoing the renames would unload served versions)."""
    pinned = configured_versions(base / MODELS_CONFIG)
    return all(version in pinned.get(p.name, []) for p in planned)


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tfrs-coldstart export``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run folder")
    p.add_argument("--index", choices=INDEX_KINDS, default=None,
                   help="scann (needs TF Serving with ScaNN ops), partitioned (approximate, "
                        "stock TF Serving) or brute-force (exact, stock TF Serving); default: "
                        "the run's export.index (scann)")
    p.add_argument("--base-dir", default=None,
                   help="model base path; models go to BASE/<name>/<version> (default: export)")
    p.add_argument("--k", type=int, default=None, help="results per query (default 100)")
    p.add_argument("--models", default=None,
                   help="comma-separated: recommend,student,teacher (default: every one the "
                        "run has)")
    p.add_argument("--version", type=int, default=None,
                   help="integer version (default: next free); existing ones are never replaced")
    p.add_argument("--ann-recall-gate", type=float, default=None,
                   help="minimum recall@k of an approximate index (ScaNN, partitioned) "
                        "against exact search (default 0.95)")
    p.add_argument("--scann-num-leaves", type=int, default=None)
    p.add_argument("--scann-leaves-to-search", type=int, default=None)
    p.add_argument("--scann-reorder", type=int, default=None)
    p.add_argument("--partitioned-num-clusters", type=int, default=None,
                   help="k-means cells of the partitioned index (default about sqrt(items))")
    p.add_argument("--partitioned-leaves-to-search", type=int, default=None,
                   help="leaves scored exactly per query (default: raised until the recall "
                        "gate passes)")
    p.add_argument("--no-item-encoder", action="store_true",
                   help="skip the student's item encoder")
    p.add_argument("--serving-base", default=None,
                   help="where TF Serving sees the base dir: base paths of BASE/models.config "
                        "become SERVING_BASE/<name> (default: as the existing config has them, "
                        f"else {DEFAULT_SERVING_BASE}, the Docker images' mount)")


def run(args: argparse.Namespace) -> int:
    """``tfrs-coldstart export RUN_DIR [...]``: one line per published model."""
    scann = {k: v for k, v in (("num_leaves", args.scann_num_leaves),
                               ("num_leaves_to_search", args.scann_leaves_to_search),
                               ("num_reordering_candidates", args.scann_reorder))
             if v is not None}
    part = {k: v for k, v in (("num_clusters", args.partitioned_num_clusters),
                              ("leaves_to_search", args.partitioned_leaves_to_search))
            if v is not None}
    base = None
    if args.serving_base is not None:  # pinned versions unchanged, base paths moved first
        base = Path(args.base_dir if args.base_dir is not None
                    else _open_run(Path(args.run_dir)).config.export.base_dir)
        set_serving_base(base, args.serving_base)
    done = export_run(args.run_dir, base_dir=args.base_dir,
                      models=(None if args.models is None else
                              tuple(m.strip() for m in args.models.split(",") if m.strip())),
                      index=args.index, k=args.k, version=args.version,
                      ann_recall_gate=args.ann_recall_gate, scann=scann or None,
                      partitioned=part or None,
                      item_encoder=not args.no_item_encoder)
    for m in done:
        rec = m.manifest.get("ann_recall") or {}
        extra = (f"  recall@{rec['k']}={rec['recall']:.3f}" if m.kind == "recommend" and rec
                 else "")
        print(f"{m.name:<16} v{m.version}  {m.kind:<12} {m.path}{extra}")
    if base is not None:
        set_serving_base(base, args.serving_base)
    return 0


def set_serving_base(base: str | os.PathLike[str], serving_base: str) -> None:
    """Make ``<base>/models.config`` name its models under ``serving_base`` (where TF Serving
    sees ``base``); later publishes keep it. Run before a publish (when a config exists, so
    the publish's switch already has the new paths) and after it (a first publish wrote the
    default). A base without a config yet is left alone until its first publish."""
    check_serving_base(serving_base)
    if (Path(base) / MODELS_CONFIG).is_file():
        write_models_config(base, serving_base=serving_base)
