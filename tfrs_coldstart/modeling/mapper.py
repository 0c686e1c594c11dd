"""The closed-form student: a linear map from content into the teacher's embedding space.

The map is fit by weighted ridge regression from each side's content to the teacher's
trained embeddings of warm entities (``min sum_e r_e |x_e W + b - t_e|^2 + alpha |W|^2``,
``r_e`` the reliability of the teacher's embedding of ``e``: a function of its training
count, as ALDI weights its alignment terms), so it is the distillation alignment term solved
exactly. It is written *into a linear student tower* (no hidden layer, feature width = the
teacher's width): each feature's embedding table holds its block of ``W`` and the output
layer sums the blocks, so the served tower computes exactly the fitted map, and the design
matrix is built from the tower's own lookups (the same vocabularies, buckets and OOV rows).

On MovieLens-100K validation this beat every gradient-trained student tried, including the
same linear tower initialised from it and fine-tuned with ``L_C + lambda * L_D``
(BENCHMARKS.md, "Issue 13").

Example::

    tower = Tower(state, linear_tower_config(64), name="item_tower")
    fit_ridge_tower(tower, warm_items, schema.item_features, "item_id", teacher_emb,
                    reliability(counts), alpha=1.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tensorflow as tf

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.data.pipeline import feature_arrays
from tfrs_coldstart.data.schema import FeatureSpec
from tfrs_coldstart.features.columns import (
    CategoricalColumn,
    DenseVectorColumn,
    IdColumn,
    IdsOfColumn,
    MultiHotColumn,
    NumericColumn,
    TextColumn,
)
from tfrs_coldstart.modeling.towers import KernelHidden, Tower

RELIABILITY = ("tanh", "linear", "log", "none")
ALPHA_BOUNDS = (1e-3, 1e4)  # how far search_alphas follows a curve past its grid's edge
KERNEL_FIT_ROWS = 100_000  # kernel_ridge's rows at most (its time grows as rows x landmarks^2)

R = TypeVar("R")


def reliability(counts: np.ndarray, kind: str = "tanh", scale: float = 10.0) -> np.ndarray:
    """How far a teacher embedding trained on ``counts`` interactions can be trusted, in
    [0, 1]: ``tanh(count / scale)``, ``min(1, count / scale)``, ``tanh(log1p(count) /
    scale)`` or 1 (``none``)."""
    c = np.asarray(counts, np.float64)
    if kind == "tanh":
        return np.tanh(c / scale)
    if kind == "linear":
        return np.minimum(1.0, c / scale)
    if kind == "log":
        return np.tanh(np.log1p(c) / scale)
    if kind == "none":
        return np.ones_like(c)
    raise ValueError(f"reliability must be one of {', '.join(RELIABILITY)}, not {kind!r}")


def linear_tower_config(width: int, base: TowerConfig | None = None) -> TowerConfig:
    """A tower config whose tower is linear in its content: no hidden layer, no dropout, every
    feature embedded at ``width`` (the teacher's width), no ID."""
    return dataclasses.replace(base or TowerConfig(), id_dim=0, feature_dim=width, hidden=(),
                               output_dim=width, dropout=0.0, feature_dropout=0.0)


def _mean_rows(ids: np.ndarray, width: int) -> sp.csr_matrix:
    """Rows of 1/n at each non-padding id (0 is padding): the encoder's masked mean."""
    n, length = ids.shape
    mask = ids > 0
    counts = np.maximum(mask.sum(axis=1, keepdims=True), 1)
    vals = np.broadcast_to(1.0 / counts, ids.shape)[mask]
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)[mask]
    return sp.csr_matrix((vals, (rows, ids[mask])), shape=(n, width))


