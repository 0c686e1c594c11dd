"""Top-K retrieval indexes over the item catalogue, and the ANN-recall gate.

Indexes are TFRS's own layers (:class:`tfrs.layers.factorized_top_k.ScaNN` and
``BruteForce``), so what is exported is what the library documents. ScaNN's
parameters follow its own guidance (``scann/docs/algorithms.md``): a k-means
tree with about ``sqrt(n)`` leaves, a fraction of them searched per query,
asymmetric hashing with 2 dimensions per block for scoring, and an exact
re-ordering of a few times ``k`` candidates. An approximate index is only
published when its recall@k against exact search on real user queries reaches a
gate (default 0.95): a silently bad index looks healthy in every other check.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_coldstart.errors import UserError

INDEX_KINDS = ("scann", "brute-force")
#: ScaNN's asymmetric hashing trains 16 centres per block, so it needs at least 16 items.
SCANN_MIN_ITEMS = 16
_TIE_TOL = 1e-5  # exact-score tolerance under which two items count as tied

# search_fn(queries float32 [n, dim]) -> (scores [n, k], ids [n, k])
SearchFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class IndexBuildError(UserError, ValueError):
    """An index cannot be built from these items or parameters; the message says what to change."""


class AnnRecallError(IndexBuildError):
    """The approximate index misses too many of the exact top-k items (below the recall gate)."""


def scann_params(
    n_items: int,
    dim: int,
    k: int = 100,
    num_leaves: int | None = None,
    num_leaves_to_search: int | None = None,
    num_reordering_candidates: int | None = None,
    dimensions_per_block: int = 2,
    training_iterations: int = 12,
    training_sample_size: int | None = None,
    anisotropic_threshold: float = 0.2,
) -> dict[str, Any]:
    """ScaNN parameters for a catalogue of ``n_items`` embeddings of width ``dim``.

    Defaults follow ScaNN's guidance: ``num_leaves ~ sqrt(n)`` (at least 1, at most
    ``n``); enough leaves searched that they hold, on average, twice the re-ordering
    candidates, and never fewer than 10% of the leaves; ``4 * k`` candidates (at least
    100, at most ``n``) re-ordered with exact scores; asymmetric hashing with 2
    dimensions per block and anisotropic quantization (threshold 0.2 for unit vectors,
    scaled by the catalogue's median norm at build time). The k-means tree trains on
    up to 1,000,000 items (ScaNN's own default samples 100,000: at 1M items that
    costs 0.1 of recall@10 at the same leaves searched; measured in BENCHMARKS.md).
    A value given explicitly wins and is listed in ``overridden``, so the recall gate
    will not tune it.
    """
    if n_items < 1:
        raise IndexBuildError("cannot size a ScaNN index for an empty catalogue")
    if dim < 1:
        raise IndexBuildError(f"embedding width must be positive, got {dim}")
    k = max(1, min(int(k), n_items))
    leaves = num_leaves if num_leaves is not None else round(math.sqrt(n_items))
    leaves = max(1, min(int(leaves), n_items))
    reorder = (num_reordering_candidates if num_reordering_candidates is not None
               else max(4 * k, 100))
    reorder = max(k, min(int(reorder), n_items))
    if num_leaves_to_search is not None:
        search = int(num_leaves_to_search)
    else:
        frac = max(0.1, min(1.0, 2.0 * reorder / n_items))
        search = math.ceil(frac * leaves)
    search = max(1, min(search, leaves))
    overridden = [name for name, v in (("num_leaves", num_leaves),
                                       ("num_leaves_to_search", num_leaves_to_search),
                                       ("num_reordering_candidates", num_reordering_candidates))
                  if v is not None]
    return {"num_leaves": leaves, "num_leaves_to_search": search,
            "num_reordering_candidates": reorder,
            "dimensions_per_block": int(dimensions_per_block),
            "training_iterations": int(training_iterations),
            "training_sample_size": int(training_sample_size or min(n_items, 1_000_000)),
            "anisotropic_threshold": float(anisotropic_threshold),
            "distance_measure": "dot_product", "overridden": overridden}


def _check_catalogue(item_ids: np.ndarray, item_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(item_ids).astype(str)
    emb = np.asarray(item_emb, dtype=np.float32)
    if emb.ndim != 2:
        raise IndexBuildError(
            f"item embeddings must be a [n_items, dim] matrix, got shape {emb.shape}")
    if len(ids) != len(emb):
        raise IndexBuildError(
            f"{len(ids)} item ids but {len(emb)} item embeddings; they must align")
    if len(ids) == 0:
        raise IndexBuildError("the item catalogue is empty: there is nothing to index")
    if not np.isfinite(emb).all():
        row = int(np.argwhere(~np.isfinite(emb))[0][0])
        raise IndexBuildError(f"item '{ids[row]}' (row {row}) has a non-finite embedding; "
                              "check that item's numeric / dense_vector features")
    return ids, emb


class _ScaNN(tfrs.layers.factorized_top_k.ScaNN):
    """TFRS's ScaNN layer, with the tree's training sample and anisotropic quantization set.

    TFRS builds its searcher with ScaNN's defaults for both (a 100,000-item k-means sample,
    isotropic quantization) and exposes neither, so the builder is replaced here; search,
    serialisation and export are TFRS's own.
    """

    def __init__(self, params: Mapping[str, Any], k: int,
                 query_model: tf.keras.Model | None = None) -> None:
        super().__init__(query_model, k=k,
                         distance_measure=params.get("distance_measure", "dot_product"),
                         num_leaves=int(params["num_leaves"]),
                         num_leaves_to_search=int(params["num_leaves_to_search"]),
                         training_iterations=int(params.get("training_iterations", 12)),
                         dimensions_per_block=int(params.get("dimensions_per_block", 2)),
                         num_reordering_candidates=params.get("num_reordering_candidates"))
        from scann.scann_ops.py import scann_ops

        def build_searcher(candidates: tf.Tensor) -> Any:
            n = int(candidates.shape[0])
            norm = float(np.median(np.linalg.norm(candidates.numpy(), axis=1))) or 1.0
            builder = scann_ops.builder(db=candidates, num_neighbors=k,
                                        distance_measure=params.get("distance_measure",
                                                                    "dot_product"))
            builder = builder.tree(
                num_leaves=int(params["num_leaves"]),
                num_leaves_to_search=int(params["num_leaves_to_search"]),
                training_sample_size=min(n, int(params.get("training_sample_size", n))),
                training_iterations=int(params.get("training_iterations", 12)))
            builder = builder.score_ah(
                int(params.get("dimensions_per_block", 2)),
                anisotropic_quantization_threshold=float(
                    params.get("anisotropic_threshold", 0.2)) * norm)
            if params.get("num_reordering_candidates") is not None:
                builder = builder.reorder(int(params["num_reordering_candidates"]))
            return builder.build(shared_name=f"{self.name}/{uuid.uuid4()}")

        self._build_searcher = build_searcher


def build_index(
    user_tower: tf.keras.Model | None,
    item_ids: np.ndarray,
    item_emb: np.ndarray,
    k: int,
    kind: str = "scann",
    params: Mapping[str, Any] | None = None,
) -> tfrs.layers.factorized_top_k.TopK:
    """A TFRS top-k layer over the catalogue; ``layer(queries) -> (scores, ids)``.

    ``user_tower`` becomes the layer's query model (raw features in); pass ``None`` to
    query with embeddings. ``k`` is clamped to the catalogue size. ``params`` are
    :func:`scann_params` output (default: computed from the catalogue; unused by brute force).
    """
    ids, emb = _check_catalogue(item_ids, item_emb)
    k = max(1, min(int(k), len(ids)))
    if kind == "brute-force":
        layer = tfrs.layers.factorized_top_k.BruteForce(user_tower, k=k)
    elif kind == "scann":
        if len(ids) < SCANN_MIN_ITEMS:
            raise IndexBuildError(
                f"ScaNN's asymmetric hashing needs at least {SCANN_MIN_ITEMS} items, the "
                f"catalogue has {len(ids)}; export with --index brute-force (exact, and fast at "
                "this size)")
        p = dict(params) if params else scann_params(len(ids), emb.shape[1], k)
        try:
            layer = _ScaNN(p, k, user_tower)
        except KeyError as e:
            raise IndexBuildError(
                f"ScaNN params lack {e}; build them with scann_params()") from None
    else:
        raise IndexBuildError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
    try:
        layer.index(tf.constant(emb), tf.constant(ids))
    except (tf.errors.InvalidArgumentError, tf.errors.FailedPreconditionError) as e:
        raise IndexBuildError(f"ScaNN could not build the index with {dict(params or {})}: "
                              f"{e.message}") from None
    return layer


@dataclass
class ExactIndex:
    """Exact top-k by dot product in NumPy: the reference an approximate index is measured by."""

    item_ids: np.ndarray
    item_emb: np.ndarray
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_ids, self.item_emb = _check_catalogue(self.item_ids, self.item_emb)
        self._row = {v: i for i, v in enumerate(self.item_ids)}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [n, k], ids [n, k])``, best first; queries go in chunks to bound memory."""
        q = np.asarray(queries, np.float32)
        k = min(k, len(self.item_ids))
        step = max(1, (1 << 25) // len(self.item_ids))  # ~128 MB of scores per chunk
        out_s, out_i = [], []
        for s in range(0, len(q), step):
            sc = q[s:s + step] @ self.item_emb.T
            top = np.argpartition(-sc, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sc, top, 1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, 1)
            out_s.append(np.take_along_axis(sc, top, 1))
            out_i.append(self.item_ids[top])
        return np.concatenate(out_s), np.concatenate(out_i)

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.search(queries, k)

    def kth_scores(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The k-th best exact score per query, ``[n]``; cached, since the recall gate
        measures many index settings against the same queries (exact search at 1M items is
        the expensive part)."""
        q = np.ascontiguousarray(queries, np.float32)
        key = (hash(q.tobytes()), q.shape, k)
        cache = self.__dict__.setdefault("_kth_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = self.search(q, k)[0][:, -1]
        return cache[key]

    def score(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact scores of ``ids [n, m]`` for each query; ``-inf`` for unknown ids (padding)."""
        ids = np.asarray(ids).astype(str)
        rows = np.array([self._row.get(v, -1) for v in ids.ravel()], np.int64).reshape(ids.shape)
        emb = self.item_emb[np.maximum(rows, 0)]
        sc = np.einsum("nd,nmd->nm", np.asarray(queries, np.float32), emb)
        return np.where(rows >= 0, sc, -np.inf)


def _decode(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.dtype == object and ids.size and isinstance(ids.flat[0], bytes):
        return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(ids).astype(str)
    return ids.astype(str)


def _as_search_fn(index_or_fn: Any, k: int) -> SearchFn:
    if isinstance(index_or_fn, tfrs.layers.factorized_top_k.TopK):
        def fn(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s, i = index_or_fn(tf.constant(q, tf.float32), k=k)
            return s.numpy(), i.numpy()
        return fn
    return index_or_fn


def ann_recall(index_or_fn: Any, exact_fn: ExactIndex | Callable[..., Any],
               queries: np.ndarray, k: int, batch_size: int = 256) -> float:
    """Mean recall@k of an approximate index against exact search over ``queries``.

    ``index_or_fn``: a TFRS top-k layer queried with embeddings, or a callable
    ``queries -> (scores, ids)``; ``exact_fn``: an :class:`ExactIndex` or a callable
    ``(queries, k) -> (scores, ids)``. With an :class:`ExactIndex`, ties count: a returned
    item is a hit when its exact score reaches the k-th best exact score (items with the
    same content have the same embedding, and which of them exact search lists first is
    arbitrary). Padding and repeated ids never count.
    """
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or not len(q):
        raise IndexBuildError(
            f"recall needs a non-empty [n, dim] query matrix, got shape {q.shape}")
    fn = _as_search_fn(index_or_fn, k)
    hits: list[float] = []
    if isinstance(exact_fn, ExactIndex):
        kth_all = exact_fn.kth_scores(q, k)
        kk = min(k, len(exact_fn.item_ids))
    for s in range(0, len(q), batch_size):
        qb = q[s:s + batch_size]
        got = _decode(fn(qb)[1])[:, :k]
        if isinstance(exact_fn, ExactIndex):
            got_scores = exact_fn.score(qb, got)
            for row_ids, row_sc, kth in zip(got, got_scores, kth_all[s:s + batch_size],
                                            strict=True):
                seen: set[str] = set()
                n = 0
                tol = _TIE_TOL * max(1.0, abs(float(kth)))  # relative: scores may be scaled
                for v, sc in zip(row_ids, row_sc, strict=True):
                    if v not in seen and sc >= kth - tol:
                        n += 1
                    seen.add(v)
                hits.append(min(n, kk) / kk)
        else:
            ex = _decode(exact_fn(qb, k)[1])
            for a, b in zip(got, ex, strict=True):
                hits.append(len(set(a) & set(b)) / max(1, len(b)))
    return float(np.mean(hits))


def _probe(layer: tfrs.layers.factorized_top_k.TopK, ids: np.ndarray, leaves: int,
           reorder: int, k: int) -> SearchFn | None:
    """Search a built ScaNN index with other ``leaves_to_search`` and re-ordering counts
    (both are query-time arguments of ScaNN's searcher), without rebuilding it."""
    module = getattr(layer, "_serialized_searcher", None)  # where TFRS keeps the searcher
    if module is None:
        return None
    from scann.scann_ops.py import scann_ops

    searcher = scann_ops.searcher_from_module(module)

    def fn(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = searcher.search_batched(tf.constant(q, tf.float32), final_num_neighbors=k,
                                      pre_reorder_num_neighbors=reorder, leaves_to_search=leaves)
        dist = res.distances.numpy()
        out = ids[np.clip(res.indices.numpy(), 0, len(ids) - 1)].astype(object)
        out[np.isnan(dist)] = ""  # ScaNN pads short results with NaN distances
        return dist, out
    return fn


@dataclass
class GatedIndex:
    """A built index with the recall it reached and the parameters that got it there."""

    layer: tfrs.layers.factorized_top_k.TopK
    kind: str
    k: int
    params: dict[str, Any]
    recall: float | None  # None for brute force: exact by construction
    gate: float | None
    n_queries: int
    trials: list[dict[str, Any]]


def build_gated_index(
    item_ids: np.ndarray,
    item_emb: np.ndarray,
    queries: np.ndarray,
    k: int,
    kind: str = "scann",
    gate: float = 0.95,
    params: Mapping[str, Any] | None = None,
) -> GatedIndex:
    """Build an index over item embeddings and enforce the ANN-recall gate on ``queries``.

    Brute force is exact (not measured). For ScaNN, the parameters the caller did not set
    among ``num_leaves_to_search`` and ``num_reordering_candidates`` are doubled, whichever
    gains more recall first (probed on the built index, then rebuilt), until the gate
    passes or both are at their maximum; a final recall below ``gate`` raises
    :class:`AnnRecallError` naming the recall and the knobs to turn.
    """
    ids, emb = _check_catalogue(item_ids, item_emb)
    k = max(1, min(int(k), len(ids)))
    if kind == "brute-force":
        return GatedIndex(build_index(None, ids, emb, k, kind), kind, k, {}, None, None, 0, [])
    if kind != "scann":
        raise IndexBuildError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
    if not gate > 0:
        raise IndexBuildError(f"ann_recall_gate must be positive, got {gate}")
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or not len(q) or q.shape[1] != emb.shape[1]:
        raise IndexBuildError(
            f"the recall gate needs real user query embeddings [n, {emb.shape[1]}], "
            f"got shape {q.shape}")
    p = dict(params) if params else scann_params(len(ids), emb.shape[1], k)
    exact = ExactIndex(ids, emb)
    fixed = set(p.get("overridden", []))
    trials: list[dict[str, Any]] = []
    while True:
        layer = build_index(None, ids, emb, k, "scann", p)
        recall = ann_recall(layer, exact, q, k)
        leaves, search = p["num_leaves"], p["num_leaves_to_search"]
        reorder = p["num_reordering_candidates"]
        trials.append({"num_leaves_to_search": search, "num_reordering_candidates": reorder,
                       "recall": recall})
        if recall >= gate:
            break
        # Probe the built index with more leaves searched or more candidates re-ordered
        # (whichever gains more recall, doubling), then rebuild with what passes.
        cur = (search, reorder)
        while True:
            options = []
            if "num_leaves_to_search" not in fixed and cur[0] < leaves:
                options.append((min(leaves, cur[0] * 2), cur[1]))
            if "num_reordering_candidates" not in fixed and cur[1] < len(ids):
                options.append((cur[0], min(len(ids), cur[1] * 2)))
            if not options:
                break
            probes = [_probe(layer, ids, s_, r_, k) for s_, r_ in options]
            if any(pr is None for pr in probes):  # cannot probe: take the first step blind
                cur = options[0]
                break
            scored = [(ann_recall(pr, exact, q, k), o) for pr, o in zip(probes, options,
                                                                          strict=True)]
            r, cur = max(scored, key=lambda t: t[0])  # ties: the first (fewer leaves)
            trials.append({"num_leaves_to_search": cur[0], "num_reordering_candidates": cur[1],
                           "recall": r, "probe": True})
            if r >= gate:
                break
        if cur == (search, reorder):
            break  # nothing left to turn
        p = {**p, "num_leaves_to_search": cur[0], "num_reordering_candidates": cur[1]}
    if recall < gate:
        raise AnnRecallError(
            f"ANN recall@{k} of the ScaNN index is {recall:.4f} on {len(q)} real user queries, "
            f"below the gate {gate} (export.ann_recall_gate / --ann-recall-gate). Knobs: raise "
            f"export.scann_leaves_to_search (now {p['num_leaves_to_search']} of "
            f"{p['num_leaves']} leaves; more leaves searched is slower but finds more), raise "
            f"export.scann_reorder (now {p['num_reordering_candidates']}), lower "
            "export.scann_num_leaves, or export with --index brute-force (exact)")
    return GatedIndex(layer, kind, k, p, recall, gate, len(q), trials)
