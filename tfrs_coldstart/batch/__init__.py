"""Offline batch retrieval over exported models: in-process and Apache Beam.

- :mod:`.model`: :class:`ServedModel`, the exported ``recommend`` SavedModel as batch calls
  it (what TF Serving serves), and the output format;
- :mod:`.reader`: the users table read in chunks;
- :mod:`.local`: :func:`batch_recommend`, in this process;
- :mod:`.beam`: :func:`beam_batch_recommend`, the same job as an Apache Beam pipeline
  (optional extra ``[beam]``, imported on first use).

This package is also the ``tfrs-coldstart batch`` command (:func:`add_arguments`,
:func:`run`). Adding items to an export is a publish step: ``tfrs_coldstart.serving.add_items``.
"""

from __future__ import annotations

import argparse
import time

from tfrs_coldstart.batch.beam import beam_batch_recommend
from tfrs_coldstart.batch.local import BatchSummary, batch_recommend
from tfrs_coldstart.batch.model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_ROWS,
    OUTPUT_SCHEMA,
    BatchError,
    ServedModel,
    resolve_version,
)

__all__ = [
    "BatchError",
    "BatchSummary",
    "OUTPUT_SCHEMA",
    "ServedModel",
    "add_arguments",
    "batch_recommend",
    "beam_batch_recommend",
    "resolve_version",
    "run",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tfrs-coldstart batch --model export/student --users U --out recs.parquet``."""
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


def run(args: argparse.Namespace) -> int:
    """Run ``tfrs-coldstart batch``; bad input raises :class:`BatchError` (or a
    ``DataError``) for the CLI's one error wrapper."""
    if args.runner == "beam":
        start = time.time()
        files = beam_batch_recommend(args.model, args.users, args.out, args.k,
                                     args.beam_option or None, args.signature,
                                     args.batch_size, args.num_shards)
        print(f"wrote {', '.join(files)} ({time.time() - start:.1f} s, Beam)")
        return 0
    if args.beam_option:
        raise BatchError("--beam-option needs --runner beam")
    s = batch_recommend(args.model, args.users, args.out, args.k, args.chunk_rows,
                        args.signature, args.batch_size, progress=not args.no_progress)
    print(f"wrote {s.out_path}: {s.users} users, {s.rows} rows (k={s.k}) in "
          f"{s.seconds:.1f} s ({s.users_per_second:.0f} users/s) with {s.model_path}")
    return 0

