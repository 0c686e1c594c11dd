"""Scale benchmark (issue 16, item 4): peak memory and examples/s of the streamed input
(``data/stream.py``) against the in-memory path, at 1M, 5M and 20M interactions of 1M users
and 1M items (synthetic).

What one measurement is, each in a child process of its own (so one size's allocations do not
flatter the next), at ``nice 19``:

- ``stream``: the users and items tables read and validated, the one streaming pass
  (:func:`~tfrs_coldstart.data.stream.scan_interactions`: vocabularies, counts, the cold-start
  and validation splits), then ``--steps`` batches of the teacher's input pipeline (its rows:
  the split's training part minus the validation warm test, as ``training.fit_teacher``)
  read shard by shard.
- ``memory``: what ``tfrs-coldstart run --format tables`` does: the tables and every
  interaction loaded and validated (``load_tables``), the split and the validation split in
  memory (``cold_start_split``, ``validation_split``), then ``--steps`` batches of
  ``interaction_dataset`` over the teacher's rows.
- ``run-stream``: the WHOLE ``tfrs-coldstart run --format stream --data-dir <view> --output
  <run folder> --quiet`` (data, split, teacher, validation teacher, student, evaluation,
  report), with small settings (:data:`RUN_OVERRIDES`: one teacher epoch, 16-wide towers,
  the ridge student, teacher batch ``--batch-size``; ``--run-set`` adds more) and
  ``--set eval.max_users=N`` (``--run-eval-max-users``: each segment evaluated on a seeded
  sample of at most N users; 0 passes nothing). The child calls ``cli.main`` in-process, so
  its ``VmHWM`` is the command's peak (the command starts no processes of its own; the
  parent's 0.5 s polls of the process tree are kept beside it as ``polled_peak_rss_mb``).
  Recorded: peak RSS, wall seconds, each phase's seconds (from the run's log), recall@20
  per model and segment from ``report.json``, and the run folder's size (then removed
  unless ``--keep-runs``).
- ``run-memory``: the same command with ``--format tables``. ``tables`` reads ONE
  interactions file (``load_dataset`` looks for ``interactions.{csv,tsv,parquet,pq}`` in the
  data folder, not a folder of shards), so the first N shards are also written as one
  ``interactions.parquet`` (streamed shard by shard) into the size's view folder
  (``<data>/views/first_<N>/``: links to the users and items tables, the schema and the first
  N shards under ``interactions/``, which is what ``--format stream`` reads).

Peak RSS is the child's ``VmHWM`` (``/proc/self/status``); examples/s counts the interactions
in the batches after ``--warmup`` batches (the shuffle buffer's first fill). The parent caps a
child's resident memory (``--max-rss-gb``: the cores and memory are shared) and records a
child killed at the cap as "did not fit"; each child's log goes to ``<workdir>/logs/``.
The interactions are written once into ``--workdir`` as ``--shard-rows``-row Parquet shards
(default 1M) by a vectorised generator (``data/synthetic.py`` builds realistic features but
takes minutes at these sizes); the first N shards are the N-row dataset.

    python benchmarks/scale.py                         # make bench-scale
    python benchmarks/scale.py --sizes 1000000 --paths stream --steps 50
    python benchmarks/scale.py --paths run-stream,run-memory --append --workers-epochs 0
    python benchmarks/scale.py --render                # report from results.json again
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402
from common import (  # noqa: E402
    REPO,
    load_average,
    log,
    machine_info,
    md_table,
    write_json,
    write_text,
)

import tfrs_coldstart  # noqa: E402, F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tfrs_coldstart import cli  # noqa: E402
from tfrs_coldstart.config import EvalConfig  # noqa: E402
from tfrs_coldstart.console import memory_mb  # noqa: E402
from tfrs_coldstart.data import Schema, cold_start_split, validation_split  # noqa: E402
from tfrs_coldstart.data.pipeline import interaction_dataset, item_probabilities  # noqa: E402
from tfrs_coldstart.data.stream import scan_interactions  # noqa: E402
from tfrs_coldstart.data.tables import feature_table, load_tables, read_table  # noqa: E402

SHARD_ROWS = 1_000_000  # the default --shard-rows
EPOCHS = 50  # the measured batches may run past an epoch (1M interactions: 541,792 rows each)
SCHEMA = {"user_features": [{"name": "segment", "type": "categorical"},
                            {"name": "activity", "type": "numeric"}],
          "item_features": [{"name": "category", "type": "categorical"},
                            {"name": "price", "type": "numeric"}]}
# The whole-run paths' settings: small enough for 1M interactions of 1M users and 1M items on
# 2 shared cores in minutes (the teacher's batch is --batch-size, added in main).
RUN_OVERRIDES = ["teacher.epochs=1", "teacher.patience=100", "student.method=ridge",
                 "teacher.tower.id_dim=16", "teacher.tower.output_dim=16",
                 "teacher.tower.hidden=[32]"]
RUN_K = 20  # the recall@K a whole run records per segment
RUN_FORMATS = {"run-stream": "stream", "run-memory": "tables"}
SEGMENTS = ("warm", "cold_item", "cold_user", "cold_both")


# ---- data ---------------------------------------------------------------------------------


def write_data(workdir: Path, n_users: int, n_items: int, n_interactions: int,
               seed: int = 0, shard_rows: int = SHARD_ROWS) -> Path:
    """Users, items, schema and ``ceil(n / shard_rows)`` interaction shards under ``workdir``
    (kept: a later run with the same sizes reuses them). Returns the data folder."""
    root = workdir / (f"data_{n_users}u_{n_items}i" if shard_rows == SHARD_ROWS
                      else f"data_{n_users}u_{n_items}i_{shard_rows}r")
    shards = root / "interactions"
    shards.mkdir(parents=True, exist_ok=True)
    user_ids = pa.array([f"u{k:07d}" for k in range(n_users)])
    item_ids = pa.array([f"i{k:07d}" for k in range(n_items)])
    rng = np.random.default_rng(seed)
    if not (root / "users.parquet").is_file():
        pq.write_table(pa.table({
            "user_id": user_ids,
            "segment": pc.take(pa.array([f"s{k}" for k in range(12)]),
                               rng.integers(0, 12, n_users)),
            "activity": rng.gamma(2.0, 1.0, n_users).astype(np.float32)}),
            root / "users.parquet")
        pq.write_table(pa.table({
            "item_id": item_ids,
            "category": pc.take(pa.array([f"c{k:03d}" for k in range(200)]),
                                rng.integers(0, 200, n_items)),
            "price": rng.lognormal(3.0, 1.0, n_items).astype(np.float32)}),
            root / "items.parquet")
        (root / "schema.yaml").write_text(yaml.safe_dump(SCHEMA, sort_keys=False))
    # Item popularity: a power law over a fixed random order of the items.
    popular = np.random.default_rng(seed + 1).permutation(n_items)
    for k in range(-(-n_interactions // shard_rows)):
        path = shards / f"part-{k:05d}.parquet"
        if path.is_file():
            continue
        r = np.random.default_rng([seed, k])
        u = r.integers(0, n_users, shard_rows)
        i = popular[(n_items * r.random(shard_rows) ** 3).astype(np.int64)]
        ts = 1_600_000_000 + np.sort(r.integers(0, 86_400, shard_rows)) + 86_400 * k
        table = pa.table({"user_id": pc.take(user_ids, u), "item_id": pc.take(item_ids, i),
                          "timestamp": ts.astype(np.int64)})
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, row_group_size=128 * 1024)
        tmp.rename(path)
        log(f"  wrote {path}")
    return root


def data_view(root: Path, size: int, shard_rows: int, one_table: bool) -> Path:
    """``<root>/views/first_<size>/``: what ``tfrs-coldstart run --data-dir`` reads at one
    size: links to the users and items tables and the schema, ``interactions/`` of links to
    the first ``size / shard_rows`` shards (``--format stream``) and, with ``one_table``,
    those shards as one ``interactions.parquet`` (``--format tables`` reads one file),
    written a shard at a time. Kept for later runs."""
    view = root / "views" / f"first_{size}"
    links = view / "interactions"
    links.mkdir(parents=True, exist_ok=True)
    for name in ("users.parquet", "items.parquet", "schema.yaml"):
        if not (view / name).is_symlink():
            (view / name).symlink_to((root / name).resolve())
    shards = [(root / "interactions" / f"part-{k:05d}.parquet").resolve()
              for k in range(size // shard_rows)]
    for shard in shards:
        if not (links / shard.name).is_symlink():
            (links / shard.name).symlink_to(shard)
    one = view / "interactions.parquet"
    if one_table and not one.is_file():
        tmp = view / "interactions.parquet.tmp"
        writer = None
        for shard in shards:
            table = pq.read_table(shard)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=128 * 1024)
        assert writer is not None
        writer.close()
        tmp.rename(one)
        log(f"  wrote {one} ({len(shards)} shards as one table, for --format tables)")
    return view


# ---- one measurement (child process) ------------------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One path at one size; returns the measurements (printed as JSON by ``--child``)."""
    if spec["path"] in RUN_FORMATS:
        return run_cli(spec)
    root = Path(spec["data"])
    n_shards = spec["interactions"] // spec.get("shard_rows", SHARD_ROWS)
    shards = [str(root / "interactions" / f"part-{k:05d}.parquet") for k in range(n_shards)]
    schema = Schema.from_yaml(root / "schema.yaml")
    out: dict[str, Any] = {"path": spec["path"], "interactions": spec["interactions"],
                           "rss_start_mb": memory_mb("VmRSS")}
    t0 = time.perf_counter()
    if spec["path"] in ("stream", "stream-nocache"):
        users = feature_table(*read_table(root / "users.parquet", "users"), "user",
                              schema.user_features)
        items = feature_table(*read_table(root / "items.parquet", "items"), "item",
                              schema.item_features)
        out["tables_s"] = time.perf_counter() - t0
        out["rss_tables_mb"] = memory_mb("VmRSS")
        t = time.perf_counter()
        scan = scan_interactions(shards, users, items, schema, chunk_rows=spec["chunk_rows"],
                                 shuffle_buffer=spec["shuffle_buffer"],
                                 cache=spec["path"] == "stream")
        out["prepare_s"] = time.perf_counter() - t
        out["train_rows"] = scan.n_rows("teacher")
        data = scan.dataset("teacher", batch_size=spec["batch_size"], epochs=(0, EPOCHS),
                            seed=0)
    else:
        frames = [pd.read_parquet(s) for s in shards]
        inter = pd.concat(frames, ignore_index=True)
        del frames
        ds = load_tables(inter, root / "users.parquet", root / "items.parquet", schema)
        del inter
        out["tables_s"] = time.perf_counter() - t0
        out["rss_tables_mb"] = memory_mb("VmRSS")
        t = time.perf_counter()
        split = cold_start_split(ds.interactions, ds.users["user_id"], ds.items["item_id"])
        v = validation_split(split)
        train_df = pd.concat([v.train, v.cold_item, v.cold_user, v.cold_both])
        prob = item_probabilities(train_df, ds.items["item_id"].astype(str))
        out["prepare_s"] = time.perf_counter() - t
        out["train_rows"] = len(train_df)
        data = interaction_dataset(train_df, ds.users, ds.items, schema.user_features,
                                   schema.item_features, spec["batch_size"], shuffle=True,
                                   seed=0, item_prob=prob, epochs=(0, EPOCHS))
    out["rss_prepared_mb"] = memory_mb("VmRSS")
    it = iter(data)
    t = time.perf_counter()
    for _ in range(spec["warmup"]):
        next(it)
    out["warmup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    for _ in range(spec["steps"]):
        n += int(next(it)["item_prob"].shape[0])
    out["steps_s"] = time.perf_counter() - t
    out["examples"] = n
    out["examples_per_s"] = n / out["steps_s"]
    out["total_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = memory_mb()
    out["load_average"] = load_average()
    return out


def run_cli(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole ``tfrs-coldstart run`` in this process (``cli.main``), then its ``VmHWM``,
    wall time, recall@K per model and segment (``report.json``) and run folder size."""
    run_dir = Path(spec["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    argv = ["run", "--format", RUN_FORMATS[spec["path"]], "--data-dir", spec["view"],
            "--output", str(run_dir), "--quiet"]
    for o in spec["overrides"]:
        argv += ["--set", o]
    out: dict[str, Any] = {"path": spec["path"], "interactions": spec["interactions"],
                           "argv": argv, "rss_start_mb": memory_mb("VmRSS")}
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout: only this function's JSON
        code = cli.main(argv)
    out["wall_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = memory_mb()
    out["load_average"] = load_average()
    if code:
        raise SystemExit(code)
    # Imported after the run, which has loaded it: a module top import would add the model
    # modules to the input-pipeline children's baseline RSS.
    from tfrs_coldstart.runs import RunDir

    report = json.loads((run_dir / "report.json").read_text())
    key = f"recall@{RUN_K}"
    out["run_seconds"] = report.get("seconds")
    out["recall"] = {m: {s: v.get(key) for s, v in segs.items() if isinstance(v, dict)}
                     for m, segs in report.get("models", {}).items()}
    out["eval_users"] = {m: {s: v.get("users") for s, v in segs.items() if isinstance(v, dict)}
                         for m, segs in report.get("models", {}).items()}
    out["mixed_recall"] = {m: v.get(key) for m, v in report.get("mixed", {}).items()}
    out["split"] = report.get("protocol", {}).get("segments", {}).get("interactions")
    use = RunDir(run_dir).disk_usage()
    out["run_dir_mb"] = use.pop("total") / 2**20
    out["run_dir_parts_mb"] = {k: round(v / 2**20, 2) for k, v in use.items()}
    if not spec.get("keep_runs"):
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


_PHASE = re.compile(r"^\[(.+?)\] done in ([0-9.]+) s(?:, peak RSS ([0-9,]+) MB)?$")


def run_child(spec: dict[str, Any], max_rss_gb: float, log_dir: Path) -> dict[str, Any]:
    """``child(spec)`` at nice 19 in a fresh interpreter, killed if it passes the RSS cap;
    its stderr goes to ``log_dir/<path>-<size>.log`` (a file, not a pipe the poll loop would
    not drain)."""
    cmd = ["nice", "-n", "19", sys.executable, __file__, "--child", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if spec["path"] in RUN_FORMATS:
        env["TFRS_COLDSTART_DEBUG"] = "1"  # a failure in the run shows its traceback
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec['path']}-{spec['interactions']}.log"
    with open(log_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                                env=env)
        row = _watch(proc, spec, max_rss_gb)
    stderr = log_path.read_text(errors="replace")
    row["log"] = str(log_path)
    if spec["path"] in RUN_FORMATS:
        phases: dict[str, float] = {}
        peaks: dict[str, float] = {}
        for line in stderr.splitlines():
            m = _PHASE.match(line.strip())
            if m:
                phases[m[1]] = phases.get(m[1], 0.0) + float(m[2])
                if m[3]:  # the run's peak RSS so far when the phase ended
                    peaks[m[1]] = float(m[3].replace(",", ""))
        row["phases_s"] = phases
        row["phase_peak_rss_mb"] = peaks
    if "error" in row and "did not fit" not in row["error"]:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else row["error"]
        row["error"] = f"{last} (log: {log_path})"
    return row


def _watch(proc: subprocess.Popen[str], spec: dict[str, Any], max_rss_gb: float
           ) -> dict[str, Any]:
    """Poll ``proc``'s process tree until it ends or passes the RSS cap; its JSON row (with
    the polled peak) or an error row."""
    cap = max_rss_gb * 2**30
    peak = 0
    killed = False
    start = time.time()
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [psutil.Process(proc.pid),
                                                    *psutil.Process(proc.pid).children(True)])
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        if rss > cap:
            killed = True
            proc.kill()
            break
        time.sleep(0.5)
    stdout, _ = proc.communicate()
    if killed:
        return {**_spec_row(spec), "error": f"over the {max_rss_gb:g} GB cap (killed at "
                f"{peak / 2**30:.1f} GB after {time.time() - start:.0f} s): did not fit",
                "peak_rss_mb": peak / 2**20}
    if proc.returncode != 0:
        return {**_spec_row(spec), "error": f"exit {proc.returncode}",
                "seconds_to_failure": time.time() - start}
    return {**json.loads(stdout.strip().splitlines()[-1]), "polled_peak_rss_mb": peak / 2**20}


def _spec_row(spec: dict[str, Any]) -> dict[str, Any]:
    return {"path": spec["path"], "interactions": spec["interactions"]}


# ---- 2 workers against 1 (issue 16, item 2) -----------------------------------------------


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sk in socks:
        sk.bind(("localhost", 0))
    ports = [sk.getsockname()[1] for sk in socks]
    for sk in socks:
        sk.close()
    return ports


def workers_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher-fit throughput of 2 local workers (``train.strategy=multi_worker``,
    ``TF_CONFIG`` on localhost, CPU collectives) against 1 process, on the embedded synthetic
    default (in memory: the same data for both), a fixed number of epochs each.

    Both share this machine's 2 cores, so the ratio says what the collectives cost when the
    workers cannot run in parallel on more hardware, not how a cluster scales.
    """
    if args.workers_epochs <= 0:
        return {"status": "skipped (--workers-epochs 0)"}
    overrides = ["--set", f"teacher.epochs={args.workers_epochs}", "--set", "teacher.patience=100",
                 "--set", "student.method=ridge"]
    cmd = [sys.executable, "-m", "tfrs_coldstart.cli", "train", *overrides]
    work = Path(args.workdir) / "workers"
    out: dict[str, Any] = {"epochs": args.workers_epochs, "data": "embedded synthetic default"}
    for n in (1, 2):
        runs = []
        ports = _free_ports(n)
        for i in range(n):
            env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
            argv = [*cmd, "--output", str(work / f"w{n}"), "--quiet"]
            if n > 1:
                env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}"
                                                                      for p in ports]},
                                               "task": {"type": "worker", "index": i}})
                argv += ["--set", "train.strategy=multi_worker"]
            runs.append((argv, env))
        if (work / f"w{n}").exists():
            subprocess.run(["rm", "-rf", str(work / f"w{n}")], check=True)
        log(f"teacher fit with {n} worker(s), {args.workers_epochs} epochs ...")
        t = time.time()
        procs = [subprocess.Popen(a, cwd=REPO, env=e, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for a, e in runs]
        errs = [pr.communicate(timeout=3600)[1] for pr in procs]
        if any(pr.returncode for pr in procs):
            return {"status": f"failed with {n} worker(s): {errs[0][-800:]}"}
        hist = json.loads((work / f"w{n}" / "teacher" / "history.json").read_text())
        rows = json.loads((work / f"w{n}" / "report.json").read_text()).get("data", {})
        out[f"workers_{n}"] = {"teacher_fit_s": hist["seconds"], "epochs": hist["epochs_run"],
                               "seconds_per_epoch": hist["seconds"] / hist["epochs_run"],
                               "wall_s": time.time() - t, "report_data": rows}
    out["ratio"] = (out["workers_1"]["seconds_per_epoch"]
                    / out["workers_2"]["seconds_per_epoch"])
    out["load_average_end"] = load_average()
    return out


# ---- report -------------------------------------------------------------------------------


def render(res: dict[str, Any], out: Path) -> str:
    """``report.md`` and ``scale.png`` from the results; returns the Markdown."""
    every = sorted(res["rows"], key=lambda r: (r["path"], r["interactions"]))
    rows = [r for r in every if r["path"] not in RUN_FORMATS]
    runs = [r for r in every if r["path"] in RUN_FORMATS]
    table = md_table(
        ["path", "interactions", "peak RSS (MB)", "RSS after tables (MB)", "prepare (s)",
         "teacher rows", "examples/s", "total (s)", "note"],
        [[r["path"], f"{r['interactions']:,}", round(r["peak_rss_mb"]) if r.get("peak_rss_mb")
          else None, round(r["rss_tables_mb"]) if r.get("rss_tables_mb") else None,
          round(r["prepare_s"], 1) if r.get("prepare_s") else None,
          f"{r['train_rows']:,}" if r.get("train_rows") else None,
          round(r["examples_per_s"]) if r.get("examples_per_s") else None,
          round(r["total_s"], 1) if r.get("total_s") else None, r.get("error", "")]
         for r in rows])
    m = res["machine"]
    lines = [
        "# Scale: streamed against in-memory input (issue 16)", "",
        f"`{m['command']}`, {m['date']}, {m['nproc']} cores ({m['cpu_model']}), "
        f"{m['memory_gb']} GB RAM, load average {m['load_average_start']} at the start; "
        f"{res['users']:,} users, {res['items']:,} items, batch {res['batch_size']}, "
        f"{res['steps']} measured batches after {res['warmup']} warm-up batches, "
        "every measurement in its own process at nice 19."]
    for extra in res.get("appended", []):
        lines.append(f"Rows added by `{extra['command']}`, {extra['date']}, load average "
                     f"{extra['load_average_start']} at the start.")
    lines += ["", table, ""] if rows or not runs else [""]
    flat = res.get("stream_flatness")
    if flat:
        lines += [f"Streamed peak RSS at {flat['largest']:,} interactions / at "
                  f"{flat['smallest']:,}: **{flat['ratio']:.3f}x** (target at most 1.2x: "
                  f"{'met' if flat['ratio'] <= 1.2 else 'NOT met'}).", ""]
    if runs:
        lines += _render_runs(runs, res)
    w = res.get("workers", {})
    if "ratio" in w:
        lines += [f"2 local workers against 1 (teacher fit, {w['epochs']} epochs, "
                  f"{w['data']}; both on this machine's 2 shared cores): "
                  f"{w['workers_1']['seconds_per_epoch']:.2f} s/epoch with 1 process, "
                  f"{w['workers_2']['seconds_per_epoch']:.2f} s/epoch with 2 workers: "
                  f"throughput ratio {w['ratio']:.2f}x", ""]
    else:
        lines += [f"2 local workers against 1: {w.get('status', '-')}", ""]
    md = "\n".join(lines)
    write_text(out / "report.md", md)
    _plot(rows, runs, out / "scale.png")
    return md


def _phase_sum(phases: dict[str, float], names: tuple[str, ...] = (),
               prefixes: tuple[str, ...] = ()) -> float | None:
    """Seconds of the run's phases named one of ``names`` or starting with one of
    ``prefixes`` (``names`` for a phase with sub-phases: ``student`` holds ``student: ...``)."""
    hit = [v for k, v in phases.items() if k in names or k.startswith(prefixes or ("\0",))]
    return round(sum(hit)) if hit else None


def _render_runs(runs: list[dict[str, Any]], res: dict[str, Any]) -> list[str]:
    """The whole ``tfrs-coldstart run`` rows: a table, the settings, the streamed flatness."""
    body = []
    for r in runs:
        ph = r.get("phases_s", {})
        model = next((m for m in ("recommend", "student", "teacher")
                      if m in r.get("recall", {})), None)
        rec = r["recall"][model] if model else {}
        users = r.get("eval_users", {}).get(model or "", {})
        body.append([
            r["path"], f"{r['interactions']:,}",
            round(r["peak_rss_mb"]) if r.get("peak_rss_mb") else None,
            round(r["wall_s"]) if r.get("wall_s") else None,
            _phase_sum(ph, ("split",), ("data",)),
            _phase_sum(ph, ("teacher",), ("validation teacher",)),
            _phase_sum(ph, ("student",)), _phase_sum(ph, prefixes=("evaluation",)),
            round(r["run_dir_mb"]) if r.get("run_dir_mb") is not None else None,
            f"{model}: " + " / ".join("-" if rec.get(s) is None else f"{rec[s]:.3f}"
                                      for s in SEGMENTS) if model else None,
            max(users.values(), default=None) if users else None, r.get("error", "")])
    table = md_table(
        ["path", "interactions", "peak RSS (MB)", "wall (s)", "data + split (s)",
         "teachers (s)", "student (s)", "evaluation (s)", "run folder (MB)",
         f"recall@{RUN_K} warm / cold item / cold user / cold both",
         "most users in a segment", "note"], body)
    sets = res.get("run_overrides", [])
    lines = [f"Whole `tfrs-coldstart run` (`run-stream`: `--format stream`; `run-memory`: "
             "`--format tables` over the same shards as one table), each in its own process "
             f"at nice 19, peak RSS its `VmHWM`, with `{' '.join('--set ' + o for o in sets)}`"
             ".", "", table, ""]
    stream = {r["interactions"]: r["peak_rss_mb"] for r in runs
              if r["path"] == "run-stream" and not r.get("error") and r.get("peak_rss_mb")}
    if len(stream) > 1:
        lo, hi = min(stream), max(stream)
        lines += [f"Whole streamed run's peak RSS at {hi:,} interactions / at {lo:,}: "
                  f"**{stream[hi] / stream[lo]:.3f}x**.", ""]
    return lines


def _plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path) -> None:
    # matplotlib: an optional heavy extra, imported only to draw the chart.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.get("peak_rss_mb") and not r.get("error")]
    fig, axes = plt.subplots(1, 3 if done else 2, figsize=(15 if done else 10, 4))
    a, b = axes[0], axes[1]
    for name, style in (("run-stream", "D-"), ("run-memory", "v--")):
        pts = [r for r in done if r["path"] == name]
        if pts:
            x = [r["interactions"] / 1e6 for r in pts]
            a.plot(x, [r["peak_rss_mb"] / 1024 for r in pts], style, label=f"{name} (whole)")
            axes[2].plot(x, [r["wall_s"] / 60 for r in pts], style, label=name)
    if done:
        axes[2].set(xlabel="interactions (M)", ylabel="wall time (min)",
                    title="whole tfrs-coldstart run")
    for name, style in (("stream", "o-"), ("memory", "s--"), ("stream-nocache", "^:")):
        pts = [r for r in rows if r["path"] == name and r.get("peak_rss_mb")
               and not r.get("error")]
        if pts:
            x = [r["interactions"] / 1e6 for r in pts]
            a.plot(x, [r["peak_rss_mb"] / 1024 for r in pts], style, label=name)
            b.plot(x, [r["examples_per_s"] / 1e3 for r in pts], style, label=name)
    a.set(xlabel="interactions (M)", ylabel="peak RSS (GB)", title="peak memory")
    b.set(xlabel="interactions (M)", ylabel="examples/s (thousands)",
          title="teacher input pipeline")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000000,5000000,20000000",
                   help="interaction counts, multiples of --shard-rows (comma-separated)")
    p.add_argument("--shard-rows", type=int, default=SHARD_ROWS,
                   help="rows of each interactions shard (a smaller one for a quick check; "
                        "its data folder is a separate one)")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--paths", default="stream,memory",
                   help="stream, memory, stream-nocache (epochs re-read the Parquet shards "
                        "instead of the scan's row cache), run-stream, run-memory (the whole "
                        "`tfrs-coldstart run --format stream|tables`)")
    p.add_argument("--run-eval-max-users", type=int, default=2000,
                   help="run-*: --set eval.max_users=N (each segment evaluated on a seeded "
                        "sample of at most N users); 0: not passed")
    p.add_argument("--run-set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-*: another --set for the run, after the benchmark's own "
                        "(repeatable)")
    p.add_argument("--keep-runs", action="store_true",
                   help="run-*: keep each run folder (<workdir>/runs/<path>-<size>)")
    p.add_argument("--append", action="store_true",
                   help="keep results.json's other rows (a path and size measured again "
                        "replaces its row)")
    p.add_argument("--steps", type=int, default=200, help="measured batches")
    p.add_argument("--warmup", type=int, default=20, help="batches before the measured ones")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-rows", type=int, default=65_536)
    p.add_argument("--shuffle-buffer", type=int, default=100_000)
    p.add_argument("--max-rss-gb", type=float, default=14.0,
                   help="kill a measurement whose resident memory passes this (shared machine)")
    p.add_argument("--workdir", default="/tmp/tfrs_scale_work", help="where the shards go")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale"))
    p.add_argument("--render", action="store_true", help="report from results.json only")
    p.add_argument("--workers-epochs", type=int, default=3,
                   help="teacher epochs of the 1-against-2-workers measurement (0: skip)")
    p.add_argument("--workers-only", action="store_true",
                   help="only the 1-against-2-workers measurement, into results.json's rows")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        print(render(json.loads((out / "results.json").read_text()), out))
        return 0
    if args.workers_only:
        res = json.loads((out / "results.json").read_text())
        res["workers"] = workers_ratio(args)
        write_json(out / "results.json", res)
        print(render(res, out))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.shard_rows < 1 or any(s <= 0 or s % args.shard_rows for s in sizes):
        p.error(f"--sizes must be positive multiples of --shard-rows ({args.shard_rows:,})")
    paths = args.paths.split(",")
    unknown = set(paths) - {"stream", "memory", "stream-nocache", *RUN_FORMATS}
    if unknown:
        p.error(f"unknown --paths {sorted(unknown)}")
    overrides = [*RUN_OVERRIDES, f"teacher.batch_size={args.batch_size}"]
    if args.run_eval_max_users > 0 and any(path in RUN_FORMATS for path in paths):
        if "max_users" not in {f.name for f in dataclasses.fields(EvalConfig)}:
            p.error("eval.max_users is not a config key in this tree yet: pass "
                    "--run-eval-max-users 0 (evaluates every user of every segment: slow at "
                    "1M users)")
        overrides.append(f"eval.max_users={args.run_eval_max_users}")
    overrides += args.run_set
    res: dict[str, Any] = {"machine": machine_info(["python", *sys.argv]), "users": args.users,
                           "items": args.items, "batch_size": args.batch_size,
                           "steps": args.steps, "warmup": args.warmup, "rows": []}
    if args.shard_rows != SHARD_ROWS:
        res["shard_rows"] = args.shard_rows
    if args.append and (out / "results.json").is_file():  # the first run's machine stays
        old = json.loads((out / "results.json").read_text())
        res["appended"] = [*old.get("appended", []), res["machine"]]
        res["machine"], res["rows"] = old["machine"], old["rows"]
        for key in ("workers", "run_overrides"):  # kept unless measured again
            if key in old:
                res[key] = old[key]
    if any(path in RUN_FORMATS for path in paths):
        res["run_overrides"] = overrides
    t = time.time()
    log(f"writing up to {max(sizes):,} interactions to {args.workdir}")
    data = write_data(Path(args.workdir), args.users, args.items, max(sizes),
                      shard_rows=args.shard_rows)
    res["data_s"] = time.time() - t
    for path in paths:
        for size in sizes:
            spec = {"path": path, "interactions": size, "data": str(data),
                    "shard_rows": args.shard_rows,
                    "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                    "chunk_rows": args.chunk_rows, "shuffle_buffer": args.shuffle_buffer}
            if path in RUN_FORMATS:
                spec.update(view=str(data_view(data, size, args.shard_rows,
                                               path == "run-memory")),
                            run_dir=str(Path(args.workdir) / "runs" / f"{path}-{size}"),
                            overrides=overrides, keep_runs=args.keep_runs)
            log(f"{path} at {size:,} interactions ...")
            row = run_child(spec, args.max_rss_gb, Path(args.workdir) / "logs")
            log(f"  {json.dumps(row)}")
            res["rows"] = [r for r in res["rows"]
                           if (r["path"], r["interactions"]) != (path, size)] + [row]
            write_json(out / "results.json", res)
    stream = {r["interactions"]: r["peak_rss_mb"] for r in res["rows"]
              if r["path"] == "stream" and not r.get("error")}
    if len(stream) > 1:
        lo, hi = min(stream), max(stream)
        res["stream_flatness"] = {"smallest": lo, "largest": hi,
                                  "ratio": stream[hi] / stream[lo]}
    if args.workers_epochs > 0 or "workers" not in res:  # --append keeps an earlier ratio
        res["workers"] = workers_ratio(args)
    res["machine"]["load_average_end"] = load_average()
    write_json(out / "results.json", res)
    print(render(res, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
