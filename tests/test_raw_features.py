"""Raw request features (issue 14, item 4): derivations declared in the schema, run in
TensorFlow ops at load time and inside the exported models, so served models, ``batch`` and
the clients take the source's own columns."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import tensorflow as tf
from conftest import TINY_MODEL_OVERRIDES

from tfrs_coldstart.data import DataError, FeatureSpec, Schema, generate, load_tables
from tfrs_coldstart.data.derive import derive_column
from tfrs_coldstart.data.movielens import USER_COLUMNS, load_movielens, ml100k_item_columns
from tfrs_coldstart.data.tables import conform
from tfrs_coldstart.features import SourceInputs

# ------------------------------------------------------------------------- the derivations


def _derive(spec: FeatureSpec, *cols: Any) -> list[Any]:
    kind = object if not spec.numeric_sources else np.float32
    return derive_column(spec, [np.asarray(c, dtype=kind) for c in cols]).tolist()


def test_each_derivation_in_tensorflow_ops() -> None:
    titles = ["Toy Story (1995)", " Land Before Time III (1995) (V)", "unknown", "(1995)",
              "Foo  (1995) (1996) ", "Misérables, Les (1995)"]
    dates = ["01-Jan-1995", "01-Feb-1994", "", "", "1997-03-02", "x"]
    strip = FeatureSpec("t", "text", source="movie_title", derive="strip_year")
    assert _derive(strip, titles) == ["Toy Story", "Land Before Time III (1995) (V)", "unknown",
                                      "(1995)", "Foo  (1995)", "Misérables, Les"]
    year = FeatureSpec("y", "numeric", source=["movie_title", "date"], derive="year_from_title")
    got = _derive(year, titles, dates)
    assert got[:2] == [1995, 1994] and np.isnan(got[2]) and got[3:] == [1995, 1996, 1995]
    assert _derive(FeatureSpec("y", "numeric", source=["t", "d"], derive="year_from_title",
                               fill=1990), titles, dates)[2] == 1990
    by_date = FeatureSpec("y", "numeric", source="d", derive="year_from_date", fill=0)
    assert _derive(by_date, dates) == [1995, 1994, 0, 0, 1997, 0]
    age = FeatureSpec("a", "categorical", source="age", derive="age_bucket")
    assert _derive(age, [0, 17, 18, 24.5, 25, 49, 50, 56, 80, np.nan]) == [
        "Under 18", "Under 18", "18-24", "18-24", "25-34", "45-49", "50-55", "56+", "56+", ""]
    code = FeatureSpec("o", "categorical", source="occ", derive="code_label", labels=["a", "b"])
    assert _derive(code, [0, 1, 2, np.nan]) == ["a", "b", "2", ""]
    zip_ = FeatureSpec("z", "categorical", source="zip", derive="prefix:2")
    assert _derive(zip_, ["85711", " V3N4P", "", "9"]) == ["85", "V3", "", "9"]
    flags = FeatureSpec("g", "multi_hot", source=["f1", "f2", "f3"],
                        derive="flags_to_multi_hot", labels=["A", "B", "C's"])
    assert _derive(flags, [1, 0, 0, 1], [1, 0, 1, np.nan], [0, 0, 1, 1]) == [
        "A|B", "", "B|C's", "A|C's"]
    assert _derive(zip_, []) == []  # an empty column


def test_schema_declares_derivations(tmp_path: Path) -> None:
    text = """
user_features:
  - {name: zip_prefix, type: categorical, source: zip_code, derive: "prefix:3"}
item_features:
  - {name: year, type: numeric, source: [name, released], derive: year_from_title, fill: 1990}
  - {name: genres, type: multi_hot, source: [g_a, g_b], derive: flags_to_multi_hot,
     labels: [A, B]}
