"""Typed feature columns: state round trip, encode shape, served input spec, warm-up dummy."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.data.pipeline import feature_arrays
from tfrs_coldstart.data.schema import FeatureSpec, FeatureType
from tfrs_coldstart.errors import RunError
from tfrs_coldstart.features import (
    COLUMN_TYPES,
    ID_FEATURE,
    DenseVectorColumn,
    FeatureColumn,
    FeatureEncoder,
    IdColumn,
    NumericColumn,
    build_columns,
    build_state,
    column_from_dict,
    columns_from_state,
    dummy_inputs,
    spec_for_input,
)
from tfrs_coldstart.serving.export import input_specs

CFG = TowerConfig(id_dim=6, feature_dim=4, hidden=(8,), output_dim=5, numeric_buckets=3)
SPECS = {
    "genre": FeatureSpec("genre", FeatureType.CATEGORICAL),
    "price": FeatureSpec("price", FeatureType.NUMERIC),
    "title": FeatureSpec("title", FeatureType.TEXT),
    "tags": FeatureSpec("tags", FeatureType.MULTI_HOT, separator=";"),
    "emb": FeatureSpec("emb", FeatureType.DENSE_VECTOR, dim=3),
}
#: Width of each type's block of the encoder output under CFG.
WIDTH = {"id": CFG.id_dim, "categorical": CFG.feature_dim, "numeric": CFG.feature_dim + 1,
         "text": CFG.feature_dim, "multi_hot": CFG.feature_dim, "dense_vector": CFG.feature_dim}
#: Served input, per type: (dtype, shape).
SERVED = {"id": (tf.string, [None]), "categorical": (tf.string, [None]),
          "numeric": (tf.float32, [None]), "text": (tf.string, [None]),
          "multi_hot": (tf.string, [None]), "dense_vector": (tf.float32, [None, 3])}
KINDS = ["id", *(s.type.value for s in SPECS.values())]


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    """Training entities, normalised as the data loaders leave them."""
    rng = np.random.default_rng(0)
    n = 12
    return pd.DataFrame({
        "item_id": [f"i{k}" for k in range(n)],
        "genre": rng.choice(["drama", "comedy", "horror"], n).astype(object),
        "price": rng.normal(10, 3, n).astype(np.float32),
        "title": [f"the {w} story" for w in rng.choice(["red", "blue", "long"], n)],
        "tags": [";".join(rng.choice(["a", "b", "c", "d"], 2, replace=False)) for _ in range(n)],
        "emb": [rng.normal(size=3).astype(np.float32) for _ in range(n)],
    })


@pytest.fixture(scope="module")
def columns(table: pd.DataFrame) -> dict[str, FeatureColumn]:
    """One column of each type, by kind."""
    cols = build_columns(tuple(SPECS.values()), table, "item_id", True, CFG)
    return {c.kind: c for c in cols}


def _inputs(table: pd.DataFrame) -> dict[str, tf.Tensor]:
    arrays = feature_arrays(table, tuple(SPECS.values()), "item_id")
    return {k: tf.constant(v) for k, v in arrays.items()}


def test_every_feature_type_has_a_column_class():
    assert set(COLUMN_TYPES) == {"id", "ids_of", *(t.value for t in FeatureType)}
    for kind, cls in COLUMN_TYPES.items():
        assert cls.kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trips_through_json(columns, kind):
    col = columns[kind]
    saved = json.loads(json.dumps({col.name: col.to_dict()}))
    assert saved[col.name]["type"] == kind
    back = column_from_dict(col.name, saved[col.name])
    assert type(back) is type(col) and back == col
    assert back.to_dict() == col.to_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_encode_shape(columns, table, kind):
    col = columns[kind]
    enc = FeatureEncoder({col.name: col.to_dict()}, CFG)
    out = enc(_inputs(table))
    assert out.shape == (len(table), WIDTH[kind]) and out.dtype == tf.float32
    assert np.isfinite(out.numpy()).all()


@pytest.mark.parametrize("kind", KINDS)
def test_input_spec_and_served_array(columns, table, kind):
    col = columns[kind]
    spec = col.input_spec()
    dtype, shape = SERVED[kind]
    assert (spec.dtype, spec.shape.as_list(), spec.name) == (dtype, shape, col.input_key)
    assert col.served
    # The array a served model takes for a pandas column agrees with the data layer's
    # feature_arrays (the tf.data pipelines' own switch) and with the spec.
    arr = col.to_array(table[col.input_key])
    expected = feature_arrays(table, tuple(SPECS.values()), "item_id")[col.input_key]
    assert arr.dtype == expected.dtype and arr.shape == expected.shape
    np.testing.assert_array_equal(arr, expected)
    assert spec.is_compatible_with(tf.constant(arr))
    empty = col.to_array(table[col.input_key].iloc[:0])
    assert spec.is_compatible_with(tf.constant(empty)) and len(empty) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_dummy_value_is_accepted_by_the_encoder(columns, kind):
    col = columns[kind]
    state = {col.name: col.to_dict()}
    dummy = dummy_inputs(state)
    assert list(dummy) == [col.input_key]
    assert col.input_spec().is_compatible_with(dummy[col.input_key])
    out = FeatureEncoder(state, CFG)(dummy)
    assert out.shape == (1, WIDTH[kind])


@pytest.mark.parametrize("kind", ["categorical", "numeric", "dense_vector"])
def test_spec_for_input_inverts_the_served_spec(columns, kind):
    col = columns[kind]
    spec = spec_for_input(col.name, col.input_spec())
    assert spec.type.value == kind and spec.name == col.name
    if kind == "dense_vector":
        assert spec.dim == 3


def test_build_state_is_the_columns_json(columns, table):
    state = build_state(tuple(SPECS.values()), table, "item_id", True, CFG)
    assert list(state) == [ID_FEATURE, *SPECS]
    assert state == {c.name: c.to_dict() for c in columns.values()}
    assert list(columns_from_state(state).values()) == list(columns.values())
    no_ids = build_state(tuple(SPECS.values()), table, "item_id", False, CFG)
    assert ID_FEATURE not in no_ids


def test_old_preprocessing_json_still_loads():
    """The state format written by runs before the column classes (teacher ID without a
    width; a student ID sink from before its dropout setting)."""
    old = json.loads("""{
      "user": {"__id__": {"type": "id", "column": "user_id", "vocabulary": ["u1", "u2"]},
               "age": {"type": "categorical", "vocabulary": ["18-24", "25-34"]},
               "year": {"type": "numeric", "mean": 1990.5, "variance": 4.0,
                        "boundaries": [1989.0, 1992.0]}},
      "item": {"title": {"type": "text", "vocabulary": ["star", "wars"]},
               "genres": {"type": "multi_hot", "vocabulary": ["Drama"], "separator": "|"},
               "vec": {"type": "dense_vector", "dim": 2},
               "__id__": {"type": "id", "column": "item_id", "vocabulary": ["i1"],
                          "train_only": true, "dim": 3}}}""")
    user = columns_from_state(old["user"])
    assert user[ID_FEATURE] == IdColumn(ID_FEATURE, column="user_id", vocabulary=["u1", "u2"])
    assert user["year"] == NumericColumn("year", 1990.5, 4.0, [1989.0, 1992.0])
    item = columns_from_state(old["item"])
    sink = item[ID_FEATURE]
    assert isinstance(sink, IdColumn) and sink.train_only and sink.dim == 3
    assert sink.dropout == 0.0 and not sink.served
    assert item["vec"] == DenseVectorColumn("vec", 2)
    for side in ("user", "item"):
        enc = FeatureEncoder(old[side], CFG)
        assert enc.state is old[side]
        out = enc(dummy_inputs(old[side]))
        assert out.shape[0] == 1
    assert FeatureEncoder(old["user"], CFG).uses_ids
    assert not FeatureEncoder(old["item"], CFG).uses_ids


def test_unknown_or_mismatched_type_is_a_run_error():
    with pytest.raises(RunError, match="unknown type 'audio'"):
        column_from_dict("clip", {"type": "audio"})
    with pytest.raises(RunError, match="not 'numeric'"):
        NumericColumn.from_dict("x", {"type": "categorical", "vocabulary": []})


def test_id_sink_is_a_typed_training_only_column(columns, table):
    """The sink is an IdColumn with train_only: not served, not an input of the served model,
    zeros at inference, read in training, and dropped from an exported encoder."""
    content = [c for c in columns.values() if not isinstance(c, IdColumn)]
    sink = columns["id"].as_sink(dim=2, dropout=0.0)
    assert not sink.served and sink.to_dict()["train_only"] is True
    assert column_from_dict(sink.name, json.loads(json.dumps(sink.to_dict()))) == sink
    state = {c.name: c.to_dict() for c in [*content, sink]}
    enc = FeatureEncoder(state, CFG)
    assert enc.feature_names == [c.name for c in content] and not enc.uses_ids
    assert "item_id" not in dummy_inputs(state)
    x = _inputs(table)
    served = enc(x).numpy()
    np.testing.assert_array_equal(served[:, -2:], 0.0)  # the sink's block, at inference
    assert np.abs(enc(x, training=True).numpy()[:, -2:]).max() > 0
    assert sum(int(np.prod(w.shape)) for w in enc.train_only_weights) == (len(table) + 1) * 2
    enc.drop_train_only()
    assert enc.train_only_weights == []
    no_id = {k: v for k, v in x.items() if k != "item_id"}
    np.testing.assert_array_equal(enc(no_id).numpy(), served)

    class _Tower:  # input_specs reads only the tower's encoder
        encoder = enc

    specs = input_specs(_Tower())  # type: ignore[arg-type]
    assert list(specs) == [c.input_key for c in content]
    assert all(specs[c.input_key] == c.input_spec() for c in content)


def test_teacher_id_width_defaults_to_the_config(columns):
    col = columns["id"]
    assert col.dim is None and "dim" not in col.to_dict()
    wide = dataclasses.replace(col, dim=9)
    assert FeatureEncoder({col.name: wide.to_dict()}, CFG)(
        {"item_id": tf.constant(["i0"])}).shape == (1, 9)


def test_long_text_cells_are_cut_before_tf_data_and_embed_as_served():
    """A text cell enters tf.data (training batches, Python embeddings) cut to TEXT_MAX_CHARS
    characters: a 10 MB title was copied into every batch row that gathered it (7.5 GB peak
    for a 1-epoch `train` of the default data, 0.86 GB after). The tower reads only the first
    TEXT_LEN tokens, so the cut cell embeds as the served graph embeds the whole one."""
    from tfrs_coldstart.data.pipeline import TEXT_MAX_CHARS, feature_gather
    from tfrs_coldstart.features.encoder import build_state
    from tfrs_coldstart.modeling.towers import Tower

    long = "red shoe " * 300_000 + "unseenword"  # 2.7 MB; its last word lies past the cut
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "title": [long, "blue shoe", ""]})
    specs = (FeatureSpec("title", FeatureType.TEXT),)
    arrays = feature_arrays(items, specs, "item_id")
    assert [len(t) for t in arrays["title"]] == [TEXT_MAX_CHARS, 9, 0]
    gather = feature_gather(items.iloc[:0].assign(user_id=[]).iloc[:, -1:], items, (), specs,
                            np.ones(3))
    batch = gather(tf.constant([], tf.int64), tf.constant([0, 0, 1], tf.int64))
    assert max(len(t) for t in batch["item"]["title"].numpy()) == TEXT_MAX_CHARS
    cfg = TowerConfig(id_dim=0, feature_dim=8, hidden=(), output_dim=4)
    state = build_state(specs, items, "item_id", False, cfg)
    vocab = [str(t) for t in state["title"]["vocabulary"]]
    assert "unseenword" not in vocab and {"red", "shoe", "blue"} <= set(vocab)
    tower = Tower(state, cfg)
    whole = tower({"title": tf.constant(items["title"].to_numpy(dtype=object))}).numpy()
    cut = tower({"title": tf.constant(arrays["title"])}).numpy()
    np.testing.assert_allclose(cut, whole, atol=1e-6)
