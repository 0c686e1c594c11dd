"""Export contract tests: what TF Serving would load, loaded the way TF Serving loads it.

One tiny run is trained per session (tables with every feature type, 2 epochs) and exported
with a ScaNN, a brute-force and a partitioned index. Every SavedModel is then loaded by TensorFlow's
graph-mode loader in a clean interpreter that has TensorFlow (and, for ScaNN, the ScaNN op
library) but cannot import this project.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EXPORT_K

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfrs_coldstart.cli import main as cli_main
from tfrs_coldstart.data.pipeline import feature_arrays, item_log_counts
from tfrs_coldstart.evaluation import prepare
from tfrs_coldstart.runs import RunDir
from tfrs_coldstart.scoring import Scorer
from tfrs_coldstart.serving.export import (
    BRUTE_FORCE_SUFFIX,
    PAD_ID,
    PAD_SCORE,
    PARTITIONED_SUFFIX,
    ExportError,
    RecommendModule,
    default_names,
    export_run,
    input_specs,
)
from tfrs_coldstart.serving.index import (
    AnnRecallError,
    ExactIndex,
    ann_recall,
    build_index,
    scann_params,
)

pytestmark = pytest.mark.slow  # trains a model or builds exports

REPO = Path(__file__).resolve().parents[1]
K = EXPORT_K
N_ROWS = 3  # real rows per request


# --------------------------------------------------------------------------------------------
# fixtures: one trained run, exported twice


def _jsonable(rows: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: [x.tolist() if isinstance(x, np.ndarray) else
                (str(x) if isinstance(x, str) else float(x)) for x in v] for k, v in rows.items()}


def _unseen(specs: dict[str, Any], n: int = 2) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, s in specs.items():
        if s.dtype.name == "string":
            out[key] = [f"never-seen-{key}-{i}" for i in range(n)]
        elif s.shape.rank == 2:
            out[key] = [[1e3] * int(s.shape[1])] * n
        else:
            out[key] = [123456.0, -5e4][:n]
    return out


def _mixed_rows(ds: Any, run_dir: Any) -> dict[str, np.ndarray]:
    """N_ROWS known users (trained on), then N_ROWS users with real content and IDs no model
    has seen."""
    cold = set(json.loads((Path(run_dir) / "split.json").read_text())["cold_users"])
    known = ds.users[~ds.users["user_id"].astype(str).isin(cold)]
    rows = feature_arrays(known.iloc[:2 * N_ROWS], ds.schema.user_features, "user_id")
    rows["user_id"] = rows["user_id"].copy()
    rows["user_id"][N_ROWS:] = [f"new-user-{i}" for i in range(N_ROWS)]
    return rows


def _with_history(rows: dict[str, np.ndarray], specs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Requests without a history (issue 17: ``""``, the model's no-history case)."""
    if "history" in specs and "history" not in rows:
        rows["history"] = np.full(len(next(iter(rows.values()))), "", dtype=object)
    return rows


def _requests(m: Any, ds: Any) -> dict[str, tuple[str, dict[str, list]]]:
    specs = m.module.specs
    if m.kind == "recommend":
        rows = _with_history(feature_arrays(ds.users.iloc[:N_ROWS], ds.schema.user_features,
                                            "user_id"), specs)
        real = _jsonable({k: rows[k] for k in specs})
        out = {"real": ("serving_default", real), "unseen": ("serving_default", _unseen(specs)),
               "embed": ("embed_user", real)}
        if "user_id" in specs:  # one request mixing known users and new ones (real content)
            mixed = _with_history(_mixed_rows(ds, m.manifest["run_dir"]), specs)
            out["mixed"] = ("serving_default", _jsonable({k: mixed[k] for k in specs}))
            out["mixed_embed"] = ("embed_user", _jsonable({k: mixed[k] for k in specs}))
        return out
    rows = feature_arrays(ds.items.iloc[:N_ROWS], ds.schema.item_features, "item_id")
    return {"items": ("serving_default", _jsonable({k: rows[k] for k in specs}))}


