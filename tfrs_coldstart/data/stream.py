"""Interactions streamed from sharded files (Parquet, CSV/TSV, TFRecord) through ``tf.data``.

For interaction logs too large to load whole. The users and items tables stay in memory (one
row per entity, see README "Streamed input" for the sizes measured); the interactions are only
ever read a chunk at a time:

1. :func:`scan_interactions`: one ordered pass over the shards (plus a vocabulary pass before
   it when a side has no table) gives the id vocabularies, per-entity counts of every split
   segment, interaction statistics and the cold-start split of DESIGN.md, *exactly* the one
   :func:`~tfrs_coldstart.data.split.cold_start_split` and
   :func:`~tfrs_coldstart.data.split.validation_split` give in memory for the same seed. The
   cold users and items come from the catalogues (the tables' ids), as in memory; the warm
   test is ``rng.random(n) < warm_test_frac`` over the warm x warm rows in file order, and
   numpy's ``Generator.random`` drawn in consecutive chunks gives the same numbers as one call,
   so a pass over the shards in sorted order, drawing per chunk, marks the same rows. The
   generators' states at each shard's start are kept (two 128-bit states per shard), so any
   shard can later be re-read on its own and its rows classified again: nothing per row is
   kept unless asked (``keep``).
2. :meth:`StreamedInteractions.dataset`: a ``tf.data.Dataset`` of training batches read shard
   by shard with the split applied (the rows of one role: ``train``, ``teacher``,
   ``val_train``), in the batch format of :func:`~tfrs_coldstart.data.pipeline.
   interaction_dataset` (features gathered from the in-memory tables by row). The pass writes
   each row's user and item table rows to a local row cache (8 bytes a row), so the epochs
   need not parse and look up string ids again (``cache=False``: they read the shards).
3. :meth:`StreamedInteractions.splits`: a run's test and validation splits, whose training
   parts are :class:`StreamPart` s (no rows in memory: counts, batches, histories) and whose
   segments hold the held-out rows of the evaluated users only (``eval.max_users``), with
   those users' training rows for the warm ranking's exclusions.
   :meth:`~StreamedInteractions.held_out`, :meth:`~StreamedInteractions.split` and
   :meth:`~StreamedInteractions.interactions` read everything (for tests and ``finetune``).

Paths are anything ``tf.io.gfile`` opens (local, ``gs://``, ``s3://``, ``hdfs://``), one or
more glob patterns or folders; the shards are read in sorted path order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import posixpath
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tensorflow as tf
import yaml

from tfrs_coldstart.config import check_weight_transform
from tfrs_coldstart.data.dataset import Dataset
from tfrs_coldstart.data.pipeline import feature_gather
from tfrs_coldstart.data.schema import DataError, FeatureSpec, Schema
from tfrs_coldstart.data.split import INT_RE, ColdStartSplit, pick_users, sort_ids
from tfrs_coldstart.data.tables import (
    COMPRESSION_SUFFIXES,
    TABLE_SUFFIXES,
    TableSource,
    derived_table,
    interactions_table,
    object_series,
    read_table,
)

__all__ = [
    "CODES",
    "ROLES",
    "SHARD_FORMATS",
    "Shard",
    "StreamPart",
    "StreamedInteractions",
    "list_shards",
    "load_stream",
    "read_shard",
    "scan_interactions",
    "shard_columns",
    "sorted_positions",
]

SHARD_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv",
                 ".tfrecord": "tfrecord", ".tfrecords": "tfrecord", ".tfr": "tfrecord"}
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zip": "zip", ".xz": "xz", ".zst": "zstd"}
REQUIRED = ("user_id", "item_id")
OPTIONAL = ("timestamp", "weight")

# Where each interaction lands. 0-4 are the test split's training rows (split.train), 1-4 of
# them held out by the validation split; 5-8 are the test segments.
CODES = {"train": 0, "val_warm": 1, "val_cold_item": 2, "val_cold_user": 3, "val_cold_both": 4,
         "warm": 5, "cold_item": 6, "cold_user": 7, "cold_both": 8}
N_CODES = len(CODES)
# The rows each fit reads: split.train; the teacher's (split.train minus the validation warm
# test, training.fit_teacher); the validation teacher's (the validation split's train).
ROLES = {"train": (0, 1, 2, 3, 4), "teacher": (0, 2, 3, 4), "val_train": (0,)}


# ---- shards -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One interactions file: its path, format (``parquet``, ``csv``, ``tsv``, ``tfrecord``)
    and compression (``gzip``, ... or None)."""

    path: str
    format: str
    compression: str | None = None


def _shard_kind(path: str) -> tuple[str, str | None] | None:
    name = posixpath.basename(path).lower()
    compression = None
    for suffix, method in _COMPRESSION.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], method
            break
    for suffix, fmt in SHARD_FORMATS.items():
        if name.endswith(suffix):
            return fmt, compression
    return None


def _hidden(path: str) -> bool:
    """Marker and temporary files writers leave beside shards (``_SUCCESS``, ``.crc``)."""
    return posixpath.basename(path).startswith(("_", "."))


def list_shards(pattern: str | Sequence[str]) -> list[Shard]:
    """The interaction shards of one or more glob patterns, folders or files, sorted by path.

    Files whose names start with ``_`` or ``.`` (``_SUCCESS``, ``.crc``) are skipped in folders
    and globs. Raises :class:`DataError` when nothing matches, when a file has no known
    interactions format, or when the shards mix formats (naming the file).
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise DataError("no interactions pattern given; pass a glob such as "
                        "'data/interactions/part-*.parquet'")
    paths: list[str] = []
    for pat in patterns:
        pat = str(pat)
        try:
            if tf.io.gfile.isdir(pat):
                found = [posixpath.join(pat, n.rstrip("/")) for n in tf.io.gfile.listdir(pat)]
                found = [p for p in found if not _hidden(p) and not tf.io.gfile.isdir(p)]
            elif any(c in pat for c in "*?["):
                found = [p for p in tf.io.gfile.glob(pat)
                         if not _hidden(p) and not tf.io.gfile.isdir(p)]
            else:
                found = [pat] if tf.io.gfile.exists(pat) else []
        except tf.errors.OpError as e:
            raise DataError(f"{pat}: cannot list the interactions shards ({e.message})") from None
        if not found:
            raise DataError(
                f"{pat}: no interactions files match; check the path or glob pattern (e.g. "
                "'data/interactions/part-*.parquet', 'gs://bucket/logs/*.tfrecord.gz')")
        paths.extend(found)
    shards = []
    for path in sorted(dict.fromkeys(paths)):
        kind = _shard_kind(path)
        if kind is None:
            raise DataError(
                f"{path}: unknown interactions file type; shards must be "
                f"{', '.join(SHARD_FORMATS)} (CSV/TSV/TFRecord optionally "
                f"{'/'.join(_COMPRESSION)}-compressed)")
        shards.append(Shard(path, *kind))
    first = shards[0]
    for shard in shards[1:]:
        if shard.format != first.format:
            raise DataError(
                f"{shard.path}: a {shard.format} shard among {first.format} shards (first: "
                f"{first.path}); all interaction shards must have one format: convert them or "
                "narrow the pattern")
    return shards


@dataclass(frozen=True)
class _ChunkSource(TableSource):
    """Names rows of one chunk of a shard by their place in the shard."""

    start: int = 0

    def row(self, pos: int) -> str:
        r = self.start + pos
        text = f"row {r} of the shard"
        if self.line_offset is not None:
            text += f" (line {r + self.line_offset} of the file)"
        return text


def _is_local(path: str) -> bool:
    return "://" not in path


def _open(path: str) -> Any:
    return path if _is_local(path) else tf.io.gfile.GFile(path, "rb")


def _csv_args(shard: Shard) -> dict[str, Any]:
    # As tables.read_table: every cell as text, so ids like "007" keep their form.
    return {"sep": "\t" if shard.format == "tsv" else ",", "dtype": str,
            "keep_default_na": False, "na_values": [""], "encoding": "utf-8",
            "compression": shard.compression}


def _tfrecord_kinds(shard: Shard) -> dict[str, Any]:
    """Feature name -> tf dtype, from the shard's first record (empty: no records)."""
    ds = tf.data.TFRecordDataset(shard.path, compression_type=_tf_compression(shard))
    for record in ds.take(1):
        example = tf.train.Example.FromString(record.numpy())
        dtypes = {"bytes_list": tf.string, "int64_list": tf.int64, "float_list": tf.float32}
        return {k: dtypes[v.WhichOneof("kind")] for k, v in example.features.feature.items()
                if v.WhichOneof("kind") in dtypes}
    return {}


