"""Smoke test of the speed benchmarks (``make bench``): every section's code path at tiny sizes,
so the benchmark cannot rot between full runs. Numbers are not checked, shapes and
invariants are (brute force is exact, recalls are fractions, every cell answered)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains a model or builds exports

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    import speed

    out = tmp_path_factory.mktemp("speed")
    rc = speed.main([
        "--items", "400", "--users", "80", "--interactions", "800", "--teacher-epochs", "1",
        "--k", "20",
        "--queries", "24", "--latency-queries", "4", "--batch-size", "8", "--batch-calls", "2",
        "--curve-leaves", "0.2,1.0", "--curve-reorder", "40", "--curve-queries", "4",
        "--tune-queries", "16", "--tune-min-items", "0", "--scann-gate", "0.5",
        "--sections", "retrieval,towers,serving,batch", "--towers-run", "synthetic",
        "--no-ml100k-retrieval", "--no-ml100k-serving", "--no-memory",
        "--serve-concurrency", "1,2", "--serve-seconds", "0.2", "--serve-warmup", "0.1",
        "--serve-batching", "on", "--batch-users", "40", "--beam-users", "0",
        "--out", str(out / "results"), "--workdir", str(out / "work")])
    return rc, json.loads((out / "results" / "results.json").read_text()), out / "results"


def test_every_section_runs(bench: tuple[int, dict, Path]) -> None:
    rc, res, _ = bench
    errors = {k: v.get("error") for k, v in res["sections"].items() if v.get("error")}
    assert rc == 0 and not errors, errors
    assert set(res["sections"]) == {"retrieval", "towers", "serving", "batch"}
    assert res["machine"]["nproc"] >= 1 and res["machine"]["load_average_start"]


def test_retrieval_compares_exported_models_loaded_back(bench: tuple[int, dict, Path]) -> None:
    _, res, _ = bench
    (row,) = res["sections"]["retrieval"]["rows"]
    assert row["items"] == 400 and row["index_dim"] == 64
    bf, sc = row["kinds"]["brute-force"], row["kinds"]["scann"]
    assert bf["recall@10"] == pytest.approx(1.0)  # exact by construction
    assert 0.0 < sc["recall@10"] <= 1.0
    for x in (bf, sc):
        assert x["batch1"]["n"] == 4 and x["batch1"]["per_s"] > 0 and x["size_mb"] > 0
        assert x["batch8"]["per_s"] > 0
    assert row["ratios"]["qps_batch1"] > 0
    assert -1.0 <= row["geometry"]["item_mean_pairwise_cos"] <= 1.0
    curve = row["index_only"]["curve"]
    assert len(curve) == 2 and all(0.0 <= p["recall@10"] <= 1.0 for p in curve)
    chosen = row["tuning"]["chosen"]  # the fastest setting reaching the gate was exported
    assert chosen["recall@20"] >= 0.5 or row["tuning"]["gate_lowered"]
    assert row["index_params"]["num_leaves_to_search"] == chosen["leaves_to_search"]


def test_towers_serving_batch_and_report(bench: tuple[int, dict, Path]) -> None:
    _, res, out = bench
    tw = res["sections"]["towers"]
    assert tw["ratios"]["user_tower_params"] > 1  # the student's query tower is smaller
    assert all(len(m["epoch_s"]) == 2 for m in tw["models"].values())
    rows = res["sections"]["serving"]["rows"]
    assert len(rows) == 2 * 2 * 2  # models x transports x concurrency
    assert all(r["errors"] == 0 and r["n"] > 0 for r in rows), rows
    (b,) = res["sections"]["batch"]["rows"]
    assert b["users"] == 40 and b["rows"] == 40 * 20
    report = (out / "report.md").read_text()
    for title in ("### Retrieval", "### Student against teacher", "### Serving",
                  "### Batch retrieval", "### Goals"):
        assert title in report
    assert {"recall_vs_speed.png", "retrieval_throughput.png", "serving_latency.png"} <= set(
        res["plots"])
    assert all((out / p).stat().st_size > 0 for p in res["plots"])


def test_helpers(tmp_path: Path) -> None:
    import speed

    res = speed.time_command([sys.executable, "-c", "print('hi')"], tmp_path / "log.txt",
                             tmp_path)
    assert res["returncode"] == 0 and res["wall_s"] > 0 and "hi" in res["tail"]
    from common import ExactTruth, latency_stats

    from tfrs_coldstart.serving.index import ExactIndex

    ids = [f"i{i}" for i in range(5)]
    emb = np.eye(5, dtype=np.float32)
    emb[4] = emb[0]  # i4 ties with i0
    truth = ExactTruth(ExactIndex(ids, emb), emb[:2], 2)
    assert truth.recall(np.array([["i0"], ["i1"]]), 1) == 1.0
    assert truth.recall(np.array([[b"i4"], [b"i3"]], dtype=object), 1) == 0.5  # a tie counts
    assert truth.recall(np.array([["i0", "i0"], ["i1", "i1"]]), 2) == 0.5  # repeats do not
    st = latency_stats([0.001, 0.002, 0.003], wall=0.006)
    assert st["p50_ms"] == pytest.approx(2.0) and st["per_s"] == pytest.approx(500.0)


def test_scann_setting_choice() -> None:
    import speed

    curve = [{"leaves_to_search": 1, "reorder": 10, "recall@10": 0.90, "qps_batch1": 900.0},
             {"leaves_to_search": 2, "reorder": 10, "recall@10": 0.96, "qps_batch1": 500.0},
             {"leaves_to_search": 4, "reorder": 10, "recall@10": 0.99, "qps_batch1": 300.0}]
    chosen, gate = speed.choose_settings(curve, 10, 0.95)  # fastest reaching the gate first
    assert gate == 0.95 and [p["leaves_to_search"] for p in chosen] == [2, 4]
    chosen, gate = speed.choose_settings(curve, 10, 0.995)  # none: fastest near the best
    assert gate == speed.GATE_OFF and chosen[0]["leaves_to_search"] == 4
    curve[1]["recall@10"] = 0.987  # within 0.005 of the best and faster
    assert speed.choose_settings(curve, 10, 0.995)[0][0]["leaves_to_search"] == 2


def test_tune_student_reports_validation_recall(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import tune_student

    out = tmp_path / "trials.jsonl"
    small = ["data.synthetic_users=150", "data.synthetic_items=120",
             "data.synthetic_interactions=3000", "teacher.epochs=1", "student.epochs=1",
             "teacher.batch_size=256", "student.batch_size=256"]
    rc = tune_student.main([*(a for s in small for a in ("--set", s)),
                            "--trial", "student.distill_lambda=0", "--trial", "",
                            "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0 and [r["trial"] for r in rows] == ["student.distill_lambda=0", ""]
    for r in rows:
        assert set(r) >= {"warm", "cold_item", "cold_user", "cold_both", "mean", "prior"}
        assert 0 < r["mean"] <= 1
    assert capsys.readouterr().out.count("{") == 2


@pytest.mark.parametrize(("shape", "fallback"), [("items-only", {"cold_user", "cold_both"}),
                                                 ("users-only", {"cold_item", "cold_both"})])
def test_quality_benchmark_one_sided_shapes(tmp_path: Path, shape: str,
                                            fallback: set[str]) -> None:
    import coldstart

    small = ["data.synthetic_users=150", "data.synthetic_items=120",
             "data.synthetic_interactions=3000", "teacher.epochs=1", "student.epochs=1",
             "teacher.batch_size=256", "student.batch_size=256"]
    rc = coldstart.main(["--format", "synthetic", "--seeds", "1", "--no-lightfm", "--shape",
                         shape, "--out", str(tmp_path), *(a for s in small for a in ("--set", s))])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0 and shape in report["dataset"]
    for model in ("teacher", "ridge mapper (closed form)", "own-space student"):
        segs = report["models"][model]
        assert {s for s, m in segs.items() if m.get("fallback")} == fallback, model
    # the served model answers every user (a featureless side's new entities get the
    # teacher's OOV embedding and the new-user prior); the aligned students need both sides
    assert not any(m.get("fallback") for m in report["models"]["recommend (unified)"].values())
    assert "aligned student (trained)" not in report["models"]
    assert set(report["mixed"]) == {"teacher", "recommend (unified)"}
    assert "†" in (tmp_path / "report.md").read_text()


def test_aligned_trials_on_synthetic_data(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import aligned_summary
    import aligned_trials

    out = tmp_path / "trials.jsonl"
    small = ["data.synthetic_users=150", "data.synthetic_items=120",
             "data.synthetic_interactions=3000", "teacher.epochs=1", "teacher.batch_size=256"]
    trials = ["teacher", "ridge", "aligned epochs=1"]
    rc = aligned_trials.main(["--format", "synthetic", *(a for s in small for a in ("--set", s)),
                              *(a for t in trials for a in ("--trial", t)),
                              "--cache", str(tmp_path / "teachers"), "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0 and [r["trial"] for r in rows] == trials
    for r in rows:
        for seg in ("warm", "cold_item", "cold_user", "cold_both", "cold_mean"):
            assert 0 < r[seg] <= 1, (r["trial"], seg)
    assert rows[1]["alpha_user"] in aligned_trials.ALPHAS and rows[1]["weight"] == "none"
    assert rows[2]["epochs_run"] == 1
    assert [p.name for p in (tmp_path / "teachers").iterdir()]  # the cached RunDir
    capsys.readouterr()
    assert aligned_summary.main(str(out)) == 0
    assert capsys.readouterr().out.count("| default |") == 3
