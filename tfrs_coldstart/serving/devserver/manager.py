"""The model manager: which versions of which models are loaded, by TF Serving's rules.

It polls the base paths, applies each model's version policy and labels, loads and warms
a new version fully before publishing it, keeps serving the old one when a new one fails,
and answers the lookups behind every request (resolve) and the model status API.

A version published with others (one export: ``export._publish``) is loaded only once every
model of that release has it on disk; until then the old version keeps serving. A release
cut by a killed export is completed (or rolled back) at start and at the poll that finds it
(which rewrites the base's ``models.config``; a ``specific`` policy there serves exactly the
pinned versions, as TF Serving).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tensorflow_serving.apis import get_model_status_pb2

from tfrs_coldstart.errors import ConfigError
from tfrs_coldstart.serving.devserver.config import (
    BatchingParameters,
    ModelConfig,
    discover_models,
    parse_models_config,
)
from tfrs_coldstart.serving.devserver.errors import RpcError, invalid
from tfrs_coldstart.serving.devserver.servable import LoadedVersion
from tfrs_coldstart.serving.saved_model import (
    RELEASE_PREFIX,
    list_versions,
    recover_releases,
    release_missing,
)
from tfrs_coldstart.serving.status import Code

__all__ = ["ModelManager"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _VersionState:
    """One version's entry in the model status API."""

    state: int  # get_model_status_pb2.ModelVersionStatus.State
    error_code: int = 0
    error_message: str = ""


@dataclass(frozen=True)
class _ModelState:
    """One model: its config, the versions requests may use, and every version's state."""

    config: ModelConfig
    available: Mapping[int, LoadedVersion]
    states: Mapping[int, _VersionState]


_STATE = get_model_status_pb2.ModelVersionStatus


def _versions_on_disk(base: Path) -> dict[int, Path]:
    """Integer-named folders that hold a complete SavedModel (others are ignored, as TF Serving)."""
    return {v: base / str(v) for v in list_versions(base)}


