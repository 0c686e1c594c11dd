"""Teacher/student models, distillation loss, persistence and per-side students."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfrs_coldstart import training as train
from tfrs_coldstart.config import RunConfig, load_config
from tfrs_coldstart.data import generate
from tfrs_coldstart.data.pipeline import interaction_dataset, table_dataset
from tfrs_coldstart.errors import RunError
from tfrs_coldstart.evaluation import prepare
from tfrs_coldstart.features.encoder import FeatureEncoder, build_state, dummy_inputs
from tfrs_coldstart.modeling.losses import distillation_loss, in_batch_logits
from tfrs_coldstart.modeling.models import build_student, student_sides, student_states
from tfrs_coldstart.runs import RunDir, load_model
from tfrs_coldstart.scoring import evaluate_model
from tfrs_coldstart.serving.export import ItemEncoderModule

# These tests are about the own-space student (method=own) and the teacher; the students in
# the teacher's space (ridge, aligned) and the unified model are tested in test_unified.py.
FAST = ["student.method=own", "teacher.epochs=3", "student.epochs=3", "teacher.patience=1",
        "student.patience=1",
        "teacher.batch_size=256", "student.batch_size=256", "student.refit=false"]


def _cfg(*extra: str) -> RunConfig:
    return load_config(None, [*FAST, *extra])


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    """A trained teacher and student on the tiny synthetic set, saved in a run folder."""
    cfg = _cfg()
    run_dir = tmp_path_factory.mktemp("run")
    prep = prepare(tiny_dataset, cfg)
    RunDir(run_dir).write_metadata(cfg, prep)
    teacher = train.fit_teacher(prep, cfg.teacher, RunDir(run_dir), verbose=0)
    student = train.fit_student(prep, teacher, cfg.student, RunDir(run_dir), verbose=0)
    return prep, teacher, student, run_dir


def test_distillation_loss_matches_hand_computation():
    t = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], np.float32)
    s = np.array([[1.0, 1.0, 0.0], [0.5, -0.5, 2.0]], np.float32)
    temp = 2.0

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(t / temp), softmax(s / temp)
    expected = np.mean(np.sum(p * np.log(p / q), axis=1))
    got = float(distillation_loss(tf.constant(t), tf.constant(s), temp))
    assert got == pytest.approx(expected, rel=1e-5)
    same = float(distillation_loss(tf.constant(t), tf.constant(t), temp))
    assert same == pytest.approx(0, abs=1e-6)


def test_in_batch_logits_temperature_logq_and_accidental_hits():
    q = tf.constant([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    c = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    prob = tf.constant([0.5, 0.25, 0.5])
    ids = tf.constant(["a", "b", "a"])
    got = in_batch_logits(q, c, 0.5, prob, ids).numpy()
    expected = (q.numpy() @ c.numpy().T) / 0.5 - np.log(prob.numpy())[None, :]
    expected[0, 2] = expected[2, 0] = -1e9  # same item "a" at another column
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_student_loss_is_contrastive_plus_lambda_t2_kl(tiny_run):
    prep, teacher, student, _ = tiny_run
    ds = prep.dataset
    batch = next(iter(interaction_dataset(prep.split.train, ds.users, ds.items,
                                          ds.schema.user_features, ds.schema.item_features,
                                          batch_size=32, shuffle=False)))
    cfg = dataclasses.replace(student.cfg, distill_lambda=0.7, distill_temperature=3.0)
    with_kd = build_student({"user": student.user_tower.encoder.state,
                             "item": student.item_tower.encoder.state}, cfg, teacher)
    with_kd.user_tower, with_kd.item_tower = student.user_tower, student.item_tower
    no_kd = dataclasses.replace(cfg, distill_lambda=0.0)
    plain = build_student({"user": student.user_tower.encoder.state,
                           "item": student.item_tower.encoder.state}, no_kd, teacher)
    plain.user_tower, plain.item_tower = student.user_tower, student.item_tower
    q = student.user_tower(batch["user"])
    c = student.item_tower(batch["item"])
    tq, tc = teacher.user_tower(batch["user"]), teacher.item_tower(batch["item"])
    prob, ids = batch["item_prob"], batch["item"]["item_id"]
    kl = distillation_loss(in_batch_logits(tq, tc, teacher.temperature, prob, ids),
                           in_batch_logits(q, c, cfg.temperature, prob, ids), 3.0)
    total = float(with_kd.compute_loss(batch, training=False))  # no dropout noise
    base = float(plain.compute_loss(batch, training=False))
    # L_C (tfrs Retrieval) sums over the batch's 32 queries, and so does the KL term.
    assert total == pytest.approx(base + 0.7 * 9.0 * 32 * float(kl), rel=1e-4)
    assert 0.7 * 9.0 * 32 * float(kl) > 0.01 * base  # the KL term is not negligible
    assert float(kl) > 0
    # Training gathers the teacher's embeddings from a cache made once: the same loss.
    with_kd.cache_teacher(ds.users, ds.items, ds.schema)
    assert float(with_kd.compute_loss(batch, training=False)) == pytest.approx(total, rel=1e-5)
    missing = {**batch, "user": {**batch["user"], "user_id": tf.fill([32], "nobody")}}
    with pytest.raises(tf.errors.InvalidArgumentError, match="missing from the teacher cache"):
        with_kd.compute_loss(missing, training=False)


def test_content_only_student_never_sees_ids(tiny_run):
    prep, teacher, student, _ = tiny_run
    for side in ("user", "item"):
        tower = student.tower(side)
        assert f"{side}_id" not in tower.feature_names
        assert not tower.uses_ids
        assert teacher.tower(side).uses_ids and f"{side}_id" in teacher.tower(side).feature_names
    # Changing the ids must not change a student embedding (and must change the teacher's).
    users = prep.dataset.users.head(8).copy()
    schema = prep.dataset.schema
    a = student.embed("user", users, schema)
    ta = teacher.embed("user", users, schema)
    users["user_id"] = [f"never-seen-{i}" for i in range(len(users))]
    np.testing.assert_allclose(student.embed("user", users, schema), a, atol=1e-6)
    assert not np.allclose(teacher.embed("user", users, schema), ta, atol=1e-4)


def test_student_is_at_least_5x_smaller(tiny_run):
    _, teacher, student, _ = tiny_run
    assert teacher.user_tower.uses_ids and not student.user_tower.uses_ids
    assert not student.item_tower.uses_ids  # its ID sink is training-only, never served
    assert teacher.param_count() >= 5 * student.param_count()


def test_reload_gives_identical_scores(tiny_run):
    prep, teacher, student, run_dir = tiny_run
    ds = prep.dataset
    for which, model in (("teacher", teacher), ("student", student)):
        loaded = load_model(run_dir, which)
        for side in ("user", "item"):
            table = ds.users if side == "user" else ds.items
            np.testing.assert_allclose(loaded.embed(side, table, ds.schema),
                                       model.embed(side, table, ds.schema), atol=1e-5)


def test_unseen_ids_and_categories_map_to_oov(tiny_run):
    prep, teacher, student, _ = tiny_run
    users = prep.dataset.users.head(3).copy()
    users["user_id"] = ["x", "y", "z"]
    for spec in prep.dataset.schema.user_features:
        if spec.type.value in ("categorical", "multi_hot", "text"):
            users[spec.name] = "value-never-seen"
    for model in (teacher, student):
        emb = model.embed("user", users, prep.dataset.schema)
        assert emb.shape[0] == 3 and np.isfinite(emb).all()
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_missing_run_errors_are_clear(tmp_path):
    with pytest.raises(RunError, match="not a run folder"):
        load_model(tmp_path / "nothing", "student")


@pytest.mark.parametrize("shape", ["items_only", "users_only"])
def test_one_sided_student_keeps_teacher_id_tower(shape, tmp_path):
    ds = generate(n_users=200, n_items=150, n_interactions=4000, seed=3, n_tags=20_000,
                  with_user_features=shape != "items_only",
                  with_item_features=shape != "users_only")
    cfg = _cfg("teacher.epochs=1", "student.epochs=1")
    prep = prepare(ds, cfg)
    sides = student_sides(ds.schema)
    content = "item" if shape == "items_only" else "user"
    other = "user" if content == "item" else "item"
    assert sides == (content,)
    teacher = train.fit_teacher(prep, cfg.teacher, RunDir(tmp_path), verbose=0)
    student = train.fit_student(prep, teacher, cfg.student, RunDir(tmp_path), verbose=0)
    assert student.tower(other) is teacher.tower(other)
    assert not student.tower(content).uses_ids
    result = evaluate_model(prep, student, RunDir(tmp_path).scorer("student"), (20,), sides)
    unservable = "cold_user" if content == "item" else "cold_item"
    assert result[unservable].get("fallback") == "popularity"
    assert result["cold_both"].get("fallback") == "popularity"
    served = "cold_item" if content == "item" else "cold_user"
    assert "fallback" not in result[served]


def test_multi_hot_with_tens_of_thousands_of_values():
    ds = generate(n_users=300, n_items=30_000, n_interactions=6000, seed=1, n_tags=40_000)
    own = dataclasses.replace(RunConfig().student, method="own")
    cfg = own.tower
    states = student_states(ds.schema, ds.users, ds.items, cfg, ("user", "item"))
    tags = [s for s in ds.schema.item_features if s.type.value == "multi_hot"][0]
    assert len(states["item"][tags.name]["vocabulary"]) > 10_000
    student = build_student(states, own, None)
    emb = student.embed("item", ds.items.head(500), ds.schema)
    assert emb.shape == (500, cfg.output_dim) and np.isfinite(emb).all()


def test_no_teacher_and_featureless_side_is_an_error():
    ds = generate(n_users=50, n_items=40, n_interactions=500, seed=0, with_user_features=False)
    own = dataclasses.replace(RunConfig().student, method="own")
    states = student_states(ds.schema, ds.users, ds.items, own.tower, ("item",))
    with pytest.raises(ValueError, match="teacher's ID tower"):
        build_student(states, own, None)
    with pytest.raises(ValueError, match="no user features"):
        student_sides(ds.schema, "both")


def test_interrupted_fit_resumes_from_backup(tiny_dataset, tmp_path: Path):
    cfg = _cfg("teacher.epochs=3", "teacher.patience=10")
    prep = prepare(tiny_dataset, cfg)

    class Interrupt(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    orig = train._fit

    def interrupted(*args, **kwargs):
        model = args[0]
        real_fit = model.fit

        def fit(*a, callbacks=(), **kw):
            return real_fit(*a, callbacks=[*callbacks, Interrupt()], **kw)

        model.fit = fit
        return orig(*args, **kwargs)

    train._fit = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train.fit_teacher(prep, cfg.teacher, RunDir(tmp_path), verbose=0)
    finally:
        train._fit = orig
    assert (tmp_path / "teacher" / "backup").is_dir()
    train.fit_teacher(prep, cfg.teacher, RunDir(tmp_path), verbose=0)
    import json

    info = json.loads((tmp_path / "teacher" / "history.json").read_text())
    # epochs 1-2 came from the backup (their history too); only epoch 3 ran again
    assert info["epochs_run"] == 3 and len(info["history"]["val_recall@20"]) == 3
    assert not (tmp_path / "teacher" / "backup").exists()


def test_feature_dropout_blanks_whole_features_in_training_only():
    ds = generate(n_users=50, n_items=400, n_interactions=1000, seed=1)
    cfg = dataclasses.replace(RunConfig().student.tower, feature_dropout=0.5)
    state = build_state(ds.schema.item_features, ds.items, "item_id", False, cfg)
    enc = FeatureEncoder(state, cfg)
    x = next(iter(table_dataset(ds.items, ds.schema.item_features, "item_id", 400)))
    full = enc(x).numpy()
    np.testing.assert_array_equal(enc(x, training=False).numpy(), full)
    tf.random.set_seed(0)
    dropped = enc(x, training=True).numpy()
    # Whole features go: per row, each feature's block is either intact or all zero.
    widths = [FeatureEncoder({n: st}, cfg)(x).shape[1] for n, st in state.items()]
    edges = np.cumsum([0, *widths])
    assert edges[-1] == full.shape[1]
    blanked = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        for r in range(len(full)):
            if np.allclose(dropped[r, a:b], 0) and np.abs(full[r, a:b]).max() > 0:
                blanked.append(1.0)
            else:
                np.testing.assert_allclose(dropped[r, a:b], full[r, a:b], rtol=1e-6)
                blanked.append(0.0)
    assert 0.4 < np.mean(blanked) < 0.6  # about the configured rate


def test_item_id_sink_is_read_in_training_only():
    """The student's ID sink shapes training but is never an input of the served tower."""
    ds = generate(n_users=50, n_items=300, n_interactions=1000, seed=2)
    states = student_states(ds.schema, ds.users, ds.items, RunConfig().student.tower,
                            ("user", "item"), item_id_sink=8)
    assert states["item"]["__id__"]["train_only"] and "__id__" not in states["user"]
    model = build_student(states, dataclasses.replace(RunConfig().student, method="own"), None)
    tower = model.item_tower
    assert "item_id" not in tower.feature_names and not tower.uses_ids
    x = next(iter(table_dataset(ds.items, ds.schema.item_features, "item_id", 300)))
    served = tower(x, training=False).numpy()
    other = {**x, "item_id": tf.fill(tf.shape(x["item_id"]), "someone-else")}
    np.testing.assert_array_equal(tower(other, training=False).numpy(), served)
    no_id = {k: v for k, v in x.items() if k != "item_id"}
    np.testing.assert_array_equal(tower(no_id, training=False).numpy(), served)
    # In training the sink is read (dropout off), so the ID changes the embedding.
    assert not np.allclose(tower.encoder(x, training=True).numpy(),
                           tower.encoder(other, training=True).numpy())
    sink = sum(int(np.prod(w.shape)) for w in tower.encoder.train_only_weights)
    assert sink == (len(ds.items) + 1) * 8
    model.user_tower(dummy_inputs(states["user"]))
    assert model.param_count(training=True) == model.param_count() + sink
    # The exported item encoder does not carry the sink (a 128 MB table at a million items).
    module = ItemEncoderModule(tower)
    assert not any(v.shape[0] == len(ds.items) + 1 for v in module.variables)
    np.testing.assert_allclose(module(no_id)["embedding"].numpy(), served, atol=1e-6)


def test_non_finite_loss_stops_with_one_clear_error(tiny_dataset, tmp_path: Path):
    """A loss that turns NaN/Inf stops the fit with a UserError naming what to change; nothing
    of the model is saved (was: trained to NaN, exit 0, a report of a broken model)."""
    cfg = _cfg("teacher.epochs=2", "teacher.temperature=1e-38")
    prep = prepare(tiny_dataset, cfg)
    with pytest.raises(train.NonFiniteLoss, match="lower the learning rate"):
        train.fit_teacher(prep, cfg.teacher, RunDir(tmp_path), verbose=0)
    assert not RunDir(tmp_path).has_model("teacher")
