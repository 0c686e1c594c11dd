"""The exported ``recommend`` SavedModel as batch retrieval uses it, and the output format.

Batch retrieval calls the SavedModel's signature itself (no server), so its results are
exactly what TF Serving serves. :class:`ServedModel` loads one version, knows the
signature's inputs and normalises raw users-table cells exactly as training normalised
them. The inputs of ``serving_default`` are the source's own columns (a MovieLens ``u.user``
table as it is: ``age``, ``zip_code``, ...; the model derives its features from them); a
table of the derived features goes through ``serving_derived``. The in-process
(:mod:`.local`) and Beam (:mod:`.beam`) runners share it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import tensorflow as tf

from tfrs_coldstart.data.schema import FeatureSpec, Schema, SourceColumn
from tfrs_coldstart.data.tables import (
    TableSource,
    normalise_feature,
    normalise_ids,
    normalise_source,
)
from tfrs_coldstart.errors import UserError
from tfrs_coldstart.features.columns import HISTORY, input_array, spec_for_input
from tfrs_coldstart.serving.saved_model import (
    MANIFEST_FILE,
    import_scann,
    is_complete,
    list_versions,
    read_manifest,
)

__all__ = [
    "BatchError",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHUNK_ROWS",
    "OUTPUT_SCHEMA",
    "ServedModel",
    "USER_ID",
    "check_k",
    "check_out_path",
    "resolve_version",
]

#: The rows every batch runner writes: one per (user, filled result slot), rank 1 = best.
OUTPUT_SCHEMA = pa.schema([("user_id", pa.string()), ("rank", pa.int32()),
                           ("item_id", pa.string()), ("score", pa.float32())])
DEFAULT_CHUNK_ROWS = 50_000
DEFAULT_BATCH_SIZE = 1024
USER_ID = "user_id"


class BatchError(UserError, ValueError):
    """Batch retrieval cannot run; the message names the path and what to do."""


def resolve_version(model_dir: str | os.PathLike[str]) -> tuple[str, str, int | None]:
    """``export/<name>`` (its highest integer version) or ``export/<name>/<version>`` ->
    ``(version folder, name, version)``. Works on local and remote (``gs://``) paths."""
    path = str(model_dir).rstrip("/") or "/"
    if is_complete(path):
        base = os.path.basename(path)
        version = int(base) if base.isdigit() else None
        name = os.path.basename(os.path.dirname(path)) if version is not None else base
        return path, name, version
    if not tf.io.gfile.isdir(path):
        raise BatchError(f"model path {path} does not exist; pass export/<name> (e.g. "
                         "export/student) or export/<name>/<version> as written by "
                         "`tfrs-coldstart export`")
    versions = list_versions(path)
    if not versions:
        raise BatchError(f"{path} holds no SavedModel version (no <integer>/saved_model.pb); "
                         "export a run there first with `tfrs-coldstart export RUN_DIR`")
    return f"{path}/{versions[-1]}", os.path.basename(path), versions[-1]


@dataclass
class ServedModel:
    """A loaded ``recommend`` SavedModel signature and what its inputs are.

    ``specs``: the signature's inputs (name -> ``tf.TensorSpec``); ``k``: results per user;
    ``schema``: the run's schema from the manifest (used to normalise input cells exactly as
    training did), or ``None`` for a SavedModel without a manifest.
    """

    path: str
    name: str
    version: int | None
    signature: str
    specs: dict[str, tf.TensorSpec]
    k: int
    manifest: dict[str, Any]
    schema: Schema | None
    fn: Any = field(repr=False)
    loaded: Any = field(repr=False)

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str],
             signature: str = "serving_default") -> ServedModel:
        path, name, version = resolve_version(model_dir)
        import_scann()
        try:
            loaded = tf.saved_model.load(path)
        except (tf.errors.OpError, OSError, ValueError) as e:
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            hint = (" (a ScaNN model needs `pip install scann` in this environment)"
                    if "Scann" in str(e) else "")
            raise BatchError(f"cannot load the SavedModel at {path}: {first}{hint}") from None
        if signature not in loaded.signatures:
            raise BatchError(f"{path} has no signature {signature!r}; it has "
                             f"{sorted(loaded.signatures)}")
        fn = loaded.signatures[signature]
        outs = fn.structured_outputs
        if not {"item_ids", "scores"} <= set(outs):
            raise BatchError(f"signature {signature!r} of {path} returns {sorted(outs)}, not "
                             "item_ids and scores: batch retrieval needs a `recommend` model "
                             "(export/student or export/teacher, not the item encoder)")
        specs = dict(fn.structured_input_signature[1])
        k = outs["item_ids"].shape[-1]
        manifest = read_manifest(path)
        schema = None
        if "schema" in manifest:
            with contextlib.suppress(ValueError):
                schema = Schema.from_dict(manifest["schema"], source=f"{path}/{MANIFEST_FILE}")
        return cls(path, name, version, signature, specs, int(k) if k is not None else 0,
                   manifest, schema, fn, loaded)

    @property
    def required_columns(self) -> list[str]:
        """``user_id`` plus the signature's inputs: what a users table must hold (an optional
        input, the request-time ``history``, may be left out)."""
        return [USER_ID] + [n for n in self.specs if n != USER_ID and n != HISTORY]

    @property
    def optional_columns(self) -> list[str]:
        """Inputs a users table may leave out: the request-time ``history`` (issue 17; item
        IDs joined by ``|``), ``""`` (no history) when absent or empty."""
        return [n for n in self.specs if n == HISTORY]

    def columns_in(self, columns: Iterable[str]) -> list[str]:
        """The columns to read from a table that has ``columns``: the required ones plus
        the optional ones it holds."""
        have = set(columns)
        return self.required_columns + [c for c in self.optional_columns if c in have]

    def feature_spec(self, name: str) -> FeatureSpec | SourceColumn:
        """How one input column is normalised: the schema's feature spec, or the source
        column a derived feature is made from, else a feature spec from the dtype."""
        if self.schema is not None and name in self.schema.names("user"):
            return self.schema.feature("user", name)
        if self.schema is not None:
            for col in self.schema.sources("user"):
                if col.name == name:
                    return col
        return spec_for_input(name, self.specs[name])

    def check_columns(self, columns: Iterable[str], where: str) -> None:
        have = set(columns)
        missing = [c for c in self.required_columns if c not in have]
        if missing:
            hint = "Add or rename the columns"
            derived = self.loaded.signatures.get("serving_derived")
            if self.signature == "serving_default" and derived is not None and all(
                    n in have for n in derived.structured_input_signature[1] if n != HISTORY):
                hint = ("The table holds the derived features instead: pass --signature "
                        "serving_derived (batch_recommend(..., signature='serving_derived'))")
            raise BatchError(
                f"{where}: missing column(s) {missing}; model {self.path} needs "
                f"{self.required_columns} (user_id plus the signature's inputs), the table has "
                f"{sorted(have)}. {hint}")

    def normalise(self, df: pd.DataFrame,
                  src: TableSource | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Raw cells -> (user ids ``str[n]``, signature inputs), as the training data loader
        normalises them; a bad cell raises :class:`DataError` naming its row."""
        src = src or TableSource("<DataFrame users>")
        df = df.reset_index(drop=True)
        ids = normalise_ids(df[USER_ID], USER_ID, src)
        feats: dict[str, Any] = {}
        for name, s in self.specs.items():
            if name == USER_ID:
                feats[name] = ids
                continue
            if name == HISTORY:  # optional: "" for none
                col = (df[name] if name in df.columns else pd.Series([""] * len(df)))
                feats[name] = col.fillna("").astype(str).to_numpy(dtype=object)
                continue
            # Cells normalised as in training, then as the array the signature input takes.
            spec = self.feature_spec(name)
            cells = (normalise_source(df[name], spec, src) if isinstance(spec, SourceColumn)
                     else normalise_feature(df[name], spec, src))
            feats[name] = input_array(cells, s)
        return ids, feats

    def recommend(self, features: dict[str, Any],
                  batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """Call the signature in batches: ``(item ids bytes [n, k], scores float32 [n, k])``."""
        n = len(next(iter(features.values()))) if features else 0
        ids_out, sc_out = [], []
        for s in range(0, n, max(1, batch_size)):
            args = {name: tf.constant(v[s:s + batch_size], dtype=spec.dtype)
                    for name, spec in self.specs.items() for v in (features[name],)}
            out = self.fn(**args)
            ids_out.append(out["item_ids"].numpy())
            sc_out.append(out["scores"].numpy())
        if not ids_out:
            return np.zeros((0, self.k), object), np.zeros((0, self.k), np.float32)
        return np.concatenate(ids_out), np.concatenate(sc_out).astype(np.float32)


def check_k(k: int | None, model: ServedModel) -> int:
    """The ``k`` a job writes: default all the model returns; never more than it returns."""
    if k is None:
        if model.k < 1:
            raise BatchError(f"{model.path} does not declare how many items it returns; pass k")
        return model.k
    if isinstance(k, bool) or int(k) < 1:
        raise BatchError(f"k must be a positive integer, got {k!r}")
    if model.k >= 1 and int(k) > model.k:
        raise BatchError(f"model {model.path} returns {model.k} items per user, fewer than "
                         f"k={k}; ask for k <= {model.k} or re-export with "
                         f"`tfrs-coldstart export RUN_DIR --k {k}`")
    return int(k)


def check_batch_size(batch_size: int, what: str = "batch size") -> int:
    """A positive number of users per model call (0 would write an empty file)."""
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise BatchError(f"{what} must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def check_out_path(out_path: str | os.PathLike[str]) -> Path:
    """A local output file path, its folder created; checked before any work starts."""
    out = Path(out_path)
    if out.is_dir():
        raise BatchError(f"output {out} is a folder; pass a file path such as recs.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
