"""In-process batch retrieval: a users table -> Parquet top-k rows, with the exported model.

:func:`batch_recommend` reads the users table in chunks (memory stays bounded), calls the
exported SavedModel's signature itself (the results are exactly what TF Serving serves) and
writes ``user_id, rank, item_id, score``. Output rows never hold padding: a slot the index
could not fill (catalogue smaller than ``k``) is dropped. Nothing is half-written: the output
goes to a temporary file renamed at the end, so a failed run leaves no output file.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from tfrs_coldstart.batch.model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_ROWS,
    OUTPUT_SCHEMA,
    BatchError,
    ServedModel,
    check_batch_size,
    check_k,
    check_out_path,
)
from tfrs_coldstart.batch.reader import UsersReader
from tfrs_coldstart.fileio import process_alive, writer_pid
from tfrs_coldstart.serving.saved_model import row_groups

__all__ = ["BatchSummary", "batch_recommend", "recommend_rows"]


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
    """``.<name>.<pid>-<random>.tmp`` beside ``out``: hidden, and named by its writer so a
    later job can tell an orphan (dead writer) from a job running now."""
    return out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _remove_orphans(out: Path) -> list[Path]:
    """Remove the temporary outputs of killed batch jobs for ``out`` (their writer's pid is
    gone); returns what was removed.

    In-process jobs leave ``.<name>.<pid>-<id>.tmp``; Beam jobs (which write through the
    same temporary name, :mod:`.beam`) also leave shards ``.<name>.<pid>-<id>.tmp-SSSSS-of-
    NNNNN.parquet`` and Beam's folder ``beam-temp-.<name>.<pid>-<id>.tmp-<uuid>``. Those of
    a live writer (a job running now) are kept.
    """
    removed = []
    name = glob.escape(out.name)
    for pattern, prefix in ((f".{name}.*.tmp", f".{out.name}."),
                            (f".{name}.*.tmp-*", f".{out.name}."),
                            (f"beam-temp-.{name}.*.tmp-*", f"beam-temp-.{out.name}.")):
        for tmp in out.parent.glob(pattern):
            pid = writer_pid(tmp.name, prefix)
            if pid is None or process_alive(pid):
                continue
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def recommend_rows(model: ServedModel, feats: dict[str, Any],
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``model.recommend`` over groups of rows (``saved_model.row_groups``): the model pads
    split string cells (multi-hot tags, a history) to the longest row of a call, so one
    250 KB cell among 240 rows took ~640 MiB; grouped, a long cell is padded only with the
    rows of its group. Same results, ``(item ids [n, k], scores [n, k])``."""
    n = len(next(iter(feats.values()))) if feats else 0
    groups = row_groups(feats, n)
    if len(groups) == 1:
        return model.recommend(feats, batch_size)
    parts = [model.recommend({k: v[g] for k, v in feats.items()}, batch_size) for g in groups]
    return (np.concatenate([ids for ids, _ in parts]),
            np.concatenate([sc for _, sc in parts]))


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
    batch_size = check_batch_size(batch_size)
    check_batch_size(chunk_rows, "chunk rows")
    model = ServedModel.load(model_dir, signature)
    k = check_k(k, model)
    reader = UsersReader(users_path, model, chunk_rows)
    out = check_out_path(out_path)
    _remove_orphans(out)
    tmp = _tmp_path(out)
    users = rows = 0
    try:
        with pq.ParquetWriter(str(tmp), OUTPUT_SCHEMA) as writer, tqdm(
                total=reader.total, unit="user", desc=f"batch {model.name}",
                disable=not progress, file=sys.stderr) as bar:
            for offset, df in reader.chunks():
                ids, feats = model.normalise(df, reader.source(offset))
                item_ids, scores = recommend_rows(model, feats, batch_size)
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
