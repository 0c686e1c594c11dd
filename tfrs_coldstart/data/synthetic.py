"""Synthetic cold-start data whose content features truly predict taste.

Generative story (so that a content-only tower *can* learn cold start):

- categories and tags have latent vectors; a tag's vector is near its home category's;
- an item's latent vector = its category vector + the mean of its tag vectors + small noise;
  its title is drawn from a per-category vocabulary, its price from a per-category level;
  the optional ``embedding`` is a noisy random projection of the latent vector;
- a user's taste = mean of their interest tags' vectors + age-bucket and region offsets +
  small noise; ``activity`` sets how many interactions they have;
- optionally (``n_friends`` > 0) a social graph: each user lists up to ``n_friends`` other
  users as ``friends`` (a multi_hot of user IDs, ``ids_of: user``): of candidates drawn
  mostly (``FRIEND_HOME``) from users of the same favourite category (taste cluster), the
  closest in taste, so a new user's taste follows their friends' and who their friends are
  is their content;
- score(u, i) = BETA * taste_u . item_i + log popularity_i (Zipf over a random item ranking);
  each user draws their items without replacement from softmax(score) (Gumbel-top-k).

Up to ``EXACT_MAX_ITEMS`` items the draw is exact over all items (in user chunks, never a full
users x items matrix). Above, each user's draw is sampling-importance-resampling: a pool drawn
by popularity (with replacement; multiplicities kept as log-weights) is reweighted by taste
with Gumbel-top-k. That keeps 1M items x 1000 users within seconds and a few hundred MB.
Draws of one seed are identical whatever the feature flags or ``dense_dim``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tfrs_coldstart.data.dataset import Dataset
from tfrs_coldstart.data.schema import DataError, FeatureSpec, FeatureType, Schema

__all__ = ["generate", "EXACT_MAX_ITEMS", "MIN_INTERACTIONS_PER_USER"]

LATENT_DIM = 16
BETA = 6.0  # taste sharpness: exp(6) ~ 400x between a perfect and an orthogonal match
ZIPF = 1.0  # popularity_i ~ 1 / (rank_i + 1) ** ZIPF
EXACT_MAX_ITEMS = 20_000
MIN_INTERACTIONS_PER_USER = 5
_TAGS_PER_ITEM = 4  # at most
_INTERESTS_PER_USER = 4  # at most
_WORDS_PER_CATEGORY = 8
_GENERAL_WORDS = 40
_AGE_BUCKETS = ("under-18", "18-24", "25-34", "35-44", "45-54", "55+")
_AGE_P = (0.05, 0.25, 0.3, 0.2, 0.12, 0.08)
_N_REGIONS = 12
_CHUNK_CELLS = 4_000_000  # per user chunk: float32 scores of about 16 MB
_SIR_POOL_MIN = 4096
FRIEND_HOME = 0.85  # share of a user's friend candidates drawn from their own taste cluster
_FRIEND_POOL = 4  # candidates per friend; the closest in taste become friends


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random vectors of norm ~1."""
    return rng.standard_normal((n, LATENT_DIM)) / np.sqrt(LATENT_DIM)