def _tf_compression(shard: Shard) -> str:
    if shard.compression not in (None, "gzip"):
        raise DataError(f"{shard.path}: TFRecord shards may be uncompressed or .gz (GZIP), not "
                        f"{shard.compression}")
    return "GZIP" if shard.compression == "gzip" else ""


def shard_columns(shard: Shard) -> list[str]:
    """The column (feature) names of a shard, read from its header, schema or first record."""
    try:
        if shard.format == "parquet":
            return list(pq.ParquetFile(_open(shard.path)).schema_arrow.names)
        if shard.format in ("csv", "tsv"):
            return list(pd.read_csv(_open(shard.path), nrows=0, **_csv_args(shard)).columns)
        return list(_tfrecord_kinds(shard))
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{shard.path}: the interactions shard is empty (no header); every CSV "
                        "shard needs a header row") from None
    except Exception as e:  # arrow/parser/TF errors come in many classes: "unreadable"
        raise DataError(f"{shard.path}: could not read the interactions shard "
                        f"({type(e).__name__}: {e}); check that it is a valid {shard.format} "
                        "file") from None


def _raw_chunks(shard: Shard, columns: Sequence[str], chunk_rows: int
                ) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(first row in the shard, frame of ``columns``)`` per chunk, as the file stores them."""
    if shard.format == "parquet":
        start = 0
        for batch in pq.ParquetFile(_open(shard.path)).iter_batches(
                batch_size=chunk_rows, columns=list(columns)):
            yield start, batch.to_pandas()
            start += batch.num_rows
    elif shard.format in ("csv", "tsv"):
        start = 0
        with pd.read_csv(_open(shard.path), chunksize=chunk_rows,
                         usecols=lambda c: c in columns, **_csv_args(shard)) as reader:
            for frame in reader:
                yield start, frame.reset_index(drop=True)
                start += len(frame)
    else:
        kinds = _tfrecord_kinds(shard)
        spec = {c: tf.io.FixedLenFeature([], kinds[c]) for c in columns}
        ds = tf.data.TFRecordDataset(shard.path, compression_type=_tf_compression(shard))
        start = 0
        for batch in ds.batch(chunk_rows):
            try:
                parsed = tf.io.parse_example(batch, spec)
            except tf.errors.InvalidArgumentError as e:
                raise DataError(
                    f"{shard.path}: records {start} to {start + len(batch) - 1}: "
                    f"{e.message.splitlines()[0]}; every record needs the features "
                    f"{list(columns)} with one value each") from None
            frame = {}
            for c in columns:
                v = parsed[c].numpy()
                frame[c] = (np.char.decode(v.astype(bytes), "utf-8").astype(object)
                            if v.dtype == object else v)
            yield start, pd.DataFrame(frame)
            start += len(batch)


def read_shard(shard: Shard, columns: Sequence[str], chunk_rows: int = 65_536
               ) -> Iterator[tuple[int, pd.DataFrame]]:
    """Validated, normalised chunks of one shard: ``(first row in the shard, frame)``.

    Frames as :func:`~tfrs_coldstart.data.tables.interactions_table` makes them (str ids,
    int64 ``timestamp``, float32 ``weight``); bad cells raise :class:`DataError` naming the
    file, column and row (line, for CSV) in the shard. Empty chunks are skipped.
    """
    source = _ChunkSource(shard.path, line_offset=2 if shard.format in ("csv", "tsv") else None)
    try:
        for start, raw in _raw_chunks(shard, columns, chunk_rows):
            if len(raw):
                yield start, interactions_table(raw, dataclasses.replace(source, start=start))
    except DataError:
        raise
    except (UnicodeDecodeError, tf.errors.OpError, OSError, ValueError) as e:
        what = e.message if isinstance(e, tf.errors.OpError) else str(e)
        raise DataError(f"{shard.path}: could not read the interactions shard "
                        f"({type(e).__name__}: {what}); check that it is a valid "
                        f"{shard.format} file") from None


# ---- the pass -----------------------------------------------------------------------------


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def _rng_from(state: dict[str, Any]) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state
    return rng


def sorted_positions(ids: np.ndarray) -> np.ndarray:
    """Positions that put unique str ``ids`` in :func:`~tfrs_coldstart.data.split.sort_ids`
    order (numeric when every id is an integer literal, else by code point), vectorised.

    ``sort_ids`` builds Python keys and took 15 s for a million ids; numpy's unicode sort
    compares code points as Python does, except that it ignores trailing NUL characters,
    so ids holding ``"\\0"`` (and integers past int64) go the exact, slow way.
    """
    ids = np.asarray(ids, dtype=object)
    if not len(ids):
        return np.zeros(0, np.int64)
    text = pa.array(ids, pa.string())
    # ASCII integers in Arrow; else split.py's own test (any Unicode digit), which stops at
    # the first id that is not an integer.
    is_int = bool(pc.all(pc.match_substring_regex(text, r"^[+-]?[0-9]+$")).as_py()) or all(
        INT_RE.match(i) for i in ids)
    if pc.any(pc.match_substring(text, "\0")).as_py() or (
            is_int and pc.max(pc.utf8_length(text)).as_py() > 18):
        order = sort_ids(ids)
        return pd.Index(ids, dtype=object).get_indexer(pd.Index(order, dtype=object))
    u = ids.astype(str)
    if is_int:  # (int value, text): "5" and "+5" and "05" sort by value, then by text
        return np.lexsort((u, ids.astype(np.int64)))
    return np.argsort(u, kind="stable")


def _draw(order: np.ndarray, frac: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """``bool [n]``: the rows ``cold_start_split`` draws cold from a catalogue whose rows in
    sorted order are ``order``: the first ``round(frac * len)`` of ``rng.permutation`` of it.

    ``Generator.permutation`` of an array shuffles a copy of it with the same draws as
    ``permutation(len)`` (``tests/test_stream.py`` checks it), so positions stand for ids.
    """
    perm = rng.permutation(len(order))
    flags = np.zeros(n, bool)
    flags[order[perm[: int(round(frac * len(order)))]]] = True
    return flags


@dataclass
class _Keep:
    """Rows kept in memory by a pass: chunks of global row, user row, item row, code, extras."""

    codes: np.ndarray  # bool [N_CODES]: which codes are kept
    parts: list[tuple[np.ndarray, ...]] = dataclasses.field(default_factory=list)


@dataclass
class _Tally:
    """What a pass adds up over rows: per-entity counts per code, weight sums per transform
    and code, and the timestamp and weight ranges."""

    counts: dict[str, np.ndarray]  # {"user"|"item": int64 [N_CODES, n]}
    sums: np.ndarray  # float64 [3 + thresholds, N_CODES]: n, raw, log1p, threshold:X...
    t: list[float] = dataclasses.field(default_factory=lambda: [np.inf, -np.inf])
    w: list[float] = dataclasses.field(default_factory=lambda: [np.inf, -np.inf])


class StreamPart:
    """The training part of a streamed split: the rows of one :data:`ROLES` role of the shards,
    never held in memory (the split functions of :mod:`~tfrs_coldstart.data.split` and the
    pipelines read it through its counts and :meth:`dataset`).

    ``seen``: the role's rows of the users the split evaluates (read by
    :meth:`StreamedInteractions.splits`), what warm ranking excludes.
    """

    def __init__(self, stream: StreamedInteractions, role: str, seen: pd.DataFrame) -> None:
        self.stream, self.role, self.seen = stream, role, seen

    def __len__(self) -> int:
        return self.stream.n_rows(self.role)

    def __repr__(self) -> str:
        return f"StreamPart({self.role!r}, {len(self):,} rows, {len(self.shards)} shard(s))"

    @property
    def shards(self) -> list[Shard]:
        return self.stream.shards

    @property
    def has_weights(self) -> bool:
        return "weight" in self.stream.columns

    def counts_for(self, side: str, ids: pd.Series) -> np.ndarray:
        """``float64 [len(ids)]``: interactions of each id in the role (0 for unknown ids)."""
        counts = self.stream.entity_counts(side, self.role)
        index = self.stream._user_index if side == "user" else self.stream._item_index
        pos = index.get_indexer(pd.Index(ids.astype(str).to_numpy(dtype=object), dtype=object))
        return np.where(pos >= 0, counts[np.maximum(pos, 0)], 0).astype(np.float64)

    def known(self, side: str) -> set[str]:
        ids = self.stream._user_ids if side == "user" else self.stream._item_ids
        return set(ids[self.stream.entity_counts(side, self.role) > 0].tolist())

    def n_entities(self, side: str) -> int:
        return int((self.stream.entity_counts(side, self.role) > 0).sum())

    def with_pseudo_cold(self) -> StreamPart:
        """The validation split's training part plus its cold segments: the teacher's rows."""
        if self.role != "val_train":
            raise ValueError(f"with_pseudo_cold is for the validation split's training part, "
                             f"not {self.role!r}")
        return StreamPart(self.stream, "teacher", self.seen.iloc[:0])

    def dataset(self, **kwargs: Any) -> tf.data.Dataset:
        """:meth:`StreamedInteractions.dataset` of this role."""
        return self.stream.dataset(self.role, **kwargs)

    def frame(self) -> pd.DataFrame:
        """Every row of the role in memory, in file order (one more pass)."""
        return self.stream._frame(self.stream._collect(self.stream._codes(self.role)))

    def sequences(self, max_len: int, buffer_rows: int = 1_000_000) -> dict[str, list[str]]:
        """Each user's first ``max_len`` items of the role in time order (by ``timestamp``,
        file order for ties and without one), as ``evaluation.user_sequences`` orders them
        and cut: the request-time histories a user tower trains on, in one pass holding at
        most ``max_len`` rows a user (plus a buffer of ``buffer_rows`` rows of chunks)."""
        st = self.stream
        want = np.zeros(N_CODES, bool)
        want[st._codes(self.role)] = True
        timed = "timestamp" in st.columns
        kept: tuple[np.ndarray, ...] = tuple(np.zeros(0, t) for t in
                                             (np.int64, np.int64, np.int64, np.int64))
        pending: list[tuple[np.ndarray, ...]] = []

        def reduce(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
            u, t, r, i = (np.concatenate(c) for c in zip(*parts, strict=True))
            if not len(u):
                return u, t, r, i
            order = np.lexsort((r, t, u))
            u = u[order]
            first = np.r_[True, u[1:] != u[:-1]]
            rank = np.arange(len(u)) - np.maximum.accumulate(np.where(first, np.arange(len(u)),
                                                                      0))
            sel = order[rank < max_len]
            return u[rank < max_len], t[sel], r[sel], i[sel]

        size = 0
        for s in range(len(st.shards)):
            for base, extra, u, i, code in st._chunks(s, source=timed or st.cache_dir is None):
                idx = np.flatnonzero(want[code])
                t = (np.asarray(extra["timestamp"], np.int64)[idx] if timed
                     else np.zeros(len(idx), np.int64))
                pending.append((u[idx].astype(np.int64), t, base + idx,
                                i[idx].astype(np.int64)))
                size += len(idx)
                if size > max(buffer_rows, 2 * len(kept[0])):
                    kept, pending, size = reduce([kept, *pending]), [], 0
        u, _, _, i = reduce([kept, *pending])
        starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, int)
        items = st._item_ids[i].tolist()
        bounds = [*starts.tolist(), len(u)]
        return {str(st._user_ids[u[a]]): items[a:b]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)}


class StreamedInteractions:
    """Sharded interactions with their cold-start split: built by :func:`scan_interactions`.

    Public attributes: ``shards``, ``users`` and ``items`` (the entity tables in memory; all
    row numbers below index them), ``schema``, ``columns`` (the shards' columns), ``seed``,
    the fractions, ``n_interactions``, ``shard_rows`` (rows per shard), ``counts``
    (``{"user"|"item": int64 [N_CODES, n]}``: interactions of each entity per :data:`CODES`
    segment), ``stats`` (interaction statistics), ``cache_dir`` (the row cache, or None) and
    the id tuples ``warm_users``, ``warm_items``, ``cold_users``, ``cold_items`` (ordered as
    :class:`ColdStartSplit` orders them).
    """

    def __init__(self, shards: list[Shard], users: pd.DataFrame, items: pd.DataFrame,
                 schema: Schema, *, seed: int, val_seed: int, cold_item_frac: float,
                 cold_user_frac: float, warm_test_frac: float, chunk_rows: int,
                 shuffle_buffer: int, cache_dir: str | None) -> None:
        self.shards = shards
        self.users, self.items, self.schema = users, items, schema
        self.seed, self.val_seed = int(seed), int(val_seed)
        self.cold_item_frac, self.cold_user_frac = float(cold_item_frac), float(cold_user_frac)
        self.warm_test_frac = float(warm_test_frac)
        self.chunk_rows, self.shuffle_buffer = int(chunk_rows), int(shuffle_buffer)
        self.cache_dir = cache_dir
        self._user_ids = users["user_id"].to_numpy(dtype=object)
        self._item_ids = items["item_id"].to_numpy(dtype=object)
        self._user_index = pd.Index(self._user_ids, dtype=object)
        self._item_index = pd.Index(self._item_ids, dtype=object)
        self.columns: list[str] = []
        self.shard_rows: list[int] = []
        self._shard_start: list[int] = []
        self._states: list[tuple[dict[str, Any], dict[str, Any]]] = []
        # {"user"|"item": int64 [N_CODES, n]}, set by the pass (_finish)
        self.counts: dict[str, np.ndarray] = {}
        self.stats: dict[str, Any] = {}
        self._weight_sums: dict[str, np.ndarray] = {}
        self._kept: dict[str, _Keep] = {}
        self._draw_cold()

    # ---- the protocol ---------------------------------------------------------------------

    def _draw_cold(self) -> None:
        """Cold items, then cold users (``seed``); then, over the warm ids, the validation
        split's pseudo-cold items and users (``val_seed``), as ``validation_split`` does."""
        if not len(self._item_ids) or not len(self._user_ids):
            raise DataError("the users or items catalogue is empty: no interactions to split")
        rng = np.random.default_rng(self.seed)
        u_order, i_order = sorted_positions(self._user_ids), sorted_positions(self._item_ids)
        self.cold_item = _draw(i_order, self.cold_item_frac, rng, len(self._item_ids))
        self.cold_user = _draw(u_order, self.cold_user_frac, rng, len(self._user_ids))
        self._test_state = _rng_state(rng)
        self.warm_users = tuple(self._user_ids[u_order[~self.cold_user[u_order]]].tolist())
        self.warm_items = tuple(self._item_ids[i_order[~self.cold_item[i_order]]].tolist())
        self.cold_users = tuple(self._user_ids[u_order[self.cold_user[u_order]]].tolist())
        self.cold_items = tuple(self._item_ids[i_order[self.cold_item[i_order]]].tolist())
        # The validation split's catalogues are the warm ids (validation_split sorts them
        # again: the order is the warm subsequence unless only the warm ids are all integers).
        vrng = np.random.default_rng(self.val_seed)
        orders = []
        for ids, order, cold in ((self._item_ids, i_order, self.cold_item),
                                 (self._user_ids, u_order, self.cold_user)):
            warm = order[~cold[order]]
            orders.append(warm[sorted_positions(ids[warm])])
        self.val_cold_item = _draw(orders[0], self.cold_item_frac, vrng, len(self._item_ids))
        self.val_cold_user = _draw(orders[1], self.cold_user_frac, vrng, len(self._user_ids))
        self._val_orders = (orders[1], orders[0])  # users, items: the validation catalogues
        self._val_state = _rng_state(vrng)

    def _classify(self, u: np.ndarray, i: np.ndarray, rng: np.random.Generator,
                  vrng: np.random.Generator) -> np.ndarray:
        """The :data:`CODES` of rows ``(u, i)`` (rows of the tables), in file order, drawing
        the warm-test marks from ``rng`` and the validation ones from ``vrng``."""
        code, vww = self._test_codes(u, i, rng)
        vmarks = vrng.random(len(vww)) < self.warm_test_frac
        code[vww[vmarks]] = CODES["val_warm"]
        return code

    def _test_codes(self, u: np.ndarray, i: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_classify` but for the validation warm test: the codes, and the positions
        of the validation split's warm x warm rows (whose marks ``vrng`` draws next)."""
        cu, ci = self.cold_user[u], self.cold_item[i]
        code = np.full(len(u), CODES["train"], np.int8)
        code[cu & ci] = CODES["cold_both"]
        code[cu & ~ci] = CODES["cold_user"]
        code[~cu & ci] = CODES["cold_item"]
        ww = np.flatnonzero(~cu & ~ci)
        marks = rng.random(len(ww)) < self.warm_test_frac
        code[ww[marks]] = CODES["warm"]
        tr = ww[~marks]
        vu, vi = self.val_cold_user[u[tr]], self.val_cold_item[i[tr]]
        code[tr[vu & vi]] = CODES["val_cold_both"]
        code[tr[vu & ~vi]] = CODES["val_cold_user"]
        code[tr[~vu & vi]] = CODES["val_cold_item"]
        return code, tr[~vu & ~vi]

    def _rows(self, shard: Shard, frame: pd.DataFrame, start: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Table rows of a chunk's users and items; unknown ids raise :class:`DataError`."""
        out = []
        for side, index in (("user", self._user_index), ("item", self._item_index)):
            col = f"{side}_id"
            rows = index.get_indexer(pd.Index(frame[col].to_numpy(dtype=object), dtype=object))
            bad = rows < 0
            if bad.any():
                pos = int(np.argmax(bad))
                src = _ChunkSource(shard.path, line_offset=2 if shard.format in ("csv", "tsv")
                                   else None, start=start)
                raise src.error(col, pos, f"{col} {frame[col].iloc[pos]!r} is not in the "
                                f"{side}s table",
                                f"Add the missing {side}s to the {side}s table or drop those "
                                "interactions")
            out.append(rows)
        return out[0], out[1]

    def _cache_paths(self, s: int) -> tuple[str, str]:
        assert self.cache_dir is not None
        return (posixpath.join(self.cache_dir, f"{s:06d}.rows"),
                posixpath.join(self.cache_dir, f"{s:06d}.weight"))

    def _chunks(self, s: int, source: bool = False
                ) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray, np.ndarray,
                                    np.ndarray]]:
        """``(global row of the chunk's first row, {optional column: values}, user rows, item
        rows, codes)`` per chunk of shard ``s``, classified from its saved generator states.

        From the row cache (user and item rows, weights) when there is one and ``source`` is
        False, else from the shard itself (then the shard must still have the rows the scan
        saw). The cache has no timestamps: ``source=True`` for them.
        """
        rng, vrng = _rng_from(self._states[s][0]), _rng_from(self._states[s][1])
        base, n = self._shard_start[s], self.shard_rows[s]
        if self.cache_dir is not None and not source:
            rows_path, w_path = self._cache_paths(s)
            # Read, not memory-mapped: mapped pages would count as this process's memory.
            with contextlib.ExitStack() as files:
                rows_f = files.enter_context(open(rows_path, "rb"))  # noqa: SIM115
                w_f = (files.enter_context(open(w_path, "rb"))  # noqa: SIM115
                       if "weight" in self.columns else None)
                for start in range(0, n, self.chunk_rows):
                    m = min(self.chunk_rows, n - start)
                    block = np.fromfile(rows_f, np.int32, 2 * m).reshape(m, 2)
                    u, i = block[:, 0].astype(np.int64), block[:, 1].astype(np.int64)
                    extra = {} if w_f is None else {"weight": np.fromfile(w_f, np.float32, m)}
                    yield base + start, extra, u, i, self._classify(u, i, rng, vrng)
            return
        shard = self.shards[s]
        seen = 0
        for start, frame in read_shard(shard, self.columns, self.chunk_rows):
            u, i = self._rows(shard, frame, start)
            extra = {c: frame[c].to_numpy() for c in OPTIONAL if c in frame}
            yield base + start, extra, u, i, self._classify(u, i, rng, vrng)
            seen = start + len(frame)
        if seen != n:
            raise DataError(f"{shard.path}: {seen} rows now, {n} when the interactions were "
                            "scanned; the shards changed: scan them again")

    def _setup(self, weight_transforms: Sequence[str]) -> list[float]:
        """The shards' columns (from the first) and the weight thresholds to count."""
        cols = shard_columns(self.shards[0])
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise DataError(f"{self.shards[0].path}: missing required column(s) {missing} (the "
                            f"shard has {cols}); interactions need user_id and item_id")
        self.columns = [*REQUIRED, *(c for c in OPTIONAL if c in cols)]
        for t in weight_transforms:
            check_weight_transform(t)
        return sorted({float(t.split(":", 1)[1]) for t in weight_transforms
                       if t.startswith("threshold:")})

    def _tally(self, thresholds: list[float]) -> _Tally:
        return _Tally({"user": np.zeros((N_CODES, len(self._user_ids)), np.int64),
                       "item": np.zeros((N_CODES, len(self._item_ids)), np.int64)},
                      np.zeros((3 + len(thresholds), N_CODES), np.float64))

    def _pass_shard(self, s: int, rng: np.random.Generator, vrng: np.random.Generator,
                    tally: _Tally, thresholds: list[float], kept: _Keep | None = None,
                    row0: int = 0) -> int:
        """Classify shard ``s`` (drawing from ``rng``/``vrng``), add its counts and
        statistics to ``tally``, write its row cache (when there is one) and keep the rows
        ``kept`` asks for (file rows from ``row0``); returns its row count."""
        shard = self.shards[s]
        n = 0
        files = None
        if self.cache_dir is not None:
            paths = self._cache_paths(s)
            files = [open(paths[0], "wb"),  # noqa: SIM115  (closed below)
                     open(paths[1], "wb") if "weight" in self.columns else None]  # noqa: SIM115
        try:
            for start, frame in read_shard(shard, self.columns, self.chunk_rows):
                u, i = self._rows(shard, frame, start)
                code = self._classify(u, i, rng, vrng)
                np.add.at(tally.counts["user"], (code, u), 1)
                np.add.at(tally.counts["item"], (code, i), 1)
                if files is not None:
                    files[0].write(np.stack([u, i], axis=1).astype(np.int32).tobytes())
                if "timestamp" in frame:
                    ts = frame["timestamp"].to_numpy()
                    tally.t = [min(tally.t[0], ts.min()), max(tally.t[1], ts.max())]
                if "weight" in frame:
                    w32 = frame["weight"].to_numpy(np.float32)
                    if files is not None and files[1] is not None:
                        files[1].write(w32.tobytes())
                    w = w32.astype(np.float64)
                    tally.w = [min(tally.w[0], w.min()), max(tally.w[1], w.max())]
                    pos = np.maximum(w, 0.0)
                    for k, v in enumerate([np.ones_like(w), pos, np.log1p(pos),
                                           *((w >= x).astype(np.float64)
                                             for x in thresholds)]):
                        tally.sums[k] += np.bincount(code, weights=v, minlength=N_CODES)
                if kept is not None and kept.codes.any():
                    idx = np.flatnonzero(kept.codes[code])
                    if len(idx):
                        kept.parts.append((row0 + start + idx, u[idx].astype(np.int32),
                                           i[idx].astype(np.int32), code[idx],
                                           *(frame[c].to_numpy()[idx] for c in OPTIONAL
                                             if c in frame)))
                n = start + len(frame)
        finally:
            for f in files or ():
                if f is not None:
                    f.close()
        return n

    def _scan(self, keep: tuple[str, ...], weight_transforms: Sequence[str]) -> None:
        """The one ordered pass (see the module docstring)."""
        rng, vrng = _rng_from(self._test_state), _rng_from(self._val_state)
        thresholds = self._setup(weight_transforms)
        keep_codes = np.zeros(N_CODES, bool)
        keep_codes[[CODES[name] for name in keep]] = True
        kept = _Keep(keep_codes)
        tally = self._tally(thresholds)
        row = 0
        for s, shard in enumerate(self.shards):
            if s:
                self._check_columns(shard)
            self._states.append((_rng_state(rng), _rng_state(vrng)))
            self._shard_start.append(row)
            n = self._pass_shard(s, rng, vrng, tally, thresholds, kept, row)
            self.shard_rows.append(n)
            row += n
        self._kept = {"rows": kept} if keep_codes.any() else {}
        self._finish(tally, thresholds)

    def _finish(self, tally: _Tally, thresholds: list[float]) -> None:
        """Totals and statistics once every shard is counted (``shard_rows`` set)."""
        row = int(sum(self.shard_rows))
        if row == 0:
            raise DataError(f"{self.shards[0].path}: the interactions shards hold no rows "
                            f"({len(self.shards)} shard(s)); they need at least one "
                            "user_id,item_id row")
        self.counts = tally.counts
        self.n_interactions = row
        w_names = ["n", "raw", "log1p", *(f"threshold:{x:g}" for x in thresholds)]
        self._weight_sums = {name: tally.sums[k] for k, name in enumerate(w_names)}
        self.stats = {"n_interactions": row, "n_shards": len(self.shards),
                      "segments": {name: int(self.counts["item"][c].sum())
                                   for name, c in CODES.items()}}
        if np.isfinite(tally.t[0]):
            self.stats["timestamp"] = {"min": int(tally.t[0]), "max": int(tally.t[1])}
        if np.isfinite(tally.w[0]):
            self.stats["weight"] = {"min": float(tally.w[0]), "max": float(tally.w[1])}

    def _scan_beam(self, weight_transforms: Sequence[str], options: Sequence[str],
                   work_dir: str) -> None:
        """The pass as three Apache Beam jobs over the shards, in parallel: the same split
        as :meth:`_scan`. A warm-test mark is the next draw of one generator over the warm x
        warm rows in file order, so (1) count each shard's warm x warm rows; a prefix sum is
        each shard's offset in the draws, and ``PCG64.advance(offset)`` its generator state;
        (2) with it, mark the shard's warm test and count its validation warm x warm rows,
        which give the validation generator's offsets the same way; (3) classify and count
        each shard from both states. Per-shard results go through ``work_dir`` (any
        ``tf.io.gfile`` path the workers and this process share)."""
        thresholds = self._setup(weight_transforms)
        for shard in self.shards[1:]:
            self._check_columns(shard)
        first = _beam_map(self, "rows", [(s,) for s in range(len(self.shards))], options,
                          work_dir)
        self.shard_rows = [int(r["rows"]) for r in first]
        self._shard_start = _offsets(self.shard_rows)
        test = [_advanced(self._test_state, k) for k in _offsets([r["ww"] for r in first])]
        second = _beam_map(self, "val_rows", [(s, test[s]) for s in range(len(self.shards))],
                           options, work_dir)
        val = [_advanced(self._val_state, k) for k in _offsets([r["vww"] for r in second])]
        self._states = list(zip(test, val, strict=True))
        tally = self._tally(thresholds)
        for r in _beam_map(self, "tally", [(s, test[s], val[s], thresholds)
                                          for s in range(len(self.shards))], options, work_dir):
            if int(r["rows"]) != self.shard_rows[int(r["shard"])]:
                raise DataError(f"{self.shards[int(r['shard'])].path}: the shard changed while "
                                "it was scanned; scan it again")
            for side in ("user", "item"):
                np.add.at(tally.counts[side], (r[f"{side}_code"], r[f"{side}_row"]),
                          r[f"{side}_n"])
            tally.sums += r["sums"]
            tally.t = [min(tally.t[0], r["t"][0]), max(tally.t[1], r["t"][1])]
            tally.w = [min(tally.w[0], r["w"][0]), max(tally.w[1], r["w"][1])]
        self._finish(tally, thresholds)

    def _shard_job(self, stage: str, s: int, *args: Any) -> dict[str, np.ndarray]:
        """One shard's part of a :meth:`_scan_beam` stage (runs on a Beam worker)."""
        shard = self.shards[s]
        if stage == "rows":  # rows and warm x warm rows
            n = ww = 0
            for start, frame in read_shard(shard, self.columns, self.chunk_rows):
                u, i = self._rows(shard, frame, start)
                ww += int((~self.cold_user[u] & ~self.cold_item[i]).sum())
                n = start + len(frame)
            return {"shard": np.int64(s), "rows": np.int64(n), "ww": np.int64(ww)}
        if stage == "val_rows":  # the validation split's warm x warm rows, given the marks
            rng = _rng_from(args[0])
            vww = 0
            for start, frame in read_shard(shard, self.columns, self.chunk_rows):
                u, i = self._rows(shard, frame, start)
                vww += len(self._test_codes(u, i, rng)[1])
            return {"shard": np.int64(s), "vww": np.int64(vww)}
        test, val, thresholds = args  # a scan on Beam has no row cache to write
        tally = self._tally(thresholds)
        n = self._pass_shard(s, _rng_from(test), _rng_from(val), tally, thresholds)
        out = {"shard": np.int64(s), "rows": np.int64(n), "sums": tally.sums,
               "t": np.asarray(tally.t, np.float64), "w": np.asarray(tally.w, np.float64)}
        for side, counts in tally.counts.items():  # sparse: a shard touches few entities
            code, row = np.nonzero(counts)
            out |= {f"{side}_code": code, f"{side}_row": row, f"{side}_n": counts[code, row]}
        return out

    def _check_columns(self, shard: Shard) -> None:
        """Every shard has the first shard's interaction columns (no more, no fewer)."""
        have = shard_columns(shard)
        lacking = [c for c in self.columns if c not in have]
        extra = [c for c in OPTIONAL if c in have and c not in self.columns]
        if lacking or extra:
            c = (lacking or extra)[0]
            raise DataError(
                f"{shard.path}: column '{c}' is {'missing' if lacking else 'present'} but the "
                f"first shard ({self.shards[0].path}) {'has' if lacking else 'lacks'} it; "
                f"every shard needs the same interaction columns ({self.columns}): fix the "
                "shard or drop the column everywhere")

    # ---- counts -----------------------------------------------------------------------------

    def _codes(self, role: str | Sequence[str]) -> list[int]:
        names = [role] if isinstance(role, str) else list(role)
        try:
            return sorted({c for r in names for c in (ROLES[r] if r in ROLES else (CODES[r],))})
        except KeyError as e:
            raise ValueError(f"unknown role or segment {e.args[0]!r}; use one of "
                             f"{[*ROLES, *CODES]}") from None

    def n_rows(self, role: str | Sequence[str] = "teacher") -> int:
        """How many interactions a role (or segment, or list of them) holds."""
        return int(self.counts["item"][self._codes(role)].sum())

    def entity_counts(self, side: str, role: str | Sequence[str] = "teacher") -> np.ndarray:
        """``int64 [n]``: interactions of each user (``side="user"``) or item in ``role``,
        aligned with :attr:`users` / :attr:`items` rows."""
        return self.counts[side][self._codes(role)].sum(axis=0)

    def entities(self, side: str, role: str | Sequence[str] = "teacher") -> pd.DataFrame:
        """The rows of the users or items table that occur in ``role``: what a fit's feature
        vocabularies and statistics (``features.encoder.build_state``) may see."""
        table = self.users if side == "user" else self.items
        return table[self.entity_counts(side, role) > 0]

    def item_probabilities(self, role: str | Sequence[str] = "teacher") -> np.ndarray:
        """``float32 [n_items]``: training frequency per item (the log-Q probability), as
        :func:`~tfrs_coldstart.data.pipeline.item_probabilities` of the role's rows."""
        freq = self.entity_counts("item", role).astype(np.float64)
        return (freq / max(self.n_rows(role), 1)).astype(np.float32)

    def item_log_counts(self, role: str | Sequence[str] = "train") -> np.ndarray:
        """``log(1 + count)`` per item (the popularity prior's feature; default: split.train)."""
        return np.log1p(self.entity_counts("item", role).astype(np.float64)).astype(np.float32)

    def weight_mean(self, transform: str, role: str | Sequence[str] = "teacher") -> float | None:
        """Mean of ``transform`` of the ``weight`` column over ``role`` (what
        :func:`~tfrs_coldstart.data.pipeline.interaction_weights` divides by); None for
        ``none`` or without a weight column."""
        check_weight_transform(transform)
        if transform == "none" or "weight" not in self.columns:
            return None
        key = f"threshold:{float(transform.split(':', 1)[1]):g}" \
            if transform.startswith("threshold:") else transform
        if key not in self._weight_sums:
            raise ValueError(f"weight transform {transform!r} was not scanned; pass it in "
                             "scan_interactions(weight_transforms=...)")
        codes = self._codes(role)
        n = self._weight_sums["n"][codes].sum()
        mean = self._weight_sums[key][codes].sum() / n if n else 0.0
        if not mean > 0:
            raise ValueError(f"interaction weights ({transform}) are all zero: nothing to learn")
        return float(mean)

    # ---- held-out rows and the split in memory ----------------------------------------------

    def _collect(self, codes: Sequence[int],
                 where: Any = None) -> tuple[np.ndarray, ...]:
        """``(file rows, user rows, item rows, codes, *optional columns)`` of the rows whose
        code is in ``codes`` (and, with ``where(user rows, codes) -> bool mask``, that it
        keeps): from the scan when it kept them, else from one more pass."""
        want = np.zeros(N_CODES, bool)
        want[list(codes)] = True
        kept = self._kept.get("rows")
        if kept is not None and kept.codes[want].all() and where is None:
            parts = kept.parts
        else:
            parts = []
            # The row cache has no timestamps; the few-shot protocol orders by them.
            source = "timestamp" in self.columns or self.cache_dir is None
            for s in range(len(self.shards)):
                for base, extra, u, i, code in self._chunks(s, source=source):
                    keep = want[code] if where is None else want[code] & where(u, code)
                    idx = np.flatnonzero(keep)
                    if len(idx):
                        parts.append((base + idx, u[idx].astype(np.int32),
                                      i[idx].astype(np.int32), code[idx],
                                      *(extra[c][idx] for c in OPTIONAL if c in extra)))
        n_extra = len(self.columns) - len(REQUIRED)
        if not parts:
            return (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                    np.zeros(0, np.int8), *(np.zeros(0) for _ in range(n_extra)))
        cols = tuple(np.concatenate([p[k] for p in parts]) for k in range(4 + n_extra))
        sel = want[cols[3]]
        return cols if sel.all() else tuple(c[sel] for c in cols)

    def _frame(self, cols: tuple[np.ndarray, ...]) -> pd.DataFrame:
        rows, u, i = cols[:3]
        data: dict[str, Any] = {"user_id": object_series(self._user_ids[u]),
                                "item_id": object_series(self._item_ids[i])}
        extras = [c for c in OPTIONAL if c in self.columns]
        for name, values in zip(extras, cols[4:], strict=True):
            data[name] = values.astype(np.int64 if name == "timestamp" else np.float32)
        frame = pd.DataFrame(data)
        frame.index = pd.Index(rows, dtype=np.int64)
        return frame

    def release(self) -> None:
        """Drop the rows the scan kept (``keep``); later calls read the shards again."""
        self._kept = {}

    def held_out(self) -> dict[str, pd.DataFrame]:
        """The test segments (``warm``, ``cold_item``, ``cold_user``, ``cold_both``) and the
        validation ones (``val_warm``, ``val_cold_item``, ...) as frames indexed by file row
        (the row in all shards in order), equal to the in-memory split's. Kept by the scan
        with ``keep=("held_out",)``, else read in one more pass."""
        names = [n for n in CODES if n != "train"]
        cols = self._collect([CODES[n] for n in names])
        return {n: self._frame(tuple(c[cols[3] == CODES[n]] for c in cols)) for n in names}

    def interactions(self) -> pd.DataFrame:
        """Every interaction, in file order, indexed 0..n-1 (as ``load_tables`` gives them)."""
        frame = self._frame(self._collect(range(N_CODES)))
        frame.index = pd.RangeIndex(len(frame))
        return frame

    def splits(self, max_users: int = 0) -> tuple[ColdStartSplit, ColdStartSplit]:
        """The test split and the validation split for a run, in one more pass, holding only
        what evaluation needs: the held-out rows of at most ``max_users`` warm and
        ``max_users`` cold users per split (0: every user; the users
        :func:`~tfrs_coldstart.data.split.sample_users` draws for the in-memory split) and
        the training rows of the warm ones among them (what their ranking excludes). Their
        training parts are :class:`StreamPart` s: the fits read the shards."""
        cu = self.counts["user"]
        n = len(self._user_ids)
        picked: dict[str, np.ndarray] = {}
        u_val = self._val_orders[0]
        vu = self.val_cold_user
        orders = {
            "test": (self._user_index.get_indexer(pd.Index(self.warm_users, dtype=object)),
                     self._user_index.get_indexer(pd.Index(self.cold_users, dtype=object)),
                     self.seed, ("warm", "cold_item"), ("cold_user", "cold_both")),
            "val": (u_val[~vu[u_val]], u_val[vu[u_val]], self.val_seed,
                    ("val_warm", "val_cold_item"), ("val_cold_user", "val_cold_both")),
        }
        for name, (warm, cold, seed, w_codes, c_codes) in orders.items():
            for k, (order, codes) in enumerate(((warm, w_codes), (cold, c_codes))):
                have = order[cu[[CODES[c] for c in codes]].sum(axis=0)[order] > 0]
                ids = pick_users(self._user_ids[have].tolist(), max_users, (seed, k))
                mask = np.zeros(n, bool)
                mask[self._user_index.get_indexer(pd.Index(ids, dtype=object))] = True
                picked[f"{name}_{'warm' if k == 0 else 'cold'}"] = mask
        test_s = picked["test_warm"] | picked["test_cold"]
        val_s = picked["val_warm"] | picked["val_cold"]
        test_w, val_w = picked["test_warm"], picked["val_warm"]

        def where(u: np.ndarray, code: np.ndarray) -> np.ndarray:
            return (((code >= CODES["warm"]) & test_s[u])
                    | ((code >= CODES["val_warm"]) & (code < CODES["warm"]) & val_s[u])
                    | ((code < CODES["warm"]) & test_w[u])
                    | ((code == CODES["train"]) & val_w[u]))

        cols = self._collect(range(N_CODES), where)
        frame = self._frame(cols)
        u, code = cols[1], cols[3]

        def part(name: str, users: np.ndarray) -> pd.DataFrame:
            return frame[(code == CODES[name]) & users[u]]

        test = ColdStartSplit(
            train=StreamPart(self, "train", frame[(code < CODES["warm"]) & test_w[u]]),
            warm_test=part("warm", test_s), cold_item=part("cold_item", test_s),
            cold_user=part("cold_user", test_s), cold_both=part("cold_both", test_s),
            warm_users=self.warm_users, warm_items=self.warm_items,
            cold_users=self.cold_users, cold_items=self.cold_items, seed=self.seed,
            cold_item_frac=self.cold_item_frac, cold_user_frac=self.cold_user_frac,
            warm_test_frac=self.warm_test_frac)
        val_ids = self._val_ids()
        val = ColdStartSplit(
            train=StreamPart(self, "val_train", frame[(code == CODES["train"]) & val_w[u]]),
            warm_test=part("val_warm", val_s), cold_item=part("val_cold_item", val_s),
            cold_user=part("val_cold_user", val_s), cold_both=part("val_cold_both", val_s),
            **val_ids, seed=self.val_seed, cold_item_frac=self.cold_item_frac,
            cold_user_frac=self.cold_user_frac, warm_test_frac=self.warm_test_frac)
        return test, val

    def _val_ids(self) -> dict[str, tuple[str, ...]]:
        """The validation split's id tuples, ordered as ``validation_split`` orders them."""
        (u_order, i_order), vu, vi = self._val_orders, self.val_cold_user, self.val_cold_item
        return {"warm_users": tuple(self._user_ids[u_order[~vu[u_order]]].tolist()),
                "warm_items": tuple(self._item_ids[i_order[~vi[i_order]]].tolist()),
                "cold_users": tuple(self._user_ids[u_order[vu[u_order]]].tolist()),
                "cold_items": tuple(self._item_ids[i_order[vi[i_order]]].tolist())}

    def split(self, validation: bool = False) -> ColdStartSplit:
        """The :class:`ColdStartSplit` (``validation``: the validation split) in memory."""
        cols = self._collect(range(N_CODES) if not validation else ROLES["train"])
        frame = self._frame(cols)
        code = cols[3]

        def part(*names: str) -> pd.DataFrame:
            return frame[np.isin(code, [CODES[n] for n in names])]

        if validation:
            return ColdStartSplit(
                train=part("train"), warm_test=part("val_warm"),
                cold_item=part("val_cold_item"), cold_user=part("val_cold_user"),
                cold_both=part("val_cold_both"), **self._val_ids(), seed=self.val_seed,
                cold_item_frac=self.cold_item_frac, cold_user_frac=self.cold_user_frac,
                warm_test_frac=self.warm_test_frac)
        return ColdStartSplit(
            train=part(*(n for n, c in CODES.items() if c in ROLES["train"])),
            warm_test=part("warm"), cold_item=part("cold_item"), cold_user=part("cold_user"),
            cold_both=part("cold_both"), warm_users=self.warm_users, warm_items=self.warm_items,
            cold_users=self.cold_users, cold_items=self.cold_items, seed=self.seed,
            cold_item_frac=self.cold_item_frac, cold_user_frac=self.cold_user_frac,
            warm_test_frac=self.warm_test_frac)

    # ---- tf.data --------------------------------------------------------------------------

    def _select(self, s: int, codes: np.ndarray | None, rows: np.ndarray | None,
                row_weights: np.ndarray | None, weight: tuple[str, float] | None
                ) -> Iterator[tuple[np.ndarray, ...]]:
        """Training rows of shard ``s``: ``(user rows, item rows[, weights])`` per chunk."""
        for base, extra, u, i, code in self._chunks(s):
            w = None
            if rows is not None:  # explicit file rows (sorted), e.g. a frame's index
                lo, hi = np.searchsorted(rows, [base, base + len(u)])
                idx = rows[lo:hi] - base
                if row_weights is not None:
                    w = row_weights[lo:hi]
            else:
                assert codes is not None
                idx = np.flatnonzero(codes[code])
                if weight is not None:
                    transform, mean = weight
                    x = extra["weight"][idx].astype(np.float64)
                    if transform.startswith("threshold:"):
                        x = (x >= float(transform.split(":", 1)[1])).astype(np.float64)
                    else:
                        x = np.maximum(x, 0.0)
                        if transform == "log1p":
                            x = np.log1p(x)
                    w = x / mean
            out: tuple[np.ndarray, ...] = (u[idx], i[idx])
            if w is not None:
                out += (np.asarray(w, np.float32),)
            yield out

    def _batches(self, epoch: int, shards: np.ndarray, batch_size: int, shuffle: bool,
                 seed: int, cycle_length: int, select: Any) -> Iterator[tuple[np.ndarray, ...]]:
        """One epoch's batches: shards in an order seeded by ``(seed, epoch)``, read
        ``cycle_length`` at a time chunk by chunk, rows shuffled through a pool of
        ``shuffle_buffer`` rows (half of it carried into the next draw), full batches out."""
        order = np.random.default_rng([seed, epoch]).permutation(shards) if shuffle else shards
        rng = np.random.default_rng([seed, epoch, 1])
        pending = [iter(select(int(s))) for s in order]
        active, pending = pending[:cycle_length], pending[cycle_length:]
        pool: list[tuple[np.ndarray, ...]] = []
        size = 0
        hold = self.shuffle_buffer // 2 if shuffle else 0
        while active:
            for reader in list(active):
                part = next(reader, None)
                if part is None:
                    active.remove(reader)
                    if pending:
                        active.append(pending.pop(0))
                    continue
                pool.append(part)
                size += len(part[0])
            if size < max(self.shuffle_buffer if shuffle else 0, batch_size) and active:
                continue
            cols = tuple(np.concatenate(c) for c in zip(*pool, strict=True))
            if shuffle:
                perm = rng.permutation(size)
                cols = tuple(c[perm] for c in cols)
            n_out = max(0, size - hold) // batch_size * batch_size if active else size
            for b in range(0, n_out, batch_size):
                yield tuple(c[b:b + batch_size] for c in cols)
            pool = [tuple(c[n_out:] for c in cols)]
            size -= n_out

    def dataset(self, role: str | Sequence[str] = "teacher", *, batch_size: int,
                user_specs: tuple[FeatureSpec, ...] | None = None,
                item_specs: tuple[FeatureSpec, ...] | None = None, shuffle: bool = True,
                seed: int = 0, epochs: tuple[int, int] | None = None,
                item_prob: np.ndarray | None = None, weight_transform: str = "none",
                rows: np.ndarray | None = None, row_weights: np.ndarray | None = None,
                shard_index: int = 0, num_shards: int = 1, cycle_length: int = 4
                ) -> tf.data.Dataset:
        """Training batches read shard by shard: ``{"user": {...}, "item": {...},
        "item_prob": float32 [b]}`` (+ ``"weight"``), as ``interaction_dataset`` makes them.

        Rows: those of ``role`` (:data:`ROLES` or :data:`CODES` names), or, when ``rows`` (file
        rows) is given, exactly those (``row_weights`` aligned with ``rows``). Weights: the
        ``weight`` column through ``weight_transform``, divided by its mean over the role.
        ``epochs=(start, stop)``: those epochs in one finite dataset, ``ceil(n / batch_size)``
        batches each (one partial batch, the last); epoch ``e`` reads the shards in an order
        seeded by ``(seed, e)``, ``cycle_length`` at a time chunk by chunk, and shuffles rows
        through a pool of ``shuffle_buffer`` rows seeded by ``(seed, e)``: a resumed fit sees
        the same epoch. Without ``epochs``: epoch 0, which Keras repeats as it is.
        ``shard_index``/``num_shards``: read only every ``num_shards``-th shard (e.g.
        ``InputContext.input_pipeline_id`` / ``num_input_pipelines`` of ``tf.distribute``);
        each shard's split is self-contained, so any subset of shards is classified exactly.
        """
        user_specs = self.schema.user_features if user_specs is None else user_specs
        item_specs = self.schema.item_features if item_specs is None else item_specs
        codes = None
        weight = None
        if rows is None:
            codes = np.zeros(N_CODES, bool)
            codes[self._codes(role)] = True
            mean = self.weight_mean(weight_transform, role)
            weight = None if mean is None else (weight_transform, mean)
        else:
            rows = np.asarray(rows, np.int64)
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
            if row_weights is not None:
                row_weights = np.asarray(row_weights, np.float32)[order]
        if item_prob is None:
            item_prob = self.item_probabilities(role)
        gather = feature_gather(self.users, self.items, user_specs, item_specs, item_prob)
        sig = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64))
        if weight is not None or row_weights is not None:
            sig += (tf.TensorSpec([None], tf.float32),)
        mine = np.arange(len(self.shards))[shard_index::num_shards]
        if not len(mine):
            raise ValueError(f"input pipeline {shard_index} of {num_shards} gets none of the "
                             f"{len(self.shards)} shards; write at least as many shards as "
                             "input pipelines")

        def select(s: int) -> Iterator[tuple[np.ndarray, ...]]:
            return self._select(s, codes, rows, row_weights, weight)

        def generate(e: Any) -> Iterator[tuple[np.ndarray, ...]]:
            return self._batches(int(e), mine, batch_size, shuffle, seed,
                                 max(1, cycle_length), select)

        start, stop = epochs if epochs is not None else (0, 1)
        ds = tf.data.Dataset.range(start, stop).flat_map(
            lambda e: tf.data.Dataset.from_generator(generate, args=(e,),
                                                     output_signature=sig))
        return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# ---- the pass in parallel (Apache Beam) ----------------------------------------------------


def _offsets(counts: Sequence[Any]) -> list[int]:
    """Each shard's first draw: the prefix sum of the draws of the shards before it."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))[:-1]]).astype(
        np.int64).tolist()


def _advanced(state: dict[str, Any], draws: int) -> dict[str, Any]:
    """``state`` after ``draws`` draws (one 64-bit output each, as ``Generator.random``
    takes per float64)."""
    rng = _rng_from(state)
    rng.bit_generator.advance(int(draws))
    return _rng_state(rng)


def _beam_map(scan: StreamedInteractions, stage: str, jobs: list[tuple[Any, ...]],
              options: Sequence[str], work_dir: str) -> list[dict[str, np.ndarray]]:
    """Run ``scan._shard_job(stage, *job)`` for every job on Apache Beam (``options``: its
    pipeline options, e.g. ``--runner=DirectRunner --direct_num_workers=2``); each worker
    writes its result to ``work_dir`` (temporary name, then rename), read back in order."""
    try:
        import apache_beam as beam  # optional extra [beam]: imported on first use
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise DataError("data.stream_beam runs the pass on Apache Beam, which is not "
                        "installed: pip install 'tfrs-coldstart[beam]' (or unset "
                        "data.stream_beam for the one ordered pass)") from None

    out = posixpath.join(work_dir, stage)
    tf.io.gfile.makedirs(out)

    def run(job: tuple[Any, ...]) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **scan._shard_job(stage, *job))
        path = posixpath.join(out, f"{job[0]:06d}.npz")
        with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
            f.write(buf.getvalue())
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)

    with beam.Pipeline(options=PipelineOptions(list(options))) as p:
        _ = p | f"{stage} shards" >> beam.Create(jobs) | f"{stage}" >> beam.Map(run)
    results = []
    for job in jobs:
        with tf.io.gfile.GFile(posixpath.join(out, f"{job[0]:06d}.npz"), "rb") as f:
            results.append(dict(np.load(io.BytesIO(f.read()))))
    return results


# ---- entry points -------------------------------------------------------------------------


def _vocabulary(shards: list[Shard], columns: list[str], side: str, chunk_rows: int
                ) -> pd.DataFrame:
    """A featureless side's table: its ids in order of first appearance (as ``load_tables``)."""
    col = f"{side}_id"
    seen: dict[str, None] = {}
    for shard in shards:
        for _, frame in read_shard(shard, columns, chunk_rows):
            seen.update(dict.fromkeys(pd.unique(frame[col].to_numpy(dtype=object)).tolist()))
    return pd.DataFrame({col: object_series(np.array(list(seen), dtype=object))})


def scan_interactions(
    pattern: str | Sequence[str],
    users: pd.DataFrame | None,
    items: pd.DataFrame | None,
    schema: Schema,
    *,
    seed: int = 42,
    val_seed: int | None = None,
    cold_item_frac: float = 0.2,
    cold_user_frac: float = 0.2,
    warm_test_frac: float = 0.1,
    chunk_rows: int = 65_536,
    shuffle_buffer: int = 100_000,
    keep: Sequence[str] = (),
    weight_transforms: Sequence[str] = (),
    cache: bool | str = True,
    beam: Sequence[str] | None = None,
    beam_dir: str | None = None,
) -> StreamedInteractions:
    """List the shards of ``pattern`` and make the one ordered pass over them.

    ``users``/``items``: the validated entity tables (``tables.feature_table``), whose ids are
    the catalogues the cold draw is made from (as ``evaluation.prepare`` passes them); None for
    a side without features: its table is then the ids of the interactions in order of first
    appearance, from a vocabulary pass before the split pass. ``seed`` and the fractions are the
    protocol's (``val_seed`` default ``seed + 1``, as ``validation_split``). ``keep``: rows to
    hold in memory from the pass (``"held_out"``: every test and validation segment, ``"all"``,
    or segment names); by default none, and :meth:`~StreamedInteractions.held_out` reads them in
    one more pass. ``weight_transforms``: ``threshold:X`` transforms whose means to count (raw
    and log1p always are). ``cache``: where the pass writes each row's user and item table
    rows (int32, 8 bytes a row, plus 4 for a weight), so the fits' epochs read those instead of
    parsing and looking up string ids again: True (default) a temporary local folder removed
    with the object, a path, or False (epochs read the shards). ``beam``: Apache Beam pipeline
    options (a list, possibly empty: the DirectRunner); then the pass runs per shard in
    parallel on Beam and gives the same split and counts (see ``_scan_beam``), with the
    per-shard results in ``beam_dir`` (a path the workers share; default a local temporary
    folder), no row cache and nothing kept (``cache`` and ``keep`` must be left unset).
    """
    for name, v in (("cold_item_frac", cold_item_frac), ("cold_user_frac", cold_user_frac),
                    ("warm_test_frac", warm_test_frac)):
        if not 0.0 <= float(v) < 1.0:
            raise DataError(f"scan_interactions: {name} must be in [0, 1), got {v!r}")
    if chunk_rows < 1 or shuffle_buffer < 1:
        raise DataError("scan_interactions: chunk_rows and shuffle_buffer must be at least 1")
    shards = list_shards(pattern)
    tables = {"user": users, "item": items}
    for side, table in tables.items():
        if table is None:
            if schema.side(side):
                raise DataError(f"no {side}s table given but the schema has {side} features "
                                f"{list(schema.names(side))}; pass the {side}s table")
            cols = [c for c in REQUIRED if c in shard_columns(shards[0])]
            if len(cols) < len(REQUIRED):
                raise DataError(f"{shards[0].path}: missing required column(s) "
                                f"{[c for c in REQUIRED if c not in cols]}; interactions need "
                                "user_id and item_id")
            tables[side] = _vocabulary(shards, cols, side, chunk_rows)
    kept: list[str] = []
    for name in keep:
        if name == "held_out":
            kept += [n for n in CODES if n != "train"]
        elif name == "all":
            kept += list(CODES)
        elif name in CODES:
            kept.append(name)
        else:
            raise DataError(f"scan_interactions: keep={name!r}; use held_out, all or segment "
                            f"names {list(CODES)}")
    if beam is not None and (kept or cache not in (True, False)):
        raise DataError("scan_interactions: a scan on Beam keeps no rows and writes no row "
                        "cache; leave keep and cache unset")
    if beam is not None:
        cache = False
    cache_dir = None
    if cache is True:
        cache_dir = tempfile.mkdtemp(prefix="tfrs_stream_")
    elif cache:
        cache_dir = str(cache)
        os.makedirs(cache_dir, exist_ok=True)
    try:
        scan = StreamedInteractions(
            shards, tables["user"], tables["item"], schema, seed=seed,
            val_seed=seed + 1 if val_seed is None else val_seed, cold_item_frac=cold_item_frac,
            cold_user_frac=cold_user_frac, warm_test_frac=warm_test_frac,
            chunk_rows=chunk_rows, shuffle_buffer=shuffle_buffer, cache_dir=cache_dir)
        if cache is True:
            weakref.finalize(scan, shutil.rmtree, cache_dir, True)
        if beam is None:
            scan._scan(tuple(dict.fromkeys(kept)), weight_transforms)
        elif beam_dir is not None:
            scan._scan_beam(weight_transforms, beam, beam_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="tfrs_scan_beam_") as tmp:
                scan._scan_beam(weight_transforms, beam, tmp)
    except BaseException:
        if cache is True and cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise
    return scan


def _find(root: str, stem: str) -> str | None:
    for suffix in TABLE_SUFFIXES:
        for comp in ("",) + COMPRESSION_SUFFIXES:
            path = posixpath.join(root, f"{stem}{suffix}{comp}")
            if tf.io.gfile.exists(path):
                return path
    return None


def _entity_table(path: str, side: str, schema: Schema
                  ) -> tuple[pd.DataFrame, tuple[FeatureSpec, ...]]:
    """A users/items table (any ``tf.io.gfile`` path) and its specs, validated and derived as
    ``load_tables`` does (``tables.derived_table``)."""
    if _is_local(path):
        return derived_table(*read_table(path, f"{side}s"), side, schema.side(side))
    suffixes = [s.lower() for s in posixpath.basename(path).split(".")[1:]]
    comp = _COMPRESSION.get("." + suffixes[-1]) if suffixes else None
    fmt = suffixes[-2] if comp and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            if fmt in ("parquet", "pq"):
                df = pd.read_parquet(f).reset_index(drop=True)
                src = TableSource(path)
            else:
                df = pd.read_csv(f, sep="\t" if fmt == "tsv" else ",", dtype=str,
                                 keep_default_na=False, na_values=[""], encoding="utf-8",
                                 compression=comp)
                src = TableSource(path, line_offset=2)
    except Exception as e:  # parser/arrow/IO errors come in many classes: all mean "unreadable"
        raise DataError(f"{path}: could not read the {side}s table ({type(e).__name__}: {e})"
                        ) from None
    return derived_table(df, src, side, schema.side(side))


def _schema(path: str) -> Schema:
    """The schema YAML at any ``tf.io.gfile`` path."""
    if _is_local(path):
        return Schema.from_yaml(path)
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            d = yaml.safe_load(f.read())
    except (tf.errors.OpError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read the schema ({e})") from None
    return Schema.from_dict(d, source=path)


def load_stream(data_dir: str | None = None, schema_path: str | None = None,
                interactions: str | Sequence[str] | None = None, *, name: str | None = None,
                seed: int = 42, cold_item_frac: float = 0.2, cold_user_frac: float = 0.2,
                warm_test_frac: float = 0.1, chunk_rows: int = 65_536,
                shuffle_buffer: int = 100_000, beam: Sequence[str] | None = None,
                beam_dir: str | None = None, weight_transforms: Sequence[str] = ()
                ) -> Dataset:
    """``data.format=stream``: the users/items tables (and ``schema.yaml``) of ``data_dir``
    as for ``tables``, the interactions from the shards of ``interactions`` (default
    ``<data_dir>/interactions/``).

    ``beam``/``beam_dir``/``weight_transforms``: as for :func:`scan_interactions`.
    Returns a :class:`Dataset` whose ``stream`` is the scan and whose ``interactions`` frame
    is empty (the shards' columns, no rows): ``evaluation.prepare`` takes the splits from
    :meth:`StreamedInteractions.splits`, the fits read their batches from the shards.
    """
    if interactions is None:
        if data_dir is None:
            raise DataError("format 'stream' needs the interactions: set data.interactions "
                            "(a glob such as 'gs://bucket/logs/part-*.parquet') or "
                            "data_dir with an interactions/ folder")
        interactions = posixpath.join(str(data_dir), "interactions")
    if schema_path is None and data_dir is not None:
        found = posixpath.join(str(data_dir), "schema.yaml")
        schema_path = found if tf.io.gfile.exists(found) else None
    if schema_path is None:
        raise DataError("format 'stream' needs a schema: pass --schema (YAML) or put "
                        "schema.yaml in data_dir")
    schema = _schema(str(schema_path))
    tables: dict[str, pd.DataFrame | None] = {}
    for side in ("user", "item"):
        path = _find(str(data_dir), f"{side}s") if data_dir is not None else None
        if path is None and schema.side(side):
            raise DataError(f"{data_dir or '(no data_dir)'}: no {side}s table found; expected "
                            f"{side}s{{{','.join(TABLE_SUFFIXES)}}} in data_dir (the schema has "
                            f"{side} features {list(schema.names(side))})")
        tables[side] = None
        if path is not None:  # as load_tables: the schema takes the derived specs' fills
            tables[side], specs = _entity_table(path, side, schema)
            schema = (Schema(specs, schema.item_features) if side == "user"
                      else Schema(schema.user_features, specs))
    scan = scan_interactions(interactions, tables["user"], tables["item"], schema,
                             seed=seed, cold_item_frac=cold_item_frac,
                             cold_user_frac=cold_user_frac, warm_test_frac=warm_test_frac,
                             chunk_rows=chunk_rows, shuffle_buffer=shuffle_buffer,
                             beam=beam, beam_dir=beam_dir,
                             weight_transforms=weight_transforms)
    label = name or posixpath.basename(str(data_dir or interactions).rstrip("/")) or "stream"
    # No rows in memory: the run's split reads what evaluation needs (StreamedInteractions.
    # splits), the fits read the shards.
    empty = scan._frame(tuple(np.zeros(0, t) for t in
                              (np.int64, np.int32, np.int32, np.int8,
                               *(np.float64 for _ in scan.columns[len(REQUIRED):]))))
    return Dataset(label, empty, scan.users, scan.items, schema, stream=scan)
