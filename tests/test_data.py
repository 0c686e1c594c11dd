"""Schema, table loading/validation, MovieLens, TFDS and the synthetic generator."""

from __future__ import annotations

import ast
import os
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tfrs_coldstart.data import (
    MOVIELENS_SCHEMA,
    DataError,
    Dataset,
    FeatureSpec,
    FeatureType,
    Schema,
    generate,
    load_dataset,
    load_movielens,
    load_tables,
    load_tfds,
)
from tfrs_coldstart.data.tfds import TFDS_SCHEMA
from tfrs_coldstart.errors import UserError

SCHEMA = Schema(
    user_features=(
        FeatureSpec("age", FeatureType.NUMERIC),
        FeatureSpec("country", FeatureType.CATEGORICAL),
    ),
    item_features=(
        FeatureSpec("title", FeatureType.TEXT),
        FeatureSpec("genres", FeatureType.MULTI_HOT),
        FeatureSpec("emb", FeatureType.DENSE_VECTOR, dim=3),
        FeatureSpec("price", FeatureType.NUMERIC, nullable=True),
    ),
)


def _frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    inter = pd.DataFrame({
        "user_id": [1, 2, 1, 3],
        "item_id": [10, 10, 11, 12],
        "timestamp": [5, 3, 9, 1],
        "weight": [1.0, 2.0, 0.5, 1.0],
    })
    users = pd.DataFrame({"user_id": [1, 2, 3], "age": [31, 42, 18], "country": ["fr", "de", "fr"]})
    items = pd.DataFrame({
        "item_id": [10, 11, 12],
        "title": ["Red shoes", "Blue hat", "Green scarf"],
        "genres": ["Action|Comedy", "Drama", "Action"],
        "emb": [[0.1, 0.2, 0.3], [1, 2, 3], [0, 0, 1]],
        "price": [9.5, None, 3.0],
    })
    return inter, users, items


def _write_csvs(tmp_path: Path, inter: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame):
    if len(items) == 3:  # the three CSV spellings of a vector
        items = items.assign(emb=["[0.1, 0.2, 0.3]", "1 2 3", "0,0,1"])
    paths = []
    for name, df in (("interactions", inter), ("users", users), ("items", items)):
        p = tmp_path / f"{name}.csv"
        df.to_csv(p, index=False)
        paths.append(p)
    return paths


