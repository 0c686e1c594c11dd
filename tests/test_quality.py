"""Quality floors on synthetic data with a known answer (content drives taste).

The floors were measured on this exact data and config (see the numbers in each test) and
set with a margin for run-to-run noise; they fail if content stops reaching the student,
if distillation or the split breaks, or if cold entities leak.
"""

from __future__ import annotations

import pytest

from tfrs_coldstart.config import load_config
from tfrs_coldstart.data import generate
from tfrs_coldstart.evaluation import evaluate_popularity, prepare
from tfrs_coldstart.runs import RunDir, load_data
from tfrs_coldstart.scoring import evaluate_model
from tfrs_coldstart.training import fit_student, fit_teacher

pytestmark = pytest.mark.slow  # trains a model or builds exports

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ds = generate(n_users=800, n_items=500, n_interactions=24_000, seed=11)
    cfg = load_config(None, ["teacher.epochs=8", "student.epochs=8", "teacher.batch_size=512",
                             "student.batch_size=512", "teacher.patience=3",
                             "student.patience=3", "student.refit=false"])
    run = RunDir(tmp_path_factory.mktemp("quality"))
    prep = prepare(ds, cfg)
    teacher = fit_teacher(prep, cfg.teacher, run, verbose=0)
    student = fit_student(prep, teacher, cfg.student, run, verbose=0)
    return {"popularity": evaluate_popularity(prep, (20,)),
            "teacher": evaluate_model(prep, teacher, run.scorer("teacher"), (20,)),
            "student": evaluate_model(prep, student, run.scorer("student"), (20,),
                                      ("user", "item"))}


def _r(results, model, segment):
    return results[model][segment]["recall@20"]


def test_student_beats_popularity_on_cold_segments(results):
    print({m: {s: round(v["recall@20"], 3) for s, v in r.items()} for m, r in results.items()})
    for seg in ("cold_item", "cold_user", "cold_both"):
        assert _r(results, "student", seg) >= _r(results, "popularity", seg) + FLOORS[seg], seg


def test_teacher_beats_popularity_on_warm(results):
    assert _r(results, "teacher", "warm") >= _r(results, "popularity", "warm") + FLOORS["warm"]


# Measured 2026-11-28 (recall@20): popularity warm 0.330, cold-item 0.119, cold-user 0.266,
# cold-both 0.122; teacher warm 0.604; student cold-item 0.465, cold-user 0.343, cold-both 0.452.
# Floors are about half of the measured margins.
FLOORS = {"warm": 0.12, "cold_item": 0.15, "cold_user": 0.03, "cold_both": 0.15}


def test_teacher_on_movielens_beats_popularity(ml100k_dir, tmp_path):
    """Real data (skipped without MovieLens-100K): 3 teacher epochs already beat popularity.

    Measured 2026-11-28: popularity warm recall@20 0.209, teacher after 3 epochs ~0.39.
    """
    cfg = load_config(None, ["data.format=movielens", f"data.data_dir={ml100k_dir}",
                             "teacher.epochs=3"])
    prep = prepare(load_data(cfg), cfg)
    assert prep.split.summary()["users"]["warm"] == 717
    run = RunDir(tmp_path)
    teacher = fit_teacher(prep, cfg.teacher, run, verbose=0)
    got = evaluate_model(prep, teacher, run.scorer("teacher"), (20,))
    pop = evaluate_popularity(prep, (20,))
    assert pop["warm"]["recall@20"] == pytest.approx(0.209, abs=0.002)
    assert got["warm"]["recall@20"] >= 0.30
    assert got["cold_item"]["recall@20"] >= pop["cold_item"]["recall@20"] + 0.1
