"""Fault injection (issue 15): kill -9 a real run and rerun it, rename failures and crashes
while publishing, stale files of killed jobs, settings and inputs refused in one line.

The kill tests run the real ``tfrs-coldstart run`` in subprocesses on a tiny synthetic
config and compare the resumed run with an uninterrupted one of the same seed *exactly*
(metrics, history, weights): the data order of each epoch is seeded by the epoch
(``interaction_dataset(epochs=...)``) and the resume state holds the weights, the
optimizer, early stopping and the history, so nothing is left to chance. Only wall-clock
``seconds`` fields are dropped before comparing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import Crash, TinyModule, fail_rename

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfrs_coldstart.batch.model import BatchError
from tfrs_coldstart.batch.reader import UsersReader
from tfrs_coldstart.cli import main
from tfrs_coldstart.errors import UserError
from tfrs_coldstart.serving import export as export_mod
from tfrs_coldstart.serving import saved_model
from tfrs_coldstart.serving.export import ExportError, _Planned, _publish
from tfrs_coldstart.serving.saved_model import list_versions, recover_releases

REPO = Path(__file__).resolve().parents[1]
RUN_ARGS = [
    "--set", "data.synthetic_users=200", "--set", "data.synthetic_items=150",
    "--set", "data.synthetic_interactions=3000", "--set", "teacher.epochs=5",
    "--set", "teacher.patience=1", "--set", "teacher.batch_size=256",
    "--set", "teacher.tower.hidden=[16]", "--set", "teacher.tower.id_dim=8",
    "--set", "teacher.tower.output_dim=8", "--set", "teacher.tower.feature_dim=8",
    "--set", "eval.ks=[10,20]", "--quiet",
]


# --------------------------------------------------------------------------------------------
# kill -9 during a run, rerun: the same model, history and report


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tfrs_coldstart.cli", "run", "--output", str(out),
            *RUN_ARGS, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run_until(out: Path, killed_when: Any, timeout: float = 400) -> tuple[bool, str]:
    """Run ``tfrs-coldstart run``; kill -9 it as soon as ``killed_when(out, stderr so far)``
    holds. ``(killed, stderr)``."""
    proc = subprocess.Popen(_cli(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=REPO)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    reader.start()
    deadline = time.time() + timeout
    killed = False
    while proc.poll() is None and time.time() < deadline:
        if killed_when(out, "".join(lines)):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    if proc.poll() is None and not killed:
        proc.kill()
    proc.wait()
    reader.join(10)
    text = "".join(lines)
    if not killed:
        assert proc.returncode == 0, text[-3000:]
    return killed, text


def _without_seconds(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _without_seconds(v) for k, v in d.items() if k != "seconds"}
    if isinstance(d, list):
        return [_without_seconds(v) for v in d]
    return d


def _weights(run: Path, which: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run / which / "weights" / "model"))
    # the variables' values; not the optimizer's (not saved in weights/ by design) nor the
    # object graph proto (it names the optimizer slots by the optimizer's build history)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "optimizer" not in k and "save_counter" not in k
            and k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _teacher_mid_fit(out: Path, _: str) -> bool:
    return (out / "teacher" / "backup" / "epoch-1" / "state.json").is_file()


def _student_phase(_: Path, err: str) -> bool:
    return "[student] ..." in err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    """kill -9 during the teacher's fit (after its 2nd epoch's backup), rerun, kill -9 in the
    student phase, rerun: same report, histories and weights as one uninterrupted run.
    (Failed before the fix: the resumed teacher restarted early stopping at the resume
    point and history.json held only the epochs after it.)"""
    ref, run = tmp_path / "ref", tmp_path / "run"
    results: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: results.update(ref=_run_until(ref, lambda *_: False)))
    thread.start()  # the uninterrupted run, alongside the killed ones
    killed, err1 = _run_until(run, _teacher_mid_fit)
    assert killed
    killed, err2 = _run_until(run, _student_phase)
    assert killed, err2[-3000:]
    assert re.search(r"resuming teacher at epoch [23] of 5", err2), err2[-3000:]
    killed, err3 = _run_until(run, lambda *_: False)
    assert not killed
    assert "teacher: already trained" in err3 and "teacher_val: already trained" in err3
    thread.join()
    assert not (run / "teacher" / "backup").exists()
    assert _without_seconds(json.loads((run / "report.json").read_text())) == \
        _without_seconds(json.loads((ref / "report.json").read_text()))
    for which in ("teacher", "teacher_val", "student", "recommend"):
        assert _without_seconds(json.loads((run / which / "history.json").read_text())) == \
            _without_seconds(json.loads((ref / which / "history.json").read_text())), which
    for which in ("teacher", "teacher_val", "student"):
        a, b = _weights(run, which), _weights(ref, which)
        assert a.keys() == b.keys() and a
        assert [k for k in a if not np.array_equal(a[k], b[k])] == [], which


@pytest.mark.slow
def test_rerun_with_another_config_stops_and_changes_nothing(tmp_path: Path, capsys) -> None:
    """Failed before the fix: the rerun loaded the folder's checkpoint into a model of another
    shape (a TensorFlow traceback) after overwriting config.yaml."""
    out = tmp_path / "run"
    out.mkdir()
    from tfrs_coldstart.config import load_config, save_config

    cfg = load_config(overrides=[f"output_dir={out}", *_overrides(RUN_ARGS)])
    save_config(cfg, out / "config.yaml")
    (out / "teacher").mkdir()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["run", "--output", str(out), *RUN_ARGS, "--set", "teacher.tower.hidden=[32]",
                 "--set", "seed=3"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "seed" in errors[0] and "teacher.tower.hidden" in errors[0]
    assert "--output" in errors[0] and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _overrides(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


# --------------------------------------------------------------------------------------------
# publishing: all or nothing per release


def _planned(n: int = 3) -> list[_Planned]:
    return [_Planned(f"m{i}", "item_encoder", "student", TinyModule(float(i)), {"name": f"m{i}"},
                     []) for i in range(n)]


def _visible(base: Path, n: int = 3) -> list[list[int]]:
    return [list_versions(base / f"m{i}") for i in range(n)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_failed_rename_publishes_none_of_the_release(tmp_path: Path, monkeypatch, k) -> None:
    base = tmp_path / "export"
    for i in range(3):  # version 1 of every model is served already
        (base / f"m{i}" / "1").mkdir(parents=True)
        (base / f"m{i}" / "1" / "saved_model.pb").write_bytes(b"")
    fail_rename(monkeypatch, k, OSError(28, "No space left on device"))
    with pytest.raises(ExportError, match="nothing was published"):
        _publish(_planned(), base, 2, "brute-force", lambda m: None)
    assert _visible(base) == [[1], [1], [1]]
    assert not list(base.glob(".release-*")) and not list(base.glob("*/.tmp-*"))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_crash_at_any_rename_ends_with_the_whole_release(tmp_path: Path, monkeypatch,
                                                           k) -> None:
    """Failed before the fix: a crash after the first rename left m0/2 published and m1/2,
    m2/2 missing for good (nothing recorded what the release was)."""
    base = tmp_path / "export"
    fail_rename(monkeypatch, k, Crash())
    with pytest.raises(Crash):
        _publish(_planned(), base, 2, "brute-force", lambda m: None)
    monkeypatch.undo()
    assert list(base.glob(".release-*"))  # the release was decided before the renames
    monkeypatch.setattr(saved_model, "pid_alive", lambda pid: False)  # its writer is gone
    done = recover_releases(base)
    assert any("completed" in line for line in done)
    assert _visible(base) == [[2], [2], [2]]
    assert not list(base.glob(".release-*")) and not list(base.glob("*/.tmp-*"))


def test_a_crash_before_the_release_is_decided_publishes_nothing(tmp_path: Path,
                                                                 monkeypatch) -> None:
    base = tmp_path / "export"
    real = export_mod.atomic_write_text

    def crash(path: Any, text: str) -> None:
        if ".release-" in str(path):
            raise Crash()
        real(path, text)

    monkeypatch.setattr(export_mod, "atomic_write_text", crash)
    with pytest.raises(Crash):
        _publish(_planned(), base, 1, "brute-force", lambda m: None)
    monkeypatch.undo()
    assert len(list(base.glob("*/.tmp-*"))) == 3 and _visible(base) == [[], [], []]
    monkeypatch.setattr(saved_model, "pid_alive", lambda pid: False)
    recover_releases(base)
    assert not list(base.glob("*/.tmp-*")) and _visible(base) == [[], [], []]


def test_a_server_never_loads_part_of_a_cut_release(tmp_path: Path, monkeypatch) -> None:
    """A crash after the first rename leaves m0/2 on disk, m1/2 and m2/2 not. Failed before the
    fix: the dev server's next poll served m0 version 2 beside m1, m2 version 1 until a
    restart. Now it holds version 2 back while the release is cut, and once its writer is
    gone completes the release at the next poll and serves all of it."""
    from tfrs_coldstart.serving.devserver.manager import ModelManager

    base = tmp_path / "export"
    _publish(_planned(), base, 1, "brute-force", lambda m: None)
    manager = ModelManager(base, None)
    served = lambda: [manager.resolve(f"m{i}").version for i in range(3)]  # noqa: E731
    try:
        manager.poll()
        assert served() == [1, 1, 1]
        fail_rename(monkeypatch, 2, Crash())
        with pytest.raises(Crash):
            _publish(_planned(), base, 2, "brute-force", lambda m: None)
        monkeypatch.undo()
        assert _visible(base) == [[1, 2], [1], [1]]  # part of release 2 on disk
        manager.poll()  # its writer (this process) is alive: a publish under way
        assert served() == [1, 1, 1]
        monkeypatch.setattr(saved_model, "pid_alive", lambda pid: False)  # the writer is gone
        manager.poll()
        assert _visible(base) == [[1, 2], [1, 2], [1, 2]]
        assert served() == [2, 2, 2]
        # a model of a finished release removed by hand does not hold the others back
        _publish(_planned(), base, 3, "brute-force", lambda m: None)
        shutil.rmtree(base / "m1" / "3")
        manager.poll()
        assert served() == [3, 2, 3]
    finally:
        manager.close()


def test_publish_flushes_files_record_and_renames_in_order(tmp_path: Path,
                                                          monkeypatch) -> None:
    """What a power loss can leave: staged files are on disk before the record, the record
    before the first rename, every rename before the record is removed. Failed before the
    fix: nothing was flushed (a renamed version could hold unwritten files, or the record be
    gone while a rename was not on disk)."""
    base = tmp_path / "export"
    events: list[tuple[str, Path]] = []
    opened: dict[int, Path] = {}
    real_open, real_fsync, real_rename, real_unlink = os.open, os.fsync, os.rename, Path.unlink

    def open_(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        fd = real_open(path, flags, *args, **kw)
        opened[fd] = Path(path)
        return fd

    def fsync(fd: int) -> None:
        events.append(("fsync", opened.get(fd, Path("?"))))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append(("rename", Path(dst)))
        real_rename(src, dst)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        events.append(("unlink", self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(Path, "unlink", unlink)
    _publish(_planned(), base, 1, "brute-force", lambda m: None)
    monkeypatch.undo()
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    record = [i for i, (kind, p) in enumerate(events)
              if kind == "unlink" and p.name.startswith(".release-")]
    assert len(renames) == 3 and len(record) == 1
    synced_before = {p for kind, p in events[:renames[0]] if kind == "fsync"}
    for i in range(3):
        final = base / f"m{i}" / "1"
        on_disk = {p.relative_to(final) for p in final.rglob("*")}  # files and folders
        staged = {Path(*p.relative_to(base / f"m{i}").parts[1:]) for p in synced_before
                  if p.is_relative_to(base / f"m{i}") and p != base / f"m{i}"
                  and p.relative_to(base / f"m{i}").parts[0].startswith(".tmp-")}
        assert on_disk and on_disk <= staged, f"m{i}: {on_disk - staged} not flushed in time"
        assert base / f"m{i}" in synced_before  # the staged folder's entry
    assert any(p.name.startswith(".release-") for p in synced_before)  # the record
    assert base in synced_before  # its folder entry
    synced_after = {p for kind, p in events[renames[-1]:record[0]] if kind == "fsync"}
    assert {base / f"m{i}" for i in range(3)} <= synced_after


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    """Failed before the fix: nothing ever removed them."""
    base = tmp_path / "export"
    dead = base / "student" / ".tmp-3-999999999-abcd1234"
    live = base / "student" / f".tmp-4-{os.getpid()}-abcd1234"
    dead.mkdir(parents=True)
    live.mkdir()
    recover_releases(base)
    assert not dead.exists() and live.exists()


def test_orphan_added_items_record_no_longer_blocks_add_items(tmp_path: Path) -> None:
    """A record without its version (add-items killed before publishing) is removed; before
    the fix every later add-items failed with 'version N already exists'."""
    from tfrs_coldstart.serving.add_items import ADDED_ITEMS_DIR, _remove_orphan_records

    root = tmp_path / "export" / "student"
    (root / "1").mkdir(parents=True)
    (root / ADDED_ITEMS_DIR).mkdir()
    kept, orphan = root / ADDED_ITEMS_DIR / "1.parquet", root / ADDED_ITEMS_DIR / "2.parquet"
    kept.write_bytes(b"x")
    orphan.write_bytes(b"x")
    _remove_orphan_records(root, lambda m: None)
    assert kept.exists() and not orphan.exists()


# --------------------------------------------------------------------------------------------
# batch and run: refused up front, one line


def _one_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), err
    assert "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("size", ["0", "-3"])
def test_batch_size_must_be_positive(tmp_path: Path, capsys, size: str) -> None:
    """Failed before the fix: 0 exited 0 with an empty Parquet file, -3 gave a traceback."""
    out = tmp_path / "recs.parquet"
    assert main(["batch", "--model", str(tmp_path / "m"), "--users", str(tmp_path / "u.csv"),
                 "--out", str(out), "--batch-size", size]) == 2
    _one_error(capsys, "batch size", size)
    assert not out.exists()


class _Model:
    """What UsersReader asks of a ServedModel."""

    required_columns = ["user_id", "age"]

    def check_columns(self, columns: Any, where: str) -> None:
        missing = set(self.required_columns) - set(columns)
        if missing:
            raise BatchError(f"{where}: missing {sorted(missing)}")

    def columns_in(self, columns: Any) -> list[str]:
        return list(self.required_columns)


def test_batch_refuses_ragged_rows_and_repeated_users(tmp_path: Path) -> None:
    """Failed before the fix: the long row's extra field was dropped silently and the
    repeated user got two sets of rows."""
    long_row = tmp_path / "long.csv"
    long_row.write_text("user_id,age,region\nu1,20,a\nu2,30,b,extra\nu3,40,c\n")
    with pytest.raises(BatchError, match=r"line 3 \(row 1\) has 4 field\(s\), the header 3"):
        UsersReader(long_row, _Model(), 100)
    short_row = tmp_path / "short.csv"
    short_row.write_text("user_id,age,region\nu1,20,a\nu2,30\n")
    with pytest.raises(BatchError, match="line 3 .* has 2 field"):
        UsersReader(short_row, _Model(), 100)
    dup = tmp_path / "dup.csv"
    dup.write_text("user_id,age\n" + "".join(f"u{i},{i}\n" for i in range(50)) + "u7,99\n")
    with pytest.raises(BatchError, match=r"user_id 'u7' appears twice \(rows 7 and 50\)"):
        UsersReader(dup, _Model(), 10)
    dup_pq = tmp_path / "dup.parquet"
    pd.DataFrame({"user_id": ["a", "b", "a"], "age": ["1", "2", "3"]}).to_parquet(dup_pq)
    with pytest.raises(BatchError, match=r"user_id 'a' appears twice \(rows 0 and 2\)"):
        UsersReader(dup_pq, _Model(), 10)
    ok = tmp_path / "ok.csv"
    ok.write_text('user_id,age\nu1,"2,0"\n\nu2,3\n')  # a quoted separator, a blank line
    UsersReader(ok, _Model(), 10)


def test_stale_batch_temporaries_are_removed(tmp_path: Path) -> None:
    from tfrs_coldstart.batch.local import _remove_orphans

    out = tmp_path / "recs.parquet"
    dead = tmp_path / ".recs.parquet.999999999-abcd1234.tmp"
    live = tmp_path / f".recs.parquet.{os.getpid()}-abcd1234.tmp"
    other = tmp_path / ".other.parquet.999999999-abcd1234.tmp"
    for p in (dead, live, other):
        p.write_bytes(b"")
    _remove_orphans(out)
    assert not dead.exists() and live.exists() and other.exists()


def test_read_only_output_is_one_line_before_any_work(tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    """--output on a read-only file system (simulated: this suite may run as root, whom
    permissions do not stop) fails before the data is read, naming the path."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro
                        else real(p, mode, **kw))
    import tfrs_coldstart.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_data", lambda cfg: pytest.fail("data was read"))
    assert main(["run", "--output", str(ro / "run"), *RUN_ARGS]) == 2
    _one_error(capsys, str(ro / "run"), "not writable")
    assert not (ro / "run").exists()


def test_user_error_base_is_what_the_cli_prints() -> None:
    from tfrs_coldstart.errors import RunError

    assert issubclass(RunError, UserError) and issubclass(BatchError, UserError)

