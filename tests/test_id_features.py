"""ID-valued content features (issue 13, item 3): ``ids_of`` in the schema, the student's
column that embeds them through the teacher's trained ID table, and a known-answer test on
synthetic data with a social graph (a user's taste follows their friends')."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfrs_coldstart.config import ConfigError, load_config
from tfrs_coldstart.data import generate
from tfrs_coldstart.data.schema import DataError, FeatureSpec, FeatureType, Schema
from tfrs_coldstart.evaluation import prepare
from tfrs_coldstart.features.columns import IdsOfColumn, MultiHotColumn, column_from_dict
from tfrs_coldstart.features.encoder import dummy_inputs
from tfrs_coldstart.modeling.models import (
    build_student,
    build_teacher,
    student_sides,
    student_states,
    teacher_states,
)
from tfrs_coldstart.runs import RunDir
from tfrs_coldstart.scoring import evaluate_model
from tfrs_coldstart.training import fit_student, fit_teacher

# ---- schema -------------------------------------------------------------------------------


def test_ids_of_round_trips_through_yaml(tmp_path):
    schema = Schema(
        user_features=(FeatureSpec("friends", FeatureType.MULTI_HOT, ids_of="user"),),
        item_features=(FeatureSpec("series", FeatureType.CATEGORICAL, ids_of="item"),
                       FeatureSpec("genre", FeatureType.CATEGORICAL)),
    )
    schema.to_yaml(tmp_path / "s.yaml")
    text = (tmp_path / "s.yaml").read_text()
    assert "ids_of: user" in text and "ids_of: item" in text
    back = Schema.from_yaml(tmp_path / "s.yaml")
    assert back == schema
    assert back.feature("item", "genre").ids_of is None
    assert "ids_of" not in back.feature("item", "genre").to_dict()


@pytest.mark.parametrize("entry, words", [
    ({"name": "n", "type": "numeric", "ids_of": "user"}, ["'n'", "categorical and multi_hot"]),
    ({"name": "t", "type": "text", "ids_of": "item"}, ["'t'", "categorical and multi_hot"]),
    ({"name": "f", "type": "multi_hot", "ids_of": "friend"}, ["'f'", "'user' or 'item'"]),
    ({"name": "f", "type": "multi_hot", "ids_of": True}, ["'f'", "'user' or 'item'"]),
])
def test_ids_of_errors_name_the_feature(entry, words):
    with pytest.raises(DataError) as err:
        Schema.from_dict({"user_features": [entry]}, source="s.yaml")
    msg = str(err.value)
    assert msg.startswith("s.yaml: user_features[0]")
    for w in words:
        assert w in msg


# ---- the column -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def social():
    """A small social dataset and an (untrained) teacher built for it."""
    ds = generate(n_users=120, n_items=80, n_interactions=1200, seed=3,
                  with_user_features=False, n_friends=4)
    cfg = load_config(None, [])
    teacher = build_teacher(teacher_states(ds.schema, ds.users, ds.items, cfg.teacher.tower),
                            cfg.teacher)
    for side in ("user", "item"):
        tower = teacher.tower(side)
        tower(dummy_inputs(tower.encoder.state))
    return ds, teacher


def _student(ds, teacher, mode):
    cfg = load_config(None, [f"student.tower.id_features={mode}", "student.method=own"])
    states = student_states(ds.schema, ds.users, ds.items, cfg.student.tower,
                            student_sides(ds.schema))
    student = build_student(states, cfg.student, teacher)
    for side in ("user", "item"):
        student.tower(side)(dummy_inputs(states[side]))
    return student, states


def _teacher_rows(teacher, ids):
    layers = teacher.user_tower.encoder.id_layers()
    return layers["emb"](layers["lookup"](tf.constant(ids))).numpy()


def test_the_teacher_learns_ids_of_features_per_value(social):
    ds, teacher = social
    assert teacher.user_tower.encoder.state["friends"]["type"] == "multi_hot"


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_column_embeds_through_the_teachers_id_table(social, mode):
    ds, teacher = social
    student, states = _student(ds, teacher, mode)
    col = column_from_dict("friends", states["user"]["friends"])
    assert isinstance(col, IdsOfColumn) and (col.ids_of, col.multi, col.mode) == (
        "user", True, mode)
    enc = student.user_tower.encoder
    out = enc({"friends": tf.constant(["u001", "u001|u002", "", "nobody", "u001|nobody"])})
    rows = _teacher_rows(teacher, ["u001", "u002", "nobody"])  # "nobody": the OOV row
    assert out.shape == (5, teacher.user_tower.cfg.id_dim)
    np.testing.assert_allclose(out[0], rows[0], atol=1e-6)  # one id: the teacher's row
    np.testing.assert_allclose(out[1], rows[:2].mean(0), atol=1e-6)  # a list: the mean
    np.testing.assert_array_equal(out[2], 0.0)  # no friends: zeros
    np.testing.assert_allclose(out[3], rows[2], atol=1e-6)  # unknown id: the OOV row
    np.testing.assert_allclose(out[4], rows[[0, 2]].mean(0), atol=1e-6)
    shared = enc._parts["friends"]["emb"] is teacher.user_tower.encoder.id_layers()["emb"]
    assert shared == (mode == "frozen")


def test_categorical_ids_of_item():
    col = IdsOfColumn("series", ids_of="item", multi=False, mode="frozen")
    lookup = tf.keras.layers.StringLookup(vocabulary=["i1", "i2"], num_oov_indices=1)
    emb = tf.keras.layers.Embedding(3, 4)
    layers = col.build_layers(load_config(None, []).student.tower,
                              {"item": {"lookup": lookup, "emb": emb}})
    out = col.encode(layers, {"series": tf.constant(["i2", ""])}, training=False).numpy()
    np.testing.assert_allclose(out[0], emb.embeddings.numpy()[2])
    np.testing.assert_array_equal(out[1], 0.0)
    assert column_from_dict("series", col.to_dict()) == col


def test_shared_column_without_a_teacher_is_a_clear_error(social):
    ds, _ = social
    with pytest.raises(ConfigError, match="friends.*id_features=learned"):
        _student(ds, None, "frozen")


def test_learned_mode_is_an_ordinary_feature(social):
    ds, teacher = social
    _, states = _student(ds, teacher, "learned")
    assert isinstance(column_from_dict("friends", states["user"]["friends"]), MultiHotColumn)


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_frozen_stays_and_finetune_moves_after_a_training_step(social, mode):
    ds, teacher = social
    student, _ = _student(ds, teacher, mode)
    before = student.user_tower.encoder._parts["friends"]["emb"].embeddings.numpy().copy()
    teacher_before = _teacher_rows(teacher, ["u001"]).copy()
    batch = {"user": {"user_id": tf.constant(["u001", "u002"]),
                      "friends": tf.constant(["u003|u004", "u005"])},
             "item": {k: tf.constant(ds.items[k].to_numpy()[:2].tolist())
                      for k in ("item_id", "category", "tags", "title")}
             | {"price": tf.constant(ds.items["price"].to_numpy()[:2])},
             "item_prob": tf.constant([0.1, 0.1])}
    student.compile(optimizer=tf.keras.optimizers.Adam(0.1))
    student.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    after = student.user_tower.encoder._parts["friends"]["emb"].embeddings.numpy()
    changed = np.abs(after - before).max() > 1e-4
    assert changed == (mode == "finetune")
    np.testing.assert_array_equal(_teacher_rows(teacher, ["u001"]), teacher_before)


# ---- saved runs and the known answer -----------------------------------------------------

_BASE = ["teacher.epochs=5", "teacher.batch_size=1024", "teacher.patience=2",
         "student.epochs=5", "student.batch_size=1024", "student.patience=2",
         "student.refit=false", "student.method=own"]


@pytest.mark.slow
def test_transferred_table_beats_learned_ids_on_cold_users(tmp_path):
    """Users' only content is who their friends are; the student that embeds them through
    the teacher's trained user-ID table does at least as well as the same student learning
    one embedding per friend from scratch, on cold users. A frozen student reloads from its
    run folder with the same outputs, and its checkpoint holds the shared table once.

    Measured 2026-11-30 on this exact data and config (2 shared cores), cold-user
    recall@20: frozen 0.361, learned 0.346 (finetune 0.357, popularity 0.322); after each
    epoch's shuffle became seeded by (seed, epoch) (issue 15), frozen 0.340, learned 0.349.
    The advantage is within run-to-run noise at this size, so the floor only guards against
    the transfer being clearly worse (a broken table or lookup loses far more than 0.02).
    """
    ds = generate(n_users=600, n_items=300, n_interactions=18_000, seed=5,
                  with_user_features=False, n_friends=3)
    cfg = load_config(None, _BASE)
    prep = prepare(ds, cfg)
    run = RunDir(tmp_path)
    teacher = fit_teacher(prep, cfg.teacher, run, verbose=0)
    recall, students = {}, {}
    for mode in ("frozen", "learned"):
        c = load_config(None, [*_BASE, f"student.tower.id_features={mode}"])
        students[mode] = fit_student(prep, teacher, c.student, run, verbose=0, name=f"s_{mode}")
        got = evaluate_model(prep, students[mode], run.scorer(f"s_{mode}"), (20,),
                             ("user", "item"))
        recall[mode] = got["cold_user"]["recall@20"]
    print(recall)
    assert recall["frozen"] >= recall["learned"] + FLOOR

    # Saved and reloaded: rebuilt with its teacher, same embeddings; the shared table is in
    # the checkpoint once (the teacher's variable; a frozen student adds no copy).
    run.write_metadata(load_config(None, [*_BASE, "student.tower.id_features=frozen"]), prep)
    again = run.load_model("s_frozen")
    users = ds.users.iloc[:20]
    np.testing.assert_allclose(again.embed("user", users, ds.schema),
                               students["frozen"].embed("user", users, ds.schema), atol=1e-5)
    table = teacher.user_tower.encoder.id_layers()["emb"].embeddings
    ckpt = tf.train.list_variables(str(run.model_dir("s_frozen") / "weights" / "model"))
    tables = [n for n, shape in ckpt
              if shape == table.shape.as_list() and "optimizer" not in n.lower()]
    assert len(tables) == 1, tables  # (besides the teacher optimizer's slots)


# Not a measured margin (see the test's docstring): the transfer must not be clearly worse.
FLOOR = -0.02