"""
    (tmp_path / "s.yaml").write_text(text)
    schema = Schema.from_yaml(tmp_path / "s.yaml")
    assert schema.inputs("user") == ("zip_code",)
    assert schema.inputs("item") == ("name", "released", "g_a", "g_b")
    assert [(c.name, c.numeric, c.nullable) for c in schema.sources("item")] == [
        ("name", False, True), ("released", False, True), ("g_a", True, False),
        ("g_b", True, False)]
    schema.to_yaml(tmp_path / "back.yaml")
    assert Schema.from_yaml(tmp_path / "back.yaml") == schema
    assert yaml.safe_load((tmp_path / "back.yaml").read_text())["user_features"][0] == {
        "name": "zip_prefix", "type": "categorical", "source": "zip_code", "derive": "prefix:3"}

    bad = {
        "derive: nope": ({"name": "z", "type": "categorical", "source": "a", "derive": "nope"},
                         "unknown derive"),
        "no source": ({"name": "z", "type": "categorical", "derive": "age_bucket"}, "source"),
        "same name": ({"name": "age", "type": "categorical", "source": "age",
                       "derive": "age_bucket"}, "name of its source"),
        "wrong type": ({"name": "z", "type": "numeric", "source": "a", "derive": "prefix:2"},
                       "categorical or text"),
        "labels": ({"name": "g", "type": "multi_hot", "source": ["a", "b"],
                    "derive": "flags_to_multi_hot", "labels": ["A"]}, "1 labels for 2"),
        "fill": ({"name": "z", "type": "categorical", "source": "a", "derive": "age_bucket",
                  "fill": 3}, "takes no 'fill'"),
        "prefix": ({"name": "z", "type": "categorical", "source": "a", "derive": "prefix"},
                   "prefix:2"),
        "id": ({"name": "z", "type": "categorical", "source": "user_id", "derive": "prefix:1"},
               "id column"),
    }
    for spec, words in bad.values():
        with pytest.raises(DataError, match=re.escape(words)):
            Schema.from_dict({"user_features": [spec]})
    with pytest.raises(DataError, match="as numbers by one of"):  # one column, two kinds
        Schema.from_dict({"user_features": [
            {"name": "a", "type": "categorical", "source": "x", "derive": "age_bucket"},
            {"name": "b", "type": "categorical", "source": "x", "derive": "prefix:1"}]})
    with pytest.raises(DataError, match="itself a derived feature"):
        Schema.from_dict({"user_features": [
            {"name": "a", "type": "categorical", "source": "x", "derive": "prefix:1"},
            {"name": "b", "type": "categorical", "source": "a", "derive": "prefix:1"}]})


# ------------------------------------------------------------------------- raw tables


def raw_tables(ds: Any, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, Schema]:
    """A synthetic dataset's users and items as a source would give them: raw ages and post
    codes for the age band and region, titles with a year (or a release date), category
    flags; plus the schema that derives the features back."""
    rng = np.random.default_rng(seed)
    u, i = ds.users, ds.items
    lower = {"Under 18": 12, "18-24": 18, "25-34": 25, "35-44": 35, "45-49": 45, "50-55": 50,
             "56+": 56}
    users = pd.DataFrame({
        "user_id": u["user_id"],
        "age": [lower.get(b, 30) + int(rng.integers(0, 5)) for b in u["age_bucket"]],
        "postcode": [f"{r[-2:]}{rng.integers(100, 999)}" for r in u["region"]],
        "activity": u["activity"], "interests": u["interests"]})
    years = rng.integers(1950, 2020, size=len(i))
    has_year = rng.random(len(i)) < 0.8
    cats = sorted(set(i["category"]))
    items = pd.DataFrame({
        "item_id": i["item_id"],
        "name": [f"{t} ({y})" if h else t for t, y, h in zip(i["title"], years, has_year,
                                                                 strict=True)],
        "released": [f"01-Jan-{y}" if not h and n % 2 else "" for n, (y, h) in
                     enumerate(zip(years, has_year, strict=True))],
        **{f"is_{c}": (i["category"] == c).astype(int) for c in cats},
        "tags": i["tags"], "price": i["price"]})
    schema = Schema.from_dict({
        "user_features": [
            {"name": "age_band", "type": "categorical", "source": "age", "derive": "age_bucket"},
            {"name": "region", "type": "categorical", "source": "postcode",
             "derive": "prefix:2"},
            {"name": "activity", "type": "numeric"},
            {"name": "interests", "type": "multi_hot"}],
        "item_features": [
            {"name": "title", "type": "text", "source": "name", "derive": "strip_year"},
            {"name": "year", "type": "numeric", "nullable": True, "source": ["name", "released"],
             "derive": "year_from_title"},
            {"name": "categories", "type": "multi_hot", "source": [f"is_{c}" for c in cats],
             "derive": "flags_to_multi_hot", "labels": cats},
            {"name": "tags", "type": "multi_hot"},
            {"name": "price", "type": "numeric"}]})
    return users, items, schema


def test_tables_derive_features_and_save_the_fill() -> None:
    ds = generate(n_users=40, n_items=30, n_interactions=300, seed=1)
    users, items, schema = raw_tables(ds)
    out = load_tables(ds.interactions, users, items, schema)
    assert list(out.users.columns) == ["user_id", "age", "postcode", "age_band", "region",
                                       "activity", "interests"]
    assert (out.users["region"] == ds.users["region"].str[-2:]).all()
    assert out.users["age"].dtype == np.float32 and out.users["age_band"].iloc[0] in (
        "Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
    assert (out.items["title"] == ds.items["title"]).all()
    assert (out.items["categories"] == ds.items["category"]).all()
    year = out.schema.feature("item", "year")
    found = [float(m.group(1)) for m in (re.search(r"\((\d{4})\)$", n) for n in items["name"])
             if m] + [float(d[-4:]) for d in items["released"] if d]
    assert year.fill == float(np.median(found))  # saved with the schema: a served constant
    missing = ~items["name"].str.contains(r"\(\d{4}\)$") & (items["released"] == "")
    assert missing.any() and (out.items.loc[missing.to_numpy(), "year"] == year.fill).all()
    # Loading again with the saved schema keeps that fill, whatever the rows.
    again = load_tables(ds.interactions, users, items.iloc[::-1], out.schema)
    assert again.schema == out.schema

    with pytest.raises(DataError, match=r"'postcode'.*source column of \['region'\]"):
        load_tables(ds.interactions, users.drop(columns="postcode"), items, schema)
    bad = users.assign(age=users["age"].astype(object))
    bad.loc[3, "age"] = "old"
    with pytest.raises(DataError, match=r"'age', row 3.*age_band"):
        load_tables(ds.interactions, bad, items, schema)


def test_source_inputs_derive_in_the_graph() -> None:
    _, _, schema = raw_tables(generate(n_users=20, n_items=20, n_interactions=100, seed=0))
    features = {"user_id": tf.TensorSpec([None], tf.string, name="user_id"),
                "age_band": tf.TensorSpec([None], tf.string, name="age_band"),
                "region": tf.TensorSpec([None], tf.string, name="region"),
                "activity": tf.TensorSpec([None], tf.float32, name="activity")}
    src = SourceInputs(schema.user_features, features)
    assert {k: s.dtype for k, s in src.specs.items()} == {
        "user_id": tf.string, "age": tf.float32, "postcode": tf.string, "activity": tf.float32}
    fn = tf.function(lambda **x: src(x)).get_concrete_function(**src.specs)
    out = fn(user_id=tf.constant(["u1"]), age=tf.constant([33.0]),
             postcode=tf.constant(["07123"]), activity=tf.constant([1.0]))
    assert out["age_band"].numpy().tolist() == [b"25-34"]
    assert out["region"].numpy().tolist() == [b"07"]
    assert not SourceInputs((), features).derives  # no schema: the features are the inputs


# ------------------------------------------------------------------------- MovieLens


def _reference_ml100k(d: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The derived MovieLens-100K columns as the loader made them in pandas before issue 14
    (the reference the TensorFlow derivations must reproduce)."""
    bands = ((1, "Under 18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"),
             (50, "50-55"), (56, "56+"))
    def lines(name: str) -> list[str]:
        return [x for x in (d / name).read_text(encoding="latin-1").splitlines() if x]

    user = [line.split("|") for line in lines("u.user")]
    users = pd.DataFrame({
        "age": [[lab for low, lab in bands if float(r[1]) >= low][-1] for r in user],
        "zip_prefix": [r[4].strip()[:2] for r in user]})
    genres = [line.split("|")[0] for line in lines("u.genre")]
    titles, years, tags = [], [], []
    for line in lines("u.item"):
        r = line.split("|")
        r = [r[0], "|".join(r[1:len(r) - 22])] + r[len(r) - 22:]
        t = r[1].strip()
        m = re.search(r"\s*\((\d{4})\)\s*$", t)
        titles.append((t[:m.start()].strip() or t) if m else t)
        y = float(m.group(1)) if m else np.nan
        if np.isnan(y) and re.search(r"\d{4}$", r[2].strip()):
            y = float(r[2].strip()[-4:])
        years.append(y)
        tags.append("|".join(g for g, f in zip(genres, r[5:], strict=True) if f == "1"))
    y = np.array(years)
    year = np.where(np.isnan(y), np.median(y[~np.isnan(y)]), y).astype(np.float32)
    return users, pd.DataFrame({"title": titles, "genres": tags, "year": year})


