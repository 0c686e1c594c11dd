"""Serving benchmark (issue 5, "Measured"): REST and gRPC latency and throughput of the
project's local TF-Serving-compatible server, at several concurrency levels.

The server (:class:`tfrs_coldstart.serving.devserver.Server`) runs in a child process on 127.0.0.1
with ephemeral ports, so the load generator (threads in this process, one client each,
using :mod:`tfrs_coldstart.serving.client` as a user would) does not share its interpreter. Every
request asks for one user's recommendations (the online path); each thread sends its next
request as soon as the previous answer arrived (closed loop), so throughput at concurrency
N is what N waiting users get. On a 2-core machine client and server share the cores:
the numbers are a floor for a real deployment, not a ceiling.

Standalone, against an existing export base path::

    python benchmarks/serving.py export --models student,teacher --users users.parquet
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, latency_stats, load_average, log  # noqa: E402

BATCHING_CONFIG = REPO / "serving" / "batching.config"


def _child(base: str, batching: str) -> int:
    """Child mode: serve ``base`` on ephemeral ports, print them, stop when stdin closes."""
    import tfrs_coldstart  # noqa: F401
    from tfrs_coldstart.serving import devserver

    params = None if batching == "off" else devserver.parse_batching_config(Path(batching))
    server = devserver.Server(base, None, rest_port=0, grpc_port=0, poll_seconds=0,
                              batching=params).start()
    print(json.dumps({"rest_port": server.rest_port, "grpc_port": server.grpc_port,
                      "models": server.manager.model_names}), flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us
    server.stop(grace=1.0)
    return 0


class ServerProcess:
    """A dev server in a child process; ``rest_url``/``grpc_address`` once started."""

    def __init__(self, base: Path, batching: Path | None, log_path: Path) -> None:
        self.base = base
        self.batching = batching
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}
        self.start_s = 0.0

    def start(self, timeout: float = 600.0) -> ServerProcess:
        t = time.perf_counter()
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-child", str(self.base),
             "--batching", str(self.batching) if self.batching else "off"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0].strip():
            self.stop()
            tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"the dev server over {self.base} did not start:\n{tail}")
        self.info = json.loads(result[0])
        self.start_s = time.perf_counter() - t
        return self

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.info['rest_port']}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.info['grpc_port']}"

    def stop(self) -> None:
        if self.proc is not None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if getattr(self, "_log", None):
            self._log.close()


@contextmanager
def running_server(base: Path, batching: Path | None, log_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(base, batching, log_path).start()
    try:
        yield server
    finally:
        server.stop()


def closed_loop(calls: Sequence[Callable[[int], Any]], seconds: float,
                warmup: float) -> dict[str, Any]:
    """Run one closed-loop thread per entry of ``calls`` for ``warmup + seconds``.

    ``calls[t](i)`` sends request ``i`` of thread ``t``. Latencies count the requests that
    started after the warm-up; throughput is those completed per second of the window.
    """
    n = len(calls)
    lat: list[list[float]] = [[] for _ in range(n)]
    errors: list[list[str]] = [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)
    times: dict[str, float] = {}

    def worker(t: int) -> None:
        barrier.wait()
        start, end = times["start"], times["end"]
        i = t
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            try:
                calls[t](i)
                ok = True
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ok = False
                if len(errors[t]) < 3:
                    errors[t].append(f"{type(exc).__name__}: {str(exc)[:200]}")
            t1 = time.perf_counter()
            if t0 >= start and t1 <= end:
                if ok:
                    lat[t].append(t1 - t0)
                else:
                    errors[t].append("")
            i += n

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(n)]
    for th in threads:
        th.start()
    now = time.perf_counter()
    times["start"] = now + warmup
    times["end"] = now + warmup + seconds
    barrier.wait()
    for th in threads:
        th.join()
    flat = [x for per in lat for x in per]
    out = latency_stats(flat, 1, seconds)
    out["errors"] = sum(len([e for e in per if e == ""]) for per in errors)
    msgs = [e for per in errors for e in per if e]
    if msgs:
        out["error_examples"] = msgs[:3]
    out["concurrency"] = n
    out["load_average"] = load_average()
    return out


def user_requests(table: Any, schema: Any, input_names: Sequence[str],
                  n: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` single-user requests (JSON-able feature dicts) from rows of a users table."""
    from tfrs_coldstart.features.sources import served_arrays

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(table), size=min(n, len(table)), replace=False)
    # features and the source columns of derived ones (issue 14)
    arrays = served_arrays(table.iloc[np.sort(rows)], schema.user_features, "user_id")
    out = []
    for r in range(len(rows)):
        user = {}
        for name in input_names:
            if name not in arrays:  # a request-time `history` (issue 17): none here
                user[name] = ""
                continue
            v = arrays[name][r]
            if isinstance(v, np.ndarray):
                user[name] = [float(x) for x in v]
            elif isinstance(v, (np.floating, float)):
                user[name] = float(v)
            else:
                user[name] = str(v)
        out.append(user)
    return out


