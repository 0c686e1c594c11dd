"""Offline batch retrieval (in-process and Beam DirectRunner) and add-items, on one tiny export.

The reference for every result is the exported SavedModel itself, loaded with TensorFlow's
SavedModel loader and called directly, as TF Serving would.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import copy_run

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfrs_coldstart.batch import (
    BatchError,
    ServedModel,
    batch_recommend,
    beam_batch_recommend,
    resolve_version,
)
from tfrs_coldstart.cli import main as cli_main
from tfrs_coldstart.data import DataError
from tfrs_coldstart.data.pipeline import feature_arrays
from tfrs_coldstart.features.columns import HISTORY_SEPARATOR
from tfrs_coldstart.serving.add_items import ADDED_ITEMS_DIR, AddItemsError, add_items
from tfrs_coldstart.serving.export import export_run

pytestmark = pytest.mark.slow  # trains a model or builds exports

K = 20
HAS_BEAM = importlib.util.find_spec("apache_beam") is not None


@pytest.fixture(scope="module")
def setup(tiny_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The session's tiny trained run (tables with a dense item vector), its student set to
    rank by the dot product alone (popularity prior 0, so an item made from a user's best
    item ties with it), exported with ScaNN, k=20.
    """
    root = tmp_path_factory.mktemp("batch")
    run = copy_run(tiny_run["run"], root / "run", student_prior=0.0)
    dataset = tiny_run["ds"]
    base = root / "export"
    export_run(run, base, index="scann", k=K, dataset=dataset, log=lambda m: None)
    users_pq = root / "users.parquet"
    dataset.users.to_parquet(users_pq)
    return {"root": root, "run": run, "base": base, "ds": dataset, "users": users_pq}


def _direct(version_dir: Path, users: pd.DataFrame, schema: Any) -> tuple[np.ndarray, np.ndarray]:
    """The SavedModel called directly with the whole table: (ids str [n, k], scores)."""
    import scann  # noqa: F401  (registers the ScaNN ops)
    import tensorflow as tf

    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    rows = feature_arrays(users, schema.user_features, "user_id")
    if "history" in specs:  # issue 17: no history
        rows["history"] = np.full(len(users), "", dtype=object)
    out = fn(**{k: tf.constant(rows[k], dtype=s.dtype) for k, s in specs.items()})
    ids = np.vectorize(lambda b: b.decode())(out["item_ids"].numpy())
    return ids, out["scores"].numpy()


def _as_matrix(recs: pd.DataFrame, user_ids: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    recs = recs.sort_values(["user_id", "rank"])
    by_user = {u: g for u, g in recs.groupby("user_id")}
    ids = np.stack([by_user[u]["item_id"].to_numpy(dtype=object) for u in user_ids])
    sc = np.stack([by_user[u]["score"].to_numpy() for u in user_ids])
    assert ids.shape == (len(user_ids), k)
    return ids, sc


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name
                  or p.name.startswith("beam-temp"))


# --------------------------------------------------------------------------------------------
# in-process batch retrieval


def test_batch_equals_the_served_model(setup: dict[str, Any], tmp_path: Path) -> None:
    ds = setup["ds"]
    out = tmp_path / "recs.parquet"
    # several chunks, several model calls per chunk
    s = batch_recommend(setup["base"] / "student", setup["users"], out, chunk_rows=70,
                        batch_size=32, progress=False)
    assert s.users == len(ds.users) and s.rows == len(ds.users) * K and s.k == K
    assert s.model_path.endswith("student/1")
    recs = pd.read_parquet(out)
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score"]
    assert str(recs["rank"].dtype) == "int32" and str(recs["score"].dtype) == "float32"
    user_ids = ds.users["user_id"].astype(str).tolist()
    assert list(dict.fromkeys(recs["user_id"])) == user_ids  # input order kept
    ids, sc = _as_matrix(recs, user_ids, K)
    ref_ids, ref_sc = _direct(setup["base"] / "student" / "1", ds.users, ds.schema)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sc, ref_sc, rtol=0, atol=1e-5)
    assert np.all(np.diff(sc, axis=1) <= 1e-6)  # rank 1 is the best
    assert _leftovers(tmp_path) == []


