"""Config: defaults, YAML file, --set overrides, clear errors, saved next to the run."""

from __future__ import annotations

import pytest
import yaml

from tfrs_coldstart.config import (
    ConfigError,
    RunConfig,
    config_from_yaml_dict,
    load_config,
    save_config,
    to_dict,
)


def test_file_then_overrides_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher:\n  epochs: 7\n  tower:\n    hidden: [32, 16]\n"
                 "student:\n  distill_lambda: 2\n")
    cfg = load_config(f, ["teacher.epochs=3", "data.data_dir=null", "student.popularity_prior=0.5"])
    assert cfg.teacher.epochs == 3
    assert cfg.teacher.tower.hidden == (32, 16)
    assert cfg.student.distill_lambda == 2.0
    assert cfg.student.popularity_prior == 0.5
    assert cfg.data.data_dir is None
    assert isinstance(cfg, RunConfig)


def test_configs_are_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.nope=1", "unknown config key 'teacher.nope'"),
        ("teacher.epochs=abc", "'teacher.epochs' expects int"),
        ("teacher.logq_correction=maybe", "'teacher.logq_correction' expects bool"),
        ("teacher.tower=3", "'teacher.tower' must be a mapping"),
        ("no_equals_sign", "must look like key.sub=value"),
        ("student.tower.numeric_buckets=0", "'student.tower.numeric_buckets' must be at least 1"),
        ("student.item_id_sink=-1", "'student.item_id_sink' must be 0"),
        ("teacher.tower.dropout=1.5", r"'teacher.tower.dropout' must be in \[0, 1\)"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(top)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["teacher.tower.hidden=[8]", "eval.ks=[5,10]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_yaml_dict(RunConfig, yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert to_dict(again)["eval"]["ks"] == [5, 10]
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no temp file left
