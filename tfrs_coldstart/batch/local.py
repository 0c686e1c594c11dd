"""Offline batch retrieval with an exported ``recommend`` SavedModel, and new items without
retraining.

- :func:`batch_recommend`: a users table (CSV/TSV or Parquet, read in chunks so memory stays
  bounded) -> Parquet rows ``user_id, rank, item_id, score``, in this process. It calls the
  exported SavedModel's signature itself, so the results are exactly what TF Serving serves.
- :func:`beam_batch_recommend`: the same job as an Apache Beam pipeline (RunInference with a
  model handler that loads the SavedModel once per worker process and is fed batches), for
  the DirectRunner locally and Dataflow, Flink or Spark at scale (``pip install
  tfrs-coldstart[beam]``).
- :func:`add_items`: new items are embedded by the run's item tower (the weights of the
  exported ``item_encoder``), the index is rebuilt over the whole catalogue (old + new) and
  a new version is published atomically by :func:`tfrs_coldstart.serving.export.export_run`.

Output rows never hold padding: a slot the index could not fill (catalogue smaller than
``k``) is dropped. Nothing is half-written: the local output goes to a temporary file that
is renamed at the end; a failed run leaves no output file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import tensorflow as tf

from tfrs_coldstart.data.schema import FeatureSpec, FeatureType, Schema
from tfrs_coldstart.data.sources import (
    TABLE_SUFFIXES,
    _feature_table,
    _normalise_feature,
    _normalise_ids,
    _read_table,
    _Source,
    _table_suffix,
)

__all__ = [
    "ADDED_ITEMS_DIR",
    "BatchError",
    "BatchSummary",
    "OUTPUT_SCHEMA",
    "ServedModel",
    "add_items",
    "add_items_main",
    "batch_main",
    "batch_recommend",
    "beam_batch_recommend",
    "resolve_version",
]

OUTPUT_SCHEMA = pa.schema([("user_id", pa.string()), ("rank", pa.int32()),
                           ("item_id", pa.string()), ("score", pa.float32())])
DEFAULT_CHUNK_ROWS = 50_000
DEFAULT_BATCH_SIZE = 1024
#: Per model name, the items added by :func:`add_items` up to each version
#: (``<base>/<name>/.added_items/<version>.parquet``; TF Serving ignores non-integer folders).
ADDED_ITEMS_DIR = ".added_items"
_ID = "user_id"
_BEAM_HINT = "install the extra: pip install 'tfrs-coldstart[beam]' (apache-beam)"


class BatchError(ValueError):
    """Batch retrieval or add-items cannot run; the message names the path and what to do."""


def _import_scann() -> None:
    """Register ScaNN's ops, which a ScaNN ``recommend`` model needs; harmless without ScaNN."""
    with contextlib.suppress(ImportError):
        import scann  # noqa: F401


# --------------------------------------------------------------------------------------------
# the exported model


def resolve_version(model_dir: str | os.PathLike[str]) -> tuple[str, str, int | None]:
    """``export/<name>`` (its highest integer version) or ``export/<name>/<version>`` ->
    ``(version folder, name, version)``. Works on local and remote (``gs://``) paths."""
    path = str(model_dir).rstrip("/") or "/"
    gfile = tf.io.gfile
    if gfile.exists(f"{path}/saved_model.pb"):
        base = os.path.basename(path)
        version = int(base) if base.isdigit() else None
        name = os.path.basename(os.path.dirname(path)) if version is not None else base
        return path, name, version
    if not gfile.isdir(path):
        raise BatchError(f"model path {path} does not exist; pass export/<name> (e.g. "
                         "export/student) or export/<name>/<version> as written by "
                         "`tfrs-coldstart export`")
    versions = sorted(int(d.rstrip("/")) for d in gfile.listdir(path)
                      if d.rstrip("/").isdigit()
                      and gfile.exists(f"{path}/{d.rstrip('/')}/saved_model.pb"))
    if not versions:
        raise BatchError(f"{path} holds no SavedModel version (no <integer>/saved_model.pb); "
                         "export a run there first with `tfrs-coldstart export RUN_DIR`")
    return f"{path}/{versions[-1]}", os.path.basename(path), versions[-1]


