"""A users table read in chunks, so batch retrieval's memory stays bounded at any size.

CSV/TSV (read as text, so ids such as ``u007`` keep their form) or Parquet (a file or a
folder of files). The header, the model's required columns and emptiness are checked
before any output is written; a bad cell found later names its row in the whole file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
from pandas.io.common import get_handle

from tfrs_coldstart.batch.model import BatchError, ServedModel
from tfrs_coldstart.data.tables import TABLE_SUFFIXES, TableSource, table_suffix

__all__ = ["UsersReader"]


@dataclass(frozen=True)
class _ChunkSource(TableSource):
    """Row references of a chunk as positions in the whole file."""

    offset: int = 0

    def row(self, pos: int) -> str:
        p = pos + self.offset
        text = f"row {p}"
        if self.line_offset is not None:
            text += f" (line {p + self.line_offset} of the file)"
        return text


class _IdChecker:
    """Finds a repeated ``user_id`` in one pass with bounded memory: 8 bytes per row (a
    64-bit hash of each id), sorted at the end; a hash match is confirmed on the ids
    themselves (re-read for those rows only) before it is reported."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.count = 0
        self._pending: list[str] = []
        self._hashes: list[np.ndarray] = []

    def add(self, user_id: str) -> None:
        self._pending.append(user_id)
        self.count += 1
        if len(self._pending) >= 131_072:
            self._flush()

    def add_many(self, ids: pd.Series) -> None:
        self._flush()
        self._hashes.append(pd.util.hash_array(ids.astype(str).to_numpy(object)))
        self.count += len(ids)

    def _flush(self) -> None:
        if self._pending:
            self._hashes.append(pd.util.hash_array(np.array(self._pending, dtype=object)))
            self._pending = []

    def check(self, ids_at: Callable[[set[int]], dict[int, str]]) -> None:
        self._flush()
        if not self._hashes:
            return
        h = np.concatenate(self._hashes)
        self._hashes = []
        order = np.argsort(h, kind="stable")
        same = np.flatnonzero(h[order][1:] == h[order][:-1])
        if not len(same):
            return
        pairs = sorted((int(order[i]), int(order[i + 1])) for i in same[:100])
        values = ids_at({r for pair in pairs for r in pair})
        for a, b in pairs:
            if values.get(a) is not None and values.get(a) == values.get(b):
                raise BatchError(f"{self.label}: user_id {values[a]!r} appears twice (rows "
                                 f"{a} and {b}); give one row per user")


class UsersReader:
    """Chunks of a CSV/TSV or Parquet users table (a file, or a folder of Parquet files).

    ``total``: the row count when known up front (Parquet), else ``None``.
    """

    def __init__(self, path: str | os.PathLike[str], model: ServedModel, chunk_rows: int) -> None:
        self.path = Path(path)
        self.label = str(path)
        self.columns = model.required_columns
        self.chunk_rows = max(1, int(chunk_rows))
        self.total: int | None = None
        if not self.path.exists():
            raise BatchError(f"{self.label}: users file not found; pass a CSV/TSV or Parquet "
                             "file (or a folder of Parquet files)")
        suffix = "parquet" if self.path.is_dir() else table_suffix(self.path)
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
        self.columns = model.columns_in(head.columns)  # with a history column if it has one
        if len(head) == 0:
            raise BatchError(f"{self.label}: the users file has a header but no rows; give "
                             "one row per user")
        self._check_csv_rows(list(head.columns))

    def _check_csv_rows(self, header: list[str]) -> None:
        """One pass over the file before any output: every row has the header's number of
        fields (pandas would fill a short row with empty cells and, reading only the model's
        columns, drop a long row's extra fields) and no ``user_id`` repeats."""
        sep = "\t" if self.kind == "tsv" else ","
        key = header.index("user_id")
        ids = _IdChecker(self.label)
        try:
            with get_handle(self.path, "r", compression="infer", encoding="utf-8") as h:
                rows = csv.reader(h.handle, delimiter=sep)
                next(rows, None)  # the header
                for fields in rows:
                    if not fields:  # a blank line, skipped as pandas skips it
                        continue
                    if len(fields) != len(header):
                        raise BatchError(
                            f"{self.label}: line {rows.line_num} (row {ids.count}) has "
                            f"{len(fields)} field(s), the header {len(header)}; fix the row "
                            "(a stray separator or a missing cell?)")
                    ids.add(fields[key])
        except (csv.Error, UnicodeDecodeError) as e:
            raise BatchError(f"{self.label}: cannot read the users CSV ({type(e).__name__}: "
                             f"{e}); check the file") from None
        ids.check(lambda rows: self._csv_ids(sep, key, rows))

    def _csv_ids(self, sep: str, key: int, wanted: set[int]) -> dict[int, str]:
        found: dict[int, str] = {}
        with get_handle(self.path, "r", compression="infer", encoding="utf-8") as h:
            rows = csv.reader(h.handle, delimiter=sep)
            next(rows, None)
            pos = 0
            for fields in rows:
                if fields:
                    if pos in wanted:
                        found[pos] = fields[key]
                    pos += 1
        return found

    def _check_parquet(self, model: ServedModel) -> None:
        try:
            self._dataset = pads.dataset(str(self.path), format="parquet")
            names = self._dataset.schema.names
            self.total = int(self._dataset.count_rows())
        except (pa.ArrowException, OSError, ValueError) as e:
            raise BatchError(f"{self.label}: cannot read the users Parquet ({type(e).__name__}: "
                             f"{e}); check the file") from None
        model.check_columns(names, self.label)
        self.columns = model.columns_in(names)  # with a history column if it has one
        if self.total == 0:
            raise BatchError(f"{self.label}: the users table has no rows; give one row per user")
        ids = _IdChecker(self.label)
        for b in self._dataset.to_batches(columns=["user_id"], batch_size=131_072):
            ids.add_many(b.column(0).to_pandas())
        ids.check(self._parquet_ids)

    def _parquet_ids(self, wanted: set[int]) -> dict[int, str]:
        found, pos = {}, 0
        for b in self._dataset.to_batches(columns=["user_id"], batch_size=131_072):
            col = b.column(0).to_pylist()
            for i in sorted(w - pos for w in wanted if pos <= w < pos + len(col)):
                found[pos + i] = str(col[i])
            pos += len(col)
        return found

    def source(self, offset: int) -> TableSource:
        """How errors in the chunk starting at row ``offset`` name their row."""
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