LEGACY_ML_SCHEMA = {  # what MovieLens runs saved before issue 14
    "user_features": [{"name": n, "type": "categorical"} for n in
                      ("age", "gender", "occupation", "zip_prefix")],
    "item_features": [{"name": "title", "type": "text"}, {"name": "genres", "type": "multi_hot"},
                      {"name": "year", "type": "numeric", "nullable": True}]}


def test_movielens_derivations_reproduce_the_pandas_loader(ml100k_dir: Path) -> None:
    ds = load_movielens(ml100k_dir)
    users, items = _reference_ml100k(ml100k_dir)
    assert ds.users["age_bucket"].tolist() == users["age"].tolist()
    assert ds.users["zip_prefix"].tolist() == users["zip_prefix"].tolist()
    for col in ("title", "genres"):
        assert ds.items[col].tolist() == items[col].tolist()
    np.testing.assert_array_equal(ds.items["year"].to_numpy(), items["year"].to_numpy())
    assert ds.schema.feature("item", "year").fill == float(np.median(items["year"]))
    # A run saved before the derivations reads the same columns under its own names.
    legacy = Schema.from_dict(LEGACY_ML_SCHEMA)
    old = conform(ds, legacy)
    assert old.schema == legacy and list(old.users.columns) == [
        "user_id", "age", "gender", "occupation", "zip_prefix"]
    assert old.users["age"].tolist() == users["age"].tolist()


