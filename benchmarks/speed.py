"""Speed benchmarks (issue 7, and the "Measured" parts of issues 4, 5 and 6), one process run.

Sections (``--sections``, default all):

- ``retrieval``: the exported ScaNN ``recommend`` SavedModel against the brute-force one, both
  loaded back from disk (``tf.saved_model.load`` after ``import scann``), on synthetic
  catalogues (``--items``): recall@10 against exact search, queries/s at batch 1 and 256,
  p50/p99 latency, index build time, size on disk, resident memory; a recall-versus-speed
  curve over ScaNN's query-time settings (leaves searched, re-ordering); the ML-100K
  catalogue too when the data is there. The synthetic runs' teacher is trained for two epochs
  on 200,000 interactions (an index's recall depends on how trained the embeddings are: a
  one-epoch teacher on 20,000 interactions left 1M items in a narrow cone where no ScaNN
  setting reached 0.95) and exported by ``export_run``, the real export path.
- ``towers``: student against teacher on ML-100K: parameters, query-tower latency and
  throughput (the exported ``embed_user`` signature), training time per epoch.
- ``e2e``: ``tfrs-coldstart run`` wall time on the embedded default (what ``make run`` runs)
  and on ML-100K (teacher + student training time).
- ``serving``: REST and gRPC p50/p99 latency and throughput at several concurrencies against
  the local TF-Serving-compatible server, for the ML-100K and the largest synthetic export.
- ``batch``: offline batch retrieval throughput (users/s) against the largest synthetic
  ScaNN export, in-process and on Beam's DirectRunner.

Writes ``results.json``, ``report.md`` and PNG charts under ``--out``
(default benchmarks/results/speed/) and prints the Markdown report.

    make bench                                  # everything, ~20 minutes on 2 cores
    make bench ARGS="--quick"                   # small sizes, a few minutes
    make bench ARGS="--items 100000 --sections retrieval"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tfrs_coldstart  # noqa: E402,F401,I001  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from common import (  # noqa: E402
    REPO,
    dir_size,
    ExactTruth,
    load_average,
    log,
    machine_info,
    md_table,
    measure_loaded_memory,
    ml100k_default,
    parse_float_list,
    parse_int_list,
    release,
    time_calls,
    write_json,
    write_text,
)
from tfrs_coldstart.evaluation import prepare  # noqa: E402
from tfrs_coldstart.runs import RunDir, load_data, load_model  # noqa: E402
from tfrs_coldstart.data.pipeline import item_log_counts  # noqa: E402
from tfrs_coldstart.scoring import Scorer  # noqa: E402
from tfrs_coldstart.training import fit_student, fit_teacher  # noqa: E402

SECTIONS = ("retrieval", "towers", "e2e", "serving", "batch")
GATE_OFF = 1e-6  # export_run's gate must be positive: this lets any recall through
GOALS = {
    "scann_recall": 0.95,  # recall@10 at 1M items
    "scann_speedup": 20.0,  # x brute-force queries/s at batch 1, 1M items
    "partitioned_recall": 0.95,  # recall@10 at 1M items (issue 14)
    "partitioned_speedup": 6.0,  # x brute-force queries/s at batch 1, 1M items (issue 14)
    "student_params": 5.0,  # x fewer query-tower parameters
    "student_speed": 3.0,  # x faster query tower
    "ml100k_train_s": 120.0,  # teacher + student
    "make_run_s": 180.0,
    "grpc_p99_ms": 10.0,  # single user, 1M-item ScaNN export
}

# Full and quick defaults; a flag given on the command line wins over both.
FULL = {"items": "100000,1000000", "users": 2000, "interactions": 200_000, "teacher_epochs": 2,
        "queries": 1000,
        "latency_queries": 500, "batch_calls": 20, "tune_queries": 500,
        "curve_leaves": "0.01,0.02,0.05,0.1,0.2,0.3,0.5,1.0",
        "curve_reorder": "100,200,500,1000,2000", "curve_queries": 200,
        "serve_concurrency": "1,8,32", "serve_seconds": 3.0, "serve_warmup": 0.5,
        "serve_batching": "off,on", "batch_users": 100_000, "beam_users": 10_000}
QUICK = {"items": "20000,100000", "users": 1000, "interactions": 10000, "teacher_epochs": 1,
         "queries": 300,
         "latency_queries": 100, "batch_calls": 5, "tune_queries": 200,
         "curve_leaves": "0.02,0.1,0.3,1.0", "curve_reorder": "100,500", "curve_queries": 50,
         "serve_concurrency": "1,8", "serve_seconds": 1.5, "serve_warmup": 0.5,
         "serve_batching": "off", "batch_users": 5000, "beam_users": 500}


class Skip(Exception):
    """A section (or part of one) cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# artifacts: trained runs and exports, built once and shared by the sections


@dataclasses.dataclass
class Run:
    label: str
    run_dir: Path
    dataset: Any
    timing: dict[str, Any]
    models: set[str]
    prep: Any = None

    def prepared(self) -> Any:
        """The run's split (made once)."""
        if self.prep is None:
            self.prep = prepare(self.dataset, RunDir.open(self.run_dir).config)
        return self.prep


@dataclasses.dataclass
class Export:
    """One exported model (``export_run`` call) and how long its phases took."""

    label: str
    kind: str
    role: str
    path: Path  # <base>/<name>/<version>
    manifest: dict[str, Any]
    seconds: float
    phases: dict[str, float]
    tuning: dict[str, Any] | None = None

    @property
    def model_dir(self) -> Path:
        """``<base>/<name>`` (what batch retrieval takes)."""
        return self.path.parent

    @property
    def base(self) -> Path:
        return self.path.parent.parent