def _check(n_users: int, n_items: int, n_interactions: int, n_categories: int, n_tags: int,
           dense_dim: int) -> None:
    def bad(msg: str) -> DataError:
        return DataError(f"synthetic.generate: {msg}")

    for name, v, lo in (("n_users", n_users, 1), ("n_items", n_items, MIN_INTERACTIONS_PER_USER),
                        ("n_categories", n_categories, 1), ("n_tags", n_tags, 1),
                        ("dense_dim", dense_dim, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise bad(f"{name} must be an integer >= {lo}, got {v!r}")
    if n_interactions < MIN_INTERACTIONS_PER_USER * n_users:
        raise bad(
            f"n_interactions={n_interactions} is below {MIN_INTERACTIONS_PER_USER} per user "
            f"(n_users={n_users}); raise n_interactions or lower n_users"
        )
    if n_interactions > n_users * n_items:
        raise bad(
            f"n_interactions={n_interactions} exceeds n_users * n_items (each user rates an "
            "item at most once); raise n_items or lower n_interactions"
        )


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct pronounceable words (titles read like text, not ids)."""
    cons = list("bdfgklmnprstvz") + ["ch", "sh", "th"]
    vows = list("aeiou") + ["ai", "oo"]
    syll = np.array([c + v for c in cons for v in vows], dtype=object)
    words: list[str] = []
    seen: set[str] = set()
    n_syl = 2
    while len(words) < n:
        draws = rng.integers(0, len(syll), size=(2 * n + 16, n_syl))
        for row in draws:
            w = "".join(syll[row])
            if w not in seen:
                seen.add(w)
                words.append(w)
                if len(words) == n:
                    break
        n_syl += 1
    return words


def _draw_from_blocks(rng: np.random.Generator, size: int, cats: np.ndarray,
                      starts: np.ndarray, counts: np.ndarray, order: np.ndarray, p_home: float,
                      n_tags: int) -> np.ndarray:
    """``size`` tags per row, mostly from the row's category block (prob p_home), else any."""
    shape = (len(cats), size)
    c = np.broadcast_to(cats[:, None], shape)
    cnt = counts[c]
    pos = starts[c] + np.floor(rng.random(shape) * np.maximum(cnt, 1)).astype(np.int64)
    home_tags = order[np.minimum(pos, n_tags - 1)]
    anywhere = rng.integers(0, n_tags, size=shape)
    use_home = (rng.random(shape) < p_home) & (cnt > 0)
    return np.where(use_home, home_tags, anywhere)


def _dedupe_rows(tags: np.ndarray, n_valid: np.ndarray, sentinel: int) -> np.ndarray:
    """Sorted distinct tags per row; padding (and duplicates) set to ``sentinel``."""
    t = np.where(np.arange(tags.shape[1])[None, :] < n_valid[:, None], tags, sentinel)
    t = np.sort(t, axis=1)
    dup = np.zeros_like(t, dtype=bool)
    dup[:, 1:] = t[:, 1:] == t[:, :-1]
    t[dup] = sentinel
    return np.sort(t, axis=1)


def _join_rows(rows: np.ndarray, names: list[str], sentinel: int, sep: str) -> list[str]:
    return [sep.join([names[t] for t in row if t != sentinel]) for row in rows.tolist()]


def _counts_per_user(rng: np.random.Generator, weights: np.ndarray, total: int,
                     cap: int) -> np.ndarray:
    """>= MIN per user, proportional to weights, summing to ``total``, none above ``cap``."""
    n = len(weights)
    k = np.full(n, MIN_INTERACTIONS_PER_USER, dtype=np.int64)
    remaining = total - int(k.sum())
    while remaining > 0:
        room = cap - k
        w = weights * (room > 0)
        k += np.minimum(rng.multinomial(remaining, w / w.sum()), room)
        remaining = total - int(k.sum())
    return k


def _sample_exact(rng: np.random.Generator, taste: np.ndarray, item_vec: np.ndarray,
                  log_pop: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gumbel-top-k over all items, users in chunks; returns (user_idx, item_idx)."""
    n_users, n_items = len(taste), len(item_vec)
    rows = max(1, _CHUNK_CELLS // n_items)
    vt = item_vec.T.astype(np.float32)
    us, its = [], []
    for s in range(0, n_users, rows):
        e = min(n_users, s + rows)
        keys = (BETA * taste[s:e].astype(np.float32)) @ vt
        keys += log_pop
        g = rng.standard_exponential(keys.shape, dtype=np.float32)
        np.maximum(g, np.float32(1e-30), out=g)
        keys -= np.log(g)  # + Gumbel(0, 1)
        kk = k[s:e]
        kmax = int(kk.max())
        if kmax < n_items:
            top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
        else:
            top = np.broadcast_to(np.arange(n_items), keys.shape).copy()
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        take = np.arange(kmax)[None, :] < kk[:, None]
        us.append(np.broadcast_to(np.arange(s, e)[:, None], top.shape)[take])
        its.append(top[take])
    return np.concatenate(us), np.concatenate(its)


def _sample_sir(rng: np.random.Generator, taste: np.ndarray, item_vec: np.ndarray,
                log_pop: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sampling-importance-resampling for large catalogues; returns (user_idx, item_idx)."""
    n_users, n_items = len(taste), len(item_vec)
    cdf = np.cumsum(np.exp(log_pop - log_pop.max()).astype(np.float64))
    cdf /= cdf[-1]
    us, its = [], []
    s = 0
    while s < n_users:
        pool = max(_SIR_POOL_MIN, 32 * int(k[s]))
        rows = max(1, 1_000_000 // pool)
        e = min(n_users, s + rows)
        pool = max(_SIR_POOL_MIN, 32 * int(k[s:e].max()))
        draws = np.searchsorted(cdf, rng.random((e - s, pool)), side="right")
        draws = np.minimum(draws, n_items - 1)
        flat = (np.arange(s, e, dtype=np.int64)[:, None] * n_items + draws).ravel()
        uniq, mult = np.unique(flat, return_counts=True)
        u, it = uniq // n_items, uniq % n_items
        score = BETA * np.einsum("nd,nd->n", taste[u], item_vec[it]) + np.log(mult)
        score -= np.log(np.maximum(rng.standard_exponential(len(score)), 1e-300))
        order = np.lexsort((-score, u))
        u, it = u[order], it[order]
        first = np.searchsorted(u, u, side="left")
        rank = np.arange(len(u)) - first
        keep = rank < k[u]
        u, it = u[keep], it[keep]
        have = np.bincount(u - s, minlength=e - s)
        short = np.flatnonzero(have < k[s:e])
        extra_u, extra_i = [], []
        for j in short:  # pool had too few distinct items (very rare): top up uniformly
            taken = set(it[u == s + j].tolist())
            need = int(k[s + j]) - len(taken)
            cand = [c for c in rng.permutation(n_items)[: need + len(taken)].tolist()
                    if c not in taken][:need]
            extra_u += [s + j] * len(cand)
            extra_i += cand
        us += [u, np.asarray(extra_u, dtype=np.int64)]
        its += [it, np.asarray(extra_i, dtype=np.int64)]
        s = e
    return np.concatenate(us), np.concatenate(its)


def _friends(rng: np.random.Generator, fav: np.ndarray, taste: np.ndarray, n_clusters: int,
             n_friends: int, user_ids: np.ndarray) -> list[str]:
    """Each user's friends ("|"-joined user IDs): of a pool drawn mostly from their own
    favourite category, the ones closest in taste (homophily), so friends' tastes predict
    one's own beyond the cluster."""
    n = len(fav)
    order = np.argsort(fav, kind="stable")
    counts = np.bincount(fav, minlength=n_clusters)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pool_size = _FRIEND_POOL * n_friends
    pool = _draw_from_blocks(rng, pool_size, fav, starts, counts, order, FRIEND_HOME, n)
    pool[pool == np.arange(n)[:, None]] = n  # never one's own friend
    pool = _dedupe_rows(pool, np.full(n, pool_size), n)
    taste_pad = np.vstack([taste, np.zeros((1, taste.shape[1]), taste.dtype)])
    sim = np.einsum("nd,npd->np", taste, taste_pad[pool])
    sim[pool == n] = -np.inf
    closest = np.take_along_axis(pool, np.argsort(-sim, axis=1, kind="stable"), axis=1)
    n_valid = rng.integers(max(1, n_friends // 2), n_friends + 1, size=n)
    rows = _dedupe_rows(closest[:, :n_friends], n_valid, n)
    return _join_rows(rows, list(user_ids), n, "|")


def generate(
    n_users: int = 2000,
    n_items: int = 1000,
    n_interactions: int = 60_000,
    seed: int = 0,
    n_categories: int = 20,
    n_tags: int = 200,
    dense_dim: int = 0,
    with_user_features: bool = True,
    with_item_features: bool = True,
    n_friends: int = 0,
) -> Dataset:
    """Generate a deterministic synthetic dataset (see the module docstring for the story).

    Every user has >= 5 interactions (no repeated user-item pair); every item is in the items
    table even without interactions. ``with_*_features=False`` gives that side no features
    (schema side empty, table holds only the id) while keeping the same interactions.
    ``n_friends`` > 0 adds the users' ``friends`` feature (user IDs of their own taste cluster,
    ``ids_of: user``; between half of ``n_friends`` and ``n_friends`` per user), also when
    ``with_user_features=False`` (then it is the users' only content).
    """
    _check(n_users, n_items, n_interactions, n_categories, n_tags, dense_dim)
    if isinstance(n_friends, bool) or not isinstance(n_friends, (int, np.integer)) or not (
            0 <= n_friends < n_users):
        raise DataError(f"synthetic.generate: n_friends must be an integer in [0, n_users), "
                        f"got {n_friends!r}")
    n_users, n_items, n_interactions = int(n_users), int(n_items), int(n_interactions)
    C, T = int(n_categories), int(n_tags)
    # The 7th stream (friends) is spawned after the others, so they do not depend on it.
    r_struct, r_items, r_users, r_text, r_emb, r_sample, r_social = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)
    )

    # Categories and tags.
    cat_vec = _unit(r_struct.standard_normal((C, LATENT_DIM)))
    p_cat = 1.0 / np.arange(1, C + 1) ** 0.8
    p_cat = r_struct.permutation(p_cat / p_cat.sum())
    tag_home = r_struct.permutation(np.arange(T) % C)
    tag_vec = _unit(cat_vec[tag_home] + 0.7 * _noise(r_struct, T))
    tag_order = np.argsort(tag_home, kind="stable")
    tag_counts = np.bincount(tag_home, minlength=C)
    tag_starts = np.concatenate([[0], np.cumsum(tag_counts)[:-1]])
    tag_vec_pad = np.vstack([tag_vec, np.zeros((1, LATENT_DIM))])  # row T = padding

    # Items.
    item_cat = r_items.choice(C, size=n_items, p=p_cat)
    n_item_tags = r_items.integers(1, _TAGS_PER_ITEM + 1, size=n_items)
    raw = _draw_from_blocks(r_items, _TAGS_PER_ITEM, item_cat, tag_starts, tag_counts,
                            tag_order, 0.8, T)
    item_tags = _dedupe_rows(raw, n_item_tags, T)
    n_valid = (item_tags < T).sum(axis=1)
    tag_mean = tag_vec_pad[item_tags].sum(axis=1) / n_valid[:, None]
    item_vec = _unit(cat_vec[item_cat] + 0.6 * tag_mean + 0.35 * _noise(r_items, n_items))
    item_vec = item_vec.astype(np.float32)
    log_pop = (-ZIPF * np.log1p(r_items.permutation(n_items))).astype(np.float32)
    price_level = r_items.normal(3.0, 0.7, size=C)
    price = np.round(np.exp(price_level[item_cat] + 0.4 * r_items.standard_normal(n_items)), 2)

    # Users.
    age = r_users.choice(len(_AGE_BUCKETS), size=n_users, p=_AGE_P)
    region = r_users.integers(0, _N_REGIONS, size=n_users)
    fav = r_users.choice(C, size=n_users, p=p_cat)
    n_interests = r_users.integers(1, _INTERESTS_PER_USER + 1, size=n_users)
    raw = _draw_from_blocks(r_users, _INTERESTS_PER_USER, fav, tag_starts, tag_counts,
                            tag_order, 0.85, T)
    interests = _dedupe_rows(raw, n_interests, T)
    n_valid_u = (interests < T).sum(axis=1)
    age_vec = 0.35 * _unit(r_users.standard_normal((len(_AGE_BUCKETS), LATENT_DIM)))
    region_vec = 0.25 * _unit(r_users.standard_normal((_N_REGIONS, LATENT_DIM)))
    taste = _unit(tag_vec_pad[interests].sum(axis=1) / n_valid_u[:, None] + age_vec[age]
                  + region_vec[region] + 0.25 * _noise(r_users, n_users)).astype(np.float32)
    activity = np.round(r_users.lognormal(0.0, 0.6, size=n_users), 3)

    # Interactions.
    k = _counts_per_user(r_sample, activity, n_interactions, n_items)
    sampler = _sample_exact if n_items <= EXACT_MAX_ITEMS else _sample_sir
    u_idx, i_idx = sampler(r_sample, taste, item_vec, log_pop, k)
    start = r_sample.integers(0, 180 * 86_400, size=n_users)
    ts = 1_600_000_000 + start[u_idx] + r_sample.integers(0, 90 * 86_400, size=len(u_idx))
    order = np.lexsort((i_idx, u_idx, ts))  # chronological file order, ties broken stably
    u_idx, i_idx, ts = u_idx[order], i_idx[order], ts[order]

    uw, iw = len(str(n_users - 1)), len(str(n_items - 1))
    user_ids = np.array([f"u{i:0{uw}d}" for i in range(n_users)], dtype=object)
    item_ids = np.array([f"i{i:0{iw}d}" for i in range(n_items)], dtype=object)
    interactions = pd.DataFrame({
        "user_id": pd.Series(user_ids[u_idx], dtype=object),
        "item_id": pd.Series(item_ids[i_idx], dtype=object),
        "timestamp": ts.astype(np.int64),
    })

    users = pd.DataFrame({"user_id": pd.Series(user_ids, dtype=object)})
    user_specs: tuple[FeatureSpec, ...] = ()
    if with_user_features:
        tw = len(str(T - 1))
        tag_names = [f"tag{t:0{tw}d}" for t in range(T)]
        users["age_bucket"] = pd.Series(np.array(_AGE_BUCKETS, dtype=object)[age], dtype=object)
        users["region"] = pd.Series([f"region{r:02d}" for r in region.tolist()], dtype=object)
        users["activity"] = activity.astype(np.float32)
        users["interests"] = pd.Series(_join_rows(interests, tag_names, T, "|"), dtype=object)
        user_specs = (
            FeatureSpec("age_bucket", FeatureType.CATEGORICAL),
            FeatureSpec("region", FeatureType.CATEGORICAL),
            FeatureSpec("activity", FeatureType.NUMERIC),
            FeatureSpec("interests", FeatureType.MULTI_HOT),
        )

    if n_friends > 0:
        users["friends"] = pd.Series(_friends(r_social, fav, taste, C, int(n_friends),
                                              user_ids),
                                     dtype=object)
        user_specs += (FeatureSpec("friends", FeatureType.MULTI_HOT, ids_of="user"),)

    items = pd.DataFrame({"item_id": pd.Series(item_ids, dtype=object)})
    item_specs: tuple[FeatureSpec, ...] = ()
    if with_item_features:
        tw = len(str(T - 1))
        tag_names = [f"tag{t:0{tw}d}" for t in range(T)]
        cw = len(str(C - 1))
        words = _pseudo_words(r_text, C * _WORDS_PER_CATEGORY + _GENERAL_WORDS)
        n_words = r_text.integers(2, 5, size=n_items)
        own = item_cat[:, None] * _WORDS_PER_CATEGORY + r_text.integers(
            0, _WORDS_PER_CATEGORY, size=(n_items, 4))
        general = C * _WORDS_PER_CATEGORY + r_text.integers(0, _GENERAL_WORDS, size=(n_items, 4))
        widx = np.where(r_text.random((n_items, 4)) < 0.75, own, general)
        titles = [" ".join([words[w] for w in row[:n]])
                  for row, n in zip(widx.tolist(), n_words.tolist(), strict=True)]
        items["category"] = pd.Series([f"cat{c:0{cw}d}" for c in item_cat.tolist()],
                                      dtype=object)
        items["tags"] = pd.Series(_join_rows(item_tags, tag_names, T, "|"), dtype=object)
        items["title"] = pd.Series(titles, dtype=object)
        items["price"] = price.astype(np.float32)
        item_specs = (
            FeatureSpec("category", FeatureType.CATEGORICAL),
            FeatureSpec("tags", FeatureType.MULTI_HOT),
            FeatureSpec("title", FeatureType.TEXT),
            FeatureSpec("price", FeatureType.NUMERIC),
        )
        if dense_dim > 0:
            proj = r_emb.standard_normal((LATENT_DIM, dense_dim)) / np.sqrt(LATENT_DIM)
            emb = (item_vec @ proj + 0.1 * r_emb.standard_normal((n_items, dense_dim)))
            emb = emb.astype(np.float32)
            items["embedding"] = pd.Series(list(emb), dtype=object)
            item_specs += (FeatureSpec("embedding", FeatureType.DENSE_VECTOR, dim=dense_dim),)

    return Dataset(
        name=f"synthetic-{n_users}u-{n_items}i-s{seed}",
        interactions=interactions,
        users=users,
        items=items,
        schema=Schema(user_features=user_specs, item_features=item_specs),
    )
