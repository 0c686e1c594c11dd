"""Top-K retrieval indexes over the item catalogue, and the ANN-recall gate.

Indexes are TFRS's own layers (:class:`tfrs.layers.factorized_top_k.ScaNN` and
``BruteForce``), so what is exported is what the library documents. ScaNN's
parameters follow its own guidance (``scann/docs/algorithms.md``): a k-means
tree with about ``sqrt(n)`` leaves, a fraction of them searched per query,
asymmetric hashing with 2 dimensions per block for scoring, and an exact
re-ordering of a few times ``k`` candidates. An approximate index is only
published when its recall@k against exact search on real user queries reaches a
gate (default 0.95): a silently bad index looks healthy in every other check.

:class:`PartitionedTopK` is the approximate index for the official TF Serving image: a
k-means partition of the catalogue searched with TensorFlow's own ops only (centroid
scores, top leaves, an exact re-score of their items, top-k), so no custom op is needed.
"""

from __future__ import annotations

import math
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

# k-means for the partitioned index: scikit-learn's KMeans (k-means++ seeding, Lloyd
# iterations, deterministic under random_state) is a well-kept, well-tested implementation;
# TensorFlow's own (tf.compat.v1.estimator.experimental.KMeans) went away with the
# estimators in TF 2.16, and a hand-written loop would be one more thing to get right.
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning

from tfrs_coldstart.errors import UserError

INDEX_KINDS = ("scann", "partitioned", "brute-force")
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


#: Floats gathered per chunk of queries by the partitioned index (64 MB): a large batch is
#: searched in chunks so memory stays bounded whatever the batch size.
PARTITIONED_GATHER_BUDGET = 1 << 24
#: Items the partitioned index's k-means trains on at most (all items are then assigned).
PARTITIONED_MAX_SAMPLE = 250_000
#: k-means++ seeds from at most this many sampled items per cell: seeding is sequential (one
#: distance pass over its sample per cell), so seeding on the whole 250,000-item sample took
#: longer than the Lloyd iterations at a million items (1,000 cells).
PARTITIONED_SEED_PER_CELL = 32
_LEAVES_GROWTH = 1.5  # the recall gate raises leaves_to_search by this factor per step


def partitioned_params(
    n_items: int,
    dim: int,
    k: int = 100,
    num_clusters: int | None = None,
    leaves_to_search: int | None = None,
    training_iterations: int = 20,
    training_sample_size: int | None = None,
) -> dict[str, Any]:
    """Parameters of a :class:`PartitionedTopK` over ``n_items`` embeddings of width ``dim``.

    ``num_clusters`` k-means cells (default ``sqrt(n)``, like ScaNN's tree);
    ``leaves_to_search`` leaves scored exactly per query (``None``: chosen at build time so
    that they hold about ``max(8 * k, 2% of n)`` items; the recall gate raises it until
    recall@k passes). A value given explicitly is listed in ``overridden`` and never tuned.
    """
    if n_items < 1:
        raise IndexBuildError("cannot size a partitioned index for an empty catalogue")
    if dim < 1:
        raise IndexBuildError(f"embedding width must be positive, got {dim}")
    for name, v in (("num_clusters", num_clusters), ("leaves_to_search", leaves_to_search)):
        if v is not None and int(v) < 1:
            raise IndexBuildError(f"partitioned {name} must be at least 1, got {v}")
    clusters = num_clusters if num_clusters is not None else round(math.sqrt(n_items))
    clusters = max(1, min(int(clusters), n_items))
    overridden = [name for name, v in (("num_clusters", num_clusters),
                                       ("leaves_to_search", leaves_to_search)) if v is not None]
    return {"num_clusters": clusters,
            "leaves_to_search": None if leaves_to_search is None else int(leaves_to_search),
            "target_candidates": max(8 * max(1, int(k)), math.ceil(0.02 * n_items)),
            "training_iterations": int(training_iterations),
            "training_sample_size": int(training_sample_size
                                        or min(n_items, PARTITIONED_MAX_SAMPLE)),
            "distance_measure": "dot_product", "overridden": overridden}


