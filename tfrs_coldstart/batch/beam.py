"""Batch retrieval as an Apache Beam pipeline: the DirectRunner locally, Dataflow, Flink or
Spark at scale (``pip install 'tfrs-coldstart[beam]'``).

RunInference with :class:`RecommendHandler`, a model handler that loads the SavedModel once
per worker process and is fed batches of users-table rows. Apache Beam is an optional extra:
it is imported on first use, so importing this module (and the in-process runner) never
needs it. ``RecommendHandler`` is defined on first access but importable by reference as
``tfrs_coldstart.batch.beam.RecommendHandler``, which is how workers unpickle it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import tensorflow as tf

from tfrs_coldstart.batch.model import (
    DEFAULT_BATCH_SIZE,
    OUTPUT_SCHEMA,
    USER_ID,
    BatchError,
    ServedModel,
    check_batch_size,
    check_k,
    check_out_path,
)
from tfrs_coldstart.data.tables import TableSource, table_suffix

__all__ = ["beam_batch_recommend"]  # and RecommendHandler, defined on first access

_BEAM_HINT = "install the extra: pip install 'tfrs-coldstart[beam]' (apache-beam)"


@dataclass(frozen=True)
class _NamedSource(TableSource):
    """Row references by user id (Beam batches have no file position)."""

    ids: tuple[str, ...] = ()

    def row(self, pos: int) -> str:
        if pos < len(self.ids) and self.ids[pos]:
            return f"the row of user_id {self.ids[pos]!r}"
        return "a row"


def _beam() -> Any:
    try:
        import apache_beam as beam  # optional extra [beam]: imported on first use
    except ImportError:
        raise BatchError(f"the Beam runner needs Apache Beam: {_BEAM_HINT}") from None
    return beam


def _define_handler() -> type:
    """The RunInference model handler class, defined on first use so that importing this
    module (and the in-process path) never pays for importing Apache Beam."""
    _beam()
    from apache_beam.ml.inference.base import ModelHandler  # optional extra [beam]

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
            ids_guess = tuple(str(v) for v in df[USER_ID].tolist())
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
    from apache_beam.options.pipeline_options import PipelineOptions  # optional extra [beam]

    if options is None:
        return PipelineOptions([])
    if isinstance(options, PipelineOptions):
        return options
    if isinstance(options, dict):
        return PipelineOptions(**options)
    return PipelineOptions(list(options))


def _check_remote_users(path: str, model: ServedModel) -> str:
    """Column and emptiness checks of a users file pattern before the pipeline starts."""
    from apache_beam.io.filesystems import FileSystems  # optional extra [beam]

    try:
        matches = FileSystems.match([path])[0].metadata_list
    except Exception as e:  # Beam's filesystems raise their own error classes
        raise BatchError(f"{path}: cannot list the users files ({e})") from None
    if not matches:
        raise BatchError(f"{path}: users file not found; pass a CSV/TSV or Parquet file or a "
                         "glob pattern matching some")
    first = matches[0].path
    suffix = table_suffix(Path(first))
    if suffix not in (".csv", ".tsv", ".parquet", ".pq"):
        raise BatchError(f"{first}: unknown file type {suffix!r} for the users table; "
                         "accepted: .csv, .tsv, .parquet")
    if all(m.size_in_bytes == 0 for m in matches):
        raise BatchError(f"{path}: the users file is empty; it needs a header and one row per "
                         "user")
    with FileSystems.open(first) as f:
        if suffix in (".parquet", ".pq"):
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
    """:func:`~tfrs_coldstart.batch.local.batch_recommend` as an Apache Beam pipeline;
    returns the written file(s).

    ``users_path`` may be a glob and remote (``gs://``...) like ``model_dir``;
    ``pipeline_options``: ``None`` (DirectRunner), a list of command-line flags
    (``["--runner=DataflowRunner", "--project=...", ...]``), a dict or a
    ``PipelineOptions``. ``num_shards=1`` writes exactly ``out_path``; otherwise
    ``out_path`` (minus ``.parquet``) is the prefix of ``-SSSSS-of-NNNNN.parquet`` shards
    (``0``: the runner decides). Beam writes to a temporary folder and renames on success,
    so a failed pipeline leaves no output file.
    """
    beam = _beam()
    from apache_beam.io import fileio  # optional extra [beam]
    from apache_beam.ml.inference.base import RunInference  # optional extra [beam]

    check_batch_size(batch_size)
    check_batch_size(chunk_rows, "chunk rows")
    model = ServedModel.load(model_dir, signature)  # fail fast, before any worker starts
    k = check_k(k, model)
    users = str(users_path)
    kind = _check_remote_users(users, model)
    out = str(out_path)
    local = "://" not in out
    if local:
        check_out_path(out)
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
            for d in set(_beam_temp_dirs(out)) - before:
                shutil.rmtree(d, ignore_errors=True)
        raise
    if num_shards == 1:
        return [out]
    return sorted(tf.io.gfile.glob(f"{prefix}-*-of-*{suffix}"))


def _beam_temp_dirs(out: str) -> list[str]:
    parent = Path(out).parent
    return [str(p) for p in parent.glob("beam-temp-*")] if parent.is_dir() else []
