"""modeling.mapper's ridge / design_matrix, modeling.aligned.AlignedStudent's loss, teacher ID
dropout (ported from the research branch's tests of aligned_trials.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tensorflow as tf

from tfrs_coldstart.config import load_config
from tfrs_coldstart.data.pipeline import interaction_dataset
from tfrs_coldstart.features.encoder import build_state, dummy_inputs
from tfrs_coldstart.modeling.aligned import AlignedConfig, build_aligned
from tfrs_coldstart.modeling.mapper import (
    design_matrix,
    linear_tower_config,
    reliability,
    ridge,
)
from tfrs_coldstart.modeling.models import build_teacher, teacher_states
from tfrs_coldstart.modeling.towers import Tower


def test_ridge_recovers_a_linear_map_and_normalises():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    w = rng.normal(size=(5, 3))
    y = x @ w + 0.5
    coef, bias = ridge(sp.csr_matrix(x), y, rng.random(200) + 0.1, 1e-6)
    np.testing.assert_allclose(x @ coef + bias, y, atol=1e-3)
    # more features than rows: the dual form, which interpolates its rows at a small alpha
    coef, bias = ridge(sp.csr_matrix(x[:3]), y[:3], None, 1e-6)
    m = x @ coef + bias
    np.testing.assert_allclose(m[:3], y[:3], atol=1e-3)
    m /= np.linalg.norm(m, axis=1, keepdims=True)  # as aligned_trials' ridge rows
    assert np.allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
    assert reliability(np.array([0, 10]), "linear", 5).tolist() == [0.0, 1.0]


def test_design_matrix_uses_the_state(tiny_dataset):
    ds = tiny_dataset
    cfg = linear_tower_config(8)
    specs = ds.schema.side("item")
    tower = Tower(build_state(specs, ds.items.iloc[:150], "item_id", False, cfg), cfg)
    tower(dummy_inputs(tower.encoder.state))
    x, blocks = design_matrix(tower, ds.items, specs, "item_id")  # the last 50 rows: OOV
    assert x.shape == (len(ds.items), sum(w for _, w in blocks))
    assert np.isfinite(x.toarray()).all()


def test_aligned_loss_terms(tiny_dataset):
    ds = tiny_dataset
    cfg = load_config(None, ["teacher.tower.id_dim=8", "teacher.tower.hidden=[16]",
                             "teacher.tower.output_dim=8", "teacher.id_dropout=0.5"])
    teacher = build_teacher(teacher_states(ds.schema, ds.users, ds.items, cfg.teacher.tower),
                            cfg.teacher)
    batch = next(iter(interaction_dataset(ds.interactions, ds.users, ds.items,
                                          ds.schema.user_features, ds.schema.item_features,
                                          64, shuffle=False)))
    assert np.isfinite(teacher.compute_loss(batch, training=True).numpy())
    small = dataclasses.replace(AlignedConfig().tower, feature_dim=4, hidden=(8,), dropout=0.0)
    losses = {}
    for name, over in {"full": {}, "ablation": {"distill_lambda": 0.0},
                       "ridge_base": {"base": "ridge"}}.items():
        acfg = dataclasses.replace(AlignedConfig(), tower=small, **over)
        model = build_aligned(ds.schema, ds.users, ds.items, acfg, 8, 0.05)
        for side, table in (("user", ds.users), ("item", ds.items)):
            ids = table[f"{side}_id"].astype(str).to_numpy()
            emb = teacher.embed(side, table, ds.schema)
            model.cache_teacher(side, ids, emb, np.arange(len(ids)))
            if acfg.base == "ridge":
                model.set_base(side, ids, emb)
        losses[name] = float(model.compute_loss(batch, training=False))
        if name == "ridge_base":  # the base embedding dominates: close to the teacher's
            out = model.embed("item", ds.items, ds.schema)
            assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert all(np.isfinite(v) for v in losses.values())
    assert losses["full"] > losses["ablation"]  # the KL and alignment terms add


def test_id_dropout_range():
    with pytest.raises(ValueError, match="id_dropout"):
        load_config(None, ["teacher.id_dropout=1.0"])
    assert isinstance(tf.constant(0.0), tf.Tensor)
    assert pd.isna(np.nan)