def _clients(server: ServerProcess, transport: str, model: str, n: int) -> list[Any]:
    from tfrs_coldstart.serving.client import GrpcClient, RestClient

    if transport == "grpc":
        return [GrpcClient(server.grpc_address, model, retries=0, timeout=60.0)
                for _ in range(n)]
    return [RestClient(server.rest_url, model, retries=0, timeout=60.0) for _ in range(n)]


def _caller(client: Any, requests: list[dict[str, Any]]) -> Callable[[int], Any]:
    return lambda i: client.recommend(requests[i % len(requests)])


def bench_server(server: ServerProcess, models: dict[str, list[dict[str, Any]]],
                 concurrency: Sequence[int], seconds: float, warmup: float,
                 transports: Sequence[str] = ("grpc", "rest"),
                 progress: Any = None) -> list[dict[str, Any]]:
    """Every (model, transport, concurrency) cell against one running server."""
    rows = []
    for model, requests in models.items():
        for transport in transports:
            for c in concurrency:
                clients = _clients(server, transport, model, c)
                for cl in clients:  # fetch the signature metadata before the clock starts
                    cl.recommend(requests[0])

                res = closed_loop([_caller(cl, requests) for cl in clients], seconds, warmup)
                for cl in clients:
                    cl.close()
                res.update(model=model, transport=transport)
                rows.append(res)
                if progress is not None:
                    progress.update(1)
                log(f"  {model:<8} {transport:<4} c={c:<3} p50={res.get('p50_ms', 0):.2f} ms "
                    f"p99={res.get('p99_ms', 0):.2f} ms {res.get('per_s', 0):.0f}/s "
                    f"errors={res['errors']}")
    return rows


def serving_benchmark(exports: dict[str, dict[str, Any]], concurrency: Sequence[int],
                      seconds: float, warmup: float, batching: Sequence[str],
                      work: Path) -> dict[str, Any]:
    """``exports``: label -> {"base": Path, "models": {name: requests}}; one server per
    (export, batching mode). Returns rows and server start times."""
    from tqdm.auto import tqdm

    cells = sum(len(e["models"]) for e in exports.values()) * 2 * len(concurrency) * len(
        batching)
    rows: list[dict[str, Any]] = []
    starts: dict[str, float] = {}
    with tqdm(total=cells, desc="serving cells", file=sys.stderr) as bar:
        for label, exp in exports.items():
            for mode in batching:
                cfg = BATCHING_CONFIG if mode == "on" else None
                log(f"serving {label} (batching {mode}): starting the dev server ...")
                with running_server(Path(exp["base"]), cfg,
                                    work / f"server-{label}-{mode}.log") as server:
                    starts[f"{label}/{mode}"] = server.start_s
                    log(f"  up in {server.start_s:.1f} s, models {server.info['models']}")
                    for r in bench_server(server, exp["models"], concurrency, seconds, warmup,
                                          progress=bar):
                        r.update(export=label, batching=mode)
                        rows.append(r)
    return {"rows": rows, "server_start_s": starts,
            "batching_config": BATCHING_CONFIG.read_text() if BATCHING_CONFIG.exists() else None}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", nargs="?", help="export base path (export/<name>/<version>)")
    p.add_argument("--serve-child", metavar="BASE", help=argparse.SUPPRESS)
    p.add_argument("--batching", default="off", help=argparse.SUPPRESS)
    p.add_argument("--models", default="student,teacher")
    p.add_argument("--users", help="users table (CSV/Parquet) with the models' user features")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--batching-modes", default="off,on")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serving.json"))
    args = p.parse_args(argv)
    if args.serve_child:
        return _child(args.serve_child, args.batching)
    if not args.base or not args.users:
        p.error("give an export base path and --users")
    import pandas as pd

    import tfrs_coldstart  # noqa: F401
    from tfrs_coldstart.data.schema import Schema
    from tfrs_coldstart.serving.saved_model import MANIFEST_FILE, list_versions

    base = Path(args.base)
    users = (pd.read_parquet(args.users) if args.users.endswith(".parquet")
             else pd.read_csv(args.users, dtype=str))
    models = {}
    for name in [m for m in args.models.split(",") if m]:
        versions = list_versions(base / name)
        manifest = json.loads((base / name / str(versions[-1]) / MANIFEST_FILE).read_text())
        schema = Schema.from_dict(manifest["schema"])
        names = list(manifest["signatures"]["serving_default"]["inputs"])
        models[name] = user_requests(users, schema, names)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = serving_benchmark({base.name: {"base": base, "models": models}},
                                [int(c) for c in args.concurrency.split(",")], args.seconds,
                                args.warmup, args.batching_modes.split(","), Path(tmp))
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
