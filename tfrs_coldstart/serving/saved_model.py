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
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tfrs_coldstart.fileio import process_alive

__all__ = [
    "MANIFEST_FILE",
    "WARMUP_FILE",
    "import_scann",
    "is_complete",
    "list_versions",
    "pid_alive",
    "read_manifest",
    "recover_releases",
    "release_missing",
    "row_groups",
    "staged_by",
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


# ---- calling a served model -----------------------------------------------------------------

#: Most "rows x longest string cell" bytes one call of a model is given (``row_groups``).
STRING_PAD_BUDGET = 1024 * 1024


def row_groups(inputs: Mapping[str, np.ndarray], rows: int,
               budget: int = STRING_PAD_BUDGET) -> list[slice]:
    """Consecutive row ranges to call a model on, so no call pads more than ``budget`` bytes.

    The exported towers split string cells (multi-hot tags, a history) and pad the pieces to
    the longest row of the call, so one 1 MB cell among 64 rows costs ~640 MiB, 64 times what
    it costs alone. Rows are grouped while ``rows x longest string cell`` stays within
    ``budget`` (a row over it alone); results are the same, as every row is scored on its
    own. Inputs that are not strings with ``rows`` rows are not looked at.
    """
    longest = np.zeros(rows, dtype=np.int64)
    for arr in inputs.values():
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "OSU":
            continue
        if arr.ndim >= 1 and arr.shape[0] == rows and arr.size:
            cells = np.fromiter(map(len, arr.reshape(-1)), dtype=np.int64, count=arr.size)
            np.maximum(longest, cells.reshape(rows, -1).max(axis=1), out=longest)
    if rows == 0 or rows * int(longest.max()) <= budget:
        return [slice(0, rows)]
    groups, start, top = [], 0, 0
    for i, n in enumerate(longest.tolist()):
        if i > start and (i - start + 1) * max(top, n) > budget:
            groups.append(slice(start, i))
            start, top = i, 0
        top = max(top, n)
    groups.append(slice(start, rows))
    return groups


# ---- releases: several models published together (export.py's _publish) -------------------

#: ``<base>/.release-<version>-<pid>-<random>.json``: a release being published (see
#: ``export._publish``): ``{"version": v, "models": [{"staged": "<name>/.tmp-...",
#: "final": "<name>/<v>"}, ...]}``, paths relative to ``<base>``.
RELEASE_PREFIX = ".release-"
#: ``<base>/<name>/.tmp-<version>-<pid>-<random>``: a version folder being written.
STAGING_PREFIX = ".tmp-"


def staged_by(name: str, prefix: str) -> int | None:
    """The writer's pid in ``<prefix><version>-<pid>-<random>...`` (None if not so named)."""
    parts = name[len(prefix):].split("-") if name.startswith(prefix) else []
    return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None


def pid_alive(pid: int | None) -> bool:
    """Whether the writer ``pid`` (of :func:`staged_by`) still runs on this machine."""
    return pid is not None and process_alive(pid)


def recover_releases(base: str | os.PathLike[str], log: Any = None) -> list[str]:
    """Finish what killed exports left under a local model base; what was done, one line each.

    - A release record whose writer is gone (its renames were cut by a crash) is completed
      when every model it lists is on disk (staged or already renamed): the rest are renamed
      into place, so TF Serving gets the whole release; if a model is missing (removed by
      hand), the release is rolled back instead (its renamed versions removed), so it gets
      none of it. Then the record is removed.
    - Hidden staging folders (``<name>/.tmp-*``) of dead writers that no record names are
      removed (an export killed before its release was decided: nothing was published).

    Records and folders of a live writer (another export running now) are left alone.
    Remote bases (``gs://``) are skipped: their exports are not renamed folder by folder.
    """
    done: list[str] = []
    if "://" in str(base):
        return done
    root = Path(base)
    if not root.is_dir():
        return done
    keep: set[Path] = set()
    for record in sorted(root.glob(f"{RELEASE_PREFIX}*.json")):
        if pid_alive(staged_by(record.name, RELEASE_PREFIX)):
            keep.update(root / m["staged"] for m in _release_models(record))
            continue
        models = _release_models(record)
        pairs = [(root / m["staged"], root / m["final"]) for m in models]
        complete = bool(pairs) and all(
            (st.is_dir() and not fi.exists()) or (fi.is_dir() and not st.exists())
            for st, fi in pairs)
        if complete:
            for st, fi in pairs:
                if st.is_dir():
                    os.rename(st, fi)
            done.append(f"completed the interrupted release {record.name} "
                        f"({', '.join(str(fi) for _, fi in pairs)})")
        else:
            for st, fi in pairs:
                if fi.is_dir() and not st.exists():
                    shutil.rmtree(fi, ignore_errors=True)
                shutil.rmtree(st, ignore_errors=True)
            done.append(f"rolled back the interrupted release {record.name} (a model of it "
                        "is missing)")
        record.unlink(missing_ok=True)
    for staged in sorted(root.glob(f"*/{STAGING_PREFIX}*")):
        if staged in keep or pid_alive(staged_by(staged.name, STAGING_PREFIX)):
            continue
        shutil.rmtree(staged, ignore_errors=True)
        done.append(f"removed {staged} (left by a killed export)")
    for line in done:
        if log is not None:
            log(line)
    return done


def release_missing(version_dir: str | os.PathLike[str]) -> list[str]:
    """The models of a version's release not yet published, as ``<name>/<version>``: while a
    release record (``export._publish``: a publish under way, or cut by a crash) names this
    version, the models of its release (its manifest's ``"release"``) that do not have the
    version on disk. ``[]`` when the release is whole, finished (no record: a model removed
    by hand later does not hold the others back) or not recorded (older exports, other code).

    A server that loads a version only when this is empty never serves part of a release.
    """
    release = read_manifest(version_dir).get("release")
    if not isinstance(release, dict):
        return []
    version, names = release.get("version"), release.get("models")
    if not isinstance(version, int) or not isinstance(names, list):
        return []
    model_dir = os.path.dirname(str(version_dir).rstrip("/"))
    base = os.path.dirname(model_dir)
    missing = [f"{n}/{version}" for n in names
               if isinstance(n, str) and not is_complete(f"{base}/{n}/{version}")]
    if not missing or "://" in base:
        return missing
    this = f"{os.path.basename(model_dir)}/{version}"
    named = any(this in {m["final"] for m in _release_models(record)}
                for record in Path(base).glob(f"{RELEASE_PREFIX}*.json"))
    return missing if named else []


def _release_models(record: Path) -> list[dict[str, str]]:
    try:
        models = json.loads(record.read_text()).get("models", [])
        return [m for m in models if isinstance(m, dict) and {"staged", "final"} <= set(m)]
    except (OSError, ValueError, AttributeError):
        return []

