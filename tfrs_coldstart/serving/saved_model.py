"""A model base path as TF Serving lays it out: ``<base>/<name>/<version>/`` SavedModels.

One place for what the exporter writes and the dev server, batch retrieval and add-items
read back: the integer version folders, the warm-up file, the manifest, the ScaNN op
library a ScaNN index needs before its SavedModel loads, the release records of a publish
and ``<base>/models.config``, the one file whose rename switches TF Serving to a release.
Paths may be local or remote (``gs://``): everything goes through ``tf.io.gfile`` (publishing
and the release switch are local only).

Example::

    versions = list_versions("export/student")          # [1, 2]
    manifest = read_manifest(f"export/student/{versions[-1]}")
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tfrs_coldstart.errors import ConfigError
from tfrs_coldstart.fileio import process_alive, writer_pid

__all__ = [
    "DEFAULT_SERVING_BASE",
    "KEEP_RELEASES",
    "MANIFEST_FILE",
    "MODELS_CONFIG",
    "STOCK_MODELS_CONFIG",
    "WARMUP_FILE",
    "check_serving_base",
    "configured_versions",
    "import_scann",
    "is_complete",
    "list_versions",
    "pid_alive",
    "read_manifest",
    "recover_releases",
    "release_missing",
    "row_groups",
    "served_releases",
    "staged_by",
    "write_models_config",
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
      removed (an export killed before its release was decided: nothing was published), and
      temporaries of dead writers' config rewrites (``.models.config.<pid>-*.tmp``).
    - When a release was completed or rolled back, ``models.config`` is rewritten
      (:func:`write_models_config`): a completed release is switched to at once.

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
    changed = bool(done)  # a release completed or rolled back: the config must follow it
    for staged in sorted(root.glob(f"*/{STAGING_PREFIX}*")):
        if staged in keep or pid_alive(staged_by(staged.name, STAGING_PREFIX)):
            continue
        shutil.rmtree(staged, ignore_errors=True)
        done.append(f"removed {staged} (left by a killed export)")
    for cfg in (MODELS_CONFIG, STOCK_MODELS_CONFIG):  # temporaries of killed config writes
        for tmp in root.glob(f".{cfg}.*.tmp"):
            if not pid_alive(writer_pid(tmp.name, f".{cfg}.")):
                tmp.unlink(missing_ok=True)
                done.append(f"removed {tmp} (left by a killed export)")
    for line in done:
        if log is not None:
            log(line)
    if changed:
        write_models_config(root, log=log)
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


# ---- the release switch: <base>/models.config (TF Serving's ModelServerConfig) -------------

#: ``<base>/models.config``: TF Serving's ``ModelServerConfig`` pinning each model under the
#: base to the versions of its newest whole releases (``specific`` policy). Rewritten in one
#: atomic rename after every publish, so TF Serving started on it switches releases at once.
MODELS_CONFIG = "models.config"
#: Whole releases kept loaded per model: the newest, and the one before it so a client can
#: pin one version across models while TF Serving loads the new one model by model (the
#: committed configs' ``latest { num_versions: 2 }`` before the switch existed).
KEEP_RELEASES = 2
#: The same without the models whose pinned version holds a ScaNN index: for the official
#: TF Serving image, which lacks ScaNN's ops (Dockerfile's ``stock`` target).
STOCK_MODELS_CONFIG = "models.stock.config"
#: Where TF Serving sees the base (its configs need absolute base paths): the Docker images
#: copy ``export/`` to ``/models`` and ``serving/docker-compose.yml`` mounts it there.
DEFAULT_SERVING_BASE = "/models"
_CONFIG_HEADER = """\
# Written by tfrs-coldstart (export, add-items, release recovery) after every publish; edits
# are overwritten. Each model is pinned to the versions of its newest whole releases (the
# newest and the one before), so a TF Serving started with --model_config_file=<this file>
# --model_config_file_poll_wait_seconds=N ignores the version folders of a release until all
# of them are on disk and this file is replaced (one rename). {what}
"""


def _release_of(name: str, version: int, manifest: Mapping[str, Any]) -> list[str]:
    """The models published together with ``<name>/<version>`` (its manifest's release;
    itself alone for versions without one: older exports, other code)."""
    release = manifest.get("release")
    if isinstance(release, dict) and release.get("version") == version:
        names = release.get("models")
        if isinstance(names, list) and name in names:
            return [n for n in names if isinstance(n, str)]
    return [name]


def served_releases(base: str | os.PathLike[str], keep: int = KEEP_RELEASES
                    ) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Per model under a local base, ``(version, manifest)`` of its ``keep`` newest *whole*
    versions, newest first: complete versions whose release (the models exported with it,
    its manifest's ``"release"``) has that version complete on disk for every one of its
    models that has a folder under the base (a model folder copied alone to another base is
    whole there). So a release cut by a crash, or being renamed into place now, is never
    chosen (its models keep their previous versions), and a model left out of a newer
    release (``add-items`` publishes one model) keeps its own. A model with no whole release
    is left out.
    """
    root = Path(base)
    on_disk: dict[str, dict[int, dict[str, Any]]] = {}
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                versions = list_versions(folder)
                if versions:
                    on_disk[folder.name] = {v: read_manifest(folder / str(v)) for v in versions}
    chosen: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for name, versions in on_disk.items():
        whole = [(v, versions[v]) for v in sorted(versions, reverse=True)
                 if all(v in on_disk.get(m, {}) or not (root / m).is_dir()
                        for m in _release_of(name, v, versions[v]))]
        if whole:
            chosen[name] = whole[:keep]
    return chosen


