"""Cold-start metrics (DESIGN.md protocol), the popularity baseline, and reports.

Ranking sets: warm ranks all warm items minus the user's training items;
cold-item and cold-both rank the cold items; cold-user ranks the warm items.
Recall@K = hits / |relevant|; NDCG@K with binary gains; averaged over users
with at least one relevant item.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tfrs_coldstart.config import RunConfig
from tfrs_coldstart.data import (
    SEGMENTS,
    ColdStartSplit,
    Dataset,
    check_no_leakage,
    cold_start_split,
    entity_counts,
    sample_users,
    seen_rows,
    validation_split,
)
from tfrs_coldstart.data.split import Rows
from tfrs_coldstart.features.columns import HISTORY_SEPARATOR
from tfrs_coldstart.fileio import atomic_write_text

SEGMENT_TITLES = {"warm": "warm", "cold_item": "cold-item", "cold_user": "cold-user",
                  "cold_both": "cold-both"}

# score_fn(user_rows [n_u], item_rows [n_c]) -> scores float [n_u, n_c]; rows index the
# dataset's users / items tables. A returned float32 array the function owns (not a view) may be
# overwritten by the caller: return a fresh one (every score function here does).
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SegmentTask:
    """What one segment ranks: its users, candidate items, relevant and excluded items."""

    name: str
    user_rows: np.ndarray  # [n_users] rows of the users table
    candidate_rows: np.ndarray  # [n_candidates] rows of the items table
    relevant: list[np.ndarray]  # per user: positions in candidate_rows
    excluded: list[np.ndarray]  # per user: positions in candidate_rows never ranked


def segment_tasks(split: ColdStartSplit, users: pd.DataFrame,
                  items: pd.DataFrame) -> dict[str, SegmentTask]:
    """The four ranking tasks of the protocol for one split."""
    u_index = pd.Index(users["user_id"].astype(str))
    i_index = pd.Index(items["item_id"].astype(str))
    warm_items = np.sort(i_index.get_indexer(list(split.warm_items)))
    cold_items = np.sort(i_index.get_indexer(list(split.cold_items)))
    train_by_user = seen_rows(split.train).groupby("user_id")["item_id"].apply(list).to_dict()
    tasks = {}
    for name, frame in split.segments().items():
        cand = cold_items if name in ("cold_item", "cold_both") else warm_items
        pos = pd.Series(np.arange(len(cand)), index=i_index[cand])
        grouped = frame.groupby("user_id", sort=True)["item_id"].apply(list)
        user_rows, relevant, excluded = [], [], []
        for uid, its in grouped.items():
            rel = np.unique(pos.reindex(its).dropna().to_numpy(dtype=np.int64))
            if not len(rel):
                continue
            user_rows.append(u_index.get_loc(uid))
            relevant.append(rel)
            if name == "warm":
                ex = pos.reindex(train_by_user.get(uid, [])).dropna().to_numpy(dtype=np.int64)
                excluded.append(np.setdiff1d(ex, rel))
            else:
                excluded.append(np.zeros(0, np.int64))
        tasks[name] = SegmentTask(name, np.asarray(user_rows, np.int64), cand, relevant, excluded)
    return tasks


def mixed_task(split: ColdStartSplit, users: pd.DataFrame, items: pd.DataFrame) -> SegmentTask:
    """The mixed-catalogue task: warm users (of the warm-test and cold-item segments) rank the
    whole catalogue, warm and cold items together, minus their training items; relevant are
    all their held-out items (warm test + cold-item interactions).

    It shows what one served index does: a score scale that buries or floods new items moves
    their share of the top K away from their share of what users really chose.
    """
    u_index = pd.Index(users["user_id"].astype(str))
    i_index = pd.Index(items["item_id"].astype(str))
    cand = np.sort(i_index.get_indexer([*split.warm_items, *split.cold_items]))
    pos = pd.Series(np.arange(len(cand)), index=i_index[cand])
    held = pd.concat([split.relevant_warm(), split.cold_item])
    train_by_user = seen_rows(split.train).groupby("user_id")["item_id"].apply(list).to_dict()
    user_rows, relevant, excluded = [], [], []
    for uid, its in held.groupby("user_id", sort=True)["item_id"].apply(list).items():
        rel = np.unique(pos.reindex(its).dropna().to_numpy(dtype=np.int64))
        if not len(rel):
            continue
        user_rows.append(u_index.get_loc(uid))
        relevant.append(rel)
        ex = pos.reindex(train_by_user.get(uid, [])).dropna().to_numpy(dtype=np.int64)
        excluded.append(np.setdiff1d(ex, rel))
    return SegmentTask("mixed", np.asarray(user_rows, np.int64), cand, relevant, excluded)


def cold_share(task: SegmentTask, score_fn: ScoreFn, cold_rows: np.ndarray,
               k: int = 20) -> dict[str, float | None]:
    """Share of cold items in the top ``k`` against their share of the relevant items.

    ``cold_rows``: rows of the items table that are cold. Returns ``top_k`` (mean over users
    of the cold share of their top k), ``held_out`` (cold share of all relevant items) and
    ``ratio`` (top_k / held_out; within [0.5, 2] means neither buried nor flooded).
    """
    if not len(task.user_rows):
        return {"top_k": None, "held_out": None, "ratio": None}
    is_cold = np.isin(task.candidate_rows, cold_rows)
    shares = []
    for _, scores in _score_chunks(task, score_fn):
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        shares.extend(is_cold[top].mean(axis=1).tolist())
    rel = np.concatenate(task.relevant)
    held_out = float(is_cold[rel].mean())
    top_k = float(np.mean(shares))
    return {"top_k": top_k, "held_out": held_out,
            "ratio": top_k / held_out if held_out > 0 else None}


@dataclass(frozen=True)
class Prepared:
    """A dataset with its test split, validation split and their ranking tasks."""

    dataset: Dataset
    split: ColdStartSplit
    val: ColdStartSplit
    tasks: dict[str, SegmentTask]
    val_tasks: dict[str, SegmentTask]

    def mixed(self, validation: bool = False) -> SegmentTask:
        """The mixed-catalogue task of the test split (or of the validation split)."""
        split = self.val if validation else self.split
        return mixed_task(split, self.dataset.users, self.dataset.items)

    def cold_item_rows(self, validation: bool = False) -> np.ndarray:
        """Rows of the items table that are cold in the test (or validation) split."""
        split = self.val if validation else self.split
        index = pd.Index(self.dataset.items["item_id"].astype(str))
        return np.sort(index.get_indexer(list(split.cold_items)))


def prepare(dataset: Dataset, cfg: RunConfig) -> Prepared:
    """Cold-start split (with the leakage guard) and the validation split carved from training.

    ``cfg.eval.max_users``: each split's segments evaluate at most that many warm and that
    many cold users (:func:`~tfrs_coldstart.data.split.sample_users`). Streamed interactions
    (``dataset.stream``) give splits whose training parts stay on disk
    (:meth:`~tfrs_coldstart.data.stream.StreamedInteractions.splits`); the split and the users
    drawn are the in-memory ones.
    """
    d, cap = cfg.data, cfg.eval.max_users
    if dataset.stream is not None:
        split, val = dataset.stream.splits(cap)
        check_no_leakage(split)
    else:
        split = cold_start_split(dataset.interactions, dataset.users["user_id"],
                                 dataset.items["item_id"], seed=d.split_seed,
                                 cold_item_frac=d.cold_item_frac,
                                 cold_user_frac=d.cold_user_frac, warm_test_frac=d.warm_test_frac)
        check_no_leakage(split)
        val = sample_users(validation_split(split), cap)
        split = sample_users(split, cap)
    return Prepared(dataset, split, val,
                    segment_tasks(split, dataset.users, dataset.items),
                    segment_tasks(val, dataset.users, dataset.items))


def protocol(cfg: RunConfig, prep: Prepared) -> dict[str, Any]:
    """The split's settings and sizes, for reports."""
    d = cfg.data
    return {"split_seed": d.split_seed, "cold_item_frac": d.cold_item_frac,
            "cold_user_frac": d.cold_user_frac, "warm_test_frac": d.warm_test_frac,
            "ks": list(cfg.eval.cutoffs), "max_users": cfg.eval.max_users,
            "segments": prep.split.summary()}