CLEAN_LOADER = r'''
import json, os, sys
spec = json.load(open(sys.argv[1]))
sys.path.extend(spec["site_packages"])  # no .pth processing: an editable install stays invisible
out = {"sys_path": list(sys.path)}
try:
    import tfrs_coldstart  # noqa: F401
    out["project_importable"] = True
except ImportError:
    out["project_importable"] = False
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry
from tensorflow_serving.apis import prediction_log_pb2


def graph_ops(path):
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    ops = set()
    for mg in sm.meta_graphs:
        ops |= {n.op for n in mg.graph_def.node}
        for fn in mg.graph_def.library.function:
            ops |= {n.op for n in fn.node_def}
    return ops


models = spec["models"]
for m in models:  # before ScaNN is imported: TensorFlow's own registry only
    ops = graph_ops(m["path"])
    m["ops"] = sorted(ops)
    m["not_tensorflow_ops"] = sorted(o for o in ops if op_def_registry.get(o) is None)
if spec["import_scann"]:
    import scann  # noqa: F401  (registers Scann>* as a TF Serving build with them linked does)
out["scann_imported"] = "scann" in sys.modules


def sig_info(sd):
    def t(v):
        return [tf.dtypes.as_dtype(v.dtype).name, [d.size for d in v.tensor_shape.dim]]
    return {"method": sd.method_name, "inputs": {k: t(v) for k, v in sd.inputs.items()},
            "outputs": {k: t(v) for k, v in sd.outputs.items()}}


def plain(v):
    return v.astype(str).tolist() if v.dtype == object else v.tolist()


for m in models:
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        mg = tf.compat.v1.saved_model.loader.load(sess, ["serve"], m["path"])
        m["signatures"] = {k: sig_info(sd) for k, sd in mg.signature_def.items()
                           if not k.startswith("__")}

        def run(sig, feats):
            sd = mg.signature_def[sig]
            feed = {sd.inputs[k].name: np.asarray(
                v, dtype=object if sd.inputs[k].dtype == tf.string.as_datatype_enum
                else np.float32) for k, v in feats.items()}
            res = sess.run({k: v.name for k, v in sd.outputs.items()}, feed_dict=feed)
            return {k: plain(v) for k, v in res.items()}

        m["results"] = {key: run(sig, feats) for key, (sig, feats) in m["requests"].items()}
        warm = []
        path = os.path.join(m["path"], "assets.extra", "tf_serving_warmup_requests")
        for rec in tf.compat.v1.io.tf_record_iterator(path):
            req = prediction_log_pb2.PredictionLog.FromString(rec).predict_log.request
            feats = {k: tf.make_ndarray(v) for k, v in req.inputs.items()}
            res = run(req.model_spec.signature_name, feats)
            warm.append({"model": req.model_spec.name, "signature": req.model_spec.signature_name,
                         "inputs": sorted(feats), "batch": len(next(iter(feats.values()))),
                         "outputs": {k: np.shape(v) for k, v in res.items()}})
        m["warmup"] = warm
out["models"] = models
with open(spec["out"], "w") as f:
    json.dump(out, f)
'''


