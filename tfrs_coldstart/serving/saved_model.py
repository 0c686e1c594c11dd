"""A model base path as TF Serving lays it out: ``<base>/<name>/<version>/`` SavedModels.

One place for what the exporter writes and the dev server, batch retrieval and add-items
read back: the integer version folders, the warm-up file, the manifest, and the ScaNN op
library a ScaNN index needs before its SavedModel loads. Paths may be local or remote
(``gs://``): everything goes through ``tf.io.gfile``.

Example::

    versions = list_versions("export/student")          # [1, 2]
    manifest = read_manifest(f"export/student/{versions[-1]}")
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import tensorflow as tf

__all__ = [
    "MANIFEST_FILE",
    "WARMUP_FILE",
    "import_scann",
    "is_complete",
    "list_versions",
    "read_manifest",
]

#: Warm-up requests (``PredictionLog`` TFRecords) inside a version folder; TF Serving
#: replays them before it publishes the version.
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
#: This project's record of a version (schema, config, metrics, index parameters).
MANIFEST_FILE = "manifest.json"
_GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")


def import_scann() -> None:
    """Register ScaNN's custom ops so a SavedModel with a ScaNN index loads.

    Harmless without ScaNN: brute-force and stock-ops exports do not need it.
    """
    with contextlib.suppress(ImportError):  # optional heavy extra: only its ops are needed
        import scann  # noqa: F401


def is_complete(version_dir: str | os.PathLike[str]) -> bool:
    """Whether a folder holds a SavedModel graph (``saved_model.pb`` or ``.pbtxt``)."""
    path = str(version_dir).rstrip("/")
    return any(tf.io.gfile.exists(f"{path}/{name}") for name in _GRAPH_FILES)


def list_versions(model_dir: str | os.PathLike[str], *, complete_only: bool = True) -> list[int]:
    """The integer version folders under ``<base>/<name>``, ascending.

    ``complete_only`` (the default) keeps those holding a SavedModel, i.e. what TF Serving
    would load; ``False`` lists every integer folder, i.e. the version numbers already
    taken (a new version must not reuse one). Other folders (``.tmp-*``, ``.added_items``)
    are ignored, as TF Serving ignores them. A missing ``model_dir`` has no versions.
    """
    path = str(model_dir).rstrip("/") or "/"
    gfile = tf.io.gfile
    if not gfile.isdir(path):
        return []
    found = []
    for entry in gfile.listdir(path):
        name = entry.rstrip("/")
        if not (name.isascii() and name.isdigit()):
            continue
        sub = f"{path}/{name}"
        if gfile.isdir(sub) and (not complete_only or is_complete(sub)):
            found.append(int(name))
    return sorted(found)


def read_manifest(version_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A version's manifest, or ``{}`` when it has none or it cannot be read.

    A SavedModel without a manifest (exported by other code) is still servable, so a
    missing manifest is not an error here; callers that need one say so.
    """
    path = f"{str(version_dir).rstrip('/')}/{MANIFEST_FILE}"
    if not tf.io.gfile.exists(path):
        return {}
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (ValueError, OSError):
        return {}
