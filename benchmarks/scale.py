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

Peak RSS is the child's ``VmHWM`` (``/proc/self/status``); examples/s counts the interactions
in the batches after ``--warmup`` batches (the shuffle buffer's first fill). The parent caps a
child's resident memory (``--max-rss-gb``: the cores and memory are shared) and records a
child killed at the cap as "did not fit". The interactions are written once into
``--workdir`` as 1M-row Parquet shards by a vectorised generator (``data/synthetic.py``
builds realistic features but takes minutes at these sizes); the first N shards are the N-M
dataset.

    python benchmarks/scale.py                         # make bench-scale
    python benchmarks/scale.py --sizes 1000000 --paths stream --steps 50
    python benchmarks/scale.py --render                # report from results.json again
"""

from __future__ import annotations

import argparse
import json
import os
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
from tfrs_coldstart.data import Schema, cold_start_split, validation_split  # noqa: E402
from tfrs_coldstart.data.pipeline import interaction_dataset, item_probabilities  # noqa: E402
from tfrs_coldstart.data.stream import scan_interactions  # noqa: E402
from tfrs_coldstart.data.tables import feature_table, load_tables, read_table  # noqa: E402

SHARD_ROWS = 1_000_000
EPOCHS = 50  # the measured batches may run past an epoch (1M interactions: 541,792 rows each)
SCHEMA = {"user_features": [{"name": "segment", "type": "categorical"},
                            {"name": "activity", "type": "numeric"}],
          "item_features": [{"name": "category", "type": "categorical"},
                            {"name": "price", "type": "numeric"}]}


# ---- data ---------------------------------------------------------------------------------


def write_data(workdir: Path, n_users: int, n_items: int, n_interactions: int,
               seed: int = 0) -> Path:
    """Users, items, schema and ``ceil(n / SHARD_ROWS)`` interaction shards under ``workdir``
    (kept: a later run with the same sizes reuses them). Returns the data folder."""
    root = workdir / f"data_{n_users}u_{n_items}i"
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
    for k in range(-(-n_interactions // SHARD_ROWS)):
        path = shards / f"part-{k:05d}.parquet"
        if path.is_file():
            continue
        r = np.random.default_rng([seed, k])
        u = r.integers(0, n_users, SHARD_ROWS)
        i = popular[(n_items * r.random(SHARD_ROWS) ** 3).astype(np.int64)]
        ts = 1_600_000_000 + np.sort(r.integers(0, 86_400, SHARD_ROWS)) + 86_400 * k
        table = pa.table({"user_id": pc.take(user_ids, u), "item_id": pc.take(item_ids, i),
                          "timestamp": ts.astype(np.int64)})
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, row_group_size=128 * 1024)
        tmp.rename(path)
        log(f"  wrote {path}")
    return root


# ---- one measurement (child process) ------------------------------------------------------


def _status(key: str) -> int:
    """``VmHWM``/``VmRSS`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One path at one size; returns the measurements (printed as JSON by ``--child``)."""
    root = Path(spec["data"])
    n_shards = spec["interactions"] // SHARD_ROWS
    shards = [str(root / "interactions" / f"part-{k:05d}.parquet") for k in range(n_shards)]
    schema = Schema.from_yaml(root / "schema.yaml")
    out: dict[str, Any] = {"path": spec["path"], "interactions": spec["interactions"],
                           "rss_start_mb": _status("VmRSS") / 2**20}
    t0 = time.perf_counter()
    if spec["path"] in ("stream", "stream-nocache"):
        users = feature_table(*read_table(root / "users.parquet", "users"), "user",
                              schema.user_features)
        items = feature_table(*read_table(root / "items.parquet", "items"), "item",
                              schema.item_features)
        out["tables_s"] = time.perf_counter() - t0
        out["rss_tables_mb"] = _status("VmRSS") / 2**20
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
        out["rss_tables_mb"] = _status("VmRSS") / 2**20
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
    out["rss_prepared_mb"] = _status("VmRSS") / 2**20
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
    out["peak_rss_mb"] = _status("VmHWM") / 2**20
    out["load_average"] = load_average()
    return out


def run_child(spec: dict[str, Any], max_rss_gb: float) -> dict[str, Any]:
    """``child(spec)`` at nice 19 in a fresh interpreter, killed if it passes the RSS cap."""
    cmd = ["nice", "-n", "19", sys.executable, __file__, "--child", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
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
    stdout, stderr = proc.communicate()
    if killed:
        return {**_spec_row(spec), "error": f"over the {max_rss_gb:g} GB cap (killed at "
                f"{peak / 2**30:.1f} GB after {time.time() - start:.0f} s): did not fit",
                "peak_rss_mb": peak / 2**20}
    if proc.returncode != 0:
        return {**_spec_row(spec), "error": stderr.strip().splitlines()[-1] if stderr.strip()
                else f"exit {proc.returncode}"}
    return json.loads(stdout.strip().splitlines()[-1])


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
    rows = sorted(res["rows"], key=lambda r: (r["path"], r["interactions"]))
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
    lines += ["", table, ""]
    flat = res.get("stream_flatness")
    if flat:
        lines += [f"Streamed peak RSS at {flat['largest']:,} interactions / at "
                  f"{flat['smallest']:,}: **{flat['ratio']:.3f}x** (target at most 1.2x: "
                  f"{'met' if flat['ratio'] <= 1.2 else 'NOT met'}).", ""]
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
    _plot(rows, out / "scale.png")
    return md


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    # matplotlib: an optional heavy extra, imported only to draw the chart.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
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
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000000,5000000,20000000",
                   help="interaction counts, multiples of 1,000,000 (comma-separated)")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--paths", default="stream,memory",
                   help="stream, memory, stream-nocache (epochs re-read the Parquet shards "
                        "instead of the scan's row cache)")
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
    if any(s % SHARD_ROWS for s in sizes):
        p.error(f"--sizes must be multiples of {SHARD_ROWS:,}")
    res: dict[str, Any] = {"machine": machine_info(["python", *sys.argv]), "users": args.users,
                           "items": args.items, "batch_size": args.batch_size,
                           "steps": args.steps, "warmup": args.warmup, "rows": []}
    if args.append and (out / "results.json").is_file():  # the first run's machine stays
        old = json.loads((out / "results.json").read_text())
        res["appended"] = [*old.get("appended", []), res["machine"]]
        res["machine"], res["rows"] = old["machine"], old["rows"]
    t = time.time()
    log(f"writing up to {max(sizes):,} interactions to {args.workdir}")
    data = write_data(Path(args.workdir), args.users, args.items, max(sizes))
    res["data_s"] = time.time() - t
    for path in args.paths.split(","):
        for size in sizes:
            spec = {"path": path, "interactions": size, "data": str(data),
                    "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                    "chunk_rows": args.chunk_rows, "shuffle_buffer": args.shuffle_buffer}
            log(f"{path} at {size:,} interactions ...")
            row = run_child(spec, args.max_rss_gb)
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
    res["workers"] = workers_ratio(args)
    res["machine"]["load_average_end"] = load_average()
    write_json(out / "results.json", res)
    print(render(res, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