def _clean_load(tmp: Path, models: list[Any], ds: Any, import_scann: bool) -> dict[str, Any]:
    # the interpreter's site-packages only (TensorFlow, ScaNN, TF Serving API), never the repo
    site_packages = [p for p in site.getsitepackages() if Path(p).name in ("site-packages",
                                                                           "dist-packages")]
    spec = {"site_packages": site_packages, "import_scann": import_scann,
            "out": str(tmp / "result.json"),
            "models": [{"name": m.name, "kind": m.kind, "path": str(m.path),
                        "requests": _requests(m, ds)} for m in models]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", CLEAN_LOADER, str(tmp / "spec.json")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp / "result.json").read_text())
    out["models"] = {m["name"]: m for m in out["models"]}
    return out


@pytest.fixture(scope="session")
def loaded(exports: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every variant loaded by TF's graph-mode loader in clean processes (ScaNN's ops
    registered for the ScaNN variant only)."""
    ds = exports["dataset"]
    return {"scann": _clean_load(tmp_path_factory.mktemp("clean_scann"),
                                 list(exports["scann"].values()), ds, import_scann=True),
            "bf": _clean_load(tmp_path_factory.mktemp("clean_bf"),
                              list(exports["bf"].values()), ds, import_scann=False),
            "part": _clean_load(tmp_path_factory.mktemp("clean_part"),
                                list(exports["part"].values()), ds, import_scann=False)}


VARIANTS = ("scann", "bf", "part")


# --------------------------------------------------------------------------------------------
# the servable contract


def test_names_versions_and_layout(exports: dict[str, Any], run_dir: Path) -> None:
    cfg = _config(run_dir)
    sc, bf, part = exports["scann"], exports["bf"], exports["part"]
    assert set(sc) == {"recommend", "student", "teacher", "student_items"}
    assert set(bf) == {"recommend" + BRUTE_FORCE_SUFFIX, "student" + BRUTE_FORCE_SUFFIX,
                       "teacher" + BRUTE_FORCE_SUFFIX, "student_items"}
    assert set(part) == {"recommend" + PARTITIONED_SUFFIX, "student" + PARTITIONED_SUFFIX,
                         "teacher" + PARTITIONED_SUFFIX, "student_items"}
    assert set(default_names(cfg, "partitioned").values()) == set(part)
    assert set(default_names(cfg, "scann").values()) == set(sc)
    assert {m.version for m in sc.values()} == {1}
    assert {m.version for m in bf.values()} == {2}  # one version per export: next free
    assert {m.version for m in part.values()} == {3}
    for m in [*sc.values(), *bf.values(), *part.values()]:
        assert m.path == exports["base"] / m.name / str(m.version)
        assert (m.path / "saved_model.pb").is_file()
        assert (m.path / "assets.extra" / "tf_serving_warmup_requests").is_file()
    leftovers = [p for p in exports["base"].rglob(".tmp-*")]
    assert leftovers == []


def test_clean_process_cannot_import_the_project(loaded: dict[str, Any]) -> None:
    for variant in VARIANTS:
        assert loaded[variant]["project_importable"] is False
        assert not any(str(REPO) == p.rstrip("/") for p in loaded[variant]["sys_path"])
    assert loaded["scann"]["scann_imported"] is True
    assert loaded["bf"]["scann_imported"] is False
    assert loaded["part"]["scann_imported"] is False


def _spec_entry(s: Any) -> list:
    return [s.dtype.name, [-1 if d is None else int(d) for d in s.shape]]


def test_signatures_match_the_contract(exports: dict[str, Any], loaded: dict[str, Any]) -> None:
    for variant in VARIANTS:
        for name, m in exports[variant].items():
            sigs = loaded[variant]["models"][name]["signatures"]
            want_inputs = {k: _spec_entry(s) for k, s in m.module.specs.items()}
            if m.kind == "recommend":
                assert set(sigs) == {"serving_default", "embed_user"}
                assert want_inputs == {k: _spec_entry(s)
                                       for k, s in input_specs(m.module.user_tower).items()}
                sd = sigs["serving_default"]
                assert sd["method"] == "tensorflow/serving/predict"
                assert sd["inputs"] == want_inputs
                assert sd["outputs"] == {"item_ids": ["string", [-1, K]],
                                         "scores": ["float32", [-1, K]]}
                dim = m.manifest["embedding_dim"]
                assert sigs["embed_user"]["inputs"] == want_inputs
                assert sigs["embed_user"]["outputs"] == {"embedding": ["float32", [-1, dim]]}
                # the teacher reads the user ID, the content-only student does not
                assert ("user_id" in sd["inputs"]) == (m.model in ("teacher", "recommend"))
                assert m.manifest["signatures"]["serving_default"]["inputs"] == {
                    k: {"dtype": v[0], "shape": v[1]} for k, v in want_inputs.items()}
            else:
                assert set(sigs) == {"serving_default"}
                assert sigs["serving_default"]["inputs"] == want_inputs
                assert want_inputs["embedding"] == ["float32", [-1, 4]]  # the dense_vector
                assert want_inputs["price"] == ["float32", [-1]]
                assert want_inputs["title"] == ["string", [-1]]
                assert "item_id" not in want_inputs
                assert sigs["serving_default"]["outputs"] == {
                    "embedding": ["float32", [-1, m.manifest["embedding_dim"]]]}


def test_top_k_equals_the_in_process_model(exports: dict[str, Any],
                                           loaded: dict[str, Any]) -> None:
    ds = exports["dataset"]
    for variant in VARIANTS:
        for name, m in exports[variant].items():
            res = loaded[variant]["models"][name]["results"]
            for key, (sig, feats) in _requests(m, ds).items():
                if sig == "serving_default" and m.kind == "recommend":
                    want = m.module(feats)
                    assert res[key]["item_ids"] == want["item_ids"].numpy().astype(str).tolist()
                    np.testing.assert_allclose(res[key]["scores"], want["scores"].numpy(),
                                               rtol=1e-5, atol=1e-6)
                else:
                    want = (m.module.embed_user(feats) if m.kind == "recommend"
                            else m.module(feats))
                    np.testing.assert_allclose(res[key]["embedding"], want["embedding"].numpy(),
                                               rtol=1e-5, atol=1e-6)


def test_index_is_the_whole_catalogue_and_brute_force_is_exact(
        exports: dict[str, Any], loaded: dict[str, Any], run_dir: Path) -> None:
    """The served brute-force top-k equals exact search over the item encoder's embeddings of
    every item, cold ones included; ScaNN reaches the gate against the same reference."""
    ds = exports["dataset"]
    enc = exports["scann"]["student_items"].module
    items = feature_arrays(ds.items, ds.schema.item_features, "item_id")
    item_emb = enc({k: items[k] for k in enc.specs})["embedding"].numpy()
    users = feature_arrays(ds.users, ds.schema.user_features, "user_id")
    # The ranking score adds the student's popularity prior: u.i / T + prior * log(1 + count).
    split = json.loads((run_dir / "split.json").read_text())
    cfg = _config(run_dir)
    train_df = prepare(ds, cfg).split.train
    assert set(train_df["item_id"]).isdisjoint(split["cold_items"])
    student = exports["scann"]["student"].manifest
    assert student["popularity_prior"] == 0.5
    bias = student["popularity_prior"] * item_log_counts(train_df, ds.items)
    exact = ExactIndex(ds.items["item_id"].astype(str).to_numpy(),
                       np.concatenate([item_emb, bias[:, None]], axis=1))
    for variant in VARIANTS:
        name = "student" + {"scann": "", "bf": BRUTE_FORCE_SUFFIX,
                            "part": PARTITIONED_SUFFIX}[variant]
        m = exports[variant][name]
        feats = {k: _with_history(users, m.module.specs)[k] for k in m.module.specs}
        q = m.module.embed_user(feats)["embedding"].numpy() / m.manifest["temperature"]
        q = np.concatenate([q, np.ones((len(q), 1), np.float32)], axis=1)
        ids = m.module(feats)["item_ids"].numpy()
        recall = ann_recall(lambda _q, ids=ids: (None, ids), exact, q, K)
        assert recall >= (0.999 if variant == "bf" else 0.95), variant
        assert m.manifest["catalogue_size"] == len(ds.items)
    # the new (cold) items are in the served index: probed with a cold item's own embedding
    # (its extra score columns zeroed), the brute-force index returns that item first
    cold = json.loads((run_dir / "split.json").read_text())["cold_items"]
    rows = ds.items.reset_index(drop=True).index[ds.items["item_id"].astype(str).isin(cold)]
    m = exports["bf"]["student" + BRUTE_FORCE_SUFFIX]
    probe = item_emb[rows[:5]] / m.manifest["temperature"]
    extra = Scorer.from_dict(m.manifest["scorer"]).extra_columns
    probe = np.concatenate([probe, np.zeros((len(probe), extra), np.float32)], axis=1)
    _, top = m.module.index(probe, k=1)
    want = ds.items["item_id"].astype(str).to_numpy()[rows[:5]]
    assert top.numpy()[:, 0].astype(str).tolist() == want.tolist()


def test_recommend_takes_the_teacher_for_known_users_and_the_student_for_new(
        exports: dict[str, Any], loaded: dict[str, Any]) -> None:
    """One request mixing known and new users: per row, the teacher's or the student's user
    embedding (in-graph, no flag), scored against one index, as the clean process serves it."""
    ds = exports["dataset"]
    rows = _mixed_rows(ds, exports["scann"]["recommend"].manifest["run_dir"])
    for variant in VARIANTS:
        suffix = {"scann": "", "bf": BRUTE_FORCE_SUFFIX, "part": PARTITIONED_SUFFIX}[variant]
        rec = exports[variant]["recommend" + suffix]
        teacher = exports[variant]["teacher" + suffix].module
        student = exports[variant]["student" + suffix].module
        emb = loaded[variant]["models"]["recommend" + suffix]["results"]["mixed_embed"]
        emb = np.asarray(emb["embedding"])
        want_t = teacher.embed_user({k: rows[k] for k in teacher.specs})["embedding"].numpy()
        rows = _with_history(rows, student.specs)
        want_s = student.embed_user({k: rows[k] for k in student.specs})["embedding"].numpy()
        np.testing.assert_allclose(emb[:N_ROWS], want_t[:N_ROWS], atol=1e-5)
        np.testing.assert_allclose(emb[N_ROWS:], want_s[N_ROWS:], atol=1e-5)
        assert rec.manifest["new_items"] > 0  # cold items are in the index, by the student
        res = loaded[variant]["models"]["recommend" + suffix]["results"]["mixed"]
        assert np.asarray(res["item_ids"]).shape == (2 * N_ROWS, K)
    # brute force is exact: the served top-k is the unified score's top-k
    rec = exports["bf"]["recommend" + BRUTE_FORCE_SUFFIX]
    sc = Scorer.from_dict(rec.manifest["scorer"])
    assert sc.temperature == rec.manifest["temperature"]
    got = rec.module({k: _with_history(rows, rec.module.specs)[k] for k in rec.module.specs})
    top = got["scores"].numpy()
    assert np.all(np.diff(top, axis=1) <= 1e-5)


def test_graph_ops_are_tensorflow_own(loaded: dict[str, Any]) -> None:
    for name, m in loaded["scann"]["models"].items():
        if m["kind"] == "recommend":
            assert m["not_tensorflow_ops"], name
            assert all(o.startswith("Scann>") for o in m["not_tensorflow_ops"]), m[
                "not_tensorflow_ops"]
            assert "Scann>ScannSearchBatched" in m["ops"]
        else:
            assert m["not_tensorflow_ops"] == [], name
    for variant in ("bf", "part"):  # what the official tensorflow/serving image can load
        for name, m in loaded[variant]["models"].items():
            assert m["not_tensorflow_ops"] == [], name
            assert not [o for o in m["ops"] if "scann" in o.lower()], name
    part = loaded["part"]["models"]["student" + PARTITIONED_SUFFIX]["ops"]
    assert {"TopKV2", "GatherV2", "BatchMatMulV2"} <= set(part)  # centroids, leaves, re-score


def test_warmup_records_parse_and_run(exports: dict[str, Any], loaded: dict[str, Any]) -> None:
    for variant in VARIANTS:
        for name, m in exports[variant].items():
            warm = loaded[variant]["models"][name]["warmup"]
            sigs = {"serving_default", "embed_user"} if m.kind == "recommend" else {
                "serving_default"}
            assert {w["signature"] for w in warm} == sigs
            assert {w["model"] for w in warm} == {name}
            assert all(w["inputs"] == sorted(m.module.specs) for w in warm)
            assert {w["batch"] for w in warm} == {1, 4}
            for w in warm:
                if w["signature"] == "serving_default" and m.kind == "recommend":
                    assert w["outputs"]["item_ids"] == [w["batch"], K]


def test_unseen_feature_values_still_get_k_results(exports: dict[str, Any],
                                                   loaded: dict[str, Any]) -> None:
    for variant in VARIANTS:
        for name, m in exports[variant].items():
            if m.kind != "recommend":
                continue
            res = loaded[variant]["models"][name]["results"]["unseen"]
            assert np.shape(res["item_ids"]) == (2, K)
            assert all(i != PAD_ID for row in res["item_ids"] for i in row)
            assert len(set(res["item_ids"][0])) == K
            assert np.isfinite(res["scores"]).all() and np.min(res["scores"]) > PAD_SCORE


def test_manifest(exports: dict[str, Any], run_dir: Path) -> None:
    cfg = _config(run_dir)
    for variant in VARIANTS:
        for m in exports[variant].values():
            man = json.loads((m.path / "manifest.json").read_text())
            assert man["name"] == m.name and man["version"] == m.version
            assert man["schema"] == exports["dataset"].schema.to_dict()
            assert man["config"]["teacher"]["tower"]["output_dim"] == cfg.teacher.tower.output_dim
            assert man["created"] and man["libraries"]["tensorflow"]
            assert "signatures" in man
            if m.model == "student":
                report = json.loads((run_dir / "report.json").read_text())
                assert man["metrics"] == report["models"]["student"]  # copied from the run
            if m.kind != "recommend":
                continue
            assert man["k"] == K and man["catalogue_size"] == len(exports["dataset"].items)
            if variant == "scann":
                p = man["index_params"]
                assert p["num_leaves"] == round(len(exports["dataset"].items) ** 0.5)
                assert p["dimensions_per_block"] == 2
                assert man["ann_recall"]["recall"] >= man["ann_recall"]["gate"] == 0.95
                assert man["ann_recall"]["queries"] == len(exports["dataset"].users)
            elif variant == "part":
                p = man["index_params"]
                assert man["index"] == "partitioned" and "stock TF Serving" in man["serving"]
                assert p["num_clusters"] <= round(len(exports["dataset"].items) ** 0.5)
                assert 1 <= p["leaves_to_search"] <= p["num_leaves"]
                assert p["index_rows"] == p["num_leaves"] * p["leaf_size"]
                assert man["ann_recall"]["recall"] >= man["ann_recall"]["gate"] == 0.95
                assert man["ann_recall"]["exact"] is False
                assert man["ann_recall"]["trials"][-1]["leaves_to_search"] == p[
                    "leaves_to_search"]
            else:
                assert man["ann_recall"] == {"recall": 1.0, "exact": True, "k": K}


def test_short_scann_results_are_padded_to_k(exports: dict[str, Any]) -> None:
    """An index that cannot fill k slots still answers [batch, k], padded, never crashes."""
    m = exports["scann"]["student"]
    ds = exports["dataset"]
    enc = exports["scann"]["student_items"].module
    items = feature_arrays(ds.items, ds.schema.item_features, "item_id")
    emb = enc({k: items[k] for k in enc.specs})["embedding"].numpy()
    p = scann_params(len(emb), emb.shape[1], K, num_leaves=100, num_leaves_to_search=1,
                     num_reordering_candidates=K)
    layer = build_index(None, ds.items["item_id"].astype(str).to_numpy(), emb, K, "scann", p)
    module = RecommendModule(m.module.user_tower, layer, K)
    users = feature_arrays(ds.users.iloc[:8], ds.schema.user_features, "user_id")
    out = module({k: _with_history(users, module.specs)[k] for k in module.specs})
    ids, scores = out["item_ids"].numpy().astype(str), out["scores"].numpy()
    assert ids.shape == scores.shape == (8, K)
    assert (ids == PAD_ID).any()
    assert np.all((ids == PAD_ID) == (scores == np.float32(PAD_SCORE)))


# --------------------------------------------------------------------------------------------
# bad input: one clear error, nothing left behind


def _snapshot(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")) if base.exists() else []


def test_existing_version_is_never_overwritten(exports: dict[str, Any], run_dir: Path) -> None:
    base = exports["base"]
    before = _snapshot(base)
    mtime = (base / "student" / "1" / "saved_model.pb").stat().st_mtime_ns
    with pytest.raises(ExportError, match=r"version 1 already exists at .*student/1"):
        export_run(run_dir, base, version=1, k=K, dataset=exports["dataset"],
                   log=lambda m: None)
    assert _snapshot(base) == before
    assert (base / "student" / "1" / "saved_model.pb").stat().st_mtime_ns == mtime


def test_missing_and_incompatible_runs(run_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "export"
    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "nope", base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.yaml"):
        export_run(tmp_path / "empty", base)
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for f in ("config.yaml", "schema.yaml", "split.json"):
        shutil.copy(run_dir / f, untrained / f)
    with pytest.raises(ExportError, match="holds no trained"):
        export_run(untrained, base, index="brute-force")
    changed = tmp_path / "changed"
    shutil.copytree(run_dir, changed, ignore=shutil.ignore_patterns("logs", "checkpoints"))
    schema = (changed / "schema.yaml").read_text().replace("name: price", "name: cost")
    (changed / "schema.yaml").write_text(schema)
    with pytest.raises(ExportError, match="another schema"):
        export_run(changed, base, index="brute-force")
    assert not base.exists()


def test_empty_catalogue(run_dir: Path, exports: dict[str, Any], tmp_path: Path) -> None:
    import dataclasses

    ds = exports["dataset"]
    empty = dataclasses.replace(ds, items=ds.items.iloc[:0])
    with pytest.raises(ExportError, match="catalogue .* is empty"):
        export_run(run_dir, tmp_path / "export", dataset=empty)
    assert not (tmp_path / "export").exists()


def test_recall_gate_failure_leaves_nothing(run_dir: Path, exports: dict[str, Any],
                                            tmp_path: Path) -> None:
    base = tmp_path / "export"
    with pytest.raises(AnnRecallError, match=r"student: ANN recall@20 of the ScaNN index is "
                                             r"[01]\.\d+ .* below the gate 1\.01") as e:
        export_run(run_dir, base, models=("student",), k=K, ann_recall_gate=1.01,
                   dataset=exports["dataset"], log=lambda m: None)
    assert "scann_leaves_to_search" in str(e.value)
    assert not base.exists()


def test_failed_publish_rolls_back(run_dir: Path, exports: dict[str, Any],
                                   tmp_path: Path) -> None:
    """The second model cannot be written: the first, already saved, must not appear either."""
    base = tmp_path / "export"
    base.mkdir()
    (base / "student_items").write_text("a file where a model folder should be")
    with pytest.raises(ExportError, match="cannot write student_items"):
        export_run(run_dir, base, models=("student",), index="brute-force", k=K,
                   dataset=exports["dataset"], log=lambda m: None)
    assert _snapshot(base) == ["student_items"]


def test_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["export", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli_main(["export", str(run_dir), "--models", "student,oops"]) == 2
    assert "subset of" in capsys.readouterr().err
    base = tmp_path / "export"
    assert cli_main(["export", str(run_dir), "--base-dir", str(base), "--index", "brute-force",
                        "--models", "teacher", "--k", "5", "--version", "7"]) == 0
    assert "teacher_bf" in capsys.readouterr().out
    assert _snapshot(base) and (base / "teacher_bf" / "7" / "saved_model.pb").is_file()
    assert json.loads((base / "teacher_bf" / "7" / "manifest.json").read_text())["k"] == 5


def _config(run_dir: Any) -> Any:
    return RunDir.open(run_dir).config


def test_cli_partitioned_knobs(run_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """`--index partitioned` with its knobs: a leaves_to_search the caller fixed is never
    raised, so one leaf of many fails the gate naming the knob; without it the gate tunes."""
    base = tmp_path / "export"
    assert cli_main(["export", str(run_dir), "--base-dir", str(base), "--index", "partitioned",
                     "--models", "teacher", "--k", str(K), "--no-item-encoder",
                     "--partitioned-num-clusters", "12",
                     "--partitioned-leaves-to-search", "1"]) == 2
    err = capsys.readouterr().err
    assert "partitioned index" in err and "partitioned_leaves_to_search (now 1 of" in err
    assert not base.exists()
    assert cli_main(["export", str(run_dir), "--base-dir", str(base), "--index", "partitioned",
                     "--models", "teacher", "--k", "5", "--no-item-encoder",
                     "--partitioned-num-clusters", "12"]) == 0
    assert "teacher" + PARTITIONED_SUFFIX in capsys.readouterr().out
    man = json.loads((base / ("teacher" + PARTITIONED_SUFFIX) / "1" / "manifest.json")
                     .read_text())
    assert man["index"] == "partitioned" and man["k"] == 5
    assert man["index_params"]["num_clusters"] <= 12
    assert man["index_params"]["overridden"] == ["num_clusters"]
    assert man["ann_recall"]["recall"] >= 0.95
