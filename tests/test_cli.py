"""The command line: end-to-end run on synthetic data, one-line errors for bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tfrs_coldstart.cli import main

TINY = ["--set", "data.synthetic_users=300", "--set", "data.synthetic_items=200",
        "--set", "data.synthetic_interactions=6000", "--set", "teacher.epochs=2",
        "--set", "student.epochs=2", "--set", "teacher.batch_size=256",
        "--set", "student.batch_size=256", "--quiet"]


def test_run_writes_report_and_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--output", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| student |" in printed
    assert str(out / "report.md") in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"popularity", "teacher", "student"}
    for model in report["models"].values():
        assert set(model) == {"warm", "cold_item", "cold_user", "cold_both"}
        for seg in model.values():
            assert {"recall@10", "recall@20", "recall@50", "ndcg@20", "users"} <= set(seg)
    assert (out / "report.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file() and (out / "schema.yaml").is_file()
    assert "teacher:" in (out / "config.yaml").read_text()
    # distill retrains the student from the saved teacher (here: the lambda = 0 ablation)
    assert main(["distill", "--teacher", str(out), "--set", "student.distill_lambda=0",
                 "--set", "student.epochs=1", "--quiet"]) == 0
    assert "distill_lambda: 0.0" in (out / "config.yaml").read_text()
    assert json.loads((out / "report.json").read_text())["models"]["student"]["warm"]["users"]
    # evaluate re-reads the run and reproduces the numbers
    assert main(["evaluate", str(out), "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    distilled = json.loads((out / "report.json").read_text())
    for m in ("teacher", "student"):
        assert again["models"][m]["warm"]["recall@20"] == pytest.approx(
            distilled["models"][m]["warm"]["recall@20"], abs=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--set", "teacher.bogus=1"], "unknown config key 'teacher.bogus'"),
        (["run", "--format", "movielens"], "needs --data-dir"),
        (["run", "--data-dir", "/nonexistent/ml"], "/nonexistent/ml"),
        (["run", "--config", "/nonexistent.yaml"], "does not exist"),
        (["evaluate", "/nonexistent/run"], "not a run folder"),
        (["distill", "--teacher", "/nonexistent/run"], "not a run folder"),
    ],
)
def test_bad_arguments_give_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--output", str(tmp_path / "o")] if argv[0] == "run" else [])]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written for bad input


def test_console_script_usage_error_is_short():
    proc = subprocess.run([sys.executable, "-m", "tfrs_coldstart.cli", "frobnicate"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "invalid choice" in proc.stderr
