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
    assert "| teacher |" in printed and "| student |" in printed and "| recommend |" in printed
    assert str(out / "report.md") in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"popularity", "teacher", "student", "recommend"}
    assert set(report["mixed"]) == {"teacher", "recommend"}
    assert "Mixed catalogue" in (out / "report.md").read_text()
    # the recommend model's cold path per side, chosen on validation, is reported
    assert set(report["cold_paths"]) == {"user", "item"}
    assert set(report["cold_paths"].values()) <= {"student", "teacher"}
    assert "`recommend` embeds new users with the" in (out / "report.md").read_text()
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
    # the student joins the run's report: its evaluated users cannot change
    assert main(["distill", "--teacher", str(out), "--set", "eval.max_users=5"]) == 2
    assert "eval.max_users=5" in capsys.readouterr().err
    # evaluate re-reads the run and reproduces the numbers
    assert main(["evaluate", str(out), "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    distilled = json.loads((out / "report.json").read_text())
    for m in ("teacher", "student", "recommend"):
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


# Every command's errors take the one path of cli.main: one line, exit 2; with
# TFRS_COLDSTART_DEBUG=1 the same error is raised with its traceback.
COMMAND_ERRORS = [
    (["run", "--set", "teacher.temperature=0"], "teacher.temperature"),
    (["evaluate", "/nonexistent/run"], "not a run folder"),
    (["export", "/nonexistent/run"], "does not exist"),
    (["batch", "--model", "/nonexistent/model", "--users", "/nonexistent/u.csv", "--out",
      "/tmp/never-written.parquet"], "/nonexistent"),
    (["add-items", "--model", "/nonexistent/model", "/nonexistent/items.csv"], "/nonexistent"),
    (["finetune", "/nonexistent/run", "--data", "/nonexistent/new.csv"], "/nonexistent"),
    (["recommend", "--server", "127.0.0.1:9", "--model", "m", "--user", "{\"age\": \"1\"}",
      "--timeout", "2", "--retries", "0"], "127.0.0.1:9"),
    (["serve", "--models-config", "/nonexistent/models.config"], "/nonexistent"),
]


@pytest.mark.parametrize(("argv", "message"), COMMAND_ERRORS, ids=lambda a: a[0])
def test_every_command_error_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), COMMAND_ERRORS, ids=lambda a: a[0])
def test_debug_switch_shows_the_traceback_of_every_command(argv, message, monkeypatch):
    monkeypatch.setenv("TFRS_COLDSTART_DEBUG", "1")
    with pytest.raises(Exception, match=message.replace(".", r"\.")):
        main(argv)


def test_settings_are_checked_before_any_data_is_read(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["run", "--data-dir", str(tmp_path / "no-such-data"), "--output", str(out),
            "--set", "student.learning_rate=-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "student.learning_rate" in err and "no-such-data" not in err
    assert not out.exists()


def test_output_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", "--output", str(f), *TINY]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err


def test_empty_segment_is_na_not_zero():
    import numpy as np

    from tfrs_coldstart.evaluation import SegmentTask, metrics_table, rank_metrics

    empty = SegmentTask("cold_user", np.zeros(0, np.int64), np.arange(5), [], [])
    seg = rank_metrics(empty, lambda u, i: np.zeros((len(u), len(i))), (20,))
    assert seg["recall@20"] is None and seg["users"] == 0
    table = metrics_table({"models": {"m": {"cold_user": seg}}}, 20)
    assert "n/a" in table and "0.000" not in table
