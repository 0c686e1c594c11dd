"""Streamed interactions (``data/stream.py``): the split, counts and training rows of sharded
files equal the in-memory path's for the same seed, and bad shards stop with one clear error.

Small synthetic tables written by each test as shards (Parquet, CSV, TFRecord) in tmp_path.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import TINY_MODEL_OVERRIDES

from tfrs_coldstart import training
from tfrs_coldstart.config import load_config
from tfrs_coldstart.data import (
    DataError,
    Dataset,
    cold_start_split,
    generate,
    load_dataset,
    load_tables,
    sort_ids,
    validation_split,
)
from tfrs_coldstart.data.pipeline import (
    interaction_dataset,
    interaction_weights,
    item_probabilities,
)
from tfrs_coldstart.data.stream import (
    CODES,
    list_shards,
    scan_interactions,
    sorted_positions,
)
from tfrs_coldstart.evaluation import prepare, user_sequences
from tfrs_coldstart.runs import RunDir, load_data

SEGMENTS = ("train", "warm_test", "cold_item", "cold_user", "cold_both")
ID_SETS = ("warm_users", "warm_items", "cold_users", "cold_items")


@pytest.fixture(scope="module")
def data() -> Dataset:
    """500 users, 300 items, 5000 interactions with a weight column (a rating 1..5)."""
    ds = generate(n_users=500, n_items=300, n_interactions=5000, seed=3)
    weight = np.random.default_rng(1).integers(1, 6, len(ds.interactions)).astype(np.float32)
    return Dataset(ds.name, ds.interactions.assign(weight=weight), ds.users, ds.items,
                   ds.schema)


def _tfrecord(frame: pd.DataFrame, path: Path) -> None:
    """user_id as int64 features (numeric ids), item_id as bytes, the rest as numbers."""
    with tf.io.TFRecordWriter(str(path)) as w:
        for row in frame.itertuples(index=False):
            f = {"user_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[row.user_id])),
                 "item_id": tf.train.Feature(bytes_list=tf.train.BytesList(
                     value=[row.item_id.encode()])),
                 "timestamp": tf.train.Feature(int64_list=tf.train.Int64List(
                     value=[row.timestamp])),
                 "weight": tf.train.Feature(float_list=tf.train.FloatList(value=[row.weight]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())


def write_shards(frame: pd.DataFrame, folder: Path, fmt: str, n: int = 3) -> Path:
    """``frame`` as ``n`` shards of format ``fmt`` (file order kept); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, rows in enumerate(np.array_split(np.arange(len(frame)), n)):
        part = frame.iloc[rows]
        path = folder / f"part-{k:03d}.{fmt}"
        if fmt == "parquet":
            part.to_parquet(path, index=False)
        elif fmt == "csv":
            part.to_csv(path, index=False)
        else:
            _tfrecord(part, path)
    return folder


def _numeric_users(ds: Dataset) -> Dataset:
    """The same data with integer user ids ("7" sorts before "10": the numeric order)."""
    to_int = {u: k * 7 % 1009 for k, u in enumerate(ds.users["user_id"])}
    users = ds.users.assign(user_id=ds.users["user_id"].map(to_int).astype(str).astype(object))
    inter = ds.interactions.assign(user_id=ds.interactions["user_id"].map(to_int))
    return Dataset(ds.name, inter, users, ds.items, ds.schema)