def test_csv_input_teacher_and_k_subset(setup: dict[str, Any], tmp_path: Path) -> None:
    """CSV read as text (ids like u007 keep their form); the teacher reads user_id itself."""
    ds = setup["ds"]
    csv = tmp_path / "users.csv"
    ds.users.to_csv(csv, index=False)
    out = tmp_path / "recs.parquet"
    s = batch_recommend(setup["base"] / "teacher", csv, out, k=5, chunk_rows=64, progress=False)
    assert s.rows == len(ds.users) * 5
    recs = pd.read_parquet(out)
    user_ids = ds.users["user_id"].astype(str).tolist()
    ids, sc = _as_matrix(recs, user_ids, 5)
    ref_ids, ref_sc = _direct(setup["base"] / "teacher" / "1", ds.users, ds.schema)
    np.testing.assert_array_equal(ids, ref_ids[:, :5])
    np.testing.assert_allclose(sc, ref_sc[:, :5], atol=1e-5)


def test_unseen_feature_values_still_get_k_results(setup: dict[str, Any],
                                                   tmp_path: Path) -> None:
    users = setup["ds"].users.iloc[:4].copy()
    users["user_id"] = ["never-seen-1", "never-seen-2", "never-seen-3", "u000"]
    users["region"] = ["region-on-mars", "region00", "region-zz", "region01"]
    users["age_bucket"] = ["120+", "??", "18-24", "25-34"]
    users["interests"] = ["tag-unknown|tag-also-unknown", "tag000", "x|y|z", "tag001"]
    users["activity"] = [1e6, -3.0, 0.0, 1.0]
    path = tmp_path / "odd_users.parquet"
    users.to_parquet(path)
    for name in ("student", "teacher"):
        out = tmp_path / f"{name}.parquet"
        batch_recommend(setup["base"] / name, path, out, progress=False)
        recs = pd.read_parquet(out)
        counts = recs.groupby("user_id").size()
        assert counts.to_dict() == dict.fromkeys(users["user_id"], K)
        assert np.isfinite(recs["score"]).all()
        assert recs.groupby("user_id")["item_id"].nunique().eq(K).all()


def test_version_resolution(setup: dict[str, Any]) -> None:
    base = setup["base"]
    path, name, version = resolve_version(base / "student")
    assert (name, version) == ("student", 1) and path.endswith("student/1")
    assert resolve_version(base / "student" / "1")[1:] == ("student", 1)
    m = ServedModel.load(base / "student")
    assert m.k == K and m.required_columns[0] == "user_id"
    assert set(m.required_columns[1:]) == set(setup["ds"].schema.names("user"))
    with pytest.raises(BatchError, match="does not exist"):
        resolve_version(base / "nope")
    empty = setup["root"] / "no_versions"
    empty.mkdir(exist_ok=True)
    with pytest.raises(BatchError, match="no SavedModel version"):
        resolve_version(empty)
    with pytest.raises(BatchError, match="not item_ids and scores"):
        ServedModel.load(base / "student_items")