def _err(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as exc:
        fn(*args, **kw)
    return str(exc.value)


# ---------------------------------------------------------------------------------- schema


def test_schema_yaml_roundtrip_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "schema.yaml"
    SCHEMA.to_yaml(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["schema.yaml"]  # no temp left
    assert Schema.from_yaml(path) == SCHEMA
    assert Schema.from_dict(SCHEMA.to_dict()) == SCHEMA
    assert SCHEMA.side("item")[2].dim == 3 and SCHEMA.names("user") == ("age", "country")


def test_schema_yaml_is_readable_by_group_and_others(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        SCHEMA.to_yaml(tmp_path / "schema.yaml")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "schema.yaml").stat().st_mode)
    assert mode == 0o644, oct(mode)  # the umask's mode, not mkstemp's 0600


def test_data_error_is_a_user_error() -> None:
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


def test_data_modules_import_one_way() -> None:
    """No import cycle inside the data package (sources <-> synthetic was one)."""
    pkg = Path(__file__).resolve().parents[1] / "tfrs_coldstart" / "data"
    graph: dict[str, set[str]] = {}
    for path in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                prefix = "tfrs_coldstart.data."
                if node.module.startswith(prefix):
                    deps.add(node.module[len(prefix):])
        graph[path.stem] = deps
    graph.pop("__init__")
    done: set[str] = set()

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        assert mod not in stack, f"import cycle: {' -> '.join(stack + (mod,))}"
        if mod in done:
            return
        for dep in graph.get(mod, ()):
            visit(dep, stack + (mod,))
        done.add(mod)

    for mod in graph:
        visit(mod, ())
    assert "sources" not in graph and {"dataset", "tables", "load"} <= set(graph)


@pytest.mark.parametrize(
    "text, words",
    [
        ("user_features: [{name: age, type: numbr}]", ["age", "numbr"]),
        ("item_features: [{type: text}]", ["item_features[0]", "name"]),
        ("item_features: [{name: emb, type: dense_vector}]", ["emb", "dim"]),
        ("item_features: [{name: t, type: text, nulable: true}]", ["t", "nulable"]),
        ("item_features: [{name: t, type: text}, {name: t, type: text}]", ["'t'", "twice"]),
        ("users: []", ["users"]),
    ],
)
def test_schema_errors_name_file_and_feature(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    msg = _err(Schema.from_yaml, path)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_schema_missing_file(tmp_path: Path) -> None:
    assert "not found" in _err(Schema.from_yaml, tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------- load_tables ok


def _check_normalised(ds: Dataset) -> None:
    inter, users, items = ds.interactions, ds.users, ds.items
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "weight"]
    assert inter["user_id"].tolist() == ["1", "2", "1", "3"]  # file order, ints -> str
    assert inter["item_id"].dtype == object and isinstance(inter["item_id"].iloc[0], str)
    assert inter["timestamp"].dtype == np.int64 and inter["weight"].dtype == np.float32
    assert users["user_id"].tolist() == ["1", "2", "3"] and users["age"].dtype == np.float32
    assert users["country"].tolist() == ["fr", "de", "fr"]
    assert items["genres"].tolist() == ["Action|Comedy", "Drama", "Action"]
    assert items["price"].dtype == np.float32 and items["price"].tolist() == [9.5, 0.0, 3.0]
    for cell in items["emb"]:
        assert isinstance(cell, np.ndarray) and cell.dtype == np.float32 and cell.shape == (3,)
    np.testing.assert_allclose(items["emb"].iloc[0], [0.1, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose(items["emb"].iloc[1], [1, 2, 3])
    assert list(items.columns) == ["item_id", "title", "genres", "emb", "price"]


def test_load_tables_from_dataframes() -> None:
    _check_normalised(load_tables(*_frames(), SCHEMA))


def test_load_tables_from_csv_writes_nothing(tmp_path: Path) -> None:
    paths = _write_csvs(tmp_path, *_frames())
    before = sorted(tmp_path.iterdir())
    ds = load_tables(*paths, SCHEMA, name="csv")
    _check_normalised(ds)
    assert sorted(tmp_path.iterdir()) == before


def test_load_tables_from_parquet(tmp_path: Path) -> None:
    inter, users, items = _frames()
    items = items.assign(genres=[["Action", "Comedy"], ["Drama"], ["Action"]])  # list column
    paths = []
    for name, df in (("interactions", inter), ("users", users), ("items", items)):
        paths.append(tmp_path / f"{name}.parquet")
        df.to_parquet(paths[-1])
    _check_normalised(load_tables(*paths, SCHEMA))


def test_float_ids_and_messy_tags_are_normalised() -> None:
    inter, users, items = _frames()
    inter["user_id"] = inter["user_id"].astype(float)  # 1.0 must become "1", not "1.0"
    items["genres"] = [" Action | Comedy|", "Drama", "Action"]
    ds = load_tables(inter, users, items, SCHEMA)
    assert ds.interactions["user_id"].tolist() == ["1", "2", "1", "3"]
    assert ds.items["genres"].iloc[0] == "Action|Comedy"


def test_featureless_side_needs_no_table() -> None:
    inter, users, _ = _frames()
    schema = Schema(user_features=SCHEMA.user_features, item_features=())
    ds = load_tables(inter, users, None, schema)
    assert list(ds.items.columns) == ["item_id"] and ds.items["item_id"].tolist() == [
        "10", "11", "12"]
    assert "items" in _err(load_tables, inter, users, None, SCHEMA)


# ----------------------------------------------------------------------- validation errors


def test_missing_required_column() -> None:
    inter, users, items = _frames()
    msg = _err(load_tables, inter.drop(columns=["item_id"]), users, items, SCHEMA)
    assert "<DataFrame interactions>" in msg and "'item_id'" in msg and "header row" in msg
    msg = _err(load_tables, inter, users.drop(columns=["country"]), items, SCHEMA)
    assert "<DataFrame users>" in msg and "'country'" in msg and "header row" in msg


def test_numeric_column_that_does_not_parse(tmp_path: Path) -> None:
    inter, users, items = _frames()
    users["age"] = ["31", "forty", "18"]
    paths = _write_csvs(tmp_path, inter, users, items)
    msg = _err(load_tables, *paths, SCHEMA)
    assert "users.csv" in msg and "'age'" in msg and "row 1 (line 3" in msg and "forty" in msg


def test_dense_vector_of_wrong_length(tmp_path: Path) -> None:
    inter, users, items = _frames()
    paths = _write_csvs(tmp_path, inter, users, items)
    df = pd.read_csv(paths[2])
    df.loc[2, "emb"] = "[1, 2]"
    df.to_csv(paths[2], index=False)
    msg = _err(load_tables, *paths, SCHEMA)
    assert "items.csv" in msg and "'emb'" in msg and "row 2" in msg and "dim=3" in msg


def test_dense_vector_not_numeric() -> None:
    inter, users, items = _frames()
    items["emb"] = [[0.1, 0.2, 0.3], "1 two 3", [0, 0, 1]]
    msg = _err(load_tables, inter, users, items, SCHEMA)
    assert "'emb'" in msg and "row 1" in msg


def test_missing_value_where_not_nullable() -> None:
    inter, users, items = _frames()
    users["country"] = ["fr", None, "fr"]
    msg = _err(load_tables, inter, users, items, SCHEMA)
    assert "'country'" in msg and "row 1" in msg and "nullable" in msg
    items["title"] = ["a", "b", "  "]  # blank text counts as missing
    msg = _err(load_tables, inter, users.assign(country="fr"), items, SCHEMA)
    assert "'title'" in msg and "row 2" in msg


def test_missing_id() -> None:
    inter, users, items = _frames()
    inter["item_id"] = [10, 10, np.nan, 12]
    msg = _err(load_tables, inter, users, items, SCHEMA)
    assert "'item_id'" in msg and "row 2" in msg


def test_interactions_name_unknown_user() -> None:
    inter, users, items = _frames()
    inter.loc[3, "user_id"] = 99
    msg = _err(load_tables, inter, users, items, SCHEMA)
    assert "<DataFrame interactions>" in msg and "'user_id'" in msg and "row 3" in msg
    assert "'99'" in msg


def test_interactions_name_unknown_item(tmp_path: Path) -> None:
    inter, users, items = _frames()
    inter.loc[1, "item_id"] = 77
    paths = _write_csvs(tmp_path, inter, users, items)
    msg = _err(load_tables, *paths, SCHEMA)
    assert "interactions.csv" in msg and "'item_id'" in msg and "row 1" in msg and "'77'" in msg


@pytest.mark.parametrize("which", [0, 1, 2])
def test_empty_table(tmp_path: Path, which: int) -> None:
    frames = list(_frames())
    frames[which] = frames[which].iloc[:0]
    paths = _write_csvs(tmp_path, *frames)
    msg = _err(load_tables, *paths, SCHEMA)
    assert paths[which].name in msg and "empty" in msg and "0 rows" in msg


def test_duplicate_ids() -> None:
    inter, users, items = _frames()
    dup_users = pd.concat([users, users.iloc[[0]]], ignore_index=True)
    msg = _err(load_tables, inter, dup_users, items, SCHEMA)
    assert "'user_id'" in msg and "row 3" in msg and "duplicate" in msg and "row 0" in msg
    dup_items = pd.concat([items, items.iloc[[1]]], ignore_index=True)
    msg = _err(load_tables, inter, users, dup_items, SCHEMA)
    assert "'item_id'" in msg and "row 3" in msg and "duplicate" in msg


def test_unreadable_or_unknown_files(tmp_path: Path) -> None:
    inter, users, items = _frames()
    xlsx = tmp_path / "users.xlsx"
    xlsx.write_text("x")
    msg = _err(load_tables, inter, xlsx, items, SCHEMA)
    assert "users.xlsx" in msg and ".parquet" in msg
    msg = _err(load_tables, tmp_path / "missing.csv", users, items, SCHEMA)
    assert "missing.csv" in msg and "not found" in msg
    broken = tmp_path / "items.parquet"
    broken.write_bytes(b"not parquet at all")
    msg = _err(load_tables, inter, users, broken, SCHEMA)
    assert "items.parquet" in msg and "could not read" in msg


def test_bad_timestamp_and_weight() -> None:
    inter, users, items = _frames()
    msg = _err(load_tables, inter.assign(weight=[1, "x", 1, 1]), users, items, SCHEMA)
    assert "'weight'" in msg and "row 1" in msg
    msg = _err(load_tables, inter.assign(timestamp=[1, 2, None, 4]), users, items, SCHEMA)
    assert "'timestamp'" in msg and "row 2" in msg


# ------------------------------------------------------------------------------- MovieLens


def test_movielens_100k(ml100k_dir: Path) -> None:
    ds = load_movielens(ml100k_dir)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100_000)
    schema = ds.schema.to_dict()
    assert schema["item_features"][2].pop("fill") == 1995.0  # the median year, saved
    assert schema == MOVIELENS_SCHEMA.to_dict()
    first = ds.interactions.iloc[0]
    assert (first.user_id, first.item_id, first.timestamp, first.weight) == (
        "196", "242", 881250949, 3.0)
    assert ds.interactions["weight"].dtype == np.float32
    toy = ds.items.set_index("item_id").loc["1"]
    assert (toy.title, toy.genres, toy.year) == ("Toy Story", "Animation|Children's|Comedy", 1995)
    unknown = ds.items.set_index("item_id").loc["267"]  # no title year, no date -> median
    assert unknown.year == np.median(ds.items["year"])
    u1 = ds.users.set_index("user_id").loc["1"]
    assert (u1.age_bucket, u1.gender, u1.occupation, u1.zip_prefix) == (
        "18-24", "M", "technician", "85")
    assert set(ds.users["age_bucket"]) <= {"Under 18", "18-24", "25-34", "35-44", "45-49", "50-55",
                                    "56+"}


def test_movielens_1m_layout(tmp_path: Path) -> None:
    """A hand-written folder in ML-1M format (no real data copied)."""
    (tmp_path / "ratings.dat").write_text("1::20::5::978300760\n2::10::3::978302109\n"
                                          "1::10::4::978301968\n")
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (tmp_path / "movies.dat").write_bytes(
        "10::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n"
        "20::Misérables, Les (1995)::Drama\n30::Untitled::Drama\n".encode("latin-1"))
    ds = load_movielens(tmp_path)
    assert ds.name == "ml-1m" and ds.interactions["item_id"].tolist() == ["20", "10", "10"]
    items = ds.items.set_index("item_id")
    assert items.loc["10", "title"] == "Star Wars: Episode IV - A New Hope"
    assert items.loc["20", "title"] == "Misérables, Les"
    assert items.loc["10", "genres"] == "Action|Sci-Fi"
    assert items.loc["30", "year"] == np.float32(1986)  # median of 1977 and 1995
    users = ds.users.set_index("user_id")
    assert users.loc["1", ["age_bucket", "gender", "occupation_name", "zip_prefix"]].tolist() == [
        "Under 18", "F", "K-12 student", "48"]
    assert users.loc["2", "age_bucket"] == "56+"
    assert users.loc["2", "occupation_name"] == "self-employed"


def test_movielens_missing_files(tmp_path: Path) -> None:
    msg = _err(load_movielens, tmp_path / "nowhere")
    assert "does not exist" in msg and "u.data" in msg and "ratings.dat" in msg
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n")
    msg = _err(load_movielens, tmp_path)
    assert "u.item" in msg and "u.user" in msg and "missing" in msg


# ------------------------------------------------------------------------- TFDS / dispatch


def test_load_tfds_with_mock_data() -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40):
        ds = load_tfds("movielens/100k-ratings")
    schema = ds.schema.to_dict()
    schema["item_features"][2].pop("fill")  # the median year of the (mock) titles
    assert ds.n_interactions == 40 and schema == TFDS_SCHEMA.to_dict()
    assert ds.interactions["weight"].dtype == np.float32
    assert ds.interactions["timestamp"].dtype == np.int64
    assert ds.interactions["user_id"].isin(ds.users["user_id"]).all()
    assert ds.interactions["item_id"].isin(ds.items["item_id"]).all()
    assert ds.users["gender"].isin(["M", "F"]).all()
    assert all(isinstance(g, str) and g for g in ds.items["genres"])
    # The mock draws genre indices from the real ClassLabel, so names come from it.
    assert {t for g in ds.items["genres"] for t in g.split("|")} <= {
        "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
        "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance",
        "Sci-Fi", "Thriller", "Unknown", "War", "Western", "(no genres listed)", "unknown"}


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    paths = _write_csvs(tmp_path, *_frames())
    SCHEMA.to_yaml(tmp_path / "schema.yaml")
    ds = load_dataset("tables", data_dir=tmp_path)
    _check_normalised(ds)
    ds = load_dataset("tables", schema_path=tmp_path / "schema.yaml", interactions=paths[0],
                      users=paths[1], items=paths[2], name="x")
    assert ds.name == "x"
    assert load_dataset("synthetic", n_users=20, n_items=30, n_interactions=200).n_users == 20
    assert "synthetic" in _err(load_dataset, "csv")
    paths[1].unlink()
    assert "users" in _err(load_dataset, "tables", data_dir=tmp_path)


# ------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_dtypes(tiny_dataset: Dataset) -> None:
    ds = tiny_dataset
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (300, 200, 6000)
    per_user = ds.interactions.groupby("user_id").size()
    assert len(per_user) == 300 and per_user.min() >= 5
    assert not ds.interactions.duplicated(["user_id", "item_id"]).any()
    assert ds.schema.names("user") == ("age_bucket", "region", "activity", "interests")
    assert ds.schema.names("item") == ("category", "tags", "title", "price")
    assert ds.users["activity"].dtype == np.float32 and ds.items["price"].dtype == np.float32
    assert ds.interactions["timestamp"].is_monotonic_increasing
    # The generated tables already are in normalised form: validation passes unchanged.
    again = load_tables(ds.interactions, ds.users, ds.items, ds.schema)
    pd.testing.assert_frame_equal(again.items, ds.items)
    pd.testing.assert_frame_equal(again.users, ds.users)
    pd.testing.assert_frame_equal(again.interactions, ds.interactions)


def test_synthetic_is_deterministic() -> None:
    a = generate(n_users=50, n_items=40, n_interactions=400, seed=3)
    b = generate(n_users=50, n_items=40, n_interactions=400, seed=3)
    c = generate(n_users=50, n_items=40, n_interactions=400, seed=4)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions.equals(c.interactions)


def test_synthetic_featureless_sides_and_dense_vectors() -> None:
    kw = dict(n_users=60, n_items=50, n_interactions=600, seed=1)
    full = generate(**kw, dense_dim=8)
    no_users = generate(**kw, with_user_features=False)
    no_items = generate(**kw, with_item_features=False)
    assert list(no_users.users.columns) == ["user_id"] and no_users.schema.user_features == ()
    assert list(no_items.items.columns) == ["item_id"] and no_items.schema.item_features == ()
    pd.testing.assert_frame_equal(full.interactions, no_users.interactions)
    pd.testing.assert_frame_equal(full.interactions, no_items.interactions)
    spec = full.schema.feature("item", "embedding")
    assert spec.type is FeatureType.DENSE_VECTOR and spec.dim == 8
    assert all(v.dtype == np.float32 and v.shape == (8,) for v in full.items["embedding"])


def test_synthetic_content_predicts_taste() -> None:
    """Users concentrate on categories, and more than chance matches their interests."""
    ds = generate(n_users=400, n_items=300, n_interactions=8000, seed=0)
    df = ds.interactions.merge(ds.items, on="item_id").merge(ds.users, on="user_id")

    def top_share(cat: pd.Series) -> float:
        return float(df.assign(c=cat.to_numpy()).groupby("user_id")["c"].agg(
            lambda s: s.value_counts(normalize=True).iloc[0]).mean())

    shuffled = pd.Series(np.random.default_rng(0).permutation(df["category"].to_numpy()))
    assert top_share(df["category"]) > top_share(shuffled) + 0.15

    def overlap(interests: np.ndarray) -> float:
        return float(np.mean([bool(set(a.split("|")) & set(b.split("|")))
                              for a, b in zip(df["tags"], interests, strict=True)]))

    real = overlap(df["interests"].to_numpy())
    chance = overlap(np.random.default_rng(0).permutation(df["interests"].to_numpy()))
    assert real > 2 * chance


def test_synthetic_many_tags() -> None:
    ds = generate(n_users=100, n_items=20_000, n_interactions=1000, n_tags=50_000, seed=0)
    tags = {t for cell in ds.items["tags"] for t in cell.split("|")}
    assert len(tags) > 20_000
    assert len(ds.items) == 20_000 and ds.interactions["item_id"].isin(ds.items["item_id"]).all()


def test_synthetic_million_items_is_fast() -> None:
    start = time.perf_counter()
    ds = generate(n_users=1000, n_items=1_000_000, n_interactions=50_000, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"took {elapsed:.1f}s"
    assert ds.n_items == 1_000_000 and ds.n_interactions == 50_000
    assert ds.interactions.groupby("user_id").size().min() >= 5
    assert not ds.interactions.duplicated(["user_id", "item_id"]).any()


def test_synthetic_bad_arguments() -> None:
    assert "n_interactions" in _err(generate, n_users=10, n_items=10, n_interactions=20)
    assert "n_items" in _err(generate, n_users=2, n_items=5, n_interactions=11)