def _assert_same_split(a, b) -> None:
    for name in SEGMENTS:
        x, y = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(x.index.to_numpy(), y.index.to_numpy(), err_msg=name)
        pd.testing.assert_frame_equal(x.reset_index(drop=True), y.reset_index(drop=True),
                                      obj=name)
    for name in ID_SETS:
        assert getattr(a, name) == getattr(b, name), name
    assert a.seed == b.seed


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tfrecord"])
def test_split_counts_and_held_out_equal_the_in_memory_path(data: Dataset, tmp_path: Path,
                                                            fmt: str) -> None:
    ds = _numeric_users(data) if fmt == "tfrecord" else data
    folder = write_shards(ds.interactions, tmp_path / "inter", fmt)
    # chunks smaller than a shard: the warm-test draws are made chunk by chunk
    scan = scan_interactions(str(folder / f"*.{fmt}"), ds.users, ds.items, ds.schema,
                             chunk_rows=700, weight_transforms=("threshold:4",))
    mem = load_tables(ds.interactions, ds.users, ds.items, ds.schema)
    split = cold_start_split(mem.interactions, mem.users["user_id"], mem.items["item_id"],
                             seed=42)
    val = validation_split(split)
    _assert_same_split(split, scan.split())
    _assert_same_split(val, scan.split(validation=True))
    held = scan.held_out()
    for name, frame in [("warm", split.warm_test), ("cold_item", split.cold_item),
                        ("cold_user", split.cold_user), ("cold_both", split.cold_both),
                        ("val_warm", val.warm_test), ("val_cold_item", val.cold_item),
                        ("val_cold_user", val.cold_user), ("val_cold_both", val.cold_both)]:
        pd.testing.assert_frame_equal(held[name], frame, check_index_type=False, obj=name)
    pd.testing.assert_frame_equal(scan.interactions(), mem.interactions)
    if fmt == "tfrecord":  # int64 ids: numeric order ("7" before "10")
        assert [int(u) for u in scan.warm_users] == sorted(int(u) for u in scan.warm_users)

    teacher = pd.concat([val.train, val.cold_item, val.cold_user, val.cold_both])
    for role, frame in (("train", split.train), ("teacher", teacher), ("val_train", val.train),
                        ("cold_item", split.cold_item)):
        assert scan.n_rows(role) == len(frame), role
        for side, table in (("user", mem.users), ("item", mem.items)):
            expected = table[f"{side}_id"].map(frame[f"{side}_id"].value_counts()).fillna(0)
            np.testing.assert_array_equal(scan.entity_counts(side, role), expected, role)
    np.testing.assert_array_equal(scan.item_probabilities("teacher"),
                                  item_probabilities(teacher, mem.items["item_id"]))
    raw = teacher["weight"].to_numpy(np.float64)
    for transform, x in (("raw", raw), ("log1p", np.log1p(raw)),
                         ("threshold:4", (raw >= 4).astype(float))):
        np.testing.assert_allclose(x / scan.weight_mean(transform, "teacher"),
                                   interaction_weights(teacher, transform), rtol=1e-6)
    assert scan.stats["n_interactions"] == len(mem.interactions) and scan.stats["weight"] == {
        "min": 1.0, "max": 5.0}


def test_numpy_draws_in_chunks_equal_one_draw() -> None:
    """What the streamed split rests on: ``Generator.random`` drawn in consecutive chunks gives
    one call's numbers, and ``permutation`` of an array moves it as ``permutation(len)``."""
    one, chunked = np.random.default_rng(42), np.random.default_rng(42)
    assert np.array_equal(one.permutation(np.array(list("abcdefghij"), dtype=object)),
                          np.array(list("abcdefghij"), dtype=object)[chunked.permutation(10)])
    x = one.random(10_000)
    parts = [chunked.random(n) for n in (0, 1, 7, 4096, 2, 5894)]
    assert np.array_equal(x, np.concatenate(parts))
    state = np.random.default_rng(7)
    state.random(123)
    again = np.random.Generator(np.random.PCG64())
    again.bit_generator.state = state.bit_generator.state
    assert np.array_equal(again.random(50), state.random(50))


@pytest.mark.parametrize("ids", [
    ["10", "9", "+5", "05", "5", "-3", "100"],  # integers: by value, then text
    ["b", "a", "é", "Z", "a b", "10", "9", "٣"],  # text: by code point
    ["x\x00", "x", "y"],  # a NUL, which numpy's unicode sort ignores: the exact way
    ["1" * 25, "2", "3"],  # past int64: the exact way
])
def test_sorted_positions_is_sort_ids(ids: list[str]) -> None:
    arr = np.array(ids, dtype=object)
    assert arr[sorted_positions(arr)].tolist() == sort_ids(ids)


def _pairs(ds: tf.data.Dataset, with_weight: bool = False) -> tuple[Counter, int]:
    pairs: Counter = Counter()
    batches = 0
    for b in ds:
        batches += 1
        cols = [b["user"]["user_id"].numpy(), b["item"]["item_id"].numpy()]
        if with_weight:
            cols.append(np.round(b["weight"].numpy(), 5))
        pairs.update(zip(*cols, strict=True))
    return pairs, batches


