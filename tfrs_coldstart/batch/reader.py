"""A users table read in chunks, so batch retrieval's memory stays bounded at any size.

CSV/TSV (read as text, so ids such as ``u007`` keep their form) or Parquet (a file or a
folder of files). The header, the model's required columns and emptiness are checked
before any output is written; a bad cell found later names its row in the whole file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

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
        if len(head) == 0:
            raise BatchError(f"{self.label}: the users file has a header but no rows; give "
                             "one row per user")

    def _check_parquet(self, model: ServedModel) -> None:
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