# ------------------------------------------------------------------------- trained models


def _train_teacher(root: Path, fmt: list[str]) -> Path:
    """A tiny teacher trained by the library's own functions into ``root/run``."""
    from tfrs_coldstart.config import load_config
    from tfrs_coldstart.evaluation import prepare
    from tfrs_coldstart.runs import RunDir, load_data
    from tfrs_coldstart.training import fit_teacher

    run = root / "run"
    cfg = load_config(overrides=[*fmt, f"output_dir={run}", *TINY_MODEL_OVERRIDES,
                                 "teacher.epochs=1"])
    prep = prepare(load_data(cfg), cfg)
    rd = RunDir(run)
    rd.write_metadata(cfg, prep)
    fit_teacher(prep, cfg.teacher, rd, cfg.seed, verbose=0)
    return run


def _as_source(ds: Any) -> tuple[pd.DataFrame, pd.DataFrame, Schema]:
    """The tiny run's tables as a source gives them: age-band codes, post codes whose first 8
    characters are the region, categories as codes, titles with a year; and the schema that
    derives exactly the features the run was trained on."""
    rng = np.random.default_rng(0)
    bands = sorted(set(ds.users["age_bucket"]))
    cats = sorted(set(ds.items["category"]))
    users = ds.users.assign(
        age_code=[bands.index(b) for b in ds.users["age_bucket"]],
        postcode=[f"{r}-{rng.integers(100, 999)}" for r in ds.users["region"]],
    ).drop(columns=["age_bucket", "region"])
    items = ds.items.assign(
        name=[f"{t} ({rng.integers(1950, 2020)})" if n % 3 else t
              for n, t in enumerate(ds.items["title"])],
        category_code=[float(cats.index(c)) for c in ds.items["category"]],
    ).drop(columns=["title", "category"])
    derived = {
        "age_bucket": {"source": "age_code", "derive": "code_label", "labels": bands},
        "region": {"source": "postcode", "derive": "prefix:8"},
        "title": {"source": "name", "derive": "strip_year"},
        "category": {"source": "category_code", "derive": "code_label", "labels": cats}}
    schema = ds.schema.to_dict()
    for side in schema.values():
        for spec in side:
            spec.update(derived.get(spec["name"], {}))
    return users, items, Schema.from_dict(schema)