class Artifacts:
    """Trained runs, tuned indexes and exports under the work folder, made on first use."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.runs: dict[str, Run] = {}
        self.exports: dict[tuple[str, str, str], Export] = {}
        self.vectors: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, dict[str, float]]] = {}
        self.tunings: dict[tuple[str, str], dict[str, Any]] = {}

    # -- synthetic -----------------------------------------------------------------------------
    def synthetic(self, n_items: int, student: bool = False) -> Run:
        """A synthetic catalogue of ``n_items``; teacher: ``--teacher-epochs``, student: one."""
        from tfrs_coldstart.data import synthetic

        a = self.args
        label = f"synthetic-{n_items}"
        run = self.runs.get(label)
        if run is None:
            log(f"[{label}] generating {n_items:,} items, {a.users:,} users, "
                f"{a.interactions:,} interactions ...")
            t = time.perf_counter()
            ds = synthetic.generate(n_users=a.users, n_items=n_items,
                                    n_interactions=a.interactions, seed=0,
                                    dense_dim=a.dense_dim)
            gen_s = time.perf_counter() - t
            cfg = self._synthetic_config(n_items)
            t = time.perf_counter()
            prep = prepare(ds, cfg)
            prep_s = time.perf_counter() - t
            run_dir = self.work / "runs" / label
            RunDir(run_dir).write_metadata(cfg, prep)
            log(f"[{label}] training the teacher ({a.teacher_epochs} epochs at most) ...")
            t = time.perf_counter()
            fit_teacher(prep, cfg.teacher, RunDir(run_dir), cfg.seed, verbose=0)
            run = Run(label, run_dir, ds, {"generate_s": gen_s, "split_s": prep_s,
                                           "teacher_fit_s": time.perf_counter() - t},
                      {"teacher"}, prep)
            self.runs[label] = run
        if student and "student" not in run.models:
            cfg = RunDir.open(run.run_dir).config
            log(f"[{label}] training the student (1 epoch) ...")
            t = time.perf_counter()
            teacher = load_model(run.run_dir, "teacher")
            fit_student(run.prepared(), teacher, cfg.student, RunDir(run.run_dir), cfg.seed,
                        verbose=0)
            run.timing["student_fit_s"] = time.perf_counter() - t
            run.models.add("student")
        return run

    def _synthetic_config(self, n_items: int) -> Any:
        from tfrs_coldstart.config import load_config

        a = self.args
        return load_config(None, [
            "data.format=synthetic", f"data.synthetic_items={n_items}",
            f"data.synthetic_users={a.users}", f"data.synthetic_interactions={a.interactions}",
            f"teacher.tower.output_dim={a.dim}", f"teacher.epochs={a.teacher_epochs}",
            "teacher.patience=1", "student.epochs=1",
            "student.refit=false",
            # a fixed prior (tuning it scores the whole catalogue six times) keeps the
            # student's served score u.i / T + prior * log(1 + count), as a real export has
            "student.popularity_prior=0.5",
            f"export.k={a.k}",
        ])

    # -- ML-100K -------------------------------------------------------------------------------
    def ml100k(self) -> Run:
        """ML-100K trained by the CLI with the default config (timed: the e2e figure)."""
        if "ml100k" in self.runs:
            return self.runs["ml100k"]
        data = Path(self.args.ml100k)
        if not (data / "u.data").is_file():
            raise Skip(f"MovieLens-100K not found at {data} (pass --ml100k or set "
                       "TFRS_COLDSTART_ML100K)")
        run_dir = self.work / "runs" / "ml100k"
        log("[ml100k] `tfrs-coldstart run` with the default config (teacher + student) ...")
        res = time_command([cli_path(), "run", "--quiet", "--data-dir", str(data), "--output",
                            str(run_dir)], self.work / "ml100k-run.log", self.work)
        if res["returncode"] != 0:
            raise RuntimeError(f"tfrs-coldstart run on ML-100K failed:\n{res['tail']}")
        timing = {"cli_wall_s": res["wall_s"], "load_average": res["load_average"],
                  **_fit_seconds(run_dir)}
        run = Run("ml100k", run_dir, load_data(RunDir.open(run_dir).config), timing,
                  {"teacher", "student"})
        self.runs["ml100k"] = run
        return run

    # -- index vectors, tuning and exports -----------------------------------------------------
    def index_vectors(self, run: Run, role: str) -> tuple[np.ndarray, np.ndarray,
                                                          dict[str, float]]:
        """The catalogue as an export of ``role`` indexes it (cached per run and role)."""
        key = (run.label, role)
        if key not in self.vectors:
            log(f"[{run.label}] {role}: embedding {len(run.dataset.items):,} items for the "
                "exact reference ...")
            self.vectors[key] = index_vectors(run, role)
        return self.vectors[key]

    def drop_vectors(self, run: Run, role: str) -> None:
        self.vectors.pop((run.label, role), None)
        release()

    def export(self, run: Run, kind: str, role: str, scann: dict[str, int] | None = None,
               gate: float | None = None) -> Export:
        """Export one model of a run with ``export_run`` (the real path), timing its phases.

        Models of one run and index kind share a base path (what a server serves)."""
        from tfrs_coldstart.serving.export import default_names, export_run

        key = (run.label, kind, role)
        if key in self.exports:
            return self.exports[key]
        base = self.work / "export" / f"{run.label}-{kind}"
        events: list[tuple[float, str]] = []
        t0 = time.perf_counter()

        def lg(msg: str) -> None:
            events.append((time.perf_counter() - t0, msg))
            log(f"    {msg}")

        log(f"[{run.label}] exporting the {role} with a {kind} index "
            f"{'(ScaNN ' + str(scann) + ')' if scann else ''}...")
        done = export_run(run.run_dir, base_dir=base, models=(role,), index=kind,
                          k=self.args.k, dataset=run.dataset, log=lg, scann=scann,
                          ann_recall_gate=gate,
                          item_encoder=kind == "scann" and role == "student")
        seconds = time.perf_counter() - t0
        name = default_names(RunDir.open(run.run_dir).config, kind)[role]
        (m,) = [m for m in done if m.name == name]
        exp = Export(run.label, kind, role, m.path, m.manifest, seconds, _phases(events))
        self.exports[key] = exp
        return exp

    def scann_export(self, run: Run, role: str) -> Export:
        """The ScaNN export of one model, its query-time settings chosen on the measured
        recall/speed curve (the fastest setting whose recall@k reaches the gate), unless
        ``--scann-auto`` (the library's own defaults and gate tuning)."""
        from tfrs_coldstart.serving.index import AnnRecallError

        key = (run.label, "scann", role)
        if key in self.exports:
            return self.exports[key]
        a = self.args
        if a.scann_auto or len(run.dataset.items) < a.tune_min_items:
            exp = self.export(run, "scann", role, gate=a.scann_gate)
            exp.tuning = {"mode": "library defaults + recall gate"}
            return exp
        tuning = self.tuning(run, role)
        candidates, gate = choose_settings(tuning["curve"], tuning["k"], a.scann_gate)
        lowered = gate != a.scann_gate
        rk = f"recall@{tuning['k']}"
        if lowered:
            log(f"    no ScaNN setting of the curve reaches {rk} {a.scann_gate}; exporting "
                f"the fastest near the best recall ({candidates[0][rk]:.3f}) with the gate off")
        errors: list[str] = []
        floor = -1.0
        for p in candidates:
            if len(errors) == 3:
                break
            if p[rk] <= floor:  # after a miss, only settings with more recall on the curve
                continue
            scann = {"num_leaves": tuning["num_leaves"],
                     "num_leaves_to_search": p["leaves_to_search"],
                     "num_reordering_candidates": p["reorder"]}
            try:
                exp = self.export(run, "scann", role, scann=scann, gate=gate)
            except AnnRecallError as e:  # the gate's own query sample fell just short
                errors.append(str(e).splitlines()[0][:300])
                log(f"    attempt {len(errors)}: {errors[-1]}")
                floor = p[rk]
                continue
            exp.tuning = {"mode": ("fastest setting near the curve's best recall, gate off"
                                   if lowered
                                   else "fastest curve setting reaching the gate"), "gate": gate,
                          "gate_lowered": lowered, "chosen": p, "failed_attempts": errors}
            return exp
        raise RuntimeError(f"no tuned ScaNN setting of the {role} passed the export gate: "
                           f"{errors}")

    def tuning(self, run: Run, role: str) -> dict[str, Any]:
        key = (run.label, role)
        if key not in self.tunings:
            ids, vectors, info = self.index_vectors(run, role)
            queries = _model_queries(run, role, info, self.args.tune_queries, seed=2)
            self.tunings[key] = scann_curve(ids, vectors, queries, self.args,
                                            f"{run.label} {role}")
        return self.tunings[key]


def choose_settings(curve: list[dict[str, Any]], k: int,
                    gate: float) -> tuple[list[dict[str, Any]], float]:
    """ScaNN settings to export, best first, and the gate to export them with.

    The curve's settings whose recall@k reaches ``gate``, fastest (batch 1) first. When none
    does: the fastest setting within 0.005 of the best recall (the curve plateaus), exported
    with the gate off so that its speed is still measured; its recall is reported as is.
    """
    rk = f"recall@{k}"
    ok = sorted((p for p in curve if p[rk] >= gate), key=lambda p: -p["qps_batch1"])
    if ok:
        return ok, gate
    top = max(p[rk] for p in curve)
    best = max((p for p in curve if p[rk] >= top - 0.005), key=lambda p: p["qps_batch1"])
    return [best], GATE_OFF


def _fit_seconds(run_dir: Path) -> dict[str, Any]:
    """Fit seconds and epochs of a run's models, from their history files."""
    out: dict[str, Any] = {}
    for which in ("teacher", "student"):
        p = run_dir / which / "history.json"
        if p.is_file():
            info = json.loads(p.read_text())
            refit = info.get("refit", {})
            out[f"{which}_fit_s"] = info["seconds"] + refit.get("seconds", 0)
            out[f"{which}_epochs"] = info["epochs_run"] + refit.get("epochs_run", 0)
    return out


def _phases(events: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds per export phase, from the export log's timestamps."""
    out: dict[str, float] = {}
    for (t, msg), (t_next, _) in zip(events, events[1:] + [(events[-1][0], "")], strict=True):
        which = msg.split(":", 1)[0] if ":" in msg else ""
        if "embedding" in msg:
            out[f"{which}_embed_items_s"] = t_next - t
        elif "building the" in msg:
            out[f"{which}_index_build_and_gate_s"] = t_next - t
        elif msg.startswith("writing "):
            out[f"write_{msg.split()[1]}_s"] = t_next - t
    return out


def cli_path() -> str:
    exe = Path(sys.executable).parent / "tfrs-coldstart"
    return str(exe) if exe.exists() else "tfrs-coldstart"


def time_command(cmd: list[str], log_path: Path, cwd: Path) -> dict[str, Any]:
    """Wall time of a command (output to ``log_path``) and the load average around it."""
    load_before = load_average()
    t = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, check=False,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}).returncode
    wall = time.perf_counter() - t
    tail = log_path.read_text()[-3000:] if log_path.exists() else ""
    return {"command": " ".join(cmd), "returncode": rc, "wall_s": wall, "tail": tail,
            "load_average": [load_before, load_average()]}


