"""Shared helpers of the speed benchmarks: machine facts, timing statistics, resident memory,
tie-aware recall against exact search, and result writers.

Numbers on a shared machine are noisy: every result records the load average next to it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def ml100k_default() -> Path:
    """MovieLens-100K folder: $TFRS_COLDSTART_ML100K or <repo>/../shared/data/ml-100k."""
    env = os.environ.get("TFRS_COLDSTART_ML100K")
    return Path(env) if env else REPO.parent / "shared" / "data" / "ml-100k"


def log(msg: str) -> None:
    """Progress to stderr (stdout stays for the final table)."""
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (how busy the shared cores were)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command, machine and date: what a reader needs to judge the numbers."""
    import tensorflow as tf

    versions = {"python": platform.python_version(), "tensorflow": tf.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorflow-recommenders", "scann", "grpcio", "apache-beam"):
        with contextlib.suppress(PackageNotFoundError):
            versions[dist] = version(dist)
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        mem_gb = None
    cmd = argv if argv is not None else sys.argv
    return {
        "command": " ".join(shlex.quote(a) for a in cmd),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "versions": versions,
        "load_average_start": load_average(),
    }


def latency_stats(seconds: Sequence[float], items_per_call: int = 1,
                  wall: float | None = None) -> dict[str, float]:
    """p50/p90/p99/mean latency (ms) of calls, and throughput (items/s over ``wall``)."""
    a = np.asarray(seconds, dtype=np.float64)
    if not len(a):
        return {"n": 0}
    total = float(wall if wall is not None else a.sum())
    return {"n": int(len(a)),
            "p50_ms": float(np.percentile(a, 50) * 1e3),
            "p90_ms": float(np.percentile(a, 90) * 1e3),
            "p99_ms": float(np.percentile(a, 99) * 1e3),
            "mean_ms": float(a.mean() * 1e3),
            "per_s": float(len(a) * items_per_call / total) if total > 0 else float("inf")}


def time_calls(fn: Callable[[int], Any], n: int, items_per_call: int = 1, warmup: int = 3,
               desc: str | None = None) -> dict[str, float]:
    """Call ``fn(i)`` ``n`` times one after the other; latency statistics and throughput."""
    from tqdm.auto import tqdm

    for i in range(warmup):
        fn(i)
    lat = []
    start = time.perf_counter()
    for i in tqdm(range(n), desc=desc, disable=desc is None, leave=False, file=sys.stderr):
        t = time.perf_counter()
        fn(i)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    out = latency_stats(lat, items_per_call, wall)
    out["load_average"] = load_average()
    return out


def dir_size(path: str | os.PathLike[str]) -> int:
    """Bytes of all files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


_RSS_SCRIPT = r"""
import json, sys, time
import tfrs_coldstart  # noqa: F401
import psutil
import numpy as np
import tensorflow as tf
try:
    import scann  # noqa: F401  (registers the Scann ops)
except ImportError:
    pass
proc = psutil.Process()
spec = json.loads(sys.argv[1])
before = proc.memory_info().rss
t = time.perf_counter()
m = tf.saved_model.load(spec["path"])
load_s = time.perf_counter() - t
after_load = proc.memory_info().rss
fn = m.signatures["serving_default"]
args = {k: tf.constant(np.asarray(v, dtype=object) if s.dtype == tf.string
                       else np.asarray(v, dtype=np.float32), s.dtype)
        for k, s in fn.structured_input_signature[1].items() for v in (spec["inputs"][k],)}
t = time.perf_counter()
fn(**args)
first_s = time.perf_counter() - t
after_query = proc.memory_info().rss
print(json.dumps({"rss_before": before, "rss_after_load": after_load,
                  "rss_after_query": after_query, "load_s": load_s, "first_query_s": first_s}))
"""


def measure_loaded_memory(path: str | os.PathLike[str],
                          inputs: dict[str, list[Any]]) -> dict[str, Any]:
    """Resident memory a SavedModel adds once loaded and queried, in a clean child process.

    A child process, because in the benchmark process freed TensorFlow buffers stay in the
    allocator and the second model measured would look smaller than it is. ``inputs``: one
    request (JSON-able, batch first). Also gives the load time and the first query's time.
    """
    spec = json.dumps({"path": str(path), "inputs": inputs})
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, spec], capture_output=True,
                         text=True, cwd=REPO, check=False,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if res.returncode != 0:
        raise RuntimeError(f"measuring the memory of {path} failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["rss_delta_mb"] = (out["rss_after_query"] - out["rss_before"]) / 2**20
    out["rss_load_delta_mb"] = (out["rss_after_load"] - out["rss_before"]) / 2**20
    return out


class ExactTruth:
    """Exact top-k scores of a fixed query set, computed once, to score many answers against.

    ``exact``: a :class:`tfrs_coldstart.serving.index.ExactIndex` over the vectors the index holds.
    Recall counts ties as hits: a returned item is a hit when its exact score reaches the k-th
    best exact score (items with equal content have equal embeddings, and which of them exact
    search lists first is arbitrary). Padding and repeated ids never count.
    """

    def __init__(self, exact: Any, queries: np.ndarray, k_max: int, tol: float = 1e-5) -> None:
        self.exact = exact
        self.queries = np.asarray(queries, np.float32)
        self.tol = tol
        step = 256
        self.top_scores = np.concatenate([exact.search(self.queries[s:s + step], k_max)[0]
                                          for s in range(0, len(self.queries), step)])

    def recall(self, got_ids: np.ndarray, k: int) -> float:
        """Mean recall@k of ``got_ids [n_queries, >= k]`` (str or bytes ids, best first)."""
        got = np.asarray(got_ids)
        if got.dtype == object and got.size and isinstance(got.flat[0], bytes):
            got = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(got)
        got = got.astype(str)[:, :k]
        kk = min(k, self.top_scores.shape[1])
        kth = self.top_scores[:, kk - 1]
        scores = self.exact.score(self.queries, got)
        hits = []
        for row, row_sc, t in zip(got, scores, kth, strict=True):
            seen: set[str] = set()
            n = 0
            for v, x in zip(row, row_sc, strict=True):
                if v not in seen and x >= t - self.tol:
                    n += 1
                seen.add(v)
            hits.append(min(n, kk) / kk)
        return float(np.mean(hits))


def release(min_rss: int = 1 << 30) -> None:
    """Drop what the previous measurement held (models, searchers) before the next one.

    Only once the process holds more than ``min_rss`` bytes: a full collection costs about
    half a second with TensorFlow loaded, and below that size memory does not matter.
    """
    if rss_bytes() > min_rss:
        gc.collect()


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a result."""
    write_text(path, json.dumps(data, indent=1, default=_default))


def emit_row(row: dict[str, Any], out: str | os.PathLike[str] | None) -> None:
    """A trial's result: printed as one JSON line and, with ``out``, appended to that JSON-lines
    file (appended as each trial ends, so a long search that stops keeps what it measured)."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def write_text(path: Path, text: str) -> None:
    """Atomic write, readable by all (results are meant to be read and committed)."""
    from tfrs_coldstart.fileio import atomic_write_text

    atomic_write_text(path, text)
    os.chmod(path, 0o644)


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get 3 significant figures unless already formatted."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:  # NaN
                return "-"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3g}" if abs(v) >= 0.001 or v == 0 else f"{v:.2e}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def parse_int_list(text: str) -> list[int]:
    """``"100000,1e6,1_000_000"`` -> ``[100000, 1000000, 1000000]``."""
    out = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if part:
            out.append(int(float(part)))
    return out


def parse_float_list(text: str) -> list[float]:
    return [float(p) for p in text.split(",") if p.strip()]