def _expected(frame: pd.DataFrame, weights: np.ndarray | None = None) -> Counter:
    cols = [frame["user_id"].str.encode("utf-8"), frame["item_id"].str.encode("utf-8")]
    if weights is not None:
        cols.append(np.round(weights, 5))
    return Counter(zip(*cols, strict=True))


def test_dataset_yields_the_training_rows_only(data: Dataset, tmp_path: Path) -> None:
    """Leakage guard of the streamed input: one epoch is exactly the teacher's rows (no cold
    user or item, no test or validation-warm row), weighted as in memory, in ceil(n / b)
    batches; the same seed and epoch give the same batches, with or without the row cache."""
    ds = data
    folder = write_shards(ds.interactions, tmp_path / "inter", "parquet", n=4)
    scan = scan_interactions(str(folder), ds.users, ds.items, ds.schema, chunk_rows=500,
                             shuffle_buffer=600)
    split = cold_start_split(ds.interactions, ds.users["user_id"], ds.items["item_id"])
    val = validation_split(split)
    teacher = pd.concat([val.train, val.cold_item, val.cold_user, val.cold_both])
    b = 256
    got, batches = _pairs(scan.dataset("teacher", batch_size=b, weight_transform="log1p",
                                       epochs=(0, 1)), with_weight=True)
    assert got == _expected(teacher, interaction_weights(teacher, "log1p"))
    assert batches == -(-len(teacher) // b)
    users = {u for u, _, _ in got}
    items = {i for _, i, _ in got}
    assert not users & {u.encode() for u in split.cold_users}
    assert not items & {i.encode() for i in split.cold_items}
    # val_train: the validation teacher's rows
    got, _ = _pairs(scan.dataset("val_train", batch_size=b, shuffle=False))
    assert got == _expected(val.train)

    def order(s, **kw):
        return [(x["user"]["user_id"].numpy().tolist(), x["item"]["item_id"].numpy().tolist())
                for x in s.dataset("teacher", batch_size=b, seed=5, **kw)]

    two = order(scan, epochs=(0, 2))
    assert len(two) == 2 * batches and two[:batches] != two[batches:]  # reshuffled per epoch
    assert order(scan, epochs=(1, 2)) == two[batches:]  # a resumed fit sees the same epoch
    uncached = scan_interactions(str(folder), ds.users, ds.items, ds.schema, chunk_rows=500,
                                 shuffle_buffer=600, cache=False)
    assert uncached.cache_dir is None and scan.cache_dir is not None
    assert order(uncached, epochs=(0, 2)) == two  # read from the shards themselves


def test_interaction_dataset_reads_a_frames_rows_from_the_shards(data: Dataset,
                                                                 tmp_path: Path) -> None:
    """The fits' hook (``interaction_dataset(stream=...)``): the rows of the frame it is given
    (by file row), with the frame's weights, read from the shards."""
    root = tmp_path / "tables"
    write_shards(data.interactions, root / "interactions", "csv")
    data.users.to_parquet(root / "users.parquet")
    data.items.to_parquet(root / "items.parquet")
    data.schema.to_yaml(root / "schema.yaml")
    ds = load_dataset("stream", root, None, chunk_rows=400, shuffle_buffer=500)
    mem = load_tables(data.interactions, data.users, data.items, data.schema)
    assert ds.stream is not None and ds.name == "tables"
    assert len(ds.interactions) == 0 and ds.n_interactions == len(mem.interactions)
    everything = ds.stream.interactions()
    pd.testing.assert_frame_equal(everything, mem.interactions)
    frame = everything.iloc[::3]
    weights = interaction_weights(frame, "raw")
    got, batches = _pairs(interaction_dataset(frame, ds.users, ds.items,
                                              ds.schema.user_features, ds.schema.item_features,
                                              100, weights=weights, epochs=(0, 1),
                                              stream=ds.stream), with_weight=True)
    assert got == _expected(frame, weights) and batches == -(-len(frame) // 100)


def test_config_and_a_featureless_side(data: Dataset, tmp_path: Path) -> None:
    """``data.format=stream`` with ``data.interactions`` a glob; items without a table (no
    item features) get the ids in order of first appearance, as ``load_tables`` does."""
    schema = data.schema.__class__.from_dict({"user_features": [
        s.to_dict() for s in data.schema.user_features]})
    root = tmp_path / "tables"
    root.mkdir()
    data.users.to_parquet(root / "users.parquet")
    schema.to_yaml(root / "schema.yaml")
    write_shards(data.interactions, tmp_path / "logs", "parquet")
    cfg = load_config(None, ["data.format=stream", f"data.data_dir={root}",
                             f"data.interactions={tmp_path / 'logs'}/part-*.parquet",
                             "data.stream_chunk_rows=999"])
    ds = load_data(cfg)
    mem = load_tables(data.interactions, data.users, None, schema)
    pd.testing.assert_frame_equal(ds.items, mem.items)
    pd.testing.assert_frame_equal(ds.stream.interactions(), mem.interactions)
    _assert_same_split(cold_start_split(mem.interactions, mem.users["user_id"],
                                        mem.items["item_id"]), ds.stream.split())


def test_bad_shards_name_the_file(data: Dataset, tmp_path: Path) -> None:
    inter = data.interactions
    kw = {"users": data.users, "items": data.items, "schema": data.schema}

    with pytest.raises(DataError, match=r"nothing.*match|no interactions files match"):
        scan_interactions(str(tmp_path / "none" / "*.parquet"), **kw)

    mixed = write_shards(inter, tmp_path / "mixed", "parquet", n=2)
    inter.iloc[:10].to_csv(mixed / "part-009.csv", index=False)
    with pytest.raises(DataError, match=r"part-009\.csv: a csv shard among parquet shards"):
        list_shards(str(mixed))

    lacking = write_shards(inter, tmp_path / "lacking", "parquet", n=2)
    inter.iloc[:10].drop(columns="weight").to_parquet(lacking / "part-001.parquet",
                                                      index=False)
    with pytest.raises(DataError, match=r"part-001\.parquet: column 'weight' is missing"):
        scan_interactions(str(lacking), **kw)

    no_item = write_shards(inter.drop(columns="item_id"), tmp_path / "noitem", "csv", n=1)
    with pytest.raises(DataError, match=r"part-000\.csv: missing required column.*item_id"):
        scan_interactions(str(no_item), **kw)

    unknown = write_shards(inter, tmp_path / "unknown", "csv", n=2)
    bad = inter.iloc[:5].copy()
    bad.loc[bad.index[3], "item_id"] = "no-such-item"
    bad.to_csv(unknown / "part-001.csv", index=False)
    with pytest.raises(DataError, match=r"part-001\.csv: column 'item_id', row 3 of the shard "
                                        r"\(line 5 of the file\): item_id 'no-such-item'"):
        scan_interactions(str(unknown), **kw)

    other = tmp_path / "other"
    other.mkdir()
    (other / "part-000.json").write_text("{}")
    with pytest.raises(DataError, match=r"part-000\.json: unknown interactions file type"):
        list_shards(str(other))

    numeric = _numeric_users(data)
    rec = write_shards(numeric.interactions.iloc[:20], tmp_path / "rec", "tfrecord", n=1)
    with tf.io.TFRecordWriter(str(rec / "part-001.tfrecord")) as w:
        w.write(tf.train.Example(features=tf.train.Features(feature={
            "user_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))})
        ).SerializeToString())
    with pytest.raises(DataError, match=r"part-001\.tfrecord: column 'item_id' is missing"):
        scan_interactions(str(rec), numeric.users, numeric.items, numeric.schema)


def _same_task(a, b, name: str) -> None:
    assert a.name == b.name, name
    np.testing.assert_array_equal(a.user_rows, b.user_rows, err_msg=name)
    np.testing.assert_array_equal(a.candidate_rows, b.candidate_rows, err_msg=name)
    for field in ("relevant", "excluded"):
        x, y = getattr(a, field), getattr(b, field)
        assert len(x) == len(y), (name, field)
        for u, (p, q) in enumerate(zip(x, y, strict=True)):
            np.testing.assert_array_equal(np.sort(p), np.sort(q), err_msg=f"{name} {field} {u}")


@pytest.mark.parametrize("max_users", [0, 25])
def test_a_streamed_run_prepares_the_in_memory_tasks_without_the_rows(
        data: Dataset, tmp_path: Path, max_users: int) -> None:
    """``evaluation.prepare`` on streamed data: the training parts stay on disk (counts and
    the rows of the evaluated users only), and every ranking task (test, validation, mixed),
    the split's summary and the popularity baseline equal the in-memory run's; with
    ``eval.max_users`` both draw the same users, and fewer rows are read."""
    from tfrs_coldstart.data.stream import StreamPart
    from tfrs_coldstart.evaluation import evaluate_popularity

    root = tmp_path / "tables"
    write_shards(data.interactions, root / "interactions", "parquet")
    data.users.to_parquet(root / "users.parquet")
    data.items.to_parquet(root / "items.parquet")
    data.schema.to_yaml(root / "schema.yaml")
    whole = tmp_path / "whole"  # the same tables with the interactions in one file
    whole.mkdir()
    data.interactions.to_parquet(whole / "interactions.parquet")
    for name in ("users.parquet", "items.parquet", "schema.yaml"):
        (whole / name).write_bytes((root / name).read_bytes())
    cap = f"eval.max_users={max_users}"
    streamed = load_config(None, ["data.format=stream", "data.stream_chunk_rows=600",
                                  f"data.data_dir={root}", cap])
    in_memory = load_config(None, ["data.format=tables", f"data.data_dir={whole}", cap])
    ps, pm = prepare(load_data(streamed), streamed), prepare(load_data(in_memory), in_memory)
    for split in (ps.split, ps.val):
        assert isinstance(split.train, StreamPart) and len(split.train.seen) < len(split.train)
    assert len(ps.split.train) == len(pm.split.train)
    assert len(ps.val.train) == len(pm.val.train)
    # what the teacher trains on does not shrink with the evaluated users
    assert len(ps.val.with_pseudo_cold()) == len(pm.val.with_pseudo_cold()) \
        == ps.dataset.stream.n_rows("teacher")
    for tasks_s, tasks_m in ((ps.tasks, pm.tasks), (ps.val_tasks, pm.val_tasks)):
        assert set(tasks_s) == set(tasks_m)
        for name in tasks_s:
            _same_task(tasks_s[name], tasks_m[name], name)
    for validation in (False, True):
        _same_task(ps.mixed(validation), pm.mixed(validation), f"mixed {validation}")
    assert ps.split.summary() == pm.split.summary()
    for split_s, split_m in ((ps.split, pm.split), (ps.val, pm.val)):  # the history student's
        whole = user_sequences(split_m.train)
        assert split_s.train.sequences(3, buffer_rows=500) == {u: s[:3] for u, s in whole.items()}
    assert evaluate_popularity(ps, (20,)) == evaluate_popularity(pm, (20,))
    users = {s: len(t.user_rows) for s, t in ps.tasks.items()}
    if max_users:  # at most 25 warm users over warm + cold-item, 25 cold over the others
        assert len(set(ps.tasks["warm"].user_rows) | set(ps.tasks["cold_item"].user_rows)) <= 25
        assert len(set(ps.tasks["cold_user"].user_rows)
                   | set(ps.tasks["cold_both"].user_rows)) <= 25
        assert all(n > 0 for n in users.values()), users
    else:
        assert users["warm"] > 100, users


@pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                    reason="apache_beam not installed (extra [beam])")
def test_the_pass_on_beam_gives_the_ordered_pass_split(data: Dataset, tmp_path: Path) -> None:
    """``scan_interactions(beam=...)``: the three per-shard Beam stages (counts, then the
    generators advanced to each shard's offset) give the ordered pass's generator states at
    every shard, its counts, statistics and so the same split, through ``data.stream_beam``."""
    folder = write_shards(data.interactions, tmp_path / "inter", "parquet", n=4)
    kw = {"chunk_rows": 700, "weight_transforms": ("threshold:4",)}
    ordered = scan_interactions(str(folder), data.users, data.items, data.schema, **kw)
    beam = scan_interactions(str(folder), data.users, data.items, data.schema, **kw,
                             beam=["--runner=DirectRunner", "--direct_num_workers=2",
                                   "--direct_running_mode=multi_threading"],
                             beam_dir=str(tmp_path / "beam"))
    assert beam.shard_rows == ordered.shard_rows and beam.stats == ordered.stats
    assert len({s for s in ordered._shard_start}) == 4 and beam.cache_dir is None
    for (t1, v1), (t2, v2) in zip(ordered._states, beam._states, strict=True):
        assert t1["state"] == t2["state"] and v1["state"] == v2["state"]
    for side in ("user", "item"):
        np.testing.assert_array_equal(beam.counts[side], ordered.counts[side])
    for name, sums in ordered._weight_sums.items():  # summed in another order
        np.testing.assert_allclose(beam._weight_sums[name], sums, rtol=1e-12)
    _assert_same_split(beam.split(), ordered.split())
    _assert_same_split(beam.split(validation=True), ordered.split(validation=True))
    # a real runner pickles the scan to its workers
    again = pickle.loads(pickle.dumps(beam))
    assert again._shard_job("rows", 2)["ww"] == beam._shard_job("rows", 2)["ww"] > 0
    root = tmp_path / "tables"  # the config's way in: data.stream_beam
    root.mkdir()
    data.users.to_parquet(root / "users.parquet")
    data.items.to_parquet(root / "items.parquet")
    data.schema.to_yaml(root / "schema.yaml")
    cfg = load_config(None, ["data.format=stream", f"data.data_dir={root}",
                             f"data.interactions={folder}", "data.stream_chunk_rows=700",
                             "data.stream_beam=--runner=DirectRunner"])
    ds = load_data(cfg)
    assert ds.stream.cache_dir is None
    np.testing.assert_array_equal(ds.stream.counts["item"], ordered.counts["item"])
    with pytest.raises(DataError, match="keeps no rows"):
        scan_interactions(str(folder), data.users, data.items, data.schema, beam=[],
                          keep=("held_out",))


def test_a_streamed_fit_weighs_its_rows(data: Dataset, tmp_path: Path) -> None:
    """``teacher.interaction_weight=threshold:4`` on streamed data: the scan counts the
    transform's mean (``runs.load_data`` passes the configured transforms), the teacher's
    batches carry the weights (0 below the threshold, one value above, mean 1) and the fit
    runs."""
    root = tmp_path / "tables"
    write_shards(data.interactions, root / "interactions", "parquet", n=2)
    data.users.to_parquet(root / "users.parquet")
    data.items.to_parquet(root / "items.parquet")
    data.schema.to_yaml(root / "schema.yaml")
    cfg = load_config(None, ["data.format=stream", f"data.data_dir={root}",
                             "teacher.interaction_weight=threshold:4", *TINY_MODEL_OVERRIDES,
                             "teacher.epochs=1"])
    ds = load_data(cfg)
    prep = prepare(ds, cfg)
    part = prep.val.with_pseudo_cold()
    w = np.concatenate([b["weight"].numpy() for b in interaction_dataset(
        part, ds.users, ds.items, ds.schema.user_features, ds.schema.item_features, 500,
        epochs=(0, 1), weight_transform="threshold:4")])
    assert len(w) == len(part) and len(np.unique(w)) == 2 and np.unique(w)[0] == 0
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    model = training.fit_teacher(prep, cfg.teacher, RunDir(tmp_path / "run"), verbose=0)
    assert model is not None


def test_held_out_rows_kept_by_the_scan(data: Dataset, tmp_path: Path) -> None:
    """``keep=("held_out",)`` holds the test and validation segments from the pass (no second
    pass), the same frames as reading them again."""
    folder = write_shards(data.interactions, tmp_path / "inter", "parquet")
    kept = scan_interactions(str(folder), data.users, data.items, data.schema,
                             keep=("held_out",))
    again = scan_interactions(str(folder), data.users, data.items, data.schema)
    a, b = kept.held_out(), again.held_out()
    assert set(a) == set(CODES) - {"train"}
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])


def test_the_teacher_fit_reads_the_stream(data: Dataset, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``data.format=stream``: ``fit_teacher`` hands the scan to its input pipeline (stopped
    there: what the batches are is the tests above)."""
    root = tmp_path / "tables"
    write_shards(data.interactions.iloc[:2000], root / "interactions", "parquet", n=2)
    data.users.to_parquet(root / "users.parquet")
    data.items.to_parquet(root / "items.parquet")
    data.schema.to_yaml(root / "schema.yaml")
    cfg = load_config(None, ["data.format=stream", f"data.data_dir={root}",
                             *TINY_MODEL_OVERRIDES])
    ds = load_data(cfg)
    seen: dict = {}

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(training, "interaction_dataset", stop)
    with pytest.raises(Stop):
        training.fit_teacher(prepare(ds, cfg), cfg.teacher, RunDir(tmp_path / "run"), verbose=0)
    assert seen["stream"] is ds.stream