class ModelManager:
    """Owns every loaded version. State is swapped whole, so readers never see a half update."""

    def __init__(
        self,
        model_base: Path | None,
        models_config: Path | None,
        batching: BatchingParameters | None = None,
        on_batch: Callable[[str, int], None] | None = None,
        on_versions: Callable[[str, int], None] | None = None,
    ) -> None:
        self.model_base = Path(model_base) if model_base is not None else None
        self.models_config = Path(models_config) if models_config is not None else None
        self.batching = batching
        self._on_batch = on_batch
        self._on_versions = on_versions
        self._models: dict[str, _ModelState] = {}
        self._failed: dict[tuple[str, int], float] = {}
        self._warned_empty: set[str] = set()
        self._held: set[tuple[str, int]] = set()
        self._poll_lock = threading.Lock()
        self._config_stamp: tuple[int, int, int] | None = None
        self._configs = self._read_configs()
        # Releases cut by a killed export are completed (or rolled back) before the first
        # scan, so this server starts with whole releases (serving.export._publish).
        self._recover(every=True)

    def _recover(self, every: bool) -> None:
        """Finish releases cut by killed exports under each base (``every``: also clean their
        temporaries; else only where a release record is left). Recovery rewrites the base's
        models.config, which the next :meth:`_refresh_configs` reads."""
        for base in sorted({c.base_path.parent for c in self._configs}):
            if not every and not any(base.glob(f"{RELEASE_PREFIX}*.json")):
                continue
            try:
                recover_releases(base, log.info)
            except OSError as exc:
                log.error("cannot finish the interrupted releases under %s: %s", base, exc)

    def _read_configs(self) -> list[ModelConfig]:
        if self.models_config is not None:
            self._config_stamp = self._stamp_config()
            return parse_models_config(self.models_config, self.model_base)
        if self.model_base is None:
            raise ConfigError("give a model base path or a models config")
        return discover_models(self.model_base)

    def _refresh_configs(self) -> None:
        try:
            if self.models_config is not None:
                if self._stamp_config() != self._config_stamp:
                    self._configs = self._read_configs()
                    log.info("reloaded %s", self.models_config)
            elif self.model_base is not None:
                self._configs = discover_models(self.model_base)
        except (ConfigError, OSError) as exc:
            log.error("keeping the previous model config: %s", exc)

    def _stamp_config(self) -> tuple[int, int, int]:
        """Identity of the config file: the exporter replaces it by a rename (a new inode),
        possibly twice within the file system's mtime granularity."""
        assert self.models_config is not None
        st = self.models_config.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    @property
    def model_names(self) -> list[str]:
        """The models currently known (each with or without a loaded version)."""
        return sorted(self._models)

    def poll(self) -> None:
        """Scan every base path once: load wanted versions, publish, unload the rest."""
        with self._poll_lock:
            # a release cut by a killed export: with a models.config pinning versions, no
            # version of it is wanted (so _release_whole never sees it); finish it here
            self._recover(every=False)
            self._refresh_configs()
            configs = {c.name: c for c in self._configs}
            for name in list(self._models):
                if name not in configs:
                    self._unload_model(name)
            for cfg in configs.values():
                self._poll_model(cfg)

    def _publish(self, name: str, state: _ModelState | None) -> None:
        models = dict(self._models)
        if state is None:
            models.pop(name, None)
        else:
            models[name] = state
        self._models = models  # one reference swap: requests see old or new, never a mix
        if self._on_versions:
            self._on_versions(name, len(state.available) if state else 0)

    def _unload_model(self, name: str) -> None:
        old = self._models.get(name)
        self._publish(name, None)
        if old:
            for lv in old.available.values():
                lv.close()

    def _poll_model(self, cfg: ModelConfig) -> None:
        """One model: load what its policy wants and is new, then publish, then unload."""
        old = self._models.get(cfg.name) or _ModelState(cfg, {}, {})
        on_disk = _versions_on_disk(cfg.base_path)
        if not on_disk and cfg.name not in self._warned_empty:
            self._warned_empty.add(cfg.name)
            log.warning("no versions of model %s found under %s", cfg.name, cfg.base_path)
        wanted = cfg.wanted(sorted(on_disk))
        available = dict(old.available)
        states = dict(old.states)
        to_load = []
        for v in sorted(wanted - set(available)):
            stamp = self._stamp(on_disk[v])
            if self._failed.get((cfg.name, v)) == stamp:
                continue
            if not self._release_whole(cfg, v, on_disk[v]):
                continue
            to_load.append(v)
        if to_load:
            for v in to_load:
                states[v] = _VersionState(_STATE.LOADING)
            self._publish(cfg.name, _ModelState(cfg, dict(available), dict(states)))
        for v in to_load:
            lv = self._load(cfg.name, v, on_disk[v])
            if isinstance(lv, LoadedVersion):
                available[v] = lv
                states[v] = _VersionState(_STATE.AVAILABLE)
                self._failed.pop((cfg.name, v), None)
            else:
                self._failed[(cfg.name, v)] = self._stamp(on_disk[v])
                states[v] = _VersionState(_STATE.END, Code.UNKNOWN.value[0], lv)
        unwanted = [v for v in available if v not in wanted]
        # Availability first: never unload the last serving versions for ones that failed.
        if unwanted and not any(v in available for v in wanted):
            unwanted = []
        dropped = [available.pop(v) for v in unwanted]
        for v in unwanted:
            states[v] = _VersionState(_STATE.END)
        if to_load or dropped or cfg != old.config or cfg.name not in self._models:
            self._publish(cfg.name, _ModelState(cfg, available, states))
        for lv in dropped:
            log.info("unloaded %s version %d", cfg.name, lv.version)
            lv.close()

    def _release_whole(self, cfg: ModelConfig, version: int, path: Path) -> bool:
        """Whether this version may load: no release record names it with a model of its
        release still without it (``release_missing``). If one does, releases of killed
        exports under the base are finished first (``recover_releases``); a release still
        being published holds the version back, the old one serving, until a later poll."""
        missing = release_missing(path)
        if missing:
            try:
                recover_releases(cfg.base_path.parent, log.info)
            except OSError as exc:
                log.error("cannot finish the interrupted releases under %s: %s",
                          cfg.base_path.parent, exc)
            missing = release_missing(path)
        key = (cfg.name, version)
        if not missing:
            self._held.discard(key)
            return True
        if key not in self._held:
            self._held.add(key)
            log.info("holding %s version %d until its release is whole (missing %s)",
                     cfg.name, version, ", ".join(missing))
        return False

    @staticmethod
    def _stamp(path: Path) -> float:
        try:
            return max(path.stat().st_mtime, (path / "saved_model.pb").stat().st_mtime)
        except OSError:
            return path.stat().st_mtime

    def _load(self, name: str, version: int, path: Path) -> LoadedVersion | str:
        t0 = time.perf_counter()
        try:
            lv = LoadedVersion(name, version, path, self.batching, self._on_batch)
            warmed = lv.warm_up()
        except Exception as exc:  # noqa: BLE001 - a bad version must not stop the server
            msg = f"Loading servable: {{name: {name} version: {version}}} failed: {exc}"
            log.error(msg)
            return msg
        log.info(
            "loaded %s version %d from %s in %.2fs (%d warm-up requests)",
            name,
            version,
            path,
            time.perf_counter() - t0,
            warmed,
        )
        return lv

    # -- lookups -------------------------------------------------------------------------------
    def resolve(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> LoadedVersion:
        """The servable for a request, with TF Serving's errors for unknown name/version/label."""
        if version is not None and label is not None:
            raise invalid(
                f"Both model version ({version}) and model version label ({label}) "
                "cannot be supplied."
            )
        state = self._models.get(name)
        if label is not None:
            if state is None or label not in state.config.labels:
                raise invalid(f"Unrecognized servable version label: {label}")
            version = state.config.labels[label]
        if state is None or not state.available:
            which = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise RpcError(Code.NOT_FOUND, f"Servable not found for request: {which}")
        if version is None:
            return state.available[max(state.available)]
        lv = state.available.get(version)
        if lv is None:
            raise RpcError(
                Code.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})"
            )
        return lv

    def status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """ModelService.GetModelStatus: every version's state, newest first, with TF Serving's
        NOT_FOUND texts for an unknown model or version."""
        state = self._models.get(name)
        if label is not None:
            if state is None or label not in state.config.labels:
                raise invalid(f"Unrecognized servable version label: {label}")
            version = state.config.labels[label]
        response = get_model_status_pb2.GetModelStatusResponse()
        states = dict(state.states) if state else {}
        if version is not None:
            if version not in states:
                raise RpcError(Code.NOT_FOUND, f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise RpcError(Code.NOT_FOUND, f"Could not find any versions of model {name}")
        for v in sorted(states, reverse=True):
            st = states[v]
            item = response.model_version_status.add(version=v, state=st.state)
            item.status.error_code = st.error_code
            item.status.error_message = st.error_message
        return response

    def close(self) -> None:
        """Unload every version (their batchers finish the requests already queued)."""
        models, self._models = self._models, {}
        for st in models.values():
            for lv in st.available.values():
                lv.close()