# ---------------------------------------------------------------------------------------------
# retrieval: ScaNN against brute force, loaded back from disk


def _input_names(manifest: dict[str, Any]) -> list[str]:
    return list(manifest["signatures"]["serving_default"]["inputs"])


def _user_rows(run: Run, n: int, seed: int) -> np.ndarray:
    users = run.dataset.users
    return np.random.default_rng(seed).choice(len(users), size=n, replace=len(users) < n)


def _user_inputs(run: Run, names: Sequence[str], n: int, seed: int = 1) -> dict[str, np.ndarray]:
    from tfrs_coldstart.features.sources import served_arrays

    ds = run.dataset  # features and the source columns of derived ones (issue 14)
    arrays = served_arrays(ds.users.iloc[_user_rows(run, n, seed)], ds.schema.user_features,
                           "user_id")
    n_rows = len(arrays["user_id"])
    # a request-time `history` (issue 17) is not a column of the users table: none here
    return {k: arrays[k] if k in arrays else np.full(n_rows, "", dtype=object) for k in names}


def _tensors(inputs: dict[str, np.ndarray], fn: Any, size: int,
             count: int) -> list[dict[str, Any]]:
    """``count`` requests of ``size`` users each (cycling over the inputs), made into tensors
    before any clock starts: the timed loops then measure the model, not the slicing."""
    import tensorflow as tf

    specs = fn.structured_input_signature[1]
    n = len(next(iter(inputs.values())))
    out = []
    for i in range(count):
        rows = np.arange(i * size, i * size + size) % n
        out.append({k: tf.constant(v[rows], dtype=specs[k].dtype) for k, v in inputs.items()})
    return out


def index_vectors(run: Run, which: str) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The catalogue as the export indexes it (:meth:`Scorer.index_vectors`) and the model's
    scorer as a dict."""
    ds = run.dataset
    model = load_model(run.run_dir, which)
    scorer = RunDir(run.run_dir).scorer(which)
    emb = scorer.index_vectors(model.embed("item", ds.items, ds.schema),
                               item_log_counts(run.prepared().split.train, ds.items))
    del model
    release()
    return ds.items["item_id"].astype(str).to_numpy(), emb, scorer.to_dict()


def _query_vectors(user_emb: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """The index's query for user embeddings (:meth:`Scorer.query_vectors`)."""
    return Scorer.from_dict(info).query_vectors(user_emb)


def _model_queries(run: Run, which: str, info: dict[str, Any], n: int, seed: int) -> np.ndarray:
    model = load_model(run.run_dir, which)
    users = run.dataset.users.iloc[_user_rows(run, n, seed)]
    q = model.embed("user", users, run.dataset.schema)
    del model
    return _query_vectors(q, info)


