"""Batch retrieval as an Apache Beam pipeline: the DirectRunner locally, Dataflow, Flink or
Spark at scale (``pip install 'tfrs-coldstart[beam]'``).

RunInference with :class:`RecommendHandler`, a model handler that loads the SavedModel once
per worker process and is fed batches of users-table rows. Apache Beam is an optional extra:
it is imported on first use, so importing this module (and the in-process runner) never
needs it. ``RecommendHandler`` is defined on first access but importable by reference as
``tfrs_coldstart.batch.beam.RecommendHandler``, which is how workers unpickle it.

The input is checked as the in-process path checks it (:mod:`.reader`): a CSV row with more
or fewer fields than its header, or a ``user_id`` on two rows, fails the job naming the file
and row, before the model sees any row (the id check is a ``CombinePerKey`` whose result
gates the rows as a side input). A :class:`~tfrs_coldstart.errors.UserError` raised inside
the pipeline comes out of :func:`beam_batch_recommend` as itself (one ``error:`` line in the
CLI), not wrapped by the runner. A local output is written under a hidden name carrying the
writer's pid and renamed at the end, so a killed job's leftovers are recognised and removed
by the next job (``local._remove_orphans``).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import tensorflow as tf

from tfrs_coldstart.batch.local import _remove_orphans, _tmp_path, recommend_rows
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
from tfrs_coldstart.data.schema import DataError
from tfrs_coldstart.data.tables import TableSource, table_suffix
from tfrs_coldstart.errors import UserError

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
                     min_batch_size: int = 1, label: str = "users",
                     columns: Sequence[str] | None = None) -> None:
            super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
            self.model_dir = str(model_dir)
            self.columns = list(columns) if columns is not None else None
            self.signature = signature
            self.k = k
            self.label = label

        def load_model(self) -> ServedModel:
            return ServedModel.load(self.model_dir, self.signature)

        def run_inference(self, batch: Sequence[dict[str, Any]], model: ServedModel,
                          inference_args: dict[str, Any] | None = None
                          ) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
            df = pd.DataFrame(list(batch), columns=self.columns or model.required_columns)
            ids_guess = tuple(str(v) for v in df[USER_ID].tolist())
            ids, feats = model.normalise(df, _NamedSource(self.label, ids=ids_guess))
            item_ids, scores = recommend_rows(model, feats, max(1, len(df)))
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


#: A row on its way to the model: ``(user_id as text, (file, row in the file or -1), cells)``.
Located = tuple[str, tuple[str, int], dict[str, Any]]


def _csv_rows(readable: Any, columns: list[str], sep: str,
              names: dict[str, str]) -> Iterator[Located]:
    """One CSV/TSV file's rows, checked as the in-process reader checks them
    (``reader.UsersReader._check_csv_rows``): the header holds the model's columns and every
    row has the header's number of fields (pandas would pad a short row with empty cells and,
    reading only the model's columns, drop a long row's extra fields). Cells stay text; an
    empty cell is NaN, as pandas reads it (``na_values=[""]``). Blank lines are skipped and
    not counted, as pandas skips them."""
    path = readable.metadata.path
    label = names.get(path, path)
    with readable.open() as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        rows = csv.reader(text, delimiter=sep)
        try:
            header = next(rows, None)
            if not header:
                raise BatchError(f"{label}: the users file is empty (no header, no rows); it "
                                 f"needs a header with {columns} and one row per user")
            missing = [c for c in columns if c not in header]
            if missing:
                raise BatchError(f"{label}: missing column(s) {missing}; the model needs "
                                 f"{columns} (user_id plus the signature's inputs), the header "
                                 f"has {header}. Add or rename the columns")
            at = [header.index(c) for c in columns]
            key = header.index(USER_ID)
            row = 0
            for fields in rows:
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise BatchError(
                        f"{label}: line {rows.line_num} (row {row}) has {len(fields)} field(s), "
                        f"the header {len(header)}; fix the row (a stray separator or a missing "
                        "cell?)")
                yield (fields[key], (path, row),
                       {c: (fields[i] if fields[i] != "" else np.nan)
                        for c, i in zip(columns, at, strict=True)})
                row += 1
        except (csv.Error, UnicodeDecodeError) as e:
            raise BatchError(f"{label}: cannot read the users CSV ({type(e).__name__}: {e}); "
                             "check the file") from None


def _parquet_row(item: tuple[str, dict[str, Any]]) -> Located:
    """``ReadAllFromParquet(with_filename=True)`` gives no row position (files are split
    across workers); a repeated id's rows are looked up when it is reported."""
    path, cells = item
    return str(cells[USER_ID]), (path, -1), cells


def _id_place(row: Located) -> tuple[str, tuple[int, tuple[tuple[str, int], ...]]]:
    return row[0], (1, (row[1],))