def servable(segment: str, sides: tuple[str, ...]) -> bool:
    """Whether a student with content towers for ``sides`` can embed a segment's unseen
    entities (the others fall back to popularity)."""
    need = {"warm": (), "cold_item": ("item",), "cold_user": ("user",),
            "cold_both": ("user", "item")}[segment]
    return all(s in sides for s in need)


def rank_metrics(task: SegmentTask, score_fn: ScoreFn, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K and NDCG@K for one segment, averaged over its users."""
    n_users, n_cand = len(task.user_rows), len(task.candidate_rows)
    out: dict[str, float] = {}
    if n_users == 0 or n_cand == 0:  # nothing to measure: null in JSON, n/a in tables
        for k in ks:
            out[f"recall@{k}"] = None
            out[f"ndcg@{k}"] = None
        out["users"] = n_users
        return out
    kmax = min(max(ks), n_cand)
    recall = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    for start, scores in _score_chunks(task, score_fn):
        for j in range(len(scores)):
            rel = np.unique(np.asarray(task.relevant[start + j], np.int64))
            rank = _ranks(scores[j], rel, kmax)
            hits = rank[rank < kmax]
            for k in ks:
                kk = min(k, kmax)
                h = hits[hits < kk]
                recall[k] += len(h) / len(rel)
                ndcg[k] += discounts[h].sum() / discounts[: min(len(rel), kk)].sum()
    for k in ks:
        out[f"recall@{k}"] = float(recall[k] / n_users)
        out[f"ndcg@{k}"] = float(ndcg[k] / n_users)
    out["users"] = n_users
    return out


def _score_chunks(task: SegmentTask, score_fn: ScoreFn) -> Iterator[tuple[int, np.ndarray]]:
    """``(first user, float32 scores [users, n_candidates])`` for the task's users, a chunk of
    about 2**25 scores at a time, each user's excluded items at -inf."""
    n_cand = len(task.candidate_rows)
    chunk = max(1, min(1024, (1 << 25) // max(n_cand, 1)))
    for start in range(0, len(task.user_rows), chunk):
        rows = task.user_rows[start:start + chunk]
        scores = np.asarray(score_fn(rows, task.candidate_rows), dtype=np.float32)
        if not (scores.flags.owndata and scores.flags.writeable):  # a view: not ours to mask
            scores = scores.copy()
        for j in range(len(rows)):
            ex = task.excluded[start + j]
            if len(ex):
                scores[j, ex] = -np.inf
        yield start, scores


def _ranks(row: np.ndarray, positions: np.ndarray, kmax: int) -> np.ndarray:
    """0-based ranks of ``positions`` in one user's scores ``row`` (``[n_candidates]``), as a
    stable sort by descending score ranks them (ties go to the lower position); ranks at or
    beyond ``kmax`` are reported as ``kmax``.

    Why not a top-k: recall and NDCG need only where the relevant items rank. For a few of
    them, counting the candidates that score higher is one pass over the row each, several
    times cheaper than ``argpartition`` at a million candidates (the validation searches call
    this for every user of every setting tried). For many (a heavy user's held-out items) one
    partition finds the items that can rank inside ``kmax``, and ranks are counted among them.
    """
    s = row[positions]
    if len(s) <= 8:
        rank = np.count_nonzero(row[None, :] > s[:, None], axis=1).astype(np.int64)
        for t in np.flatnonzero(rank < kmax):
            rank[t] += np.count_nonzero(row[: positions[t]] == s[t])  # equal scores before
    else:  # only items scoring at least the kmax-th best can rank inside kmax: rank among them
        clean = np.where(np.isnan(row), -np.inf, row)
        top = np.flatnonzero(clean >= np.partition(clean, len(row) - kmax)[len(row) - kmax])
        rank = np.full(len(s), kmax, np.int64)
        for t in np.flatnonzero(np.isin(positions, top)):
            rank[t] = (np.count_nonzero(clean[top] > s[t])
                       + np.count_nonzero(clean[top[top < positions[t]]] == s[t]))
    rank[np.isnan(s)] = kmax
    return np.minimum(rank, kmax)


def embedding_score_fn(user_emb: np.ndarray, item_emb: np.ndarray,
                       item_bias: np.ndarray | None = None) -> ScoreFn:
    """Dot-product scores plus an optional per-item bias; rows aligned with the tables."""
    if item_bias is None or not np.any(item_bias):
        return lambda u, i: user_emb[u] @ item_emb[i].T
    return lambda u, i: user_emb[u] @ item_emb[i].T + item_bias[i][None, :]


def popularity_score_fn(train: Rows, items: pd.DataFrame, seed: int = 0) -> ScoreFn:
    """Training-count scores; ties (all cold items) are broken by a fixed random order.
    ``train``: a frame or a streamed part."""
    tie = np.random.default_rng(seed).random(len(items)) * 1e-3
    pop = entity_counts(train, "item", items["item_id"]) + tie
    return lambda u, i: np.broadcast_to(pop[i], (len(u), len(i)))


def evaluate_scores(tasks: dict[str, SegmentTask], score_fns: dict[str, ScoreFn | None],
                    ks: Sequence[int], fallback: ScoreFn | None = None) -> dict[str, dict]:
    """Metrics per segment; one whose score_fn is None uses ``fallback`` and is marked so."""
    out = {}
    for name, task in tasks.items():
        fn = score_fns.get(name)
        if fn is None:
            if fallback is None:
                continue
            out[name] = {**rank_metrics(task, fallback, ks), "fallback": "popularity"}
        else:
            out[name] = rank_metrics(task, fn, ks)
    return out


def evaluate_score_fn(prep: Prepared, fn: ScoreFn, ks: Sequence[int],
                      sides: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Test-segment metrics of any scorer; segments ``sides`` cannot serve use popularity."""
    fns = {s: (fn if sides is None or servable(s, sides) else None) for s in prep.tasks}
    return evaluate_scores(prep.tasks, fns, ks,
                           popularity_score_fn(prep.split.train, prep.dataset.items))


def evaluate_popularity(prep: Prepared, ks: Sequence[int]) -> dict[str, dict]:
    """The popularity baseline on the test segments."""
    fn = popularity_score_fn(prep.split.train, prep.dataset.items)
    return evaluate_scores(prep.tasks, dict.fromkeys(prep.tasks, fn), ks)


def evaluate_mixed(prep: Prepared, fn: ScoreFn, ks: Sequence[int],
                   k_share: int = 20) -> dict[str, Any]:
    """Mixed-catalogue metrics of one scorer: recall/NDCG@K and the cold-item share."""
    task = prep.mixed()
    return {**rank_metrics(task, fn, ks),
            "cold_share": cold_share(task, fn, prep.cold_item_rows(), k_share)}


# ---- few-shot cold users (issue 17) --------------------------------------------------------

#: History lengths of the few-shot report (0 is the cold-user segment's setting).
FEWSHOT_NS = (0, 1, 3, 5, 10)


def user_sequences(interactions: pd.DataFrame) -> dict[str, list[str]]:
    """Each user's item IDs in time order: by ``timestamp`` when there is one, file order
    (the frame's order) for ties and where there is none."""
    df = interactions
    if "timestamp" in df.columns:
        df = df.sort_values("timestamp", kind="stable")
    return {str(u): [str(i) for i in its]
            for u, its in df.groupby("user_id", sort=False)["item_id"]}


def join_history(items: Sequence[str]) -> str:
    """A history as the served model takes it: item IDs joined by HISTORY_SEPARATOR."""
    return HISTORY_SEPARATOR.join(str(i) for i in items)


@dataclass(frozen=True)
class FewShotTask:
    """Cold users with their first ``n`` interactions revealed as the request-time history.

    ``task`` ranks the warm items minus each user's revealed ones; relevant are the user's
    remaining warm-item interactions. ``history`` is a string per row of the users table
    (``""`` for rows outside the task). ``skipped``: cold users with fewer than ``n + 1``
    interactions, left out at this ``n``.
    """

    n: int
    task: SegmentTask
    history: np.ndarray  # object [n_users_table]
    skipped: int


def fewshot_tasks(split: ColdStartSplit, users: pd.DataFrame, items: pd.DataFrame,
                  ns: Sequence[int] = FEWSHOT_NS) -> dict[int, FewShotTask]:
    """The few-shot cold-user tasks of one split (the test split, or the validation split's
    pseudo-cold users): each cold user's interactions (cold-user and cold-both, in time
    order) split into the first ``n`` (the history) and the rest (the test, over warm items).
    """
    u_index = pd.Index(users["user_id"].astype(str))
    i_index = pd.Index(items["item_id"].astype(str))
    cand = np.sort(i_index.get_indexer(list(split.warm_items)))
    pos = pd.Series(np.arange(len(cand)), index=i_index[cand])
    frame = pd.concat([split.cold_user, split.cold_both]).sort_index(kind="stable")
    seqs = user_sequences(frame)
    out = {}
    for n in ns:
        history = np.full(len(users), "", dtype=object)
        user_rows, relevant, excluded, skipped = [], [], [], 0
        for uid in sorted(seqs):
            seq = seqs[uid]
            if len(seq) < n + 1:
                skipped += 1
                continue
            shown = seq[:n]
            revealed = np.unique(pos.reindex(shown).dropna().to_numpy(dtype=np.int64))
            rel = np.setdiff1d(pos.reindex(seq[n:]).dropna().to_numpy(dtype=np.int64), revealed)
            if not len(rel):
                continue
            row = u_index.get_loc(uid)
            user_rows.append(row)
            relevant.append(rel)
            excluded.append(revealed)
            history[row] = join_history(shown)
        task = SegmentTask(f"fewshot@{n}", np.asarray(user_rows, np.int64), cand, relevant,
                           excluded)
        out[n] = FewShotTask(n, task, history, skipped)
    return out


#: ``embed_users(history [n_users_table] object) -> ScoreFn``: a model's scores once each
#: user carries the given history.
HistoryScorer = Callable[[np.ndarray], ScoreFn]


def evaluate_fewshot(tasks: dict[int, FewShotTask], scorer: HistoryScorer,
                     ks: Sequence[int]) -> dict[str, dict]:
    """Metrics per history length ``n`` (keys ``"n=0"``, ``"n=1"``, ...), with the number
    of users skipped for having fewer than ``n + 1`` interactions."""
    out = {}
    for n, ft in tasks.items():
        fn = scorer(ft.history)
        out[f"n={n}"] = {**rank_metrics(ft.task, fn, ks), "skipped": ft.skipped}
    return out


def write_report(report: dict[str, Any], out_dir: str | Path, headline_k: int = 20) -> dict:
    """Write ``report.json``, ``report.md`` and ``report.png`` atomically; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md",
             "png": out_dir / "report.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write_text(paths["md"], report_markdown(report, headline_k))
    plot_report(report, paths["png"], headline_k)
    return paths


def _fmt(seg: dict[str, Any], key: str) -> str:
    v = seg.get(key)
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    if "std" in seg and key in seg["std"]:
        s += f" ± {seg['std'][key]:.3f}"
    if seg.get("fallback"):
        s += "†"
    return s


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def metrics_table(report: dict[str, Any], headline_k: int = 20) -> str:
    """Markdown table: one row per model, Recall@K and NDCG@K per segment."""
    models = report["models"]
    head = ["model"] + [f"{SEGMENT_TITLES[s]} R@{headline_k}" for s in SEGMENTS] + [
        f"{SEGMENT_TITLES[s]} N@{headline_k}" for s in SEGMENTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, segs in models.items():
        cells = [name]
        for metric in ("recall", "ndcg"):
            for s in SEGMENTS:
                seg = segs.get(s, {})
                cells.append(_fmt(seg, f"{metric}@{headline_k}") if seg else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(report: dict[str, Any], headline_k: int = 20) -> str:
    proto = report.get("protocol", {})
    users = {s: next((m[s]["users"] for m in report["models"].values() if s in m), 0)
             for s in SEGMENTS}
    lines = [f"# Cold-start report: {report.get('dataset', '?')}", "",
             f"Protocol: {json.dumps(proto)}", "",
             "Users per segment: " + ", ".join(f"{SEGMENT_TITLES[s]} {users[s]}" for s in SEGMENTS),
             "", f"## Recall@{headline_k} and NDCG@{headline_k}", "",
             metrics_table(report, headline_k)]
    if isinstance(report.get("cold_paths"), dict):  # where `recommend` embeds new entities
        paths = report["cold_paths"]
        lines.append("`recommend` embeds new users with the "
                     + " and new items with the ".join(
                         "teacher's content path" if paths.get(s) == "teacher" else "student"
                         for s in ("user", "item")) + " (chosen on validation).\n")
    if any(seg.get("fallback") for m in report["models"].values() for seg in m.values()
           if isinstance(seg, dict)):
        lines.append("† this side has no content features: unseen entities fall back to "
                     "popularity.\n")
    if report.get("mixed"):
        lines += ["## Mixed catalogue (warm users rank warm and new items together)", "",
                  f"| model | R@{headline_k} | N@{headline_k} | new items in top {headline_k} | "
                  "new items among held-out | ratio |", "|---|---|---|---|---|---|"]
        for name, m in report["mixed"].items():
            share = m.get("cold_share") or {}
            lines.append(f"| {name} | {_num(m.get(f'recall@{headline_k}'))} | "
                         f"{_num(m.get(f'ndcg@{headline_k}'))} | {_num(share.get('top_k'))} | "
                         f"{_num(share.get('held_out'))} | {_num(share.get('ratio'))} |")
        lines += ["", "A ratio within [0.5, 2] means new items are neither buried nor flooded.",
                  ""]
    ks = sorted({int(k.split("@")[1]) for m in report["models"].values() for seg in m.values()
                 if isinstance(seg, dict) for k in seg if k.startswith("recall@")})
    lines += ["## All cut-offs", "", "| model | segment | " + " | ".join(
        f"R@{k} | N@{k}" for k in ks) + " | users |", "|" + "---|" * (3 + 2 * len(ks))]
    for name, segs in report["models"].items():
        for s in SEGMENTS:
            if s in segs:
                seg = segs[s]
                vals = " | ".join(f"{_num(seg.get(f'recall@{k}'))} | "
                                  f"{_num(seg.get(f'ndcg@{k}'))}" for k in ks)
                lines.append(f"| {name} | {SEGMENT_TITLES[s]} | {vals} | {seg['users']} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path, headline_k: int = 20) -> None:
    """Grouped bar chart of Recall@K per segment and model, written atomically."""
    import matplotlib  # heavy, and only reports draw: imported when one is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, name in enumerate(models):
        vals = [report["models"][name].get(s, {}).get(f"recall@{headline_k}") for s in SEGMENTS]
        vals = [math.nan if v is None else v for v in vals]
        errs = [report["models"][name].get(s, {}).get("std", {}).get(f"recall@{headline_k}", 0.0)
                for s in SEGMENTS]
        ax.bar(np.arange(len(SEGMENTS)) + j * width, vals, width, yerr=errs, label=name)
    ax.set_xticks(np.arange(len(SEGMENTS)) + width * (len(models) - 1) / 2)
    ax.set_xticklabels([SEGMENT_TITLES[s] for s in SEGMENTS])
    ax.set_ylabel(f"Recall@{headline_k}")
    ax.set_title(f"{report.get('dataset', '')}: Recall@{headline_k} by segment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def aggregate(reports: list[dict[str, dict]]) -> dict[str, dict]:
    """Mean and standard deviation over seeds of ``{model: {segment: metrics}}``."""
    out: dict[str, dict] = {}
    for model in reports[0]:
        out[model] = {}
        for seg in reports[0][model]:
            keys = [k for k in reports[0][model][seg] if "@" in k]
            vals = {k: [r[model][seg][k] for r in reports] for k in keys}
            if any(v is None for vs in vals.values() for v in vs):  # an empty segment
                out[model][seg] = {k: None for k in keys} | {"users": 0, "seeds": len(reports)}
                continue
            entry: dict[str, Any] = {k: float(np.mean(v)) for k, v in vals.items()}
            entry["std"] = {k: float(np.std(v)) for k, v in vals.items()}
            entry["users"] = reports[0][model][seg]["users"]
            entry["seeds"] = len(reports)
            if reports[0][model][seg].get("fallback"):
                entry["fallback"] = reports[0][model][seg]["fallback"]
            out[model][seg] = entry
    return out