def design_matrix(tower: Tower, table: pd.DataFrame, specs: tuple[FeatureSpec, ...],
                  id_column: str) -> tuple[sp.csr_matrix, list[tuple[str, int]]]:
    """``X [n_rows, n_design]`` of ``table`` as the linear tower sees it, and its blocks
    ``(column name, width)`` in order. Training-only columns (an ID sink) are left out."""
    arrays = feature_arrays(table, specs, id_column)
    enc = tower.encoder
    blocks, parts = [], []
    for name, col in enc.columns.items():
        layers = enc._parts[name]
        if not col.served or isinstance(col, IdColumn):
            continue
        if col.input_key in arrays:
            x = tf.constant(arrays[col.input_key])
        else:  # a column outside the schema (the request-time history): "" when absent
            x = tf.constant(table[col.input_key].astype(str).to_numpy(dtype=object)
                            if col.input_key in table.columns
                            else np.full(len(table), "", dtype=object))
        if isinstance(col, CategoricalColumn):
            width = int(layers["lookup"].vocabulary_size())
            ids = layers["lookup"](x).numpy()
            block = sp.csr_matrix((np.ones(len(ids)), (np.arange(len(ids)), ids)),
                                  shape=(len(ids), width))
        elif isinstance(col, MultiHotColumn):
            width = int(layers["lookup"].vocabulary_size())
            tags = tf.strings.split(x, sep=col.separator).to_tensor("")
            block = _mean_rows(layers["lookup"](tags).numpy(), width)
        elif isinstance(col, TextColumn):
            width = int(layers["lookup"].vocabulary_size())
            block = _mean_rows(layers["lookup"](x).numpy(), width)
        elif isinstance(col, NumericColumn):
            width = int(layers["emb"].input_dim)
            xf = tf.cast(x, tf.float32)
            ids = layers["disc"](xf).numpy().astype(np.int64)
            z = np.clip((xf.numpy() - col.mean) / np.sqrt(col.variance), -5.0, 5.0)
            onehot = sp.csr_matrix((np.ones(len(ids)), (np.arange(len(ids)), ids)),
                                   shape=(len(ids), width))
            block = sp.hstack([onehot, sp.csr_matrix(z[:, None])], format="csr")
            width += 1
        elif isinstance(col, DenseVectorColumn):
            width = col.dim
            block = sp.csr_matrix(np.asarray(arrays[col.input_key], np.float64))
        elif isinstance(col, IdsOfColumn):
            # IDs of users or items: the mean of the teacher's trained ID rows, a fixed
            # block the map weighs (the column's output enters the output layer directly)
            out = col.encode(layers, {col.input_key: x}, training=False).numpy()
            width = out.shape[1]
            block = sp.csr_matrix(out.astype(np.float64))
        else:
            raise ValueError(f"the closed-form student cannot map feature '{name}' "
                             f"({type(col).__name__}); use student.method=aligned or own")
        blocks.append((name, width))
        parts.append(block)
    if not parts:
        raise ValueError("the closed-form student needs at least one content feature")
    return sp.hstack(parts, format="csr"), blocks