@pytest.fixture(scope="module")
def raw_export(tiny_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The session's tiny run (no retraining), its users and items files rewritten with
    source columns and its schema deriving its features from them; exported with a
    brute-force index (``recommend_bf``)."""
    from conftest import copy_run

    from tfrs_coldstart.serving.export import export_run

    root = tmp_path_factory.mktemp("raw_run")
    run = copy_run(tiny_run["run"], root / "run")
    users, items, schema = _as_source(tiny_run["ds"])
    data = root / "data"
    data.mkdir()
    tiny_run["ds"].interactions.to_parquet(data / "interactions.parquet")
    users.to_parquet(data / "users.parquet")
    items.to_parquet(data / "items.parquet")
    schema.to_yaml(data / "schema.yaml")
    schema.to_yaml(run / "schema.yaml")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["data_dir"], cfg["data"]["schema"] = str(data), None
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    models = export_run(run, root / "export", models=("recommend",), index="brute-force",
                        k=10, item_encoder=False, log=lambda m: None)
    return {"root": root, "run": run, "users": users, "items": items, "schema": schema,
            "ds": tiny_run["ds"], "models": {m.name: m for m in models}}


def test_exported_models_take_source_columns(raw_export: dict[str, Any]) -> None:
    from tfrs_coldstart.runs import RunDir

    models = raw_export["models"]
    reco = models["recommend_bf"].module
    assert set(reco.specs) == {"user_id", "age_code", "postcode", "activity", "interests",
                               "history"}
    assert set(reco.feature_specs) == {"user_id", "age_bucket", "region", "activity",
                                       "interests", "history"}
    sigs = models["recommend_bf"].manifest["signatures"]
    assert set(sigs) == {"serving_default", "embed_user", "serving_derived",
                         "embed_user_derived"}
    assert sigs["serving_default"]["inputs"]["age_code"]["dtype"] == "float32"
    assert models["recommend_bf"].manifest["schema"] == raw_export["schema"].to_dict()
    # In process, the module's top-k from source columns equals the derived features' one.
    ds = raw_export["ds"]
    rows = raw_export["users"].iloc[:8]
    raw = {k: rows[k].to_numpy() for k in reco.specs if k != "history"}
    feats = {k: ds.users[k].iloc[:8].to_numpy() for k in reco.feature_specs if k != "history"}
    raw["history"] = feats["history"] = np.array([""] * 8, dtype=object)
    a, b = reco(raw), reco.call_derived(feats)
    assert (a["item_ids"].numpy() == b["item_ids"].numpy()).all()
    # Old runs (no derivations in their schema) keep serving their features: see
    # test_export.py, whose tiny run is this one before its tables were rewritten.
    assert RunDir(raw_export["run"]).schema.derives


def test_tf_serving_loader_serves_source_columns(raw_export: dict[str, Any],
                                                tmp_path: Path) -> None:
    """As TF Serving loads it: TensorFlow's graph-mode loader in a clean interpreter without
    this project (test_export's loader). Its ops are TensorFlow's own, every warm-up request
    (both signature kinds) runs, and source columns give the derived features' top-k."""
    import json
    import os
    import site
    import subprocess
    import sys

    from test_export import CLEAN_LOADER

    m = raw_export["models"]["recommend_bf"]
    src, ds = raw_export["users"].iloc[:4], raw_export["ds"].users.iloc[:4]

    def cells(table: pd.DataFrame, specs: dict[str, Any]) -> dict[str, list]:
        return {k: ([""] * 4 if k == "history" else
                    [x if isinstance(x, str) else float(x) for x in table[k]]) for k in specs}

    spec = {"site_packages": [p for p in site.getsitepackages()
                              if Path(p).name in ("site-packages", "dist-packages")],
            "import_scann": False, "out": str(tmp_path / "out.json"),
            "models": [{"name": m.name, "kind": m.kind, "path": str(m.path), "requests": {
                "raw": ("serving_default", cells(src, m.module.specs)),
                "derived": ("serving_derived", cells(ds, m.module.feature_specs))}}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", CLEAN_LOADER,
                           str(tmp_path / "spec.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert not out["project_importable"]
    got = out["models"][0]
    assert got["not_tensorflow_ops"] == []
    assert {"Substr", "AsString"} <= set(got["ops"])  # prefix:8, code_label: in the graph
    assert {w["signature"] for w in got["warmup"]} == {
        "serving_default", "embed_user", "serving_derived", "embed_user_derived"}
    res = got["results"]
    assert res["raw"]["item_ids"] == res["derived"]["item_ids"]
    assert res["raw"]["item_ids"] == m.module.call_derived(
        {k: ds[k].to_numpy() if k != "history" else np.array([""] * 4, dtype=object)
         for k in m.module.feature_specs})["item_ids"].numpy().astype(str).tolist()


def test_item_encoder_takes_source_columns(raw_export: dict[str, Any]) -> None:
    from tfrs_coldstart.runs import RunDir
    from tfrs_coldstart.serving.export import ItemEncoderModule

    tower = RunDir(raw_export["run"]).load_model("student").item_tower
    enc = ItemEncoderModule(tower, raw_export["schema"].item_features)
    assert {"name", "category_code", "price", "embedding"} <= set(enc.specs)
    assert "title" not in enc.specs and "title" in enc.feature_specs
    assert set(enc.signatures()) == {"serving_default", "serving_derived"}
    raw, ds = raw_export["items"].iloc[:5], raw_export["ds"].items.iloc[:5]
    a = enc({k: np.stack(raw[k].to_numpy()) for k in enc.specs})["embedding"]
    b = enc.signatures()["serving_derived"](**{
        k: tf.constant(np.stack(ds[k].to_numpy()), s.dtype)
        for k, s in enc.feature_specs.items()})["embedding"]
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_rest_request_with_raw_columns_gives_the_derived_top_k(
        raw_export: dict[str, Any]) -> None:
    """Over real sockets (the project's TF-Serving-compatible server): a request with the
    source's columns and one with the derived features get the same top-k."""
    from tfrs_coldstart.serving.client import GrpcClient, RestClient
    from tfrs_coldstart.serving.devserver import Server

    ds = raw_export["ds"]
    src = raw_export["users"].iloc[:6]
    raw = [{"user_id": r.user_id, "age_code": int(r.age_code), "postcode": r.postcode,
            "activity": float(r.activity), "interests": r.interests}
           for r in src.itertuples()]
    raw[0]["user_id"] = "someone new"  # the student's path too
    derived = [{"user_id": u["user_id"], "age_bucket": r.age_bucket, "region": r.region,
                "activity": u["activity"], "interests": u["interests"]}
               for u, r in zip(raw, ds.users.iloc[:6].itertuples(), strict=True)]
    with Server(raw_export["root"] / "export", None, rest_port=0, grpc_port=0,
                poll_seconds=0) as server:
        with RestClient(server.rest_url, "recommend_bf") as rest:
            by_raw = rest.recommend(raw)
            by_derived = rest.recommend(derived, signature="serving_derived")
            with GrpcClient(server.grpc_address, "recommend_bf") as grpc:
                assert grpc.recommend(raw) == by_raw
        assert [r.item_ids for r in by_raw] == [r.item_ids for r in by_derived]
        assert all(len(r.item_ids) == 10 and r.item_ids[0] for r in by_raw)
        np.testing.assert_allclose([r.scores for r in by_raw], [r.scores for r in by_derived],
                                   rtol=1e-6)


def test_batch_over_a_raw_users_file(raw_export: dict[str, Any], tmp_path: Path) -> None:
    from tfrs_coldstart.batch import batch_recommend
    from tfrs_coldstart.batch.model import BatchError, ServedModel

    model = raw_export["root"] / "export" / "recommend_bf"
    users = raw_export["users"].iloc[:40]
    users.to_csv(tmp_path / "raw.csv", index=False)
    batch_recommend(model, tmp_path / "raw.csv", tmp_path / "a.parquet", progress=False)
    recs = pd.read_parquet(tmp_path / "a.parquet")
    derived = raw_export["ds"].users.iloc[:40]
    want = raw_export["models"]["recommend_bf"].module.call_derived(
        {**{k: derived[k].to_numpy() for k in ("user_id", "age_bucket", "region", "activity",
                                                 "interests")},
         "history": np.array([""] * 40, dtype=object)})["item_ids"].numpy().astype(str)
    assert recs.groupby("user_id", sort=False)["item_id"].apply(list).tolist() == [
        list(row) for row in want]
    # A table of the derived features: the error says which signature takes it.
    with pytest.raises(BatchError, match="--signature serving_derived"):
        ServedModel.load(model).check_columns(derived.columns, "derived.parquet")


def test_batch_over_ml100k_u_user_as_it_is(ml100k_dir: Path, tmp_path: Path) -> None:
    """`batch` over ML-100K's own ``u.user`` (read as a DataFrame with its columns) with a
    teacher trained on the MovieLens folder (a 3,000-rating slice of it, to stay quick)."""
    from tfrs_coldstart.batch import batch_recommend
    from tfrs_coldstart.serving.export import export_run

    data = tmp_path / "ml-100k"
    data.mkdir()
    for f in ("u.user", "u.item", "u.genre"):
        (data / f).write_bytes((ml100k_dir / f).read_bytes())
    with open(ml100k_dir / "u.data") as src:
        (data / "u.data").write_text("".join(next(src) for _ in range(3000)))
    run = _train_teacher(tmp_path, ["data.format=movielens", f"data.data_dir={data}"])
    export_run(run, tmp_path / "export", models=("teacher",), index="brute-force", k=10,
               item_encoder=False, log=lambda m: None)
    users = pd.read_csv(ml100k_dir / "u.user", sep="|", names=list(USER_COLUMNS),
                        encoding="latin-1")
    assert users["age"].dtype == np.int64  # as pandas reads it, nothing converted by hand
    users.to_parquet(tmp_path / "u_user.parquet")
    model = tmp_path / "export" / "teacher_bf"
    batch_recommend(model, tmp_path / "u_user.parquet", tmp_path / "recs.parquet",
                    progress=False)
    recs = pd.read_parquet(tmp_path / "recs.parquet")
    assert len(recs) == 943 * 10 and recs["user_id"].nunique() == 943
    derived = load_movielens(data).users.drop(columns=["age", "zip_code"])
    derived.to_parquet(tmp_path / "derived.parquet")
    batch_recommend(model, tmp_path / "derived.parquet", tmp_path / "ref.parquet",
                    signature="serving_derived", progress=False)
    pd.testing.assert_frame_equal(recs, pd.read_parquet(tmp_path / "ref.parquet"))
    assert len(ml100k_item_columns()) == 24  # u.item's fields: what the item encoder takes