def _merge_places(parts: Iterable[tuple[int, tuple[tuple[str, int], ...]]]
                  ) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Per user id: how many rows hold it and the first two places (file, row). Associative
    and commutative, with bounded state, so Beam combines it before and after the shuffle."""
    count, places = 0, []
    for n, ps in parts:
        count += n
        places.extend(ps)
    return count, tuple(sorted(places)[:2])


def _repeated(item: tuple[str, tuple[int, tuple[tuple[str, int], ...]]]
              ) -> Iterator[tuple[tuple[tuple[str, int], ...], str]]:
    uid, (count, places) = item
    if count > 1:
        yield places, uid


def _first_repeated(found: Iterable[Any]) -> Any:
    """The repeated id whose first row comes first (files in name order), or None."""
    found = [f for f in found if f is not None]
    return min(found) if found else None


def _one_row_per_user(row: Located, repeated: Any, names: dict[str, str],
                      pattern: str) -> dict[str, Any]:
    """Gate before the model: with a repeated id anywhere in the input, every row fails (the
    first one ends the job), so nothing is computed or written for a table the in-process
    path refuses."""
    if repeated is not None:
        raise _repeated_id_error(repeated, names, pattern)
    return row[2]


def _repeated_id_error(repeated: tuple[tuple[tuple[str, int], ...], str],
                       names: dict[str, str], pattern: str) -> BatchError:
    """The in-process reader's message (``reader._IdChecker``): the id and its two first rows;
    Parquet rows are found again by reading the files' ``user_id`` column."""
    places, uid = repeated
    if any(r < 0 for _, r in places):
        places = _parquet_places(sorted({f for f, _ in places}), uid)
    (fa, ra), (fb, rb) = (list(places) + [places[-1]])[:2]
    name = lambda f: names.get(f, f)  # noqa: E731
    if fa == fb:
        return BatchError(f"{name(fa)}: user_id {uid!r} appears twice (rows {ra} and {rb}); "
                          "give one row per user")
    return BatchError(f"{pattern}: user_id {uid!r} appears twice ({name(fa)} row {ra} and "
                      f"{name(fb)} row {rb}); give one row per user")


def _parquet_places(files: list[str], uid: str) -> list[tuple[str, int]]:
    """The first two (file, row) holding ``uid``, reading only the ``user_id`` column."""
    from apache_beam.io.filesystems import FileSystems  # optional extra [beam]

    places: list[tuple[str, int]] = []
    for path in files:
        with FileSystems.open(path) as f:
            pos = 0
            for b in pq.ParquetFile(f).iter_batches(columns=[USER_ID], batch_size=131_072):
                col = b.column(0).to_pandas().astype(str).to_numpy(object)
                places += [(path, pos + int(i)) for i in np.flatnonzero(col == uid)[:2]]
                pos += len(col)
                if len(places) >= 2:
                    return places[:2]
    return places or [(f, -1) for f in files]


_RUNNING = re.compile(r"(?: \[while running '[^']*'\])+$")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(BatchError|DataError|UserError): (.+)$", re.M)
_ERROR_NAME = re.compile(r"\b(?:BatchError|DataError|UserError): ")


def _user_error(exc: BaseException | None) -> UserError | None:
    """The project's error a runner raised for a failed pipeline, as a new exception of the
    same type with the original message, or None when it is not one (a bug or a runner error
    keeps its traceback).

    The DirectRunner re-raises a DoFn's exception as the same type with `` [while running
    'Step']`` appended (the original as its cause); runners that run workers elsewhere
    (multi-process DirectRunner, Dataflow) send the worker's traceback as text, whose last
    ``...BatchError: message`` line is taken.
    """
    found, seen, e = None, set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            found = e  # the innermost one holds the original message
        e = e.__cause__ or e.__context__
    if found is not None:
        message = _RUNNING.sub("", str(found))
        try:
            return type(found)(message)
        except Exception:  # noqa: BLE001 - a subclass with another constructor
            return BatchError(message)
    lines = _ERROR_LINE.findall(str(exc)) if exc is not None else []
    if lines:
        kind, message = lines[-1]
        cls = {"BatchError": BatchError, "DataError": DataError}.get(kind, BatchError)
        return cls(_RUNNING.sub("", message.strip()))
    return None


