"""The release switch (issue 15, item 3): ``<base>/models.config`` pins every model to the
versions of its two newest whole releases, rewritten in one rename after the last model of a
release is renamed into place, so a TF Serving started on it never sees part of a release.

Every test here failed before the switch existed (no config was written).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import Crash, TinyModule, fail_rename
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfrs_coldstart.cli import main as cli_main
from tfrs_coldstart.serving import saved_model
from tfrs_coldstart.serving.export import ExportError, _Planned, _publish
from tfrs_coldstart.serving.saved_model import list_versions, recover_releases

# the files' names spelled out, so every test runs (and fails) on code without the switch
MODELS_CONFIG = "models.config"  # saved_model.MODELS_CONFIG
STOCK_MODELS_CONFIG = "models.stock.config"  # saved_model.STOCK_MODELS_CONFIG


def _planned(names: tuple[str, ...] = ("m0", "m1", "m2"), index: str | None = None
             ) -> list[_Planned]:
    return [_Planned(n, "item_encoder", "student", TinyModule(1.0), {"name": n, "index": index}, [])
            for n in names]


def _pinned(base: Path, file: str = MODELS_CONFIG) -> dict[str, tuple[str, list[int]]]:
    """The config as TF Serving parses it: model -> (base_path, specific versions)."""
    cfg = text_format.Parse((base / file).read_text(),
                            model_server_config_pb2.ModelServerConfig())
    out = {}
    for c in cfg.model_config_list.config:
        assert c.model_platform == "tensorflow"
        assert c.model_version_policy.WhichOneof("policy_choice") == "specific"
        out[c.name] = (c.base_path, list(c.model_version_policy.specific.versions))
    return out


def _versions(base: Path, file: str = MODELS_CONFIG) -> dict[str, list[int]]:
    return {n: v for n, (_, v) in _pinned(base, file).items()}


def _quiet(msg: str) -> None:
    pass


def test_publish_pins_each_model_to_its_newest_whole_release(tmp_path: Path) -> None:
    base = tmp_path / "export"
    _publish(_planned(), base, 1, "brute-force", _quiet)
    pinned = _pinned(base)
    assert pinned == {f"m{i}": (f"/models/m{i}", [1]) for i in range(3)}
    _publish(_planned(("m0", "m1")), base, 2, "brute-force", _quiet)  # m2 not in release 2
    assert _versions(base) == {"m0": [1, 2], "m1": [1, 2], "m2": [1]}
    _publish(_planned(("m0",)), base, 3, "brute-force", _quiet)  # the two newest are kept
    assert _versions(base) == {"m0": [2, 3], "m1": [1, 2], "m2": [1]}
    # a ScaNN version is left out of the stock image's config, kept in the full one
    _publish(_planned(("m1",), index="scann"), base, 4, "scann", _quiet)
    assert _versions(base) == {"m0": [2, 3], "m1": [2, 4], "m2": [1]}
    assert _versions(base, STOCK_MODELS_CONFIG) == {"m0": [2, 3], "m1": [2], "m2": [1]}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_crash_at_any_rename_keeps_the_old_release_configured(tmp_path: Path, monkeypatch,
                                                                k: int) -> None:
    """Part of release 2 is on disk, but the config (what TF Serving loads) still names
    release 1; once recovery completes release 2 the config names all of it."""
    base = tmp_path / "export"
    _publish(_planned(), base, 1, "brute-force", _quiet)
    before = (base / MODELS_CONFIG).read_bytes()
    fail_rename(monkeypatch, k, Crash())
    with pytest.raises(Crash):
        _publish(_planned(), base, 2, "brute-force", _quiet)
    monkeypatch.undo()
    assert [list_versions(base / f"m{i}") for i in range(3)].count([1, 2]) == k - 1
    assert (base / MODELS_CONFIG).read_bytes() == before
    monkeypatch.setattr(saved_model, "pid_alive", lambda pid: False)  # its writer is gone
    recover_releases(base)
    assert _versions(base) == {"m0": [1, 2], "m1": [1, 2], "m2": [1, 2]}


@pytest.mark.parametrize("k", [1, 3])
def test_a_failed_rename_leaves_the_config_as_it_was(tmp_path: Path, monkeypatch,
                                                     k: int) -> None:
    base = tmp_path / "export"
    _publish(_planned(), base, 1, "brute-force", _quiet)
    before = (base / MODELS_CONFIG).read_bytes()
    fail_rename(monkeypatch, k, OSError(28, "No space left on device"))
    with pytest.raises(ExportError, match="nothing was published"):
        _publish(_planned(), base, 2, "brute-force", _quiet)
    assert (base / MODELS_CONFIG).read_bytes() == before
    assert [list_versions(base / f"m{i}") for i in range(3)] == [[1], [1], [1]]


def test_the_config_rename_is_the_commit_point(tmp_path: Path, monkeypatch) -> None:
    """A crash at the config's own rename: every folder of release 2 is on disk, the config
    names release 1 (recovery switches it). A failed config write undoes the release. A
    crash just after the switch keeps release 2 (no undo would unload served versions)."""
    base = tmp_path / "export"
    _publish(_planned(), base, 1, "brute-force", _quiet)
    before = (base / MODELS_CONFIG).read_bytes()
    real = os.replace

    def replace_crashing(exc: BaseException) -> Any:
        def replace(src: Any, dst: Any) -> None:
            if Path(dst).name == MODELS_CONFIG:
                raise exc
            real(src, dst)
        return replace

    monkeypatch.setattr(saved_model.os, "replace", replace_crashing(Crash()))
    with pytest.raises(Crash):
        _publish(_planned(), base, 2, "brute-force", _quiet)
    monkeypatch.undo()
    assert [list_versions(base / f"m{i}") for i in range(3)] == [[1, 2]] * 3
    assert (base / MODELS_CONFIG).read_bytes() == before
    monkeypatch.setattr(saved_model, "pid_alive", lambda pid: False)
    assert any("completed" in line for line in recover_releases(base))
    assert _versions(base) == {"m0": [1, 2], "m1": [1, 2], "m2": [1, 2]}
    monkeypatch.undo()

    before = (base / MODELS_CONFIG).read_bytes()
    monkeypatch.setattr(saved_model.os, "replace", replace_crashing(OSError(5, "I/O error")))
    with pytest.raises(ExportError, match="models.config .*nothing was published"):
        _publish(_planned(), base, 3, "brute-force", _quiet)
    monkeypatch.undo()
    assert [list_versions(base / f"m{i}") for i in range(3)] == [[1, 2]] * 3
    assert (base / MODELS_CONFIG).read_bytes() == before

    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.startswith(".release-"):
            raise Crash()
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(Crash):
        _publish(_planned(), base, 4, "brute-force", _quiet)
    monkeypatch.undo()
    assert _versions(base) == {"m0": [2, 4], "m1": [2, 4], "m2": [2, 4]}
    assert [list_versions(base / f"m{i}") for i in range(3)] == [[1, 2, 4]] * 3


def test_the_config_is_flushed_and_swapped_after_every_model_rename(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """What a power loss can leave: the config's data is on disk before its rename, the
    rename comes after every model's and before the release record goes, and the folder
    entry is flushed after it."""
    base = tmp_path / "export"
    base.mkdir()
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace, real_unlink = (os.fsync, os.rename, os.replace,
                                                          Path.unlink)

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", lambda s, d: (events.append(("rename", str(d))),
                                                    real_rename(s, d))[1])
    monkeypatch.setattr(os, "replace", lambda s, d: (events.append(("replace", str(d))),
                                                     real_replace(s, d))[1])
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (
        events.append(("unlink", str(self))), real_unlink(self, missing_ok=missing_ok))[1])
    _publish(_planned(), base, 1, "brute-force", _quiet)
    monkeypatch.undo()
    swap = events.index(("replace", str(base / MODELS_CONFIG)))
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    record = [i for i, (kind, p) in enumerate(events) if kind == "unlink" and ".release-" in p]
    assert len(renames) == 3 and renames[-1] < swap < record[0]
    assert events[swap - 1][0] == "fsync" and ".models.config." in events[swap - 1][1]
    assert ("fsync", str(base.resolve())) in events[swap + 1:record[0]]


def test_dev_server_on_the_config_serves_exactly_the_pinned_versions(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """The same file the TF Serving images read: the dev server loads the pinned versions
    only (not the newest folder, not the two newest folders), holds a cut release back and
    takes the whole of it once recovery has switched the config."""
    from tfrs_coldstart.serving.devserver.manager import ModelManager

    base = tmp_path / "export"
    for version, names in ((1, ("m0", "m1", "m2")), (2, ("m0", "m1")), (3, ("m0",))):
        _publish(_planned(names), base, version, "brute-force", _quiet)
    fail_rename(monkeypatch, 2, Crash())  # release 4: m0/4 on disk, m1/4 and m2/4 not
    with pytest.raises(Crash):
        _publish(_planned(), base, 4, "brute-force", _quiet)
    monkeypatch.undo()
    assert list_versions(base / "m0") == [1, 2, 3, 4]
    manager = ModelManager(None, base / MODELS_CONFIG)

    def loaded() -> dict[str, list[int]]:
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return {n: sorted(int(s.version) for s in manager.status(n).model_version_status
                          if s.state == available) for n in manager.model_names}

    try:
        manager.poll()
        assert loaded() == {"m0": [2, 3], "m1": [1, 2], "m2": [1]}
        assert [manager.resolve(f"m{i}").version for i in range(3)] == [3, 2, 1]
        assert manager.resolve("m1", version=1).version == 1  # a pinned client's version
        monkeypatch.setattr(saved_model, "pid_alive", lambda pid: False)  # writer gone
        manager.poll()  # recovery completes release 4 and switches the config
        assert _versions(base) == {"m0": [3, 4], "m1": [2, 4], "m2": [1, 4]}
        assert loaded() == {"m0": [3, 4], "m1": [2, 4], "m2": [1, 4]}
        assert [manager.resolve(f"m{i}").version for i in range(3)] == [4, 4, 4]
    finally:
        manager.close()


def test_stale_config_temporaries_are_removed(tmp_path: Path) -> None:
    """A writer killed between its temporary file and the rename leaves the temporary; the
    next recovery removes it (a live writer's stays)."""
    base = tmp_path / "export"
    _publish(_planned(("m0",)), base, 1, "brute-force", _quiet)
    dead = base / f".{MODELS_CONFIG}.999999999-abcd1234.tmp"
    live = base / f".{STOCK_MODELS_CONFIG}.{os.getpid()}-abcd1234.tmp"
    dead.write_text("model_config_list {")
    live.write_text("model_config_list {")
    recover_releases(base)
    assert not dead.exists() and live.exists()
    assert _versions(base) == {"m0": [1]}


def test_relative_serving_base_is_refused(tmp_path: Path, capsys) -> None:
    """TF Serving refuses relative base paths: stop before anything is read or written."""
    assert cli_main(["export", str(tmp_path / "run"), "--base-dir", str(tmp_path / "export"),
                     "--serving-base", "models"]) == 2
    assert "--serving-base 'models' must be an absolute path" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


@pytest.mark.slow  # exports the session's tiny trained run (brute force) and adds items
def test_export_and_add_items_switch_the_config(tiny_run: dict[str, Any],
                                                tmp_path: Path) -> None:
    from tfrs_coldstart.serving.export import export_run

    base = tmp_path / "export"
    export_run(tiny_run["run"], base, models=("student",), index="brute-force", k=5,
               dataset=tiny_run["ds"], item_encoder=False, log=_quiet)
    (base / "other" / "4").mkdir(parents=True)  # a model of another release (no manifest)
    (base / "other" / "4" / "saved_model.pb").write_bytes(b"")
    assert _pinned(base) == {"student_bf": ("/models/student_bf", [1])}  # written before it
    new = tiny_run["ds"].items.iloc[:2].copy()
    new["item_id"] = ["fresh-a", "fresh-b"]
    new.to_parquet(tmp_path / "new.parquet")
    assert cli_main(["add-items", str(tmp_path / "new.parquet"), "--model",
                     str(base / "student_bf"), "--serving-base", "/srv/models"]) == 0
    # the new version pinned, the other model keeps its own, the base paths moved
    assert _pinned(base) == {"student_bf": ("/srv/models/student_bf", [1, 2]),
                             "other": ("/srv/models/other", [4])}
    assert _pinned(base, STOCK_MODELS_CONFIG) == _pinned(base)