def configured_versions(config_file: str | os.PathLike[str]) -> dict[str, list[int]]:
    """The ``specific`` versions a ModelServerConfig file pins, by model (``{}`` when the
    file is missing or unreadable; a model with another policy maps to ``[]``)."""
    cfg = _read_config(Path(config_file))
    if cfg is None:
        return {}
    return {c.name: list(c.model_version_policy.specific.versions)
            for c in cfg.model_config_list.config}


def _read_config(path: Path) -> Any:
    try:
        return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    except (OSError, text_format.ParseError):
        return None


def _serving_base_of(path: Path) -> str | None:
    """The folder the config's base paths share (``/models`` for ``/models/<name>``)."""
    cfg = _read_config(path)
    if cfg is None:
        return None
    bases = {posixpath.dirname(c.base_path.rstrip("/")) for c in cfg.model_config_list.config
             if posixpath.basename(c.base_path.rstrip("/")) == c.name}
    return bases.pop() if len(bases) == 1 else None


def check_serving_base(serving_base: str) -> str:
    """``serving_base`` without a trailing slash; :class:`ConfigError` if it is relative.

    TF Serving 2.20 refuses relative base paths (server_core.cc, ValidateModelConfigList:
    the model server never sets ``model_config_list_root_dir``)."""
    if not (serving_base.startswith("/") or "://" in serving_base):
        raise ConfigError(f"--serving-base {serving_base!r} must be an absolute path (or a URI "
                          "such as gs://bucket/models): where TF Serving sees the export "
                          f"folder, e.g. {DEFAULT_SERVING_BASE} in the Docker images")
    return serving_base.rstrip("/") or "/"


def _render(models: Mapping[str, list[tuple[int, dict[str, Any]]]], serving_base: str,
            what: str) -> str:
    cfg = model_server_config_pb2.ModelServerConfig()
    cfg.model_config_list.SetInParent()
    for name, versions in sorted(models.items()):
        entry = cfg.model_config_list.config.add(
            name=name, base_path=posixpath.join(serving_base, name),
            model_platform="tensorflow")
        entry.model_version_policy.specific.versions.extend(sorted(v for v, _ in versions))
    return _CONFIG_HEADER.format(what=what) + text_format.MessageToString(cfg)


@contextlib.contextmanager
def _config_lock(root: Path) -> Iterator[None]:
    """One config writer per base at a time, so a writer that read the base earlier never
    replaces the config of one that read it later (two exports finishing together)."""
    fd = os.open(root / f".{MODELS_CONFIG}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it); skipped where folders cannot be synced."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_durably(path: Path, text: str) -> None:
    """Temporary file beside ``path`` (named with this pid, so a killed writer's is
    recognised), flushed, renamed over ``path`` in one step, then the folder flushed: a
    reader or a power loss sees the old file or the new one, never a mix. (``fileio``'s
    atomic writes do not fsync; the release switch must survive a power loss.)"""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_models_config(base: str | os.PathLike[str], serving_base: str | None = None,
                        log: Any = None) -> bool:
    """(Re)write ``<base>/models.config`` and ``<base>/models.stock.config`` for a local base.

    Every model under the base is pinned (``model_version_policy { specific { versions: P
    versions: N } }``) to the versions of its two newest whole releases
    (:func:`served_releases`): TF Serving serves N to requests without a version and keeps P
    for clients pinning it during a switch. The stock file leaves out versions holding a
    ScaNN index (manifest ``index``), and models left with none.
    Base paths are ``<serving_base>/<name>``: where TF Serving sees the base, which it needs
    absolute. ``serving_base`` defaults to the one the existing config uses, else
    :data:`DEFAULT_SERVING_BASE`. Each file is replaced in one durable rename, and only when
    its text changes; a base without models gets no new file (an existing one is rewritten
    empty). Returns whether a file changed. Remote bases (``gs://``) are skipped.
    """
    if "://" in str(base):
        return False
    root = Path(base)
    if not root.is_dir():
        return False
    with _config_lock(root):
        main = root / MODELS_CONFIG
        serving = check_serving_base(serving_base or _serving_base_of(main)
                                      or DEFAULT_SERVING_BASE)
        models = served_releases(root)
        stock = {n: kept for n, vs in models.items()
                 if (kept := [(v, m) for v, m in vs if m.get("index") != "scann"])}
        changed = False
        for path, chosen, what in (
                (main, models, "Every model under the base (TF Serving with ScaNN's ops)."),
                (root / STOCK_MODELS_CONFIG, stock, "Models with a ScaNN index are left out "
                 "(the official TF Serving image lacks ScaNN's ops).")):
            text = _render(chosen, serving, what)
            if not chosen and not path.exists():
                continue
            with contextlib.suppress(OSError):
                if path.read_text(encoding="utf-8") == text:
                    continue
            _replace_durably(path, text)
            changed = True
        if changed and log is not None:
            log(f"{main}: " + (", ".join(f"{n} {vs[0][0]}" for n, vs in sorted(models.items()))
                               or "no models"))
        return changed