class _QuietUserErrors(logging.Filter):
    """Beam logs a failing DoFn's traceback before re-raising it (in this process, or as the
    text a worker process sent); for a user's error the CLI's one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return _user_error(exc) is None
        return _ERROR_NAME.search(record.getMessage()) is None


@contextlib.contextmanager
def _quiet_user_errors() -> Iterator[None]:
    quiet = _QuietUserErrors()
    loggers = [logging.getLogger(n) for n in (
        "apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker",
        "apache_beam.runners.portability.local_job_service")]
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


def _pipeline_options(options: Any) -> Any:
    from apache_beam.options.pipeline_options import PipelineOptions  # optional extra [beam]

    if options is None:
        return PipelineOptions([])
    if isinstance(options, PipelineOptions):
        return options
    if isinstance(options, dict):
        return PipelineOptions(**options)
    return PipelineOptions(list(options))


def _check_remote_users(path: str, model: ServedModel) -> tuple[str, list[str], list[str]]:
    """Column and emptiness checks of a users file pattern before the pipeline starts;
    ``(kind, matched files, columns to read)``: the model's inputs plus its optional
    ``history`` when the first file has that column (then every file must have it)."""
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
            columns = model.columns_in(meta.schema.names)
            if sum(pq.ParquetFile(FileSystems.open(m.path)).metadata.num_rows
                   for m in matches) == 0:
                raise BatchError(f"{path}: the users table has no rows")
            return "parquet", [m.path for m in matches], columns
        try:
            head = pd.read_csv(f, nrows=1, dtype=str, sep="\t" if suffix == ".tsv" else ",")
        except pd.errors.EmptyDataError:
            raise BatchError(f"{first}: the users file is empty (no header, no rows)") from None
        model.check_columns(head.columns, first)
        columns = model.columns_in(head.columns)
        if len(head) == 0 and len(matches) == 1:
            raise BatchError(f"{first}: the users file has a header but no rows")
    return suffix[1:], [m.path for m in matches], columns


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
    (``0``: the runner decides). A failed pipeline leaves no output file: a local output is
    written under a hidden temporary name and renamed on success (a remote one through
    Beam's own temporary folder). Ragged CSV rows and repeated ``user_id`` s fail the job
    before the model runs, as in the in-process path; a :class:`UserError` raised in the
    pipeline is raised here as itself. ``chunk_rows`` is checked for the in-process path's
    sake; CSV rows stream one at a time here.
    """
    beam = _beam()
    from apache_beam.io import fileio  # optional extra [beam]
    from apache_beam.ml.inference.base import RunInference  # optional extra [beam]

    check_batch_size(batch_size)
    check_batch_size(chunk_rows, "chunk rows")
    model = ServedModel.load(model_dir, signature)  # fail fast, before any worker starts
    k = check_k(k, model)
    users = str(users_path)
    kind, matched, columns = _check_remote_users(users, model)
    # Errors name a single input file as the user named it.
    names = {matched[0]: users} if len(matched) == 1 else {}
    out = str(out_path)
    local = "://" not in out
    if num_shards == 1:
        prefix, suffix, template = out, "", ""
    else:
        prefix = out[:-len(".parquet")] if out.endswith(".parquet") else out
        suffix, template = ".parquet", None
    tmp: Path | None = None
    write_prefix = prefix
    if local:
        final = check_out_path(out).parent / Path(prefix).name
        _remove_orphans(final)  # what killed jobs left for this output
        tmp = _tmp_path(final)
        write_prefix = str(tmp)
    handler = _handler_class()(model.path, signature, k, max_batch_size=batch_size,
                               label=users, columns=columns)
    try:
        with _quiet_user_errors(), beam.Pipeline(
                options=_pipeline_options(pipeline_options)) as p:
            if kind == "parquet":
                rows = (p | "UsersFiles" >> beam.Create([users])
                        | "ReadUsers" >> beam.io.ReadAllFromParquet(columns=columns,
                                                                    with_filename=True)
                        | "Locate" >> beam.Map(_parquet_row))
            else:
                sep = "\t" if kind == "tsv" else ","
                rows = (p | "MatchUsers" >> fileio.MatchFiles(users)
                        | "OpenUsers" >> fileio.ReadMatches()
                        | "ReadUsers" >> beam.FlatMap(_csv_rows, columns, sep, names))
            repeated = (rows
                        | "UserIds" >> beam.Map(_id_place)
                        | "CountIds" >> beam.CombinePerKey(_merge_places)
                        | "Repeated" >> beam.FlatMap(_repeated)
                        | "FirstRepeated" >> beam.CombineGlobally(_first_repeated))
            _ = (rows
                 | "OneRowPerUser" >> beam.Map(_one_row_per_user,
                                               beam.pvalue.AsSingleton(repeated), names, users)
                 | "Recommend" >> RunInference(handler)
                 | "ToRows" >> beam.FlatMap(_output_rows)
                 | "Write" >> beam.io.WriteToParquet(
                     write_prefix, schema=OUTPUT_SCHEMA, file_name_suffix=suffix,
                     num_shards=max(0, int(num_shards)), shard_name_template=template))
        if tmp is None:
            return ([out] if num_shards == 1
                    else sorted(tf.io.gfile.glob(f"{prefix}-*-of-*{suffix}")))
        if num_shards == 1:
            os.replace(tmp, out)
            return [out]
        written = []
        for shard in sorted(tmp.parent.glob(f"{glob.escape(tmp.name)}-*-of-*{suffix}")):
            dst = f"{prefix}{shard.name[len(tmp.name):]}"
            os.replace(shard, dst)
            written.append(dst)
        return written
    except BaseException as exc:
        if tmp is not None:
            _remove_temporaries(tmp)
        err = _user_error(exc) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from None
        raise


def _remove_temporaries(tmp: Path) -> None:
    """This job's temporary output, shards and Beam temporary folder (a failed job)."""
    tmp.unlink(missing_ok=True)
    name = glob.escape(tmp.name)
    for p in [*tmp.parent.glob(f"{name}-*"), *tmp.parent.glob(f"beam-temp-{name}-*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
