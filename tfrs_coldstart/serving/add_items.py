"""New items in an exported ``recommend`` model without retraining: a publish step.

:func:`add_items` embeds the new items as the exported model does (the student's item tower, the
weights of the exported ``item_encoder``; for ``recommend``, the item cold path its run chose on
validation: the student or the teacher's content path), rebuilds the index over the whole
catalogue (old + new) and publishes a new version atomically through
:func:`tfrs_coldstart.serving.export.export_run`; the version being served is never touched.
Each version's added items are recorded beside the versions
(``<base>/<name>/.added_items/<version>.parquet``), so the next addition builds on them.

Example::

    published = add_items("export/student", "new_items.parquet")
    print(published.version, published.manifest["catalogue_size"])
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tfrs_coldstart.console import log as _stderr_log
from tfrs_coldstart.data.schema import Schema
from tfrs_coldstart.data.tables import feature_table, read_table
from tfrs_coldstart.errors import RunError, UserError
from tfrs_coldstart.fileio import atomic_write_bytes
from tfrs_coldstart.runs import RunDir
from tfrs_coldstart.serving.export import ExportedModel, export_run, set_serving_base
from tfrs_coldstart.serving.saved_model import (
    STAGING_PREFIX,
    check_serving_base,
    is_complete,
    list_versions,
    pid_alive,
    read_manifest,
    recover_releases,
    staged_by,
)

__all__ = ["ADDED_ITEMS_DIR", "AddItemsError", "add_arguments", "add_items", "run"]

#: Per model name, the items added by :func:`add_items` up to each version
#: (``<base>/<name>/.added_items/<version>.parquet``; TF Serving ignores non-integer folders).
ADDED_ITEMS_DIR = ".added_items"


class AddItemsError(UserError, ValueError):
    """Items cannot be added; the message names the path or item and what to do."""


def _read_items(items: Any, schema: Schema) -> pd.DataFrame:
    """A new-items table (path or DataFrame), validated like the training items table."""
    df, src = read_table(items, "items")
    return feature_table(df, src, "item", schema.side("item"))


def _added_items_path(model_root: Path, version: int) -> Path:
    return model_root / ADDED_ITEMS_DIR / f"{version}.parquet"


def _remove_orphan_records(model_root: Path, log: Callable[[str], None]) -> None:
    """Records of versions that were never published (an add-items killed between writing
    the record and publishing): they would block that version number forever. A record of a
    version being staged by a live process is kept."""
    folder = model_root / ADDED_ITEMS_DIR
    if not folder.is_dir():
        return
    for record in folder.glob("*.parquet"):
        v = record.stem
        if not v.isdigit() or (model_root / v).exists():
            continue
        staging = [d for d in model_root.glob(f"{STAGING_PREFIX}{v}-*")]
        if any(pid_alive(staged_by(d.name, STAGING_PREFIX)) for d in staging):
            continue
        record.unlink(missing_ok=True)
        log(f"removed {record} (its version was never published: a killed add-items)")


def _resolve_local(model_dir: str | os.PathLike[str]) -> tuple[Path, str, int | None]:
    """``export/<name>`` (its highest version) or ``export/<name>/<version>`` ->
    ``(version folder, name, version)``; add-items publishes beside it, so local only."""
    if "://" in str(model_dir):
        raise AddItemsError("add-items publishes next to the model: pass a local model path")
    path = Path(model_dir)
    if is_complete(path):
        version = int(path.name) if path.name.isdigit() else None
        return path, (path.parent.name if version is not None else path.name), version
    if not path.is_dir():
        raise AddItemsError(f"model path {path} does not exist; pass export/<name> (e.g. "
                            "export/student) or export/<name>/<version> as written by "
                            "`tfrs-coldstart export`")
    versions = list_versions(path)
    if not versions:
        raise AddItemsError(f"{path} holds no SavedModel version (no "
                            "<integer>/saved_model.pb); export a run there first with "
                            "`tfrs-coldstart export RUN_DIR`")
    return path / str(versions[-1]), path.name, versions[-1]


def _open_run(run_dir: Path, model_path: Path) -> RunDir:
    try:
        return RunDir.open(run_dir)
    except RunError:
        raise AddItemsError(f"the run folder {run_dir} that trained {model_path} is not there "
                            "(no config.yaml); pass the run folder with --run-dir") from None


def add_items(
    model_dir: str | os.PathLike[str],
    items: Any,
    base_dir: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    version: int | None = None,
    log: Callable[[str], None] | None = None,
    serving_base: str | None = None,
) -> ExportedModel:
    """Add new items to an exported ``recommend`` model and publish a new version.

    Args:
      model_dir: ``export/<name>`` (latest version) or ``export/<name>/<version>``, local.
      items: a CSV/TSV/Parquet path or DataFrame with ``item_id`` and the schema's item
        features (validated like the training items; ids already in the catalogue are an
        error).
      base_dir: publish as ``<base_dir>/<name>/<version>`` (default: beside ``model_dir``).
      run_dir: the run folder that trained the export (default: the manifest's).
      version: the new version (default: the next free one; never overwritten).
      log: progress lines (default: stderr).
      serving_base: where TF Serving sees ``base_dir``, for the base paths of
        ``<base_dir>/models.config`` (default: kept as they are, else ``/models``).

    Returns:
      The published :class:`~tfrs_coldstart.serving.export.ExportedModel`. Its catalogue =
      the run's items + every item added to ``model_dir``'s version before + ``items``,
      embedded as the export embeds new items and indexed with the same index kind, ``k`` and
      recall gate. The publish rewrites ``<base_dir>/models.config``, pinning the model
      to the new version (``export._publish``).
    """
    log = log or _stderr_log
    if serving_base is not None:
        check_serving_base(serving_base)
    path, name, src_version = _resolve_local(model_dir)
    manifest = read_manifest(path)
    if manifest.get("kind") != "recommend" or "model" not in manifest:
        raise AddItemsError(f"{path} is not a `recommend` export of this project (its "
                            "manifest.json is missing or of another kind); pass export/student "
                            "or export/teacher")
    run = _open_run(Path(run_dir if run_dir is not None else manifest.get("run_dir", "")), path)
    which = str(manifest["model"])
    schema = run.schema
    new = _read_items(items, schema)
    label = items if isinstance(items, (str, os.PathLike)) else "<DataFrame items>"
    log(f"loading the catalogue of {run.path} ...")
    data = run.load_dataset()
    src_root = path.parent
    before: list[pd.DataFrame] = [data.items]
    prev = _added_items_path(src_root, src_version) if src_version is not None else None
    if prev is not None and prev.is_file():
        before.append(_read_items(prev, schema))
    catalogue = pd.concat(before, ignore_index=True)
    known = set(catalogue["item_id"].astype(str))
    dup = new["item_id"].astype(str).isin(known).to_numpy()
    if dup.any():
        pos = int(np.argmax(dup))
        raise AddItemsError(f"{label}: column 'item_id', row {pos}: item "
                            f"{new['item_id'].iloc[pos]!r} is already in the catalogue of "
                            f"{path} ({int(dup.sum())} such item(s)); give new items new ids")
    added = pd.concat(before[1:] + [new], ignore_index=True)
    dataset = dataclasses.replace(data, items=pd.concat([catalogue, new], ignore_index=True))
    base = Path(base_dir) if base_dir is not None else src_root.parent
    target = base / name
    recover_releases(base, log)  # complete or roll back what a killed export left
    if serving_base is not None:
        set_serving_base(base, serving_base)
    _remove_orphan_records(target, log)
    if version is None:
        version = 1 + max(list_versions(target, complete_only=False), default=0)
    record = _added_items_path(target, int(version))
    if record.exists() or (target / str(version)).exists():
        raise AddItemsError(f"version {version} of {target} already exists; versions are "
                            "never overwritten: pass another version or omit it")
    gate = (manifest.get("ann_recall") or {}).get("gate")
    params = manifest.get("index_params") or {}
    scann = {key: params[key] for key in params.get("overridden", []) if key in params}
    try:
        buf = io.BytesIO()
        added.to_parquet(buf, index=False)
        atomic_write_bytes(record, buf.getvalue())
        log(f"adding {len(new)} item(s) to {name}: catalogue {len(catalogue)} -> "
            f"{len(dataset.items)} ...")
        out = export_run(run.path, base, models=(which,), index=manifest.get("index"),
                         k=manifest.get("k_requested", manifest.get("k")), version=int(version),
                         names={which: name}, ann_recall_gate=gate, scann=scann or None,
                         item_encoder=False, dataset=dataset, log=log)
    except BaseException:
        record.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            record.parent.rmdir()
        raise
    if serving_base is not None:
        set_serving_base(base, serving_base)
    return out[0]


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tfrs-coldstart add-items ITEMS --model export/student``."""
    p.add_argument("items", help="new items: CSV/TSV or Parquet with item_id and the item "
                                 "features")
    p.add_argument("--model", required=True,
                   help="export/<name> (latest version) or export/<name>/<version>")
    p.add_argument("--run-dir", default=None,
                   help="the run folder that trained the export (default: the manifest's)")
    p.add_argument("--base-dir", default=None,
                   help="publish under BASE/<name>/<version> (default: beside --model)")
    p.add_argument("--version", type=int, default=None, help="new version (default: next)")
    p.add_argument("--serving-base", default=None,
                   help="where TF Serving sees the base dir, for BASE/models.config "
                        "(default: as the existing config has it, else /models)")


def run(args: argparse.Namespace) -> int:
    """Run ``tfrs-coldstart add-items``: one line for the published version; bad input
    raises :class:`AddItemsError` (or a ``DataError``) for the CLI's one error wrapper."""
    m = add_items(args.model, args.items, args.base_dir, args.run_dir, args.version,
                  serving_base=args.serving_base)
    print(f"{m.name:<16} v{m.version}  {m.path}  catalogue "
          f"{m.manifest.get('catalogue_size')} items")
    return 0