def scann_curve(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray,
                args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Index build times, and ScaNN's recall-versus-speed curve over its query-time settings
    (leaves searched, candidates re-ordered) on one built index, against brute force: the
    indexes alone, queried with embeddings (no user tower, no SavedModel)."""
    import tensorflow as tf
    from scann.scann_ops.py import scann_ops
    from tqdm.auto import tqdm

    from tfrs_coldstart.serving.index import ExactIndex, build_index, scann_params

    k = args.k
    n = len(ids)
    p = scann_params(n, vectors.shape[1], k)
    truth = ExactTruth(ExactIndex(ids, vectors), queries, k)
    log(f"  [{label}] index only: building ScaNN ({p['num_leaves']} leaves) and brute force "
        "...")
    t = time.perf_counter()
    layer = build_index(None, ids, vectors, k, "scann", p)
    scann_build = time.perf_counter() - t
    t = time.perf_counter()
    bf = build_index(None, ids, vectors, k, "brute-force")
    bf_build = time.perf_counter() - t
    m = min(args.curve_queries, len(queries))
    b = args.batch_size
    singles = [tf.constant(queries[i:i + 1], tf.float32) for i in range(m)]
    qb = tf.constant(queries[np.arange(b) % len(queries)], tf.float32)
    qall = tf.constant(queries, tf.float32)
    many_calls = max(3, args.batch_calls // 2)
    bf1 = time_calls(lambda i: bf(singles[i % m], k=k), m)
    bfb = time_calls(lambda i: bf(qb, k=k), many_calls, items_per_call=b, warmup=1)
    searcher = scann_ops.searcher_from_module(layer._serialized_searcher)  # where TFRS keeps it
    leaves_total = int(p["num_leaves"])
    leaves_grid = sorted({max(1, min(leaves_total, round(f * leaves_total)))
                          for f in args.curve_leaves})
    reorder_grid = sorted({max(k, min(n, r)) for r in args.curve_reorder})

    def search(q: Any, leaves: int, reorder: int) -> Any:
        # batch 1 too through search_batched_parallel: what the exported TFRS layer calls
        return searcher.search_batched_parallel(q, final_num_neighbors=k,
                                                pre_reorder_num_neighbors=reorder,
                                                leaves_to_search=leaves)

    points = []
    with tqdm(total=len(leaves_grid) * len(reorder_grid), desc=f"ScaNN curve {label}",
              file=sys.stderr, leave=False) as bar:
        for leaves in leaves_grid:
            for reorder in reorder_grid:
                res = search(qall, leaves, reorder)
                idx = np.clip(res.indices.numpy(), 0, n - 1)
                got = ids[idx].astype(object)
                got[np.isnan(res.distances.numpy())] = ""  # ScaNN pads short results
                one = time_calls(lambda i, lv=leaves, r=reorder: search(singles[i % m], lv, r),
                                 m)
                many = time_calls(lambda i, lv=leaves, r=reorder: search(qb, lv, r),
                                  many_calls, items_per_call=b, warmup=1)
                points.append({"leaves_to_search": leaves, "leaves_frac": leaves / leaves_total,
                               "reorder": reorder, "recall@10": truth.recall(got, min(10, k)),
                               f"recall@{k}": truth.recall(got, k),
                               "qps_batch1": one["per_s"], "p99_batch1_ms": one["p99_ms"],
                               f"qps_batch{b}": many["per_s"],
                               "speedup_batch1": one["per_s"] / bf1["per_s"]})
                bar.update(1)
    return {"k": k, "queries": len(queries), "num_leaves": leaves_total,
            "library_defaults": {kk: p[kk] for kk in ("num_leaves_to_search",
                                                      "num_reordering_candidates")},
            "scann_build_s": scann_build, "brute_force_build_s": bf_build,
            "brute_force": {"qps_batch1": bf1["per_s"], "p99_batch1_ms": bf1["p99_ms"],
                            f"qps_batch{b}": bfb["per_s"]},
            "curve": points, "load_average": load_average()}


def measure_export(path: Path, inputs: dict[str, np.ndarray], args: argparse.Namespace,
                   kind: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Size, memory, latency and throughput of one exported ``recommend`` model, loaded back;
    also its answers (item ids) and user embeddings for the ``args.queries`` users."""
    import scann  # noqa: F401  (registers the Scann ops before loading)
    import tensorflow as tf

    one = {name: v[:1].tolist() for name, v in inputs.items()}
    res: dict[str, Any] = {"path": str(path), "size_mb": dir_size(path) / 2**20,
                           "memory": (None if args.no_memory
                                      else measure_loaded_memory(path, one))}
    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    embed = loaded.signatures["embed_user"]
    b, n = args.batch_size, args.queries
    nb = math.ceil(n / b)
    batches = _tensors(inputs, serve, b, nb)
    singles = _tensors(inputs, serve, 1, min(n, args.latency_queries))
    got = np.concatenate([serve(**t)["item_ids"].numpy() for t in batches])[:n]
    user_emb = np.concatenate([embed(**t)["embedding"].numpy() for t in batches])[:n]
    res["batch1"] = time_calls(lambda i: serve(**singles[i % len(singles)]),
                               args.latency_queries, desc=f"{kind} batch 1")
    res[f"batch{b}"] = time_calls(lambda i: serve(**batches[i % nb]), args.batch_calls,
                                  items_per_call=b, warmup=1, desc=f"{kind} batch {b}")
    res["embed_user_batch1"] = time_calls(lambda i: embed(**singles[i % len(singles)]),
                                          args.latency_queries, desc="embed_user")
    return res, got, user_emb


def compare_indexes(arts: Artifacts, run: Run, which: str, exports: dict[str, Export],
                    args: argparse.Namespace) -> dict[str, Any]:
    """Recall, latency, throughput, size and memory of the exported ScaNN and brute-force
    ``recommend`` models of one run, loaded back from disk."""
    from tfrs_coldstart.serving.index import ExactIndex

    manifest = exports["scann"].manifest
    k = int(manifest["k"])
    ids, vectors, info = arts.index_vectors(run, which)
    names = _input_names(manifest)
    inputs = _user_inputs(run, names, args.queries, seed=1)
    out: dict[str, Any] = {"catalogue": run.label, "items": len(ids), "model": which,
                           "index_dim": int(vectors.shape[1]), "k": k,
                           "queries": args.queries, "index_params": manifest["index_params"],
                           "export_gate": manifest.get("ann_recall"),
                           "tuning": exports["scann"].tuning, "kinds": {},
                           "export_s": {kk: e.seconds for kk, e in exports.items()},
                           "export_phases": {kk: e.phases for kk, e in exports.items()}}
    truth = None
    for kind, exp in exports.items():
        log(f"[{run.label}] {which} {kind}: memory, latency, throughput, recall ...")
        res, got, user_emb = measure_export(exp.path, inputs, args, kind)
        if truth is None:
            truth = ExactTruth(ExactIndex(ids, vectors), _query_vectors(user_emb, info), k)
        res["recall@10"] = truth.recall(got, min(10, k))
        res[f"recall@{k}"] = truth.recall(got, k)
        res["index_params"] = exp.manifest.get("index_params")
        out["kinds"][kind] = res
        release()
    out["geometry"] = geometry(vectors, info, truth)
    bf = out["kinds"].get("brute-force")
    for kind, key in (("scann", "ratios"), ("partitioned", "ratios_partitioned")):
        s = out["kinds"].get(kind)
        if s and bf:
            out[key] = _ratios(s, bf, f"batch{args.batch_size}")
    return out


def _ratios(s: dict[str, Any], bf: dict[str, Any], bk: str) -> dict[str, Any]:
    """An approximate index relative to brute force (speed: higher is better)."""
    return {"qps_batch1": s["batch1"]["per_s"] / bf["batch1"]["per_s"],
            f"qps_{bk}": s[bk]["per_s"] / bf[bk]["per_s"],
            "p99_batch1": bf["batch1"]["p99_ms"] / s["batch1"]["p99_ms"],
            "size": s["size_mb"] / bf["size_mb"],
            "rss": (s["memory"]["rss_delta_mb"] / max(bf["memory"]["rss_delta_mb"], 1e-9)
                    if s["memory"] and bf["memory"] else None)}


def _exports(arts: Artifacts, run: Run, which: str,
             args: argparse.Namespace) -> dict[str, Export]:
    """The exports compared on one run: ScaNN, brute force and (unless
    ``--no-partitioned``) the partitioned index for the official TF Serving image, through
    the same recall gate as ScaNN."""
    out = {"scann": arts.scann_export(run, which),
           "brute-force": arts.export(run, "brute-force", which)}
    if not args.no_partitioned:
        out["partitioned"] = arts.export(run, "partitioned", which, gate=args.scann_gate)
    return out


def geometry(vectors: np.ndarray, info: dict[str, Any], truth: ExactTruth) -> dict[str, float]:
    """How hard the catalogue is for an approximate index: how tightly the item embeddings
    bunch (mean pairwise cosine, norm of their mean) and how close the exact top scores are."""
    emb = vectors[:, :-1] if info.get("prior") else vectors
    rows = np.random.default_rng(0).choice(len(emb), size=min(2000, len(emb)), replace=False)
    sample = emb[rows] / np.maximum(np.linalg.norm(emb[rows], axis=1, keepdims=True), 1e-12)
    top = truth.top_scores
    j = min(9, top.shape[1] - 1)
    return {"item_mean_pairwise_cos": float(np.mean(sample @ sample.T)),
            "item_mean_norm": float(np.linalg.norm(sample.mean(axis=0))),
            "top1_minus_top10_median": float(np.median(top[:, 0] - top[:, j])),
            "top1_median": float(np.median(top[:, 0]))}


def section_retrieval(arts: Artifacts, args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for n in args.items:
        try:
            run = arts.synthetic(n, student=_needs_student(args, n))
            res = compare_indexes(arts, run, "teacher", _exports(arts, run, "teacher", args),
                                  args)
        except Exception as e:  # noqa: BLE001 - keep the other sizes; reported as failed
            traceback.print_exc()
            errors.append({"items": n, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            continue
        if (run.label, "teacher") in arts.tunings:
            res["index_only"] = arts.tunings[(run.label, "teacher")]
        res["train"] = dict(run.timing)
        rows.append(res)
        arts.drop_vectors(run, "teacher")
    if not args.no_ml100k_retrieval:
        try:
            run = arts.ml100k()
        except Skip as e:
            log(f"retrieval on ML-100K skipped: {e}")
        else:
            for which in ("student", "teacher"):
                res = compare_indexes(arts, run, which, _exports(arts, run, which, args),
                                      args)
                rows.append(res)
                arts.drop_vectors(run, which)
    if errors and not rows:
        raise RuntimeError(f"every catalogue failed: {errors}")
    return {"rows": rows, "errors": errors}


def _needs_student(args: argparse.Namespace, n: int) -> bool:
    return n == args.serve_items and bool({"serving", "batch"} & set(args.sections))


# ---------------------------------------------------------------------------------------------
# student against teacher


def epoch_timer() -> Any:
    """A Keras callback collecting each epoch's wall time in ``.times``."""
    import tensorflow as tf

    class Timer(tf.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.times.append(time.perf_counter() - self._t)

    return Timer()


def epoch_times(run: Run, which: str, epochs: int = 2) -> list[float]:
    """Seconds per training epoch of a run's model on its training split (epoch 1 traces)."""
    import tensorflow as tf

    from tfrs_coldstart.data.pipeline import interaction_dataset, item_probabilities

    cfg = RunDir.open(run.run_dir).config
    prep = run.prepared()
    ds = run.dataset
    model = load_model(run.run_dir, which)
    mcfg = cfg.teacher if which == "teacher" else cfg.student
    df = prep.split.train
    data = interaction_dataset(df, ds.users, ds.items, ds.schema.user_features,
                               ds.schema.item_features, mcfg.batch_size, shuffle=True, seed=0,
                               item_prob=item_probabilities(df, ds.items["item_id"].astype(str)))
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=mcfg.learning_rate))
    timer = epoch_timer()
    model.fit(data, epochs=epochs, verbose=0, callbacks=[timer])
    del model
    release()
    return list(timer.times)


def time_embed_user(path: Path, inputs: dict[str, np.ndarray], args: argparse.Namespace,
                    which: str) -> dict[str, Any]:
    """Latency (batch 1) and throughput (batch ``args.batch_size``) of a loaded export's
    ``embed_user`` signature: the query tower as served."""
    import scann  # noqa: F401
    import tensorflow as tf

    b = args.batch_size
    embed = tf.saved_model.load(str(path)).signatures["embed_user"]
    singles = _tensors(inputs, embed, 1, args.latency_queries)
    batches = _tensors(inputs, embed, b, 4)
    # The floor: a function taking the same inputs that computes nothing (per-call overhead).
    specs = embed.structured_input_signature[1]
    first = next(iter(specs))
    floor = tf.function(lambda **kw: {"n": tf.shape(kw[first])[0]}).get_concrete_function(
        **specs)
    return {"embed_batch1": time_calls(lambda i: embed(**singles[i % len(singles)]),
                                       args.latency_queries, desc=f"{which} embed_user"),
            f"embed_batch{b}": time_calls(lambda i: embed(**batches[i % 4]),
                                          max(10, args.batch_calls), items_per_call=b,
                                          warmup=2),
            "call_floor_batch1": time_calls(lambda i: floor(**singles[i % len(singles)]),
                                            args.latency_queries)}


def section_towers(arts: Artifacts, args: argparse.Namespace) -> dict[str, Any]:
    """Parameters, query-tower latency/throughput (exported ``embed_user``), epoch time."""
    run = arts.ml100k() if args.towers_run == "ml100k" else arts.synthetic(
        args.items[0], student=True)
    exps = {which: arts.scann_export(run, which) for which in ("teacher", "student")}
    out: dict[str, Any] = {"dataset": run.label, "models": {}}
    b = args.batch_size
    for which in ("teacher", "student"):
        log(f"[{run.label}] {which}: parameters, query tower, epoch time ...")
        model = load_model(run.run_dir, which)
        res: dict[str, Any] = {
            "user_tower_params": model.user_tower.param_count(),
            "item_tower_params": model.item_tower.param_count(),
            "output_dim": int(model.user_tower.cfg.output_dim),
            "hidden": list(model.user_tower.cfg.hidden)}
        del model
        inputs = _user_inputs(run, _input_names(exps[which].manifest), max(b, args.queries))
        res.update(time_embed_user(exps[which].path, inputs, args, which))
        release()
        times = epoch_times(run, which)
        res["epoch_s"] = times
        res["epoch_s_steady"] = times[-1]
        res["train_interactions"] = int(len(run.prepared().split.train))
        out["models"][which] = res
    t, s = out["models"]["teacher"], out["models"]["student"]
    out["ratios"] = {
        "user_tower_params": t["user_tower_params"] / s["user_tower_params"],
        "total_params": (t["user_tower_params"] + t["item_tower_params"])
        / (s["user_tower_params"] + s["item_tower_params"]),
        "embed_p50_batch1": t["embed_batch1"]["p50_ms"] / s["embed_batch1"]["p50_ms"],
        f"embed_qps_batch{b}": s[f"embed_batch{b}"]["per_s"] / t[f"embed_batch{b}"]["per_s"],
        "epoch_s": t["epoch_s_steady"] / s["epoch_s_steady"]}
    return out


# ---------------------------------------------------------------------------------------------
# end to end


def section_e2e(arts: Artifacts, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not args.skip_default_run:
        log("[e2e] `tfrs-coldstart run --quiet` on the embedded default (what `make run` runs) "
            "...")
        run_dir = arts.work / "runs" / "default"
        res = time_command([cli_path(), "run", "--quiet", "--output", str(run_dir)],
                           arts.work / "default-run.log", arts.work)
        if res["returncode"] != 0:
            raise RuntimeError(f"tfrs-coldstart run failed:\n{res['tail']}")
        res.pop("tail")
        res.update(_fit_seconds(run_dir))
        out["default_run"] = res
    try:
        run = arts.ml100k()
    except Skip as e:
        out["ml100k"] = {"skipped": str(e)}
    else:
        out["ml100k"] = t = dict(run.timing)
        t["teacher_plus_student_fit_s"] = t["teacher_fit_s"] + t["student_fit_s"]
    return out


# ---------------------------------------------------------------------------------------------
# serving


def section_serving(arts: Artifacts, args: argparse.Namespace) -> dict[str, Any]:
    from serving import serving_benchmark, user_requests

    exports: dict[str, dict[str, Any]] = {}
    targets: list[Run] = []
    if not args.no_ml100k_serving:
        try:
            targets.append(arts.ml100k())
        except Skip as e:
            log(f"serving ML-100K skipped: {e}")
    targets.append(arts.synthetic(args.serve_items, student=True))
    for run in targets:
        models = {}
        for role in ("student", "teacher"):
            exp = arts.scann_export(run, role)
            models[exp.manifest["name"]] = user_requests(run.dataset.users, run.dataset.schema,
                                                         _input_names(exp.manifest))
        exports[run.label] = {"base": exp.base, "models": models}
    release()
    return serving_benchmark(exports, args.serve_concurrency, args.serve_seconds,
                             args.serve_warmup, args.serve_batching, arts.work)


# ---------------------------------------------------------------------------------------------
# batch retrieval


def section_batch(arts: Artifacts, args: argparse.Namespace) -> dict[str, Any]:
    try:
        from tfrs_coldstart import batch
    except ImportError as e:
        raise Skip(f"tfrs_coldstart.batch is not available ({e})") from None
    import pandas as pd

    run = arts.synthetic(args.serve_items, student=True)
    users = run.dataset.users
    rng = np.random.default_rng(7)

    def users_file(n: int, name: str) -> Path:
        rows = rng.choice(len(users), size=n, replace=True)
        df = users.iloc[rows].reset_index(drop=True).copy()
        df["user_id"] = [f"b{i:08d}" for i in range(n)]  # unseen users: the OOV id path
        path = arts.work / name
        df.to_parquet(path, index=False)
        return path

    out: dict[str, Any] = {"catalogue": run.label, "items": len(run.dataset.items), "rows": []}
    path = users_file(args.batch_users, "batch-users.parquet")
    for role in args.batch_models:
        log(f"[batch] {role}: {args.batch_users:,} users, in-process ...")
        dest = arts.work / f"recs-{role}.parquet"
        t = time.perf_counter()
        summary = batch.batch_recommend(arts.scann_export(run, role).model_dir, path, dest,
                                        k=min(args.batch_k, args.k), progress=True)
        wall = time.perf_counter() - t
        out["rows"].append({"model": role, "runner": "in-process", "users": summary.users,
                            "k": summary.k, "rows": summary.rows, "seconds": wall,
                            "users_per_s": summary.users / wall,
                            "output_mb": dest.stat().st_size / 2**20,
                            "load_average": load_average()})
        dest.unlink(missing_ok=True)
    if args.beam_users > 0:
        try:
            import apache_beam  # noqa: F401
        except ImportError:
            out["beam"] = {"skipped": "apache-beam is not installed (pip install "
                                      "'tfrs-coldstart[beam]')"}
        else:
            small = users_file(args.beam_users, "beam-users.parquet")
            for role in args.batch_models[:1]:
                log(f"[batch] {role}: {args.beam_users:,} users on Beam's DirectRunner ...")
                dest = arts.work / f"beam-{role}.parquet"
                t = time.perf_counter()
                files = batch.beam_batch_recommend(arts.scann_export(run, role).model_dir,
                                                   small, dest,
                                                   k=min(args.batch_k, args.k))
                wall = time.perf_counter() - t
                n_rows = sum(len(pd.read_parquet(f, columns=["rank"])) for f in files)
                out["rows"].append({"model": role, "runner": "beam-direct",
                                    "users": args.beam_users, "k": min(args.batch_k, args.k),
                                    "rows": n_rows,
                                    "seconds": wall, "users_per_s": args.beam_users / wall,
                                    "load_average": load_average()})
    return out


# ---------------------------------------------------------------------------------------------
# report


def goals(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each goal of issues 5 and 7: target, measured value, met or not."""
    out = []
    sec = results["sections"]
    rows = [r for r in sec.get("retrieval", {}).get("rows", []) if r["model"] == "teacher"
            and r["catalogue"].startswith("synthetic")]
    if rows:
        big = max(rows, key=lambda r: r["items"])
        s = big["kinds"]["scann"]
        tag = f"{big['items']:,} items"
        out.append({"goal": f"ScaNN recall@10 >= {GOALS['scann_recall']} ({tag})",
                    "measured": f"{s['recall@10']:.3f}",
                    "met": s["recall@10"] >= GOALS["scann_recall"]})
        r = big.get("ratios", {}).get("qps_batch1")
        if r is not None:
            out.append({"goal": f"ScaNN >= {GOALS['scann_speedup']:.0f}x brute-force queries/s "
                                f"at batch 1 ({tag})", "measured": f"{r:.1f}x",
                        "met": r >= GOALS["scann_speedup"]})
        p = big["kinds"].get("partitioned")
        if p:
            out.append({"goal": f"partitioned recall@10 >= {GOALS['partitioned_recall']} "
                                f"({tag})", "measured": f"{p['recall@10']:.3f}",
                        "met": p["recall@10"] >= GOALS["partitioned_recall"]})
            r = big.get("ratios_partitioned", {}).get("qps_batch1")
            if r is not None:
                out.append({"goal": f"partitioned >= {GOALS['partitioned_speedup']:.0f}x "
                                    f"brute-force queries/s at batch 1 ({tag})",
                            "measured": f"{r:.1f}x", "met": r >= GOALS["partitioned_speedup"]})
    tw = sec.get("towers", {})
    if "ratios" in tw:
        r = tw["ratios"]
        out.append({"goal": f"student query tower >= {GOALS['student_params']:.0f}x fewer "
                            "parameters", "measured": f"{r['user_tower_params']:.1f}x",
                    "met": r["user_tower_params"] >= GOALS["student_params"]})
        b = args.batch_size
        fast = max(r["embed_p50_batch1"], r[f"embed_qps_batch{b}"])
        out.append({"goal": f"student query tower >= {GOALS['student_speed']:.0f}x faster",
                    "measured": f"{r['embed_p50_batch1']:.2f}x (batch 1 p50), "
                                f"{r[f'embed_qps_batch{b}']:.2f}x (batch {b})",
                    "met": fast >= GOALS["student_speed"]})
    e2e = sec.get("e2e", {})
    ml = e2e.get("ml100k", {})
    if "teacher_plus_student_fit_s" in ml:
        out.append({"goal": f"ML-100K teacher + student < {GOALS['ml100k_train_s']:.0f} s",
                    "measured": f"{ml['teacher_plus_student_fit_s']:.0f} s training "
                                f"({ml['cli_wall_s']:.0f} s whole `run`)",
                    "met": ml["teacher_plus_student_fit_s"] < GOALS["ml100k_train_s"]})
    if "default_run" in e2e:
        w = e2e["default_run"]["wall_s"]
        out.append({"goal": f"`make run` < {GOALS['make_run_s']:.0f} s", "measured": f"{w:.0f} s",
                    "met": w < GOALS["make_run_s"]})
    srows = sec.get("serving", {}).get("rows", [])
    label = f"synthetic-{args.serve_items}"
    cand = [r for r in srows if r["export"] == label and r["transport"] == "grpc"
            and r["concurrency"] == 1 and "p99_ms" in r]
    if cand:  # every model and batching mode must make it
        worst = max(r["p99_ms"] for r in cand)
        out.append({"goal": f"gRPC p99 <= {GOALS['grpc_p99_ms']:.0f} ms, one user, "
                            f"{args.serve_items:,}-item ScaNN export",
                    "measured": "; ".join(f"{r['model']} {r['p99_ms']:.1f} ms (batching "
                                          f"{r['batching']})" for r in cand),
                    "met": worst <= GOALS["grpc_p99_ms"]})
    return out


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    m = results["machine"]
    b = args.batch_size
    lines = ["## Speed benchmarks", "",
             f"- command: `{m['command']}`",
             f"- machine: {m['nproc']} cores ({m['cpu_model']}), {m['memory_gb']} GB RAM, "
             f"{m['platform']}",
             f"- date: {m['date']}; total {results['seconds']:.0f} s",
             f"- load average (1/5/15 min) at start {m['load_average_start']}, at end "
             f"{m.get('load_average_end')} (the cores are shared: a load above "
             f"{m['nproc']} means other work competed with these measurements)",
             f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}", ""]
    g = results.get("goals") or []
    if g:
        lines += ["### Goals", "", md_table(["goal", "measured", "met"],
                                            [[x["goal"], x["measured"],
                                              "yes" if x["met"] else "**no**"] for x in g]), ""]
    sec = results["sections"]
    for name in SECTIONS:
        if name in sec and isinstance(sec[name], dict) and sec[name].get("error"):
            lines += [f"**{name}: failed** - `{sec[name]['error']}`", ""]
        elif name in sec and isinstance(sec[name], dict) and sec[name].get("skipped"):
            lines += [f"**{name}: skipped** - {sec[name]['skipped']}", ""]
    ret = sec.get("retrieval", {})
    for e in ret.get("errors", []):
        lines += [f"**retrieval at {e['items']:,} items failed** - `{e['error']}`", ""]
    if ret.get("rows"):
        lines += ["### Retrieval: exported ScaNN and partitioned against brute force, loaded back "
                  "from disk", "",
                  "Each model is an exported `recommend` SavedModel (user tower + top-k index, "
                  f"k = {args.k}) loaded with `tf.saved_model.load`; queries are rows of the "
                  "users table (batch 1: one user per call, in turn). Recall is against exact "
                  "search over the vectors the index holds (ties count as hits). RSS: resident "
                  "memory a fresh process gains by loading the model and answering one query. "
                  "ScaNN setting: leaves searched / leaves, candidates re-ordered; on the "
                  "synthetic catalogues the fastest setting of the curve below whose recall@k "
                  "reaches the export's recall gate (other query users than these).", ""]
        rows = []
        for r in ret["rows"]:
            ip = r["index_params"]
            for kind, x in r["kinds"].items():
                pp = x.get("index_params") or {}
                setting = (f"{ip['num_leaves_to_search']}/{ip['num_leaves']}, "
                           f"{ip['num_reordering_candidates']}" if kind == "scann"
                           else f"{pp.get('leaves_to_search')}/{pp.get('num_leaves')} leaves of "
                                f"{pp.get('leaf_size')}" if kind == "partitioned" else "exact")
                if kind == "scann" and (r.get("tuning") or {}).get("gate_lowered"):
                    setting += " (gate off: none reaches it)"
                rows.append([f"{r['catalogue']} ({r['items']:,} items, {r['index_dim']}-d)",
                             r["model"], kind, setting, x["recall@10"],
                             x["batch1"]["per_s"], x["batch1"]["p50_ms"],
                             x["batch1"]["p99_ms"], x[f"batch{b}"]["per_s"],
                             x[f"batch{b}"]["p50_ms"], x[f"batch{b}"]["p99_ms"],
                             x["size_mb"], (x["memory"] or {}).get("rss_delta_mb"),
                             (x["memory"] or {}).get("load_s")])
        lines += [md_table(["catalogue", "model", "index", "setting", "recall@10",
                            "q/s b=1", "p50 ms b=1", "p99 ms b=1", f"users/s b={b}",
                            f"p50 ms b={b}", f"p99 ms b={b}", "size MB", "RSS MB", "load s"],
                           rows), ""]
        rrows = [[f"{r['catalogue']} ({r['model']})", kind, f"{x['qps_batch1']:.1f}x",
                  f"{x[f'qps_batch{b}']:.1f}x", f"{x['p99_batch1']:.1f}x", f"{x['size']:.2f}x",
                  f"{x['rss']:.2f}x" if x["rss"] is not None else "-"]
                 for r in ret["rows"]
                 for kind, key in (("scann", "ratios"), ("partitioned", "ratios_partitioned"))
                 for x in [r.get(key)] if x]
        if rrows:
            lines += ["ScaNN and the partitioned index relative to brute force (speed: higher "
                      "is better; size and memory: index / brute force):", "",
                      md_table(["catalogue", "index", "q/s b=1", f"users/s b={b}",
                                "p99 b=1 (BF/index)", "size", "RSS"], rrows), ""]
        geo = [[f"{r['catalogue']} ({r['model']})", g["item_mean_pairwise_cos"],
                g["item_mean_norm"], g["top1_median"], g["top1_minus_top10_median"]]
               for r in ret["rows"] for g in [r.get("geometry")] if g]
        if geo:
            lines += ["How hard each catalogue is for an approximate index: item embeddings "
                      "bunched in a narrow cone (mean pairwise cosine near 1) and exact top-10 "
                      "scores that differ by less than the index's quantisation error need "
                      "more leaves searched and more re-ordering:", "",
                      md_table(["catalogue", "mean pairwise cos (items)",
                                "norm of mean item", "top-1 score (median)",
                                "top-1 minus top-10 (median)"], geo), ""]
        io_rows = []
        for r in ret["rows"]:
            io = r.get("index_only")
            if not io:
                continue
            ch = (r.get("tuning") or {}).get("chosen")
            x = r["kinds"]["scann"]
            io_rows.append([f"{r['items']:,}", io["scann_build_s"], io["brute_force_build_s"],
                            r["export_s"]["scann"], r["export_s"]["brute-force"],
                            ch["qps_batch1"] if ch else None, io["brute_force"]["qps_batch1"],
                            ch["speedup_batch1"] if ch else None,
                            x["embed_user_batch1"]["p50_ms"], x["batch1"]["p50_ms"],
                            r["kinds"]["brute-force"]["batch1"]["p50_ms"]])
        if io_rows:
            lines += ["Index build and export times; the indexes alone (queried with "
                      "embeddings: no SavedModel, no user tower) at the exported setting; and "
                      "where the served batch-1 time goes (the user tower alone is the "
                      "`embed_user` signature):", "",
                      md_table(["items", "ScaNN build s", "BF build s", "ScaNN export s",
                                "BF export s", "ScaNN q/s b=1", "BF q/s b=1", "ratio",
                                "embed_user p50 ms", "ScaNN recommend p50 ms",
                                "BF recommend p50 ms"], io_rows), ""]
        for r in ret["rows"]:
            io = r.get("index_only")
            if not io:
                continue
            ch = (r.get("tuning") or {}).get("chosen") or {}
            d = io["library_defaults"]
            k = io["k"]
            lines += [f"ScaNN query-time settings, {r['items']:,} items, {io['num_leaves']} "
                      f"leaves, {io['queries']} query users (* = exported; library default: "
                      f"{d['num_leaves_to_search']} leaves, {d['num_reordering_candidates']} "
                      "re-ordered):", "",
                      md_table(["leaves searched", "re-ordered", "recall@10",
                                *([f"recall@{k}"] if k != 10 else []), "q/s b=1",
                                "x BF b=1", "p99 ms b=1", f"q/s b={b}"],
                               [[f"{p['leaves_to_search']} ({p['leaves_frac']:.0%})"
                                 + (" *" if (p["leaves_to_search"], p["reorder"])
                                    == (ch.get("leaves_to_search"), ch.get("reorder")) else ""),
                                 p["reorder"], p["recall@10"],
                                 *([p[f"recall@{k}"]] if k != 10 else []), p["qps_batch1"],
                                 p["speedup_batch1"], p["p99_batch1_ms"], p[f"qps_batch{b}"]]
                                for p in io["curve"]]), ""]
    tw = sec.get("towers", {})
    if tw.get("models"):
        rows = []
        for which, x in tw["models"].items():
            rows.append([which, x["user_tower_params"], x["item_tower_params"],
                         x["embed_batch1"]["p50_ms"], x["embed_batch1"]["p99_ms"],
                         x["embed_batch1"]["per_s"], x[f"embed_batch{b}"]["per_s"],
                         ", ".join(f"{t:.3g}" for t in x["epoch_s"])])
        r = tw["ratios"]
        rows.append(["teacher / student", f"{r['user_tower_params']:.1f}x",
                     f"{r['total_params']:.1f}x (both towers)",
                     f"{r['embed_p50_batch1']:.2f}x", "", "",
                     f"{r[f'embed_qps_batch{b}']:.2f}x", f"{r['epoch_s']:.2f}x"])
        floor = tw["models"]["student"].get("call_floor_batch1")
        if floor:
            rows.append(["(call floor: same inputs, no computation)", "", "", floor["p50_ms"],
                         floor["p99_ms"], floor["per_s"], "", ""])
        lines += [f"### Student against teacher ({tw['dataset']})", "",
                  "Query tower = the exported `embed_user` signature, loaded back. Epoch "
                  "times: the first epoch includes tracing; training on the whole training "
                  "split, the student including its distillation term (the frozen teacher's "
                  "embeddings are computed once per fit).",
                  "", md_table(["model", "user tower params", "item tower params",
                                "p50 ms b=1", "p99 ms b=1", "q/s b=1", f"users/s b={b}",
                                "epoch s (1st, 2nd)"], rows), ""]
    e2e = sec.get("e2e", {})
    if e2e and not e2e.get("error"):
        rows = []
        if "default_run" in e2e:
            d = e2e["default_run"]
            rows.append(["`tfrs-coldstart run --quiet` (embedded default = `make run`)",
                         d["wall_s"], d.get("teacher_fit_s"), d.get("student_fit_s"),
                         f"{d.get('teacher_epochs')}, {d.get('student_epochs')}"])
        ml = e2e.get("ml100k", {})
        if "cli_wall_s" in ml:
            rows.append(["`tfrs-coldstart run --quiet --data-dir ml-100k`", ml["cli_wall_s"],
                         ml["teacher_fit_s"], ml["student_fit_s"],
                         f"{ml['teacher_epochs']}, {ml['student_epochs']}"])
        if rows:
            lines += ["### End to end", "",
                      "Wall time of the whole command (data, split, training with early "
                      "stopping, evaluation, report); fit seconds from the run's history "
                      "(student: search + refit).", "",
                      md_table(["command", "wall s", "teacher fit s", "student fit s",
                                "epochs (teacher, student)"], rows), ""]
    srv = sec.get("serving", {})
    if srv.get("rows"):
        rows = [[r["export"], r["model"], r["transport"], r["batching"], r["concurrency"],
                 r.get("p50_ms"), r.get("p99_ms"), r.get("per_s"), r["errors"],
                 "/".join(f"{x:.1f}" for x in r["load_average"][:1])]
                for r in srv["rows"]]
        lines += ["### Serving: local TF-Serving-compatible server (`tfrs-coldstart serve`)", "",
                  "One user per request (`client.recommend`), closed loop: each of N threads "
                  "sends its next request when the answer arrives. Server in a child process "
                  "on 127.0.0.1; client and server share the machine's cores. Batching on = "
                  "`serving/batching.config`.", "",
                  md_table(["export", "model", "API", "batching", "concurrency", "p50 ms",
                            "p99 ms", "req/s", "errors", "load 1m"], rows), ""]
    bt = sec.get("batch", {})
    if bt.get("rows"):
        rows = [[r["runner"], r["model"], r["users"], r["k"], r["seconds"], r["users_per_s"]]
                for r in bt["rows"]]
        lines += [f"### Batch retrieval ({bt['items']:,}-item ScaNN export)", "",
                  "Users table (Parquet) -> top-k Parquet, model load included.", "",
                  md_table(["runner", "model", "users", "k", "seconds", "users/s"], rows), ""]
        if "beam" in bt:
            lines += [f"Beam: {bt['beam'].get('skipped')}", ""]
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> str:
    """Write one chart and free it; returns the file name for the report."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(results: dict[str, Any], out: Path, args: argparse.Namespace) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    b = args.batch_size
    rows = [r for r in results["sections"].get("retrieval", {}).get("rows", [])
            if r.get("index_only")]
    if rows:
        fig, ax = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4.5), squeeze=False)
        for a, r in zip(ax[0], rows, strict=True):
            io = r["index_only"]
            for reorder in sorted({p["reorder"] for p in io["curve"]}):
                pts = sorted((p for p in io["curve"] if p["reorder"] == reorder),
                             key=lambda p: p["leaves_to_search"])
                a.plot([p["qps_batch1"] for p in pts], [p["recall@10"] for p in pts], "o-",
                       label=f"re-order {reorder}")
            ch = (r.get("tuning") or {}).get("chosen")
            ex = [p for p in io["curve"] if ch and (p["leaves_to_search"], p["reorder"])
                  == (ch["leaves_to_search"], ch["reorder"])]
            if ex:
                a.plot([ex[0]["qps_batch1"]], [ex[0]["recall@10"]], "k*", ms=14,
                       label="exported setting")
            a.axvline(io["brute_force"]["qps_batch1"], color="grey", ls="--",
                      label="brute force (recall 1)")
            a.axhline(GOALS["scann_recall"], color="red", ls=":", lw=1)
            a.set_xscale("log")
            a.set_xlabel("queries/s, batch 1 (index only)")
            a.set_ylabel("recall@10 vs exact")
            a.set_title(f"ScaNN, {r['items']:,} items, {io['num_leaves']} leaves "
                        "(points: leaves searched)")
            a.legend(fontsize=8)
        made.append(_save(fig, out / "recall_vs_speed.png"))
    rrows = [r for r in results["sections"].get("retrieval", {}).get("rows", [])
             if {"scann", "brute-force"} <= set(r.get("kinds", {}))]
    if rrows:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [f"{r['catalogue']}\n{r['model']}" for r in rrows]
        x = np.arange(len(rrows))
        for a, key, title in ((ax[0], "batch1", "queries/s, batch 1"),
                              (ax[1], f"batch{b}", f"users/s, batch {b}")):
            kinds = [kd for kd in ("scann", "partitioned", "brute-force")
                     if all(kd in r["kinds"] for r in rrows)]
            w = 0.8 / len(kinds)
            for j, kind in enumerate(kinds):
                a.bar(x + (j - (len(kinds) - 1) / 2) * w,
                      [r["kinds"][kind][key]["per_s"] for r in rrows], w, label=kind)
            a.set_xticks(x, labels, fontsize=8)
            a.set_yscale("log")
            a.set_title(f"exported recommend, loaded back: {title}")
            a.legend()
        made.append(_save(fig, out / "retrieval_throughput.png"))
    srows = results["sections"].get("serving", {}).get("rows", [])
    if srows:
        groups = sorted({(r["export"], r["batching"]) for r in srows})
        fig, ax = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False)
        for a, (exp, mode) in zip(ax[0], groups, strict=True):
            for model in sorted({r["model"] for r in srows if r["export"] == exp}):
                for tr, style in (("grpc", "-"), ("rest", "--")):
                    pts = sorted((r for r in srows if r["export"] == exp and r["batching"] == mode
                                  and r["model"] == model and r["transport"] == tr
                                  and "p99_ms" in r), key=lambda r: r["concurrency"])
                    if pts:
                        a.plot([r["concurrency"] for r in pts], [r["p99_ms"] for r in pts],
                               "o" + style, label=f"{model} {tr} p99")
            a.axhline(GOALS["grpc_p99_ms"], color="red", ls=":", lw=1)
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xlabel("concurrent clients")
            a.set_ylabel("p99 latency, ms")
            a.set_title(f"{exp}, batching {mode}")
            a.legend(fontsize=8)
        made.append(_save(fig, out / "serving_latency.png"))
    return made


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sizes default to the full benchmark; --quick shrinks "
                                       "every size not given explicitly.")
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--items", help=f"synthetic catalogue sizes (default {FULL['items']})")
    p.add_argument("--dim", type=int, default=64, help="teacher embedding width (default 64)")
    p.add_argument("--dense-dim", type=int, default=0,
                   help="give synthetic items a dense content vector of this width (default 0: "
                        "the embedded default data)")
    p.add_argument("--k", type=int, default=10,
                   help="results per query of every export (default 10: the goal's recall@10)")
    p.add_argument("--scann-gate", type=float, default=0.95,
                   help="the exports' ANN-recall gate (recall@k against exact, default 0.95)")
    p.add_argument("--scann-auto", action="store_true",
                   help="export ScaNN with the library's own defaults and gate tuning instead "
                        "of the fastest setting of the measured curve")
    p.add_argument("--tune-queries", type=int, help="query users for the ScaNN curve")
    p.add_argument("--tune-min-items", type=int, default=20_000,
                   help="smaller catalogues use the library's ScaNN defaults (default 20000)")
    p.add_argument("--users", type=int, help="synthetic users (training the tiny runs)")
    p.add_argument("--interactions", type=int, help="synthetic interactions")
    p.add_argument("--teacher-epochs", type=int,
                   help="epochs of the synthetic runs' teacher (early stopping on validation)")
    p.add_argument("--queries", type=int, help="query users for recall and batch timing")
    p.add_argument("--latency-queries", type=int, help="sequential single-user calls timed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batch-calls", type=int, help="batched calls timed")
    p.add_argument("--curve-leaves", help="fractions of the leaves searched, for the curve")
    p.add_argument("--curve-reorder", help="re-ordering candidate counts, for the curve")
    p.add_argument("--curve-queries", type=int, help="queries timed per curve point")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the resident-memory measurement (a child process per model)")
    p.add_argument("--ml100k", default=str(ml100k_default()), help="MovieLens-100K folder")
    p.add_argument("--no-ml100k-retrieval", action="store_true")
    p.add_argument("--no-partitioned", action="store_true",
                   help="retrieval: skip the partitioned index (stock TF Serving) export")
    p.add_argument("--no-ml100k-serving", action="store_true")
    p.add_argument("--towers-run", choices=["ml100k", "synthetic"], default="ml100k",
                   help="dataset of the student/teacher comparison")
    p.add_argument("--skip-default-run", action="store_true",
                   help="e2e: do not time `tfrs-coldstart run` on the embedded default")
    p.add_argument("--serve-items", type=int,
                   help="synthetic catalogue served and batch-scored (default: largest --items)")
    p.add_argument("--serve-concurrency", help="concurrent clients (default 1,8,32)")
    p.add_argument("--serve-seconds", type=float, help="measured seconds per serving cell")
    p.add_argument("--serve-warmup", type=float, help="warm-up seconds per serving cell")
    p.add_argument("--serve-batching", help="server batching modes: off,on")
    p.add_argument("--batch-users", type=int, help="users scored by batch retrieval")
    p.add_argument("--batch-models", default="student", help="models for batch retrieval")
    p.add_argument("--batch-k", type=int, default=100)
    p.add_argument("--beam-users", type=int, help="users for the Beam DirectRunner (0: skip)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed"))
    p.add_argument("--workdir", help="where runs and exports go (default: a temporary folder)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder")
    p.add_argument("--render", action="store_true",
                   help="only rebuild report.md, goals and plots from OUT/results.json")
    return p