def _read_manifest(version_dir: str) -> dict[str, Any]:
    p = f"{version_dir}/manifest.json"
    if not tf.io.gfile.exists(p):
        return {}
    try:
        with tf.io.gfile.GFile(p) as f:
            return json.load(f)
    except (ValueError, OSError):
        return {}


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
        _import_scann()
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
        manifest = _read_manifest(path)
        schema = None
        if "schema" in manifest:
            with contextlib.suppress(ValueError):
                schema = Schema.from_dict(manifest["schema"], source=f"{path}/manifest.json")
        return cls(path, name, version, signature, specs, int(k) if k is not None else 0,
                   manifest, schema, fn, loaded)

    @property
    def required_columns(self) -> list[str]:
        """``user_id`` plus the signature's inputs: what a users table must hold."""
        return [_ID] + [n for n in self.specs if n != _ID]

    def feature_spec(self, name: str) -> FeatureSpec:
        """How one input column is normalised: the schema's spec, else one from the dtype."""
        if self.schema is not None and name in self.schema.names("user"):
            return self.schema.feature("user", name)
        s = self.specs[name]
        if s.dtype == tf.string:
            return FeatureSpec(name, FeatureType.CATEGORICAL)
        if s.shape.rank == 2:
            return FeatureSpec(name, FeatureType.DENSE_VECTOR, dim=int(s.shape[1]))
        return FeatureSpec(name, FeatureType.NUMERIC)

    def check_columns(self, columns: Iterable[str], where: str) -> None:
        have = set(columns)
        missing = [c for c in self.required_columns if c not in have]
        if missing:
            raise BatchError(
                f"{where}: missing column(s) {missing}; model {self.path} needs "
                f"{self.required_columns} (user_id plus the signature's inputs), the table has "
                f"{sorted(have)}. Add or rename the columns")

    def normalise(self, df: pd.DataFrame,
                  src: _Source | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Raw cells -> (user ids ``str[n]``, signature inputs), as the training data loader
        normalises them; a bad cell raises :class:`DataError` naming its row."""
        src = src or _Source("<DataFrame users>")
        df = df.reset_index(drop=True)
        ids = _normalise_ids(df[_ID], _ID, src)
        feats: dict[str, Any] = {}
        for name, s in self.specs.items():
            if name == _ID:
                feats[name] = ids
                continue
            spec = self.feature_spec(name)
            values = _normalise_feature(df[name], spec, src)
            if spec.type is FeatureType.DENSE_VECTOR:
                dim = int(s.shape[1]) if s.shape.rank == 2 else spec.dim
                values = (np.stack(values).astype(np.float32) if len(values)
                          else np.zeros((0, dim), np.float32))
            elif s.dtype != tf.string:
                values = np.asarray(values, dtype=np.float32)
            feats[name] = values
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


def _check_k(k: int | None, model: ServedModel) -> int:
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


def _rows_table(user_ids: np.ndarray, item_ids: np.ndarray, scores: np.ndarray,
                k: int) -> pa.Table:
    """One output row per (user, filled slot): ``user_id, rank (1 = best), item_id, score``."""
    n = len(user_ids)
    k = min(k, np.asarray(item_ids).shape[1]) if np.ndim(item_ids) == 2 else k
    ids = np.asarray(item_ids)[:, :k].ravel()
    sc = np.asarray(scores, np.float32)[:, :k].ravel()
    keep = np.array([len(v) > 0 for v in ids], dtype=bool) if len(ids) else np.zeros(0, bool)
    ranks = np.tile(np.arange(1, k + 1, dtype=np.int32), n)
    users = np.repeat(np.asarray(user_ids, dtype=object), k)
    item_arr = pa.array(ids[keep], type=pa.binary() if ids.dtype == object and len(ids) and
                        isinstance(ids[0], bytes) else pa.string()).cast(pa.string())
    return pa.Table.from_arrays(
        [pa.array(users[keep], type=pa.string()), pa.array(ranks[keep], type=pa.int32()),
         item_arr, pa.array(sc[keep], type=pa.float32())], schema=OUTPUT_SCHEMA)


# --------------------------------------------------------------------------------------------
# reading the users table in chunks


@dataclass(frozen=True)
class _ChunkSource(_Source):
    """Row references of a chunk as positions in the whole file."""

    offset: int = 0

    def row(self, pos: int) -> str:
        p = pos + self.offset
        text = f"row {p}"
        if self.line_offset is not None:
            text += f" (line {p + self.line_offset} of the file)"
        return text


@dataclass(frozen=True)
class _NamedSource(_Source):
    """Row references by user id (Beam batches have no file position)."""

    ids: tuple[str, ...] = ()

    def row(self, pos: int) -> str:
        if pos < len(self.ids) and self.ids[pos]:
            return f"the row of user_id {self.ids[pos]!r}"
        return "a row"


class _UsersReader:
    """Chunks of a CSV/TSV or Parquet users table (a file, or a folder of Parquet files)."""

    def __init__(self, path: str | os.PathLike[str], model: ServedModel, chunk_rows: int) -> None:
        self.path = Path(path)
        self.label = str(path)
        self.columns = model.required_columns
        self.chunk_rows = max(1, int(chunk_rows))
        self.total: int | None = None
        if not self.path.exists():
            raise BatchError(f"{self.label}: users file not found; pass a CSV/TSV or Parquet "
                             "file (or a folder of Parquet files)")
        suffix = "parquet" if self.path.is_dir() else _table_suffix(self.path)
        if suffix in (".csv", ".tsv"):
            self.kind = suffix[1:]
            self._check_csv(model)
        elif suffix in (".parquet", ".pq", "parquet"):
            self.kind = "parquet"
            self._check_parquet(model)
        else:
            raise BatchError(f"{self.label}: unknown file type {suffix or '(no extension)'!r} "
                             f"for the users table; accepted: {', '.join(TABLE_SUFFIXES)} "
                             "(CSV optionally compressed) or a folder of Parquet files")

    def _csv_kwargs(self) -> dict[str, Any]:
        return {"sep": "\t" if self.kind == "tsv" else ",", "dtype": str,
                "keep_default_na": False, "na_values": [""], "encoding": "utf-8"}

    def _check_csv(self, model: ServedModel) -> None:
        try:
            head = pd.read_csv(self.path, nrows=1, **self._csv_kwargs())
        except pd.errors.EmptyDataError:
            raise BatchError(f"{self.label}: the users file is empty (no header, no rows); it "
                             f"needs a header with {model.required_columns} and one row per "
                             "user") from None
        except (UnicodeDecodeError, pd.errors.ParserError, OSError) as e:
            raise BatchError(f"{self.label}: cannot read the users CSV ({type(e).__name__}: "
                             f"{e}); check the file") from None
        model.check_columns(head.columns, self.label)
        if len(head) == 0:
            raise BatchError(f"{self.label}: the users file has a header but no rows; give "
                             "one row per user")

    def _check_parquet(self, model: ServedModel) -> None:
        import pyarrow.dataset as pads

        try:
            self._dataset = pads.dataset(str(self.path), format="parquet")
            names = self._dataset.schema.names
            self.total = int(self._dataset.count_rows())
        except (pa.ArrowException, OSError, ValueError) as e:
            raise BatchError(f"{self.label}: cannot read the users Parquet ({type(e).__name__}: "
                             f"{e}); check the file") from None
        model.check_columns(names, self.label)
        if self.total == 0:
            raise BatchError(f"{self.label}: the users table has no rows; give one row per user")

    def source(self, offset: int) -> _Source:
        return _ChunkSource(self.label, line_offset=2 if self.kind != "parquet" else None,
                            offset=offset)

    def chunks(self) -> Iterator[tuple[int, pd.DataFrame]]:
        """``(row offset, DataFrame of at most chunk_rows rows)`` in file order."""
        offset = 0
        if self.kind != "parquet":
            reader = pd.read_csv(self.path, chunksize=self.chunk_rows, usecols=self.columns,
                                 **self._csv_kwargs())
            try:
                for df in reader:
                    yield offset, df.reset_index(drop=True)
                    offset += len(df)
            except (pd.errors.ParserError, UnicodeDecodeError) as e:
                raise BatchError(f"{self.label}: cannot read the users CSV after row {offset} "
                                 f"({type(e).__name__}: {e}); fix the file") from None
            finally:
                reader.close()
            return
        pending: list[pa.RecordBatch] = []
        size = 0
        for b in self._dataset.to_batches(columns=self.columns,
                                          batch_size=min(self.chunk_rows, 131_072)):
            pending.append(b)
            size += b.num_rows
            if size >= self.chunk_rows:
                df = pa.Table.from_batches(pending).to_pandas()
                yield offset, df
                offset += len(df)
                pending, size = [], 0
        if pending:
            yield offset, pa.Table.from_batches(pending).to_pandas()


# --------------------------------------------------------------------------------------------
# in-process batch retrieval


@dataclass(frozen=True)
class BatchSummary:
    """What a batch job wrote."""

    out_path: str
    model_path: str
    users: int
    rows: int
    k: int
    seconds: float

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")


def _tmp_path(out: Path) -> Path:
    return out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _check_out(out_path: str | os.PathLike[str]) -> Path:
    out = Path(out_path)
    if out.is_dir():
        raise BatchError(f"output {out} is a folder; pass a file path such as recs.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def batch_recommend(
    model_dir: str | os.PathLike[str],
    users_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    k: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    signature: str = "serving_default",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> BatchSummary:
    """Top-``k`` items for every row of a users table, written as Parquet.

    ``model_dir``: ``export/<name>`` (latest version) or ``export/<name>/<version>``;
    ``users_path``: CSV/TSV or Parquet (file or folder) with ``user_id`` and the model's
    user feature columns, read ``chunk_rows`` at a time; ``k``: default all the model
    returns (the export's ``--k``). Writes ``user_id, rank, item_id, score`` (rank 1 =
    best) to ``out_path`` through a temporary file renamed at the end. Users with unseen
    feature values go through the model's OOV buckets like any served request.
    """
    start = time.time()
    model = ServedModel.load(model_dir, signature)
    k = _check_k(k, model)
    reader = _UsersReader(users_path, model, chunk_rows)
    out = _check_out(out_path)
    tmp = _tmp_path(out)
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    users = rows = 0
    try:
        with pq.ParquetWriter(str(tmp), OUTPUT_SCHEMA) as writer, tqdm(
                total=reader.total, unit="user", desc=f"batch {model.name}",
                disable=not progress, file=sys.stderr) as bar:
            for offset, df in reader.chunks():
                ids, feats = model.normalise(df, reader.source(offset))
                item_ids, scores = model.recommend(feats, batch_size)
                table = _rows_table(ids, item_ids, scores, k)
                writer.write_table(table)
                users += len(ids)
                rows += table.num_rows
                bar.update(len(ids))
        if users == 0:
            raise BatchError(f"{reader.label}: the users table has no rows; give one row per "
                             "user")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BatchSummary(str(out), model.path, users, rows, k, time.time() - start)


# --------------------------------------------------------------------------------------------
# Apache Beam


def _beam() -> Any:
    try:
        import apache_beam as beam
    except ImportError:
        raise BatchError(f"the Beam runner needs Apache Beam: {_BEAM_HINT}") from None
    return beam


def _define_handler() -> type:
    """The RunInference model handler class, defined on first use so that importing this
    module (and the in-process path) never pays for importing Apache Beam."""
    _beam()
    from apache_beam.ml.inference.base import ModelHandler

    class RecommendHandler(ModelHandler):
        """Beam RunInference model handler for an exported ``recommend`` SavedModel.

        Examples are users table rows (``dict`` column -> value); each prediction is
        ``(user_id, item ids [k], scores [k])``. RunInference loads the model once per worker
        process (shared between its threads, :meth:`load_model`) and feeds it batches of rows
        (``beam.BatchElements`` with ``min_batch_size``/``max_batch_size``).
        """

        def __init__(self, model_dir: str, signature: str = "serving_default",
                     k: int | None = None, max_batch_size: int = DEFAULT_BATCH_SIZE,
                     min_batch_size: int = 1, label: str = "users") -> None:
            super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
            self.model_dir = str(model_dir)
            self.signature = signature
            self.k = k
            self.label = label

        def load_model(self) -> ServedModel:
            return ServedModel.load(self.model_dir, self.signature)

        def run_inference(self, batch: Sequence[dict[str, Any]], model: ServedModel,
                          inference_args: dict[str, Any] | None = None
                          ) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
            df = pd.DataFrame(list(batch), columns=model.required_columns)
            ids_guess = tuple(str(v) for v in df[_ID].tolist())
            ids, feats = model.normalise(df, _NamedSource(self.label, ids=ids_guess))
            item_ids, scores = model.recommend(feats, max(1, len(df)))
            k = self.k or model.k
            return [(str(u), item_ids[j, :k], scores[j, :k]) for j, u in enumerate(ids)]

        def get_num_bytes(self, batch: Sequence[dict[str, Any]]) -> int:
            return sum(len(str(row)) for row in batch)

        def get_metrics_namespace(self) -> str:
            return "tfrs_coldstart_batch"

    # Importable as <this module>.RecommendHandler, so workers unpickle it by reference.
    RecommendHandler.__module__ = __name__
    RecommendHandler.__qualname__ = "RecommendHandler"
    return RecommendHandler


def _handler_class() -> type:
    cls = globals().get("RecommendHandler")
    return cls if cls is not None else __getattr__("RecommendHandler")


def __getattr__(name: str) -> Any:
    if name == "RecommendHandler":
        cls = _define_handler()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _output_rows(pred: Any) -> Iterator[dict[str, Any]]:
    """One prediction ``(user_id, ids, scores)`` -> output rows (padding slots dropped)."""
    user, ids, scores = getattr(pred, "inference", pred)
    for r, (i, s) in enumerate(zip(ids, scores, strict=True), start=1):
        item = i.decode("utf-8") if isinstance(i, bytes) else str(i)
        if item:
            yield {"user_id": user, "rank": r, "item_id": item, "score": float(s)}


def _csv_rows(readable: Any, columns: list[str], chunk_rows: int,
              sep: str) -> Iterator[dict[str, Any]]:
    with readable.open() as f:
        for df in pd.read_csv(f, chunksize=chunk_rows, usecols=columns, sep=sep, dtype=str,
                              keep_default_na=False, na_values=[""], encoding="utf-8"):
            yield from df.to_dict("records")


def _pipeline_options(options: Any) -> Any:
    from apache_beam.options.pipeline_options import PipelineOptions

    if options is None:
        return PipelineOptions([])
    if isinstance(options, PipelineOptions):
        return options
    if isinstance(options, dict):
        return PipelineOptions(**options)
    return PipelineOptions(list(options))


def _check_remote_users(path: str, model: ServedModel) -> str:
    """Column and emptiness checks of a users file pattern before the pipeline starts."""
    from apache_beam.io.filesystems import FileSystems

    try:
        matches = FileSystems.match([path])[0].metadata_list
    except Exception as e:  # Beam's filesystems raise their own error classes
        raise BatchError(f"{path}: cannot list the users files ({e})") from None
    if not matches:
        raise BatchError(f"{path}: users file not found; pass a CSV/TSV or Parquet file or a "
                         "glob pattern matching some")
    first = matches[0].path
    suffix = _table_suffix(Path(first))
    if suffix not in (".csv", ".tsv", ".parquet", ".pq"):
        raise BatchError(f"{first}: unknown file type {suffix!r} for the users table; "
                         "accepted: .csv, .tsv, .parquet")
    if all(m.size_in_bytes == 0 for m in matches):
        raise BatchError(f"{path}: the users file is empty; it needs a header and one row per "
                         "user")
    with FileSystems.open(first) as f:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(f).metadata
            model.check_columns(meta.schema.names, first)
            if sum(pq.ParquetFile(FileSystems.open(m.path)).metadata.num_rows
                   for m in matches) == 0:
                raise BatchError(f"{path}: the users table has no rows")
            return "parquet"
        try:
            head = pd.read_csv(f, nrows=1, dtype=str, sep="\t" if suffix == ".tsv" else ",")
        except pd.errors.EmptyDataError:
            raise BatchError(f"{first}: the users file is empty (no header, no rows)") from None
        model.check_columns(head.columns, first)
        if len(head) == 0 and len(matches) == 1:
            raise BatchError(f"{first}: the users file has a header but no rows")
    return suffix[1:]


def beam_batch_recommend(
    model_dir: str | os.PathLike[str],
    users_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    k: int | None = None,
    pipeline_options: Any = None,
    signature: str = "serving_default",
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_shards: int = 1,
    chunk_rows: int = 10_000,
) -> list[str]:
    """:func:`batch_recommend` as an Apache Beam pipeline; returns the written file(s).

    ``users_path`` may be a glob and remote (``gs://``...) like ``model_dir``;
    ``pipeline_options``: ``None`` (DirectRunner), a list of command-line flags
    (``["--runner=DataflowRunner", "--project=...", ...]``), a dict or a
    ``PipelineOptions``. ``num_shards=1`` writes exactly ``out_path``; otherwise
    ``out_path`` (minus ``.parquet``) is the prefix of ``-SSSSS-of-NNNNN.parquet`` shards
    (``0``: the runner decides). Beam writes to a temporary folder and renames on success,
    so a failed pipeline leaves no output file.
    """
    beam = _beam()
    from apache_beam.io import fileio
    from apache_beam.ml.inference.base import RunInference

    model = ServedModel.load(model_dir, signature)  # fail fast, before any worker starts
    k = _check_k(k, model)
    users = str(users_path)
    kind = _check_remote_users(users, model)
    out = str(out_path)
    local = "://" not in out
    if local:
        _check_out(out)
    if num_shards == 1:
        prefix, suffix, template = out, "", ""
    else:
        prefix = out[:-len(".parquet")] if out.endswith(".parquet") else out
        suffix, template = ".parquet", None
    before = set(_beam_temp_dirs(out)) if local else set()
    handler = _handler_class()(model.path, signature, k, max_batch_size=batch_size,
                               label=users)
    columns = model.required_columns
    try:
        with beam.Pipeline(options=_pipeline_options(pipeline_options)) as p:
            if kind == "parquet":
                rows = p | "ReadUsers" >> beam.io.ReadFromParquet(users, columns=columns)
            else:
                sep = "\t" if kind == "tsv" else ","
                rows = (p | "MatchUsers" >> fileio.MatchFiles(users)
                        | "OpenUsers" >> fileio.ReadMatches()
                        | "ReadUsers" >> beam.FlatMap(_csv_rows, columns, chunk_rows, sep))
            _ = (rows
                 | "Recommend" >> RunInference(handler)
                 | "ToRows" >> beam.FlatMap(_output_rows)
                 | "Write" >> beam.io.WriteToParquet(
                     prefix, schema=OUTPUT_SCHEMA, file_name_suffix=suffix,
                     num_shards=max(0, int(num_shards)), shard_name_template=template))
    except BaseException:
        if local:
            import shutil

            for d in set(_beam_temp_dirs(out)) - before:
                shutil.rmtree(d, ignore_errors=True)
        raise
    if num_shards == 1:
        return [out]
    return sorted(tf.io.gfile.glob(f"{prefix}-*-of-*{suffix}"))


def _beam_temp_dirs(out: str) -> list[str]:
    parent = Path(out).parent
    return [str(p) for p in parent.glob("beam-temp-*")] if parent.is_dir() else []


# --------------------------------------------------------------------------------------------
# new items without retraining


def _read_items(items: Any, schema: Schema) -> pd.DataFrame:
    """A new-items table (path or DataFrame), validated like the training items table."""
    df, src = _read_table(items, "items")
    return _feature_table(df, src, "item", schema.side("item"))


def _added_items_path(model_root: Path, version: int) -> Path:
    return model_root / ADDED_ITEMS_DIR / f"{version}.parquet"


def add_items(
    model_dir: str | os.PathLike[str],
    items: Any,
    base_dir: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    version: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Add new items to an exported ``recommend`` model and publish a new version.

    ``model_dir``: ``export/<name>`` (latest version) or ``export/<name>/<version>``;
    ``items``: a CSV/TSV/Parquet path or DataFrame with ``item_id`` and the schema's item
    features (validated like the training items; ids already in the catalogue are an error).
    The new version's catalogue = the run's items + every item added to ``model_dir``'s
    version before + ``items``; it is embedded by the run's item tower (the weights of the
    exported item encoder), indexed (same index kind, ``k`` and recall gate) and published
    as ``<base_dir>/<name>/<version>`` (default: beside ``model_dir``, next free version).
    Needs the run folder that trained the export (``run_dir``; default: the manifest's).
    Returns the :class:`tfrs_coldstart.serving.export.ExportedModel`.
    """
    from tfrs_coldstart import training as train
    from tfrs_coldstart.data.sources import Dataset
    from tfrs_coldstart.serving.export import existing_versions, export_run

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if "://" in str(model_dir):
        raise BatchError("add-items publishes next to the model: pass a local model path")
    path, name, src_version = resolve_version(model_dir)
    manifest = _read_manifest(path)
    if manifest.get("kind") != "recommend" or "model" not in manifest:
        raise BatchError(f"{path} is not a `recommend` export of this project (its "
                         "manifest.json is missing or of another kind); pass export/student "
                         "or export/teacher")
    run = Path(run_dir if run_dir is not None else manifest.get("run_dir", ""))
    if not (run / "config.yaml").is_file():
        raise BatchError(f"the run folder {run} that trained {path} is not there (no "
                         "config.yaml); pass the run folder with --run-dir")
    which = str(manifest["model"])
    cfg = train.load_run_config(run)
    schema = train.load_schema(run)
    new = _read_items(items, schema)
    label = items if isinstance(items, (str, os.PathLike)) else "<DataFrame items>"
    log(f"loading the catalogue of {run} ...")
    data = train.load_data(cfg)
    src_root = Path(path).parent
    before: list[pd.DataFrame] = [data.items]
    prev = _added_items_path(src_root, src_version) if src_version is not None else None
    if prev is not None and prev.is_file():
        before.append(_read_items(prev, schema))
    catalogue = pd.concat(before, ignore_index=True)
    known = set(catalogue["item_id"].astype(str))
    dup = new["item_id"].astype(str).isin(known).to_numpy()
    if dup.any():
        pos = int(np.argmax(dup))
        raise BatchError(f"{label}: column 'item_id', row {pos}: item "
                         f"{new['item_id'].iloc[pos]!r} is already in the catalogue of {path} "
                         f"({int(dup.sum())} such item(s)); give new items new ids")
    added = pd.concat(before[1:] + [new], ignore_index=True)
    dataset = Dataset(data.name, data.interactions, data.users,
                      pd.concat([catalogue, new], ignore_index=True), data.schema)
    base = Path(base_dir) if base_dir is not None else src_root.parent
    target = base / name
    if version is None:
        version = 1 + max(existing_versions(target), default=0)
    record = _added_items_path(target, int(version))
    if record.exists() or (target / str(version)).exists():
        raise BatchError(f"version {version} of {target} already exists; versions are never "
                         "overwritten: pass another version or omit it")
    gate = (manifest.get("ann_recall") or {}).get("gate")
    params = manifest.get("index_params") or {}
    scann = {key: params[key] for key in params.get("overridden", []) if key in params}
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(record)
    try:
        added.to_parquet(tmp, index=False)
        os.replace(tmp, record)
        log(f"adding {len(new)} item(s) to {name}: catalogue {len(catalogue)} -> "
            f"{len(dataset.items)} ...")
        out = export_run(run, base, models=(which,), index=manifest.get("index"),
                         k=manifest.get("k_requested", manifest.get("k")), version=int(version),
                         names={which: name}, ann_recall_gate=gate, scann=scann or None,
                         item_encoder=False, dataset=dataset, log=log)
    except BaseException:
        tmp.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            record.parent.rmdir()
        raise
    return out[0]


# --------------------------------------------------------------------------------------------
# command line


def batch_main(argv: Sequence[str] | None = None) -> int:
    """``tfrs-coldstart batch --model export/student --users users.parquet --out recs.parquet``."""
    p = argparse.ArgumentParser(
        prog="tfrs-coldstart batch",
        description="top-k items for every user of a table, with an exported recommend model")
    p.add_argument("--model", required=True,
                   help="export/<name> (latest version) or export/<name>/<version>")
    p.add_argument("--users", required=True,
                   help="users table: CSV/TSV or Parquet with user_id and the user features")
    p.add_argument("--out", required=True, help="output Parquet (user_id, rank, item_id, score)")
    p.add_argument("--k", type=int, default=None,
                   help="results per user (default: all the model returns, its export --k)")
    p.add_argument("--runner", choices=("direct", "beam"), default="direct",
                   help="direct: in this process (default); beam: an Apache Beam pipeline "
                        "(DirectRunner unless --beam-option=--runner=...)")
    p.add_argument("--beam-option", action="append", default=[], metavar="FLAG",
                   help="a Beam pipeline option, e.g. --beam-option=--runner=DataflowRunner "
                        "(repeatable)")
    p.add_argument("--num-shards", type=int, default=1,
                   help="Beam output shards (1: exactly --out; 0: the runner decides)")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                   help="users read per chunk (bounds memory)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="users per model call")
    p.add_argument("--signature", default="serving_default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        if a.runner == "beam":
            start = time.time()
            files = beam_batch_recommend(a.model, a.users, a.out, a.k, a.beam_option or None,
                                         a.signature, a.batch_size, a.num_shards)
            print(f"wrote {', '.join(files)} ({time.time() - start:.1f} s, Beam)")
            return 0
        if a.beam_option:
            raise BatchError("--beam-option needs --runner beam")
        s = batch_recommend(a.model, a.users, a.out, a.k, a.chunk_rows, a.signature,
                            a.batch_size, progress=not a.no_progress)
        print(f"wrote {s.out_path}: {s.users} users, {s.rows} rows (k={s.k}) in "
              f"{s.seconds:.1f} s ({s.users_per_second:.0f} users/s) with {s.model_path}")
        return 0

    from tfrs_coldstart.serving.export import _run_cli

    return _run_cli(run, p, argv)


def add_items_main(argv: Sequence[str] | None = None) -> int:
    """``tfrs-coldstart add-items --model export/student items.csv``."""
    p = argparse.ArgumentParser(
        prog="tfrs-coldstart add-items",
        description="embed new items, rebuild the index over the whole catalogue and publish "
                    "a new version (no retraining)")
    p.add_argument("items", help="new items: CSV/TSV or Parquet with item_id and the item "
                                 "features")
    p.add_argument("--model", required=True,
                   help="export/<name> (latest version) or export/<name>/<version>")
    p.add_argument("--run-dir", default=None,
                   help="the run folder that trained the export (default: the manifest's)")
    p.add_argument("--base-dir", default=None,
                   help="publish under BASE/<name>/<version> (default: beside --model)")
    p.add_argument("--version", type=int, default=None, help="new version (default: next)")

    def run(a: argparse.Namespace) -> int:
        m = add_items(a.model, a.items, a.base_dir, a.run_dir, a.version)
        print(f"{m.name:<16} v{m.version}  {m.path}  catalogue "
              f"{m.manifest.get('catalogue_size')} items")
        return 0

    from tfrs_coldstart.serving.export import _run_cli

    return _run_cli(run, p, argv)


if __name__ == "__main__":
    sys.exit(batch_main())