def test_bad_input_gives_one_clear_error_and_no_output(setup: dict[str, Any],
                                                       tmp_path: Path) -> None:
    ds = setup["ds"]
    model = setup["base"] / "student"
    out = tmp_path / "recs.parquet"

    def fails(exc: type[Exception], match: str, users: Any, **kw: Any) -> None:
        with pytest.raises(exc, match=match):
            batch_recommend(kw.pop("model", model), users, out, progress=False, **kw)
        assert not out.exists()
        assert _leftovers(tmp_path) == []

    fails(BatchError, "does not exist", setup["users"], model=tmp_path / "no-model")
    missing = tmp_path / "missing.csv"
    ds.users.drop(columns=["region"]).to_csv(missing, index=False)
    fails(BatchError, r"missing\.csv: missing column\(s\) \['region'\]", missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    fails(BatchError, "empty", empty)
    header = tmp_path / "header.csv"
    header.write_text(",".join(ds.users.columns) + "\n")
    fails(BatchError, "no rows", header)
    empty_pq = tmp_path / "empty.parquet"
    ds.users.iloc[:0].to_parquet(empty_pq)
    fails(BatchError, "no rows", empty_pq)
    fails(BatchError, "not found", tmp_path / "nope.parquet")
    fails(BatchError, "unknown file type", setup["run"] / "config.yaml")
    # a bad cell far into the file: found in a later chunk, after output was being written
    bad = ds.users.copy()
    bad["activity"] = bad["activity"].astype(object)
    bad.loc[150, "activity"] = "lots"
    bad_csv = tmp_path / "bad.csv"
    bad.to_csv(bad_csv, index=False)
    fails(DataError, r"bad\.csv: column 'activity', row 150 \(line 152 of the file\)", bad_csv,
          chunk_rows=50)
    fails(BatchError, "returns 20 items per user", setup["users"], k=K + 1)
    with pytest.raises(BatchError, match="is a folder"):
        batch_recommend(model, setup["users"], tmp_path, progress=False)


def test_batch_cli(setup: dict[str, Any], tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.parquet"
    assert cli_main(["batch", "--model", str(setup["base"] / "student"), "--users",
                     str(setup["users"]), "--out", str(out), "--k", "3",
                     "--no-progress"]) == 0
    assert "users/s" in capsys.readouterr().out
    assert len(pd.read_parquet(out)) == len(setup["ds"].users) * 3
    out2 = tmp_path / "cli2.parquet"
    assert cli_main(["batch", "--model", str(tmp_path / "nope"), "--users", str(setup["users"]),
                     "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and not out2.exists()


def test_long_multi_hot_cell_is_not_padded_across_the_batch(setup: dict[str, Any],
                                                            tmp_path: Path) -> None:
    """A 250 KB `interests` cell in a Parquet users table (CSV stops at 128 KiB cells): the
    model pads every row of a call to the longest row's tags, so before the fix the 240-row
    call grew RSS by ~660 MiB (a 10 MB cell: ~26 GB); rows are now grouped
    (saved_model.row_groups). The other rows' results do not change."""
    from test_devserver_limits import MiB, peak_rss_growth

    users = setup["ds"].users.copy()
    users.loc[7, "interests"] = "|".join(f"tag{i % 150:03d}" for i in range(36_000))
    assert len(users.loc[7, "interests"]) > 250_000
    src = tmp_path / "users.parquet"
    users.to_parquet(src)
    model = setup["base"] / "student"
    batch_recommend(model, setup["users"], tmp_path / "warm.parquet", progress=False)
    out = tmp_path / "recs.parquet"
    growth, _ = peak_rss_growth(lambda: batch_recommend(model, src, out, progress=False))
    print(f"batch, one 250 KB multi-hot cell in 240 rows: peak RSS growth {growth / MiB:.1f} MiB")
    got = pd.read_parquet(out)
    want = pd.read_parquet(tmp_path / "warm.parquet")
    other = want["user_id"] != users.loc[7, "user_id"]
    assert len(got) == len(want)
    np.testing.assert_array_equal(got[other]["item_id"], want[other]["item_id"])
    np.testing.assert_allclose(got[other]["score"], want[other]["score"], atol=1e-5)
    assert growth < 128 * MiB, f"peak RSS grew {growth / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------------
# Apache Beam


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam not installed (extra [beam])")
def test_beam_direct_runner_matches_in_process(setup: dict[str, Any], tmp_path: Path) -> None:
    ds = setup["ds"]
    model = setup["base"] / "student"
    ref = tmp_path / "ref.parquet"
    batch_recommend(model, setup["users"], ref, k=10, progress=False)
    want = pd.read_parquet(ref).sort_values(["user_id", "rank"]).reset_index(drop=True)
    csv = tmp_path / "users.csv"
    ds.users.to_csv(csv, index=False)
    for src in (setup["users"], csv):
        out = tmp_path / f"beam-{Path(src).suffix[1:]}.parquet"
        files = beam_batch_recommend(model, src, out, k=10, batch_size=48,
                                     pipeline_options=["--runner=DirectRunner"])
        assert files == [str(out)]
        got = pd.read_parquet(out).sort_values(["user_id", "rank"]).reset_index(drop=True)
        assert list(got.columns) == list(want.columns) and len(got) == len(want)
        assert (got["user_id"] == want["user_id"]).all()
        assert (got["item_id"] == want["item_id"]).all()
        np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)
    with pytest.raises(BatchError, match=r"missing column\(s\) \['region'\]"):
        missing = tmp_path / "missing.parquet"
        ds.users.drop(columns=["region"]).to_parquet(missing)
        beam_batch_recommend(model, missing, tmp_path / "never.parquet")
    with pytest.raises(BatchError, match="does not exist"):
        beam_batch_recommend(tmp_path / "nope", setup["users"], tmp_path / "never.parquet")
    assert not (tmp_path / "never.parquet").exists()


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam not installed (extra [beam])")
def test_beam_passes_a_history_column_like_the_local_path(setup: dict[str, Any],
                                                         tmp_path: Path) -> None:
    """A users table with the request-time ``history`` (issue 17): the Beam path sends it to
    the model as the in-process path does (same results, the history's items left out),
    from Parquet and CSV."""
    model = setup["base"] / "student"
    users = setup["ds"].users.iloc[:30].copy()
    plain = tmp_path / "plain.parquet"
    users.to_parquet(plain)
    batch_recommend(model, plain, tmp_path / "plain_out.parquet", k=10, progress=False)
    top = (pd.read_parquet(tmp_path / "plain_out.parquet").sort_values(["user_id", "rank"])
           .groupby("user_id")["item_id"].apply(list))
    if "history" not in ServedModel.load(model).specs:
        pytest.skip("this export takes no history (student.history=false)")
    users["history"] = [HISTORY_SEPARATOR.join(top[u][:2]) for u in users["user_id"]]
    with_hist = tmp_path / "hist.parquet"
    users.to_parquet(with_hist)
    ref = tmp_path / "ref.parquet"
    batch_recommend(model, with_hist, ref, k=10, progress=False)
    want = pd.read_parquet(ref).sort_values(["user_id", "rank"]).reset_index(drop=True)
    for u, g in want.groupby("user_id"):  # the history's items are left out
        assert not set(g["item_id"]) & set(top[u][:2])
    csv = tmp_path / "hist.csv"
    users.to_csv(csv, index=False)
    for src in (with_hist, csv):
        out = tmp_path / f"beam-{src.suffix[1:]}.parquet"
        beam_batch_recommend(model, src, out, k=10, batch_size=16,
                             pipeline_options=["--runner=DirectRunner"])
        got = pd.read_parquet(out).sort_values(["user_id", "rank"]).reset_index(drop=True)
        assert (got["item_id"] == want["item_id"]).all(), src
        np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam not installed (extra [beam])")
def test_beam_bad_cell_fails_without_output(setup: dict[str, Any], tmp_path: Path) -> None:
    bad = setup["ds"].users.copy()
    bad["activity"] = bad["activity"].astype(object)
    bad.loc[7, "activity"] = "lots"
    src = tmp_path / "bad.csv"
    bad.to_csv(src, index=False)
    out = tmp_path / "out" / "recs.parquet"
    with pytest.raises(Exception, match="activity"):
        beam_batch_recommend(setup["base"] / "student", src, out)
    assert not out.exists() and _leftovers(out.parent) == []


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny recommend-shaped SavedModel (inputs age, activity; 30 items, k=5): enough for
    the Beam input checks, without training."""
    import tensorflow as tf
    from conftest import make_recommender

    base = tmp_path_factory.mktemp("beam_small") / "export" / "rec"
    m = make_recommender([f"i{i}" for i in range(30)], 5, 1, dim=4, buckets=16, seed=0)
    tf.saved_model.save(m, str(base / "1"),
                        signatures={"serving_default": m.recommend, "embed_user": m.embed_user})
    return base


def _local_error(model: Path, users: Path, out: Path) -> str:
    with pytest.raises(BatchError) as info:
        batch_recommend(model, users, out, progress=False)
    return str(info.value)


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam not installed (extra [beam])")
def test_beam_refuses_ragged_rows_like_the_local_path(small_model: Path, tmp_path: Path) -> None:
    """Failed before the fix: Beam read the model's columns with pandas, so the long row's
    extra field was dropped and the short row padded, and the job wrote recommendations."""
    long_row = tmp_path / "long.csv"
    long_row.write_text("user_id,age,activity\nu1,20,1\nu2,30,1,extra\nu3,40,1\n")
    short_row = tmp_path / "short.tsv"
    short_row.write_text("user_id\tage\tactivity\nu1\t20\t1\n\nu2\t30\n")
    out = tmp_path / "out" / "recs.parquet"
    for src, want in ((long_row, r"long\.csv: line 3 \(row 1\) has 4 field\(s\), the header 3"),
                      (short_row, r"short\.tsv: line 4 \(row 1\) has 2 field\(s\), the header 3")):
        with pytest.raises(BatchError, match=want) as info:
            beam_batch_recommend(small_model, src, out)
        assert str(info.value) == _local_error(small_model, src, out)  # the same error
        assert not out.exists() and _leftovers(out.parent) == []


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam not installed (extra [beam])")
def test_beam_refuses_repeated_users_like_the_local_path(small_model: Path,
                                                         tmp_path: Path) -> None:
    """Failed before the fix: the repeated user got two sets of rows."""
    dup = tmp_path / "dup.csv"
    dup.write_text("user_id,age,activity\n" + "".join(f"u{i},{i},1\n" for i in range(50))
                   + "u7,99,1\n")
    dup_pq = tmp_path / "dup.parquet"
    pd.DataFrame({"user_id": ["a", "b", "a"], "age": ["1", "2", "3"],
                  "activity": [1.0, 2.0, 3.0]}).to_parquet(dup_pq)
    out = tmp_path / "out" / "recs.parquet"
    for src, want in ((dup, r"dup\.csv: user_id 'u7' appears twice \(rows 7 and 50\)"),
                      (dup_pq, r"dup\.parquet: user_id 'a' appears twice \(rows 0 and 2\)")):
        with pytest.raises(BatchError, match=want) as info:
            beam_batch_recommend(small_model, src, out)
        assert str(info.value) == _local_error(small_model, src, out)
        assert not out.exists() and _leftovers(out.parent) == []
    # across files of a glob: both files named
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, ids in enumerate((["a", "b"], ["c", "b"])):
        pd.DataFrame({"user_id": ids, "age": ["1", "2"], "activity": [1.0, 2.0]}).to_parquet(
            parts / f"users-{i}.parquet")
    with pytest.raises(BatchError, match=r"user_id 'b' appears twice \(.*users-0\.parquet row 1 "
                                         r"and .*users-1\.parquet row 1\)"):
        beam_batch_recommend(small_model, str(parts / "users-*.parquet"), out)
    assert not out.exists()


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam not installed (extra [beam])")
def test_beam_user_error_is_one_cli_line(small_model: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Failed before the fix: a bad cell came out of the runner with `[while running ...]`
    appended and Beam logged the worker's traceback before the CLI's error line."""
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,age,activity\nu1,20,1\nu2,30,lots\n")
    out = tmp_path / "recs.parquet"
    assert cli_main(["batch", "--runner", "beam", "--model", str(small_model), "--users",
                     str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "column 'activity'" in errors[0] and "while running" not in errors[0]
    assert "Traceback" not in err and not out.exists()


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam not installed (extra [beam])")
def test_beam_removes_temporaries_of_dead_jobs(small_model: Path, tmp_path: Path) -> None:
    """Failed before the fix: Beam's temporary folders and files of a killed job stayed
    forever (and carried no writer pid to tell them from a running job's)."""
    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": [f"u{i}" for i in range(12)], "age": ["20"] * 12,
                  "activity": [0.5] * 12}).to_csv(users, index=False)
    out = tmp_path / "recs.parquet"
    dead, live = "999999999-abcd1234", f"{os.getpid()}-abcd1234"
    stale = [tmp_path / f".recs.parquet.{dead}.tmp",
             tmp_path / f"beam-temp-.recs.parquet.{dead}.tmp-0123abcd",
             tmp_path / f".recs.{dead}.tmp-00000-of-00002.parquet",
             tmp_path / f"beam-temp-.recs.{dead}.tmp-4567cdef"]
    kept = [tmp_path / f".recs.parquet.{live}.tmp",
            tmp_path / f"beam-temp-.recs.parquet.{live}.tmp-89abcdef",
            tmp_path / ".other.parquet.999999999-abcd1234.tmp"]
    for p in stale + kept:
        if p.name.startswith("beam-temp"):
            p.mkdir()
            (p / "part.parquet").write_bytes(b"x")
        else:
            p.write_bytes(b"x")
    assert beam_batch_recommend(small_model, users, out, k=3) == [str(out)]
    assert len(pd.read_parquet(out)) == 12 * 3
    shards = beam_batch_recommend(small_model, users, out, k=2, num_shards=2)
    assert [Path(s).name for s in shards] == ["recs-00000-of-00002.parquet",
                                              "recs-00001-of-00002.parquet"]
    assert sum(len(pd.read_parquet(s)) for s in shards) == 12 * 2
    assert [p.name for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert _leftovers(tmp_path) == sorted(p.name for p in kept)


# --------------------------------------------------------------------------------------------
# add-items


def _as_csv(items: pd.DataFrame, path: Path) -> Path:
    """Items as a CSV file (dense vectors as space-separated text)."""
    items = items.copy()
    items["embedding"] = items["embedding"].map(lambda v: " ".join(f"{x:.8g}" for x in v))
    items.to_csv(path, index=False)
    return path


def test_add_items_makes_new_items_retrievable_at_once(setup: dict[str, Any],
                                                       tmp_path: Path) -> None:
    ds = setup["ds"]
    base = tmp_path / "export"
    shutil.copytree(setup["base"] / "student", base / "student")
    users = ds.users.iloc[:5]
    old = ServedModel.load(base / "student")
    _, feats = old.normalise(users, None)
    old_ids, old_sc = old.recommend(feats)
    # a new item made to match user 0's taste: the content of that user's best item
    best = old_ids[0, 0].decode()
    new = ds.items[ds.items["item_id"] == best].copy()
    new["item_id"] = "new-taste-match"
    other = ds.items.iloc[:2].copy()
    other["item_id"] = ["new-a", "new-b"]
    src = _as_csv(pd.concat([new, other]), tmp_path / "new_items.csv")
    m = add_items(base / "student", src, log=lambda msg: None)
    assert (m.name, m.version) == ("student", 2)
    assert m.manifest["catalogue_size"] == len(ds.items) + 3
    assert (base / "student" / ADDED_ITEMS_DIR / "2.parquet").is_file()
    new_model = ServedModel.load(base / "student")  # the latest version
    assert new_model.version == 2
    new_ids, new_sc = new_model.recommend(feats)
    top = [i.decode() for i in new_ids[0]]
    assert "new-taste-match" in top[:2]  # ties with the item it was made from
    # items already there keep their scores (ranking by the same dot products)
    for j in range(len(users)):
        before = dict(zip(old_ids[j], old_sc[j], strict=True))
        after = dict(zip(new_ids[j], new_sc[j], strict=True))
        common = set(before) & set(after)
        assert len(common) >= K - 3
        np.testing.assert_allclose([before[c] for c in common], [after[c] for c in common],
                                   atol=1e-4)
    # the old version still serves the old catalogue; batch uses the new one at once
    out = tmp_path / "recs.parquet"
    batch_recommend(base / "student", setup["users"], out, progress=False)
    recs = pd.read_parquet(out)
    assert "new-taste-match" in set(recs.loc[recs["user_id"] == users["user_id"].iloc[0],
                                             "item_id"])
    # a second addition builds on the first: version 3 holds both
    more = ds.items.iloc[5:6].copy()
    more["item_id"] = "new-c"
    m3 = add_items(base / "student", more, log=lambda msg: None)
    assert m3.version == 3 and m3.manifest["catalogue_size"] == len(ds.items) + 4
    added = pd.read_parquet(base / "student" / ADDED_ITEMS_DIR / "3.parquet")
    assert sorted(added["item_id"]) == ["new-a", "new-b", "new-c", "new-taste-match"]


def test_add_items_bad_input(setup: dict[str, Any], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    ds = setup["ds"]
    base = tmp_path / "export"
    shutil.copytree(setup["base"] / "student", base / "student")
    versions = lambda: sorted(p.name for p in (base / "student").iterdir())  # noqa: E731

    def fails(exc: type[Exception], match: str, items: Any, model: Path | None = None) -> None:
        with pytest.raises(exc, match=match):
            add_items(model or base / "student", items, log=lambda msg: None)
        assert versions() == ["1"]

    dup = ds.items.iloc[:2].copy()
    fails(AddItemsError, r"row 0: item '.+' is already in the catalogue", dup)
    fails(DataError, "missing required column", ds.items.drop(columns=["title"]).iloc[:1])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    fails(DataError, "empty", empty)
    fails(DataError, "empty", ds.items.iloc[:0])
    fails(AddItemsError, "does not exist", ds.items.iloc[:1], tmp_path / "nope")
    fails(AddItemsError, "not a `recommend` export", ds.items.iloc[:1],
          setup["base"] / "student_items")
    new = ds.items.iloc[:1].copy()
    new["item_id"] = "fresh"
    src = _as_csv(new, tmp_path / "fresh.csv")
    assert cli_main(["add-items", str(src), "--model", str(base / "student")]) == 0
    assert "v2" in capsys.readouterr().out and versions() == [".added_items", "1", "2"]
    assert cli_main(["add-items", str(src), "--model", str(base / "student")]) == 2
    assert "already in the catalogue" in capsys.readouterr().err
    assert versions() == [".added_items", "1", "2"]


# --------------------------------------------------------------------------------------------
# layering


def test_imports_stay_in_their_layer() -> None:
    """batch and add-items never import training code; batch imports Apache Beam only when a
    Beam pipeline runs (it is an optional extra)."""
    import subprocess
    import sys

    code = ("import sys, tfrs_coldstart.batch, tfrs_coldstart.serving.add_items; "
            "bad = [m for m in ('tfrs_coldstart.training', 'apache_beam') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif(not HAS_BEAM, reason="apache_beam not installed (extra [beam])")
def test_recommend_handler_pickles_by_reference() -> None:
    """Beam workers unpickle the handler by its module path."""
    import pickle

    from tfrs_coldstart.batch import beam

    cls = beam.RecommendHandler
    assert (cls.__module__, cls.__qualname__) == ("tfrs_coldstart.batch.beam", "RecommendHandler")
    handler = pickle.loads(pickle.dumps(cls("export/student", k=3, max_batch_size=8)))
    assert type(handler) is cls and (handler.model_dir, handler.k) == ("export/student", 3)