def resolve_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.items = parse_int_list(args.items)
    args.curve_leaves = parse_float_list(args.curve_leaves)
    args.curve_reorder = parse_int_list(args.curve_reorder)
    args.serve_concurrency = parse_int_list(args.serve_concurrency)
    args.serve_batching = [m.strip() for m in args.serve_batching.split(",") if m.strip()]
    args.batch_models = [m.strip() for m in args.batch_models.split(",") if m.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"error: unknown section(s) {bad}; choose from {list(SECTIONS)}")
    if any(m not in ("off", "on") for m in args.serve_batching):
        raise SystemExit("error: --serve-batching takes off, on or off,on")
    if not args.items:
        raise SystemExit("error: --items needs at least one size")
    if args.serve_items is None:
        args.serve_items = max(args.items)
    return args


RUNNERS = {"retrieval": section_retrieval, "towers": section_towers, "e2e": section_e2e,
           "serving": section_serving, "batch": section_batch}


def render(out: Path) -> int:
    """Rebuild goals, plots and report.md from a finished run's results.json."""
    results = json.loads((out / "results.json").read_text())
    write_reports(results, out, argparse.Namespace(**results["args"]))
    return 0


def write_reports(results: dict, out: Path, args: argparse.Namespace) -> None:
    """Goals and plots into ``results.json``, then ``report.md``; the table is printed too."""
    results["goals"] = goals(results, args)
    results["plots"] = plots(results, out, args)
    write_json(out / "results.json", results)
    text = markdown(results, args)
    write_text(out / "report.md", text + "\n")
    print(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_args(argv)
    if args.render:
        return render(Path(args.out))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tfrs-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    cmd = ["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)]
    results: dict[str, Any] = {"machine": machine_info(cmd), "goals_targets": GOALS,
                               "args": {k: v for k, v in vars(args).items()}, "sections": {}}
    log(f"work folder: {work}")
    arts = Artifacts(args, work)
    t0 = time.perf_counter()
    failed = False
    try:
        for name in args.sections:
            log(f"=== {name} (load average {load_average()}) ===")
            t = time.perf_counter()
            try:
                res = RUNNERS[name](arts, args)
            except Skip as e:
                log(f"{name} skipped: {e}")
                res = {"skipped": str(e)}
            except Exception as e:  # noqa: BLE001 - record it, run the other sections
                failed = True
                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                       if str(e) else type(e).__name__,
                       "traceback": traceback.format_exc()}
            res["section_s"] = time.perf_counter() - t
            res["load_average_end"] = load_average()
            results["sections"][name] = res
            # partial results survive a crash or Ctrl-C in a later section
            write_json(out / "results.json", {**results, "partial": True})
    finally:
        results["seconds"] = time.perf_counter() - t0
        results["machine"]["load_average_end"] = load_average()
        if not args.keep_work and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    write_reports(results, out, args)
    log(f"results: {out / 'results.json'}, {out / 'report.md'}, plots {results['plots']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