def _kmeans_cells(emb: np.ndarray, clusters: int, iterations: int, sample: int,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids [c, dim], cell of each item [n])``, empty cells dropped.

    k-means trains on a random sample of at most ``sample`` items, then every item goes to
    its nearest centroid (in chunks, so memory stays bounded at a million items).
    """
    n = len(emb)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, max(1, sample)), replace=False))
    clusters = max(1, min(clusters, len(rows)))
    train = emb[rows]
    seed_rows = rng.choice(len(train), size=min(len(train), clusters * PARTITIONED_SEED_PER_CELL),
                           replace=False)
    with warnings.catch_warnings():  # duplicate embeddings give fewer distinct cells: fine
        warnings.simplefilter("ignore", ConvergenceWarning)
        init, _ = kmeans_plusplus(train[np.sort(seed_rows)], clusters, random_state=seed)
        km = KMeans(n_clusters=clusters, init=init, n_init=1, max_iter=max(1, iterations),
                    random_state=seed, algorithm="lloyd").fit(train)
    centroids = km.cluster_centers_.astype(np.float32)
    sq = (centroids * centroids).sum(axis=1)
    cell = np.empty(n, np.int64)
    step = max(1, (1 << 24) // clusters)
    for s in range(0, n, step):
        cell[s:s + step] = np.argmin(sq[None, :] - 2.0 * emb[s:s + step] @ centroids.T, axis=1)
    used, cell = np.unique(cell, return_inverse=True)
    return centroids[used], cell.reshape(-1)


def _leaf_size(sizes: np.ndarray, dim: int) -> int:
    """Rows per leaf: a cell bigger than this is split into several leaves (sharing its
    centroid), a smaller one is padded. Chosen to minimise the work of a search (padded rows
    scored, weighted by the ~10% of leaves a search reads, plus one centroid per leaf), so a
    few oversized k-means cells do not pad every leaf to their size."""
    mean = float(sizes.mean())
    cands = {max(1, math.ceil(mean * r)) for r in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)}
    cands.add(int(sizes.max()))

    def cost(m: int) -> float:
        leaves = np.ceil(sizes / m)
        return 0.1 * float((leaves * m).sum()) + float(leaves.sum())

    return min(sorted(cands), key=cost)


class PartitionedTopK(tfrs.layers.factorized_top_k.TopK):
    """Approximate top-k over a k-means partition, in TensorFlow's own ops only.

    Export time: k-means (scikit-learn) splits the catalogue into cells; each cell is cut
    into leaves of ``leaf_size`` rows (padded), held as a ``[n_leaves, leaf_size, dim]``
    embedding table, a ``[n_leaves, leaf_size]`` table of item rows (``n`` marks padding)
    and the leaves' centroids. Query time: score the centroids, take the best
    ``leaves_to_search`` leaves, gather their items, score them exactly, top-k. Slots no
    reachable item fills score ``-inf`` with id ``""``. Scores are exact dot products, so
    what the index finds is ranked as brute force ranks it. The layer is called like the
    TFRS top-k layers: ``layer(queries, k=k) -> (scores [b, k], ids [b, k])``.
    """

    def __init__(self, query_model: tf.keras.Model | None = None, k: int = 10,
                 params: Mapping[str, Any] | None = None, name: str | None = None) -> None:
        super().__init__(k=k, name=name)
        self.query_model = query_model
        self._params = dict(params or {})
        self._built_index = False
        self.leaves_to_search = 1
        self.n_items = self.n_leaves = self.leaf_size = self.dim = 0

    def index(self, candidates: tf.Tensor,
              identifiers: tf.Tensor | None = None) -> PartitionedTopK:
        emb = np.asarray(candidates, np.float32)
        if emb.ndim != 2 or not len(emb):
            raise IndexBuildError(f"the partitioned index needs a non-empty [n, dim] matrix, "
                                  f"got shape {emb.shape}")
        n, dim = emb.shape
        ids = (np.arange(n).astype(str) if identifiers is None
               else _decode(np.asarray(identifiers))).astype(object)
        p = {**partitioned_params(n, dim, self._k), **self._params}
        centroids, cell = _kmeans_cells(emb, int(p["num_clusters"]),
                                        int(p["training_iterations"]),
                                        int(p["training_sample_size"]))
        sizes = np.bincount(cell, minlength=len(centroids))
        m = _leaf_size(sizes, dim)
        order = np.argsort(cell, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        leaf_rows, leaf_cent = [], []
        for c in range(len(centroids)):
            members = order[starts[c]:starts[c + 1]]
            for s in range(0, len(members), m):
                block = np.full(m, n, np.int32)
                block[:len(members[s:s + m])] = members[s:s + m]
                leaf_rows.append(block)
                leaf_cent.append(centroids[c])
        rows = np.stack(leaf_rows)
        table = np.concatenate([emb, np.zeros((1, dim), np.float32)])[rows]
        self.n_items, self.n_leaves, self.leaf_size, self.dim = n, len(rows), m, dim
        self._centroids = tf.Variable(np.stack(leaf_cent), trainable=False, name="centroids")
        self._leaf_emb = tf.Variable(table, trainable=False, name="leaf_embeddings")
        self._leaf_rows = tf.Variable(rows, trainable=False, name="leaf_rows")
        self._identifiers = tf.Variable(
            tf.constant(np.concatenate([ids, np.array([""], object)]), tf.string),
            trainable=False, name="identifiers")
        if p.get("leaves_to_search") is not None:
            search = int(p["leaves_to_search"])
        else:
            search = math.ceil(int(p["target_candidates"]) / m)
        self.leaves_to_search = max(1, min(search, self.n_leaves))
        self._params = {**p, "num_clusters": int(len(centroids))}
        self._built_index = True
        self._reset_tf_function_cache()
        return self

    @property
    def params(self) -> dict[str, Any]:
        """What the manifest records: the partition's shape and the query-time setting."""
        p = {k: v for k, v in self._params.items() if k != "target_candidates"}
        p["overridden"] = list(p.get("overridden", []))  # plain data, not Keras's wrapper
        return {**p, "num_leaves": self.n_leaves, "leaf_size": self.leaf_size,
                "leaves_to_search": self.leaves_to_search,
                "index_rows": self.n_leaves * self.leaf_size}

    def _search(self, q: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
        """One chunk of queries ``[c, dim]`` -> ``(scores [c, k], item rows [c, k])``."""
        n, width = self.n_items, self.leaves_to_search * self.leaf_size
        _, leaves = tf.math.top_k(tf.matmul(q, self._centroids, transpose_b=True),
                                  k=self.leaves_to_search)
        emb = tf.reshape(tf.gather(self._leaf_emb, leaves), [-1, width, self.dim])
        rows = tf.reshape(tf.gather(self._leaf_rows, leaves), [-1, width])
        scores = tf.linalg.matvec(emb, q)
        scores = tf.where(rows < n, scores, tf.constant(-np.inf, tf.float32))
        if width < k:  # fewer reachable slots than k: pad, the caller sees -inf / ""
            scores = tf.pad(scores, [[0, 0], [0, k - width]], constant_values=-np.inf)
            rows = tf.pad(rows, [[0, 0], [0, k - width]], constant_values=n)
        top, pos = tf.math.top_k(scores, k=k)
        return top, tf.gather(rows, pos, batch_dims=1)

    def call(self, queries: tf.Tensor | dict[str, tf.Tensor],
             k: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        if not self._built_index:
            raise ValueError("The `index` method must be called first to create the "
                             "retrieval index.")
        k = int(k if k is not None else self._k)
        if self.query_model is not None:
            queries = self.query_model(queries)
        q = tf.convert_to_tensor(queries, tf.float32)
        # Chunks of queries bound the gathered [chunk, leaves * leaf_size, dim] tensor.
        per_query = self.leaves_to_search * self.leaf_size * self.dim
        chunk_max = max(1, PARTITIONED_GATHER_BUDGET // per_query)
        b = tf.shape(q)[0]
        chunk = tf.maximum(1, tf.minimum(b, chunk_max))
        n_chunks = tf.maximum(1, (b + chunk - 1) // chunk)  # an empty batch: one pad row
        q = tf.pad(q, [[0, n_chunks * chunk - b], [0, 0]])
        chunks = tf.reshape(q, [n_chunks, chunk, self.dim])
        scores, rows = tf.map_fn(
            lambda c: self._search(c, k), chunks, parallel_iterations=1,
            fn_output_signature=(tf.TensorSpec([None, k], tf.float32),
                                 tf.TensorSpec([None, k], tf.int32)))
        scores = tf.reshape(scores, [-1, k])[:b]
        rows = tf.reshape(rows, [-1, k])[:b]
        return scores, tf.gather(self._identifiers, rows)

    def is_exact(self) -> bool:
        return False


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
    :func:`scann_params` (ScaNN) or :func:`partitioned_params` (partitioned) output (default:
    computed from the catalogue; unused by brute force).
    """
    ids, emb = _check_catalogue(item_ids, item_emb)
    k = max(1, min(int(k), len(ids)))
    if kind == "brute-force":
        layer = tfrs.layers.factorized_top_k.BruteForce(user_tower, k=k)
    elif kind == "partitioned":
        p = dict(params) if params else partitioned_params(len(ids), emb.shape[1], k)
        return PartitionedTopK(user_tower, k=k, params=p).index(emb, ids)
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

    Brute force is exact (not measured). For the partitioned index, ``leaves_to_search``
    (unless the caller set it) is raised by half, on the one built partition, until the gate
    passes or every leaf is searched. For ScaNN, the parameters the caller did not set
    among ``num_leaves_to_search`` and ``num_reordering_candidates`` are doubled, whichever
    gains more recall first (probed on the built index, then rebuilt), until the gate
    passes or both are at their maximum; a final recall below ``gate`` raises
    :class:`AnnRecallError` naming the recall and the knobs to turn.
    """
    ids, emb = _check_catalogue(item_ids, item_emb)
    k = max(1, min(int(k), len(ids)))
    if kind == "brute-force":
        return GatedIndex(build_index(None, ids, emb, k, kind), kind, k, {}, None, None, 0, [])
    if kind not in ("scann", "partitioned"):
        raise IndexBuildError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
    if not gate > 0:
        raise IndexBuildError(f"ann_recall_gate must be positive, got {gate}")
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or not len(q) or q.shape[1] != emb.shape[1]:
        raise IndexBuildError(
            f"the recall gate needs real user query embeddings [n, {emb.shape[1]}], "
            f"got shape {q.shape}")
    if kind == "partitioned":
        return _gated_partitioned(ids, emb, q, k, gate, params)
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


def _gated_partitioned(ids: np.ndarray, emb: np.ndarray, q: np.ndarray, k: int, gate: float,
                       params: Mapping[str, Any] | None) -> GatedIndex:
    """The partitioned index's gate: ``leaves_to_search`` is a query-time setting, so the
    partition is built once and searched with more leaves until recall@k reaches ``gate``."""
    p = dict(params) if params else partitioned_params(len(ids), emb.shape[1], k)
    layer = build_index(None, ids, emb, k, "partitioned", p)
    assert isinstance(layer, PartitionedTopK)
    exact = ExactIndex(ids, emb)
    fixed = "leaves_to_search" in p.get("overridden", [])
    trials: list[dict[str, Any]] = []
    while True:
        recall = ann_recall(layer, exact, q, k)
        trials.append({"leaves_to_search": layer.leaves_to_search, "recall": recall})
        if recall >= gate or fixed or layer.leaves_to_search >= layer.n_leaves:
            break
        layer.leaves_to_search = min(layer.n_leaves, max(
            layer.leaves_to_search + 1, math.ceil(layer.leaves_to_search * _LEAVES_GROWTH)))
    if recall < gate:
        raise AnnRecallError(
            f"ANN recall@{k} of the partitioned index is {recall:.4f} on {len(q)} real user "
            f"queries, below the gate {gate} (export.ann_recall_gate / --ann-recall-gate). "
            f"Knobs: raise export.partitioned_leaves_to_search (now {layer.leaves_to_search} "
            f"of {layer.n_leaves} leaves of {layer.leaf_size} items; more leaves searched is "
            "slower but finds more), lower export.partitioned_num_clusters (now "
            f"{layer.params['num_clusters']} k-means cells), or export with --index "
            "brute-force (exact)")
    return GatedIndex(layer, "partitioned", k, layer.params, recall, gate, len(q), trials)