def ridge(x: sp.csr_matrix, y: np.ndarray, weights: np.ndarray | None,
          alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ridge with an unpenalised intercept: ``(W [d, k], b [k])``.

    Solved in the primal (``d x d``) or the dual (``n x n``), whichever is smaller. The
    centring is folded into the normal equations (``Xc'WXc = X'WX - s m m'``, ``m`` the
    weighted column means, ``s`` the weights' sum), so ``x`` stays sparse: memory is its
    nonzeros plus the ``min(n, d)``-square system, not a dense ``n x d`` copy (at 800,000
    entities and 220 design columns that copy was 1.4 GB, three times over).
    """
    x = sp.csr_matrix(x, dtype=np.float64)
    y = np.asarray(y, np.float64)
    n, d = x.shape
    if y.ndim != 2 or len(y) != n:
        raise ValueError(f"ridge: targets must be [n_rows={n}, dim], got {y.shape}")
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    w = w / max(w.mean(), 1e-12)  # mean 1: alpha means the same with or without weights
    total = w.sum()
    x_mean = np.asarray(x.T @ w).ravel() / total  # [d]
    y_mean = (w @ y) / total  # [k]
    if d <= n:
        xtw = (x.T @ sp.diags(w)).tocsr()  # [d, n]
        gram = np.asarray((xtw @ x).todense()) - total * np.outer(x_mean, x_mean)
        rhs = np.asarray(xtw @ y) - total * np.outer(x_mean, y_mean)
        coef = np.linalg.solve(gram + alpha * np.eye(d), rhs)
    else:  # Xc = S (X - 1 m'), S = diag(sqrt w): the n x n kernel, and W = Xc' a
        sw = np.sqrt(w)
        xm = np.asarray(x @ x_mean).ravel()  # [n] x_i . m
        kernel = (np.asarray((x @ x.T).todense()) - xm[:, None] - xm[None, :]
                  + x_mean @ x_mean) * sw[:, None] * sw[None, :]
        a = np.linalg.solve(kernel + alpha * np.eye(n), (y - y_mean) * sw[:, None])
        sa = a * sw[:, None]  # [n, k]
        coef = np.asarray(x.T @ sa) - np.outer(x_mean, sa.sum(0))
    return coef.astype(np.float32), (y_mean - x_mean @ coef).astype(np.float32)


def set_linear_weights(tower: Tower, blocks: list[tuple[str, int]], coef: np.ndarray,
                       intercept: np.ndarray,
                       dense: tf.keras.layers.Dense | KernelHidden | None = None) -> None:
    """Write a linear map into a linear tower (see the module docstring); ``dense``: the
    layer that sums the blocks when it is not the output layer (a kernel tower's hidden
    layer, whose width is the map's)."""
    enc = tower.encoder
    width = int(coef.shape[1])
    if dense is None:
        dense = tower.mlp.layers[-1]
        if tower.cfg.hidden or tower.cfg.feature_dim != width:
            raise ValueError("set_linear_weights needs a linear tower (linear_tower_config)")
    offsets = dict(zip([b[0] for b in blocks], np.cumsum([0] + [b[1] for b in blocks]),
                       strict=False))
    kernel_rows: list[np.ndarray | None] = []  # None: an identity block
    for name, col in enc.columns.items():
        layers = enc._parts[name]
        if not col.served:  # a training-only sink: zeros at inference, no weight needed
            kernel_rows.append(np.zeros((layers.get("width", width) if "emb" not in layers
                                         else layers["emb"].output_dim, width), np.float32))
            continue
        start = offsets[name]
        if isinstance(col, NumericColumn):
            n_b = int(layers["emb"].input_dim)
            layers["emb"].set_weights([coef[start:start + n_b]])
            kernel_rows += [None, coef[start + n_b:start + n_b + 1]]
        elif isinstance(col, DenseVectorColumn):
            layers["proj"].set_weights([coef[start:start + col.dim], np.zeros(width, np.float32)])
            kernel_rows.append(None)
        elif isinstance(col, IdsOfColumn):
            size = int(blocks[[b[0] for b in blocks].index(name)][1])
            kernel_rows.append(coef[start:start + size])
        else:
            size = int(layers["emb"].input_dim)
            layers["emb"].set_weights([coef[start:start + size]])
            kernel_rows.append(None)
    if isinstance(dense, KernelHidden):  # it adds the identity blocks without storing them
        dense.assign_blocks([r for r in kernel_rows if r is not None], intercept)
    else:
        eye = np.eye(width, dtype=np.float32)
        dense.set_weights([np.concatenate([eye if r is None else r for r in kernel_rows]),
                           intercept])


def fit_ridge_tower(tower: Tower, table: pd.DataFrame, specs: tuple[FeatureSpec, ...],
                    id_column: str, targets: np.ndarray, weights: np.ndarray | None,
                    alpha: float) -> dict[str, Any]:
    """Fit the linear map on ``table``'s rows (warm entities) to ``targets`` (the teacher's
    embeddings of them) and write it into ``tower``; returns the fit's sizes."""
    x, blocks = design_matrix(tower, table, specs, id_column)
    coef, intercept = ridge(x, targets, weights, alpha)
    set_linear_weights(tower, blocks, coef, intercept)
    return {"rows": int(x.shape[0]), "design_columns": int(x.shape[1]), "alpha": alpha}


# ---- the kernel map: degree-2 polynomial kernel ridge on the same design -----------------


def kernel_tower_config(width: int, landmarks: int, base: TowerConfig | None = None
                        ) -> TowerConfig:
    """The tower of a kernel map (:func:`fit_kernel_tower`; built with ``kernel=True``):
    every feature embedded at ``landmarks`` (its block of the landmarks' design rows,
    transposed), one hidden layer of that width (``towers.KernelHidden``: the sum of the
    blocks plus 1, squared), output ``width``."""
    return dataclasses.replace(linear_tower_config(width, base), feature_dim=landmarks,
                               hidden=(landmarks,))


def _poly2(x: sp.csr_matrix, landmarks: sp.csr_matrix, chunk: int = 8192) -> np.ndarray:
    """``(1 + x l')^2``: ``float64 [n_rows, n_landmarks]``, in chunks of rows."""
    lt = landmarks.T.tocsc()
    parts = [np.square(1.0 + np.asarray((x[i:i + chunk] @ lt).todense()))
             for i in range(0, x.shape[0], chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, landmarks.shape[0]))


def landmark_rows(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """Which of ``n`` training rows span the kernel map: all of them, or a seeded uniform
    sample of ``limit`` (the Nystrom approximation), sorted."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def kernel_ridge(x: sp.csr_matrix, y: np.ndarray, weights: np.ndarray | None, lam: float,
                 landmarks: np.ndarray, chunk: int = 8192,
                 max_rows: int = KERNEL_FIT_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Weighted kernel ridge with the polynomial kernel ``k(a, b) = (1 + a.b)^2`` over the
    rows ``landmarks`` of ``x`` (Nystrom when they are a sample):
    ``min sum_e r_e |k(x_e, L) beta + b - t_e|^2 + lam beta' K_LL beta``. Returns ``(beta
    [m, k], b [k])``; the map is ``k(x, L) beta + b``.

    Why: on MovieLens-100K validation the linear map leaves what *combinations* of content
    say (a genre in one decade, two genres together) to the teacher's ID, and the kernel
    reads them (BENCHMARKS.md, "The kernel item map"). The ``m x m`` system is accumulated
    over chunks of rows, so memory is ``n x nnz + m^2``, not ``n x m``; time is ``n m^2``,
    so beyond ``max_rows`` rows the fit reads a seeded sample of that many (the landmarks
    are rows of ``x`` either way).
    """
    x = sp.csr_matrix(x, dtype=np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    lm = x[landmarks]
    if x.shape[0] > max_rows:
        keep = landmark_rows(x.shape[0], max_rows, seed=1)
        x, y, w = x[keep], y[keep], w[keep]
    w = w / max(w.mean(), 1e-12)
    y_mean = (w @ y) / w.sum()
    gram = np.zeros((len(landmarks), len(landmarks)))
    rhs = np.zeros((len(landmarks), y.shape[1]))
    for i in range(0, x.shape[0], chunk):
        c = _poly2(x[i:i + chunk], lm)
        cw = c * w[i:i + chunk, None]
        gram += cw.T @ c
        rhs += cw.T @ (y[i:i + chunk] - y_mean)
    k_ll = _poly2(lm, lm)
    system = gram + lam * k_ll
    system += np.eye(len(system)) * 1e-9 * max(np.trace(system) / len(system), 1e-12)
    beta = np.linalg.solve(system, rhs)
    return beta.astype(np.float32), y_mean.astype(np.float32)


def kernel_apply(x: sp.csr_matrix, landmarks_x: sp.csr_matrix, beta: np.ndarray,
                 intercept: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The kernel map of every row of ``x``: ``float32 [n_rows, k]`` (not normalised)."""
    out = [(_poly2(x[i:i + chunk], landmarks_x) @ beta + intercept).astype(np.float32)
           for i in range(0, x.shape[0], chunk)]
    return np.concatenate(out) if out else np.zeros((0, beta.shape[1]), np.float32)


def set_kernel_weights(tower: Tower, blocks: list[tuple[str, int]],
                       landmarks_x: sp.csr_matrix, beta: np.ndarray,
                       intercept: np.ndarray) -> None:
    """Write a kernel map into a kernel tower: the encoder and the hidden layer compute
    ``1 + x L'`` (the landmarks' design rows, as :func:`set_linear_weights` writes a linear
    map, with a bias of 1), the activation squares it, the output layer is ``beta``."""
    m = landmarks_x.shape[0]
    if tower.kernel is None or tower.cfg.hidden != (m,) or tower.cfg.feature_dim != m:
        raise ValueError(f"set_kernel_weights needs a kernel tower of {m} landmarks "
                         "(kernel_tower_config, built with kernel=True)")
    coef = np.asarray(landmarks_x.T.todense(), np.float32)  # [d, m]
    set_linear_weights(tower, blocks, coef, np.ones(m, np.float32), dense=tower.kernel)
    tower.mlp.layers[-1].set_weights([np.asarray(beta, np.float32),
                                      np.asarray(intercept, np.float32)])


def fit_kernel_tower(tower: Tower, table: pd.DataFrame, specs: tuple[FeatureSpec, ...],
                     id_column: str, targets: np.ndarray, weights: np.ndarray | None,
                     lam: float, landmarks: np.ndarray) -> dict[str, Any]:
    """Fit the kernel map on ``table``'s rows to ``targets`` over the rows ``landmarks`` and
    write it into ``tower`` (built with :func:`kernel_tower_config` for that many)."""
    x, blocks = design_matrix(tower, table, specs, id_column)
    beta, intercept = kernel_ridge(x, targets, weights, lam, landmarks)
    set_kernel_weights(tower, blocks, x[landmarks], beta, intercept)
    return {"rows": int(x.shape[0]), "design_columns": int(x.shape[1]), "alpha": lam,
            "map": "kernel", "landmarks": int(len(landmarks))}


def _next_alpha(alpha: float, up: bool) -> float:
    """The neighbour of ``alpha`` on the 1-3-10 log grid (0.3 -> 1 -> 3 -> 10 ...); an
    alpha off that grid steps to the grid value past it."""
    exponent = float(np.floor(np.log10(alpha) + 1e-9))
    ladder = [m * 10.0 ** e for e in (exponent - 1, exponent, exponent + 1) for m in (1.0, 3.0)]
    if up:
        return float(f"{min(a for a in ladder if a > alpha * (1 + 1e-9)):.3g}")
    return float(f"{max(a for a in ladder if a < alpha * (1 - 1e-9)):.3g}")


def search_alphas(score: Callable[[float], R], grid: Sequence[float],
                  key: Callable[[R], float] = float,  # type: ignore[assignment]
                  bounds: tuple[float, float] = ALPHA_BOUNDS) -> dict[float, R]:
    """``score`` at each alpha of ``grid``, and past the grid's edge while the edge is
    strictly best (the validation curve still rising there), one 1-3-10 step at a time up
    to ``bounds``: a grid that stops where its best value sits says nothing about the
    alphas beyond it. A one-value grid (a fixed alpha) is scored as it is. Returns the
    scores by alpha, in increasing order (``key`` makes a score a number)."""
    found = {float(a): score(float(a)) for a in sorted(set(grid))}
    while len(found) > 1:
        alphas = list(found)
        value = {a: key(r) for a, r in found.items()}
        top, low = alphas[-1], alphas[0]
        if all(value[top] > value[a] for a in alphas[:-1]) and top < bounds[1]:
            nxt = min(_next_alpha(top, up=True), bounds[1])
        elif all(value[low] > value[a] for a in alphas[1:]) and low > bounds[0]:
            nxt = max(_next_alpha(low, up=False), bounds[0])
        else:
            break
        found[nxt] = score(nxt)
        found = dict(sorted(found.items()))
    return found
