"""Issue 15 (a left gap): the list columns (multi-hot tags, ``ids_of`` lists, the request-time
history) stay ragged end to end, so one long cell costs its own tokens, not rows x longest.

Their outputs equal the padded formula they replaced (kept here as the reference) on batches
with empty, short and very long rows, gradients reach the embedding tables as before, the
variables keep their checkpoint paths, and an exported model served by TensorFlow's graph-mode
loader in a clean interpreter answers 64 rows with one 1 MB tag cell within a memory bound.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import tensorflow as tf

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.data.schema import FeatureSpec, FeatureType
from tfrs_coldstart.features.columns import (
    HISTORY,
    IdsOfColumn,
    MultiHotColumn,
    history_column,
    history_hits,
)
from tfrs_coldstart.features.encoder import FeatureEncoder, build_state

MiB = 1024 * 1024
SEP = "|"
VOCAB = [f"t{i:03d}" for i in range(60)]  # the multi-hot vocabulary / the teacher's item IDs
#: Peak RSS growth allowed for one 64-row call of the exported recommend model with one 1 MB
#: tag cell (measured: 3,321-3,342 MiB padded, 124-146 MiB ragged).
TAGS_RSS_BOUND = 320 * MiB
#: The same for embed_user with one 1 MB history (measured: 473-489 MiB padded, 23 MiB ragged).
HISTORY_RSS_BOUND = 96 * MiB


def _cells(rng: np.random.Generator, long: int = 20_000) -> np.ndarray:
    """40 cells: empty, separators only, empty entries, unknown values only, short random
    lists, and three very long ones (``long``, ``long // 4`` and 3,000 tokens)."""
    pool = [*VOCAB, "never-seen", "zz", ""]
    cells = ["", SEP, f"t001{SEP}{SEP}t002{SEP}", f"zz{SEP}never-seen", "t005"]
    cells += [SEP.join(rng.choice(pool, int(rng.integers(0, 8)))) for _ in range(32)]
    cells += [SEP.join(rng.choice(pool, n)) for n in (long, long // 4, 3000)]
    return np.asarray(rng.permutation(cells), dtype=object)


def _set_random(layer: tf.keras.layers.Embedding, rng: np.random.Generator) -> None:
    """Weights away from 0 (mean 0.5), so long rows sum to large values as trained ones do."""
    layer.set_weights([rng.normal(0.5, 1.0, layer.embeddings.shape).astype(np.float32)])


def _multi_hot(rng: np.random.Generator) -> tuple[MultiHotColumn, dict[str, Any]]:
    col = MultiHotColumn("tags", VOCAB[:50], SEP)
    layers = col.build_layers(TowerConfig(feature_dim=8))
    col.encode(layers, {"tags": tf.constant([""])}, training=False)  # builds the table
    _set_random(layers["emb"], rng)
    return col, layers


def _padded_multi_hot(col: MultiHotColumn, layers: dict[str, Any], x: tf.Tensor) -> tf.Tensor:
    """The formula before issue 15: tags padded to the longest row, masked mean."""
    ids = layers["lookup"](tf.strings.split(x, sep=col.separator).to_tensor(""))
    emb = layers["emb"](ids)
    mask = tf.cast(ids > 0, emb.dtype)[..., None]
    return tf.math.divide_no_nan(tf.reduce_sum(emb * mask, axis=1), tf.reduce_sum(mask, axis=1))


def _padded_ids_of(col: IdsOfColumn, layers: dict[str, Any], raw: tf.Tensor) -> tf.Tensor:
    """``IdsOfColumn.encode`` before issue 15 (padded to the longest list)."""
    ids = (tf.strings.split(raw, sep=col.separator).to_tensor("") if col.multi
           else tf.reshape(raw, [-1, 1]))
    index = layers["lookup"](ids)
    emb = layers["emb"](index)
    if col.mode == "frozen":
        emb = tf.stop_gradient(emb)
    keep = tf.not_equal(ids, "")
    if col.ignore_unknown:
        keep = tf.logical_and(keep, index > 0)
    mask = tf.cast(keep, emb.dtype)[..., None]
    total, count = tf.reduce_sum(emb * mask, axis=1), tf.reduce_sum(mask, axis=1)
    out = (total / (count + col.shrinkage) if col.shrinkage
           else tf.math.divide_no_nan(total, count))
    return out * col.scale if col.scale != 1.0 else out


def _teacher(rng: np.random.Generator) -> dict[str, Any]:
    lookup = tf.keras.layers.StringLookup(vocabulary=VOCAB[:50], num_oov_indices=1)
    emb = tf.keras.layers.Embedding(lookup.vocabulary_size(), 6, name="item_id_embedding")
    emb.build((None,))
    _set_random(emb, rng)
    return {"lookup": lookup, "emb": emb}


IDS_OF = {
    "history": history_column(shrinkage=1.5, scale=10.0),
    "history_plain": history_column(),
    "history_table": history_column(shrinkage=1.0, scale=10.0, table="embedding", dim=4),
    "friends_frozen": IdsOfColumn("friends", ids_of="item"),
    "friends_finetune": IdsOfColumn("friends", ids_of="item", mode="finetune", shrinkage=2.0),
    "one_id": IdsOfColumn("best", ids_of="item", multi=False),
}


def _ids_of(key: str, rng: np.random.Generator) -> tuple[IdsOfColumn, dict[str, Any]]:
    col = IDS_OF[key]
    layers = col.build_layers(TowerConfig(), {"item": _teacher(rng)})
    if col.table == "embedding" or col.mode == "finetune":
        _set_random(layers["emb"], rng)
    return col, layers


def _exact_mean(cells: np.ndarray, table: np.ndarray, index: dict[str, int], oov: int, *,
                drop_unknown: bool, shrinkage: float = 0.0) -> np.ndarray:
    """float64 reference: per cell the sum of its kept tokens' rows / (count + shrinkage);
    "" entries are left out, unknown ones are row ``oov`` (left out with ``drop_unknown``)."""
    out = np.zeros((len(cells), table.shape[1]))
    for r, cell in enumerate(cells):
        idx = [index.get(t, oov) for t in str(cell).split(SEP) if t != ""]
        idx = [i for i in idx if i != oov] if drop_unknown else idx
        if idx:
            out[r] = table[idx].astype(np.float64).sum(axis=0) / (len(idx) + shrinkage)
    return out


# --------------------------------------------------------------------------------------------
# the same outputs as the padded formula

#: Rows up to this many tokens equal the padded formula within 1e-5. Longer ones are compared
#: with the exact (float64) value instead: the padded float32 sum drifts over long rows (1.1e-5
#: at 5,000 tokens of mean 0.9; 1.6e-4 at 20,000 with scale 10), the ragged one sums in float64.
PADDED_EXACT_UP_TO = 3000


def _check(cells: np.ndarray, got: np.ndarray, padded: np.ndarray, exact: np.ndarray | None,
           scale: float = 1.0) -> None:
    n = np.array([len(str(c).split(SEP)) for c in cells])
    short = n <= PADDED_EXACT_UP_TO
    assert short.any()
    # 1e-5 on the mean; the history's ``scale`` (10) multiplies the difference too
    np.testing.assert_allclose(got[short], padded[short], atol=1e-5 * scale)
    if exact is None:
        np.testing.assert_allclose(got, padded, rtol=1e-3, atol=1e-5)
        return
    np.testing.assert_allclose(got, exact, atol=2e-6 * scale)  # float32 rounding of exact
    # and never further from exact than the padded formula was (beyond float32 rounding)
    assert np.all(np.abs(got - exact) <= np.abs(padded - exact) + 2e-6 * scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_hot_equals_the_padded_mean(seed: int) -> None:
    rng = np.random.default_rng(seed)
    col, layers = _multi_hot(rng)
    cells = _cells(rng)
    x = tf.constant(cells)
    got = col.encode(layers, {"tags": x}, training=False).numpy()
    graph = tf.function(lambda c: col.encode(layers, {"tags": c}, training=False),
                        input_signature=[tf.TensorSpec([None], tf.string)])
    np.testing.assert_array_equal(graph(x).numpy(), got)
    # unknown tags average in the OOV row; empty rows (no tag, or only "" entries) are zeros
    index = {t: i + 2 for i, t in enumerate(col.vocabulary)}  # 0: mask "", 1: OOV
    exact = _exact_mean(cells, layers["emb"].get_weights()[0], index, 1, drop_unknown=False)
    _check(cells, got, _padded_multi_hot(col, layers, x).numpy(), exact)
    empty = [i for i, c in enumerate(cells) if not c.replace(SEP, "")]
    assert empty and not got[empty].any()


@pytest.mark.parametrize("key", sorted(IDS_OF))
def test_ids_of_and_history_equal_the_padded_formula(key: str) -> None:
    rng = np.random.default_rng(len(key))
    col, layers = _ids_of(key, rng)
    cells = _cells(rng) if col.multi else np.asarray(["", "t003", "zz", *VOCAB[:40]], object)
    x = tf.constant(cells)
    got = col.encode(layers, {col.name: x}, training=False).numpy()
    want = _padded_ids_of(col, layers, x).numpy()
    assert got.shape == want.shape == (len(cells), layers["emb"].output_dim)
    index = {t: i + 1 for i, t in enumerate(VOCAB[:50])}  # the teacher's lookup: 0 is OOV
    exact = col.scale * _exact_mean(cells, layers["emb"].get_weights()[0], index, 0,
                                    drop_unknown=col.ignore_unknown, shrinkage=col.shrinkage)
    _check(cells, got, want, exact, col.scale)
    if col.ignore_unknown:  # the history: a list with no known ID is zeros
        none_known = [i for i, c in enumerate(cells) if not set(c.split(SEP)) & set(VOCAB[:50])]
        assert none_known and not got[none_known].any()


def test_a_missing_history_is_still_zeros() -> None:
    col, layers = _ids_of("history", np.random.default_rng(0))
    out = col.encode(layers, {"age": tf.constant(["a", "b", "c"])}, training=False)
    assert out.shape == (3, 6) and not out.numpy().any()


# --------------------------------------------------------------------------------------------
# training: gradients and checkpoint paths as before


def _grad(fn: Any, var: tf.Variable, w: tf.Tensor) -> tf.Tensor | None:
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fn() * w)
    g = tape.gradient(loss, var)
    return None if g is None else tf.convert_to_tensor(g)


def test_gradients_equal_the_padded_formula() -> None:
    rng = np.random.default_rng(5)
    col, layers = _multi_hot(rng)
    x = tf.constant(_cells(rng, long=5000))
    w = tf.constant(rng.normal(size=(len(x.numpy()), 8)).astype(np.float32))
    var = layers["emb"].embeddings
    got = _grad(lambda: col.encode(layers, {"tags": x}, training=True), var, w)
    want = _grad(lambda: _padded_multi_hot(col, layers, x), var, w)
    assert got is not None and np.abs(got.numpy()).sum() > 0
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    assert not got.numpy()[0].any()  # the mask row ("") gets nothing
    for key, trains in (("friends_finetune", True), ("friends_frozen", False)):
        col2, layers2 = _ids_of(key, rng)
        w2 = tf.constant(rng.normal(size=(len(x.numpy()), 6)).astype(np.float32))
        var2 = layers2["emb"].embeddings
        g2 = _grad(lambda c=col2, ly=layers2: c.encode(ly, {c.name: x}, training=True), var2,
                   w2)
        if not trains:
            assert g2 is None  # frozen: the teacher's table gets no gradient, as before
            continue
        want2 = _grad(lambda c=col2, ly=layers2: _padded_ids_of(c, ly, x), var2, w2)
        assert g2 is not None and np.abs(g2.numpy()).sum() > 0
        np.testing.assert_allclose(g2.numpy(), want2.numpy(), atol=1e-5)


def test_keras_fit_trains_the_tag_table_and_keeps_checkpoint_paths(tmp_path: Path) -> None:
    import pandas as pd

    rng = np.random.default_rng(2)
    cfg = TowerConfig(feature_dim=4, feature_dropout=0.0)
    train = pd.DataFrame({"id": [f"u{i}" for i in range(64)],
                          "tags": [SEP.join(rng.choice(VOCAB[:20], 3)) for _ in range(64)]})
    state = build_state((FeatureSpec("tags", FeatureType.MULTI_HOT),), train, "id", False, cfg)

    class _Model(tf.keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = FeatureEncoder(state, cfg)
            self.head = tf.keras.layers.Dense(1)

        def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
            return self.head(self.encoder(inputs, training=training))

    cells = train["tags"].to_numpy(dtype=object).copy()
    cells[3] = SEP.join(rng.choice(VOCAB[:10], 4000))  # one long row in a batch of 16
    cells[9] = ""
    data = tf.data.Dataset.from_tensor_slices(
        ({"tags": cells}, rng.normal(size=(64, 1)).astype(np.float32))).batch(16)
    model = _Model()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.5), loss="mse")
    model(next(iter(data))[0])
    table = model.encoder._parts["tags"]["emb"].embeddings
    before = table.numpy().copy()
    model.fit(data, epochs=1, verbose=0)
    after = table.numpy()
    lookup = model.encoder._parts["tags"]["lookup"]
    seen = np.unique(lookup(tf.constant(VOCAB[:20])).numpy())
    unseen = sorted(set(range(len(before))) - set(seen.tolist()))
    assert np.abs(after[seen] - before[seen]).min() > 0  # every trained tag's row moved
    np.testing.assert_array_equal(after[unseen], before[unseen])  # the mask row among them
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    shapes = dict(tf.train.list_variables(prefix))
    key = "model/encoder/_parts/tags/emb/embeddings/.ATTRIBUTES/VARIABLE_VALUE"
    assert shapes[key] == list(before.shape)  # the path old runs saved


# --------------------------------------------------------------------------------------------
# the history's results filter (offered to serving.export's drop_history)


def test_history_hits_equal_the_padded_comparison() -> None:
    rng = np.random.default_rng(4)
    cells = _cells(rng, long=5000)
    ids = rng.choice([*VOCAB, "zz", ""], (len(cells), 7)).astype(object)
    seen = tf.strings.split(tf.constant(cells), sep=SEP).to_tensor("")
    want = tf.reduce_any(tf.logical_and(tf.equal(ids[:, :, None], seen[:, None, :]),
                                        tf.not_equal(seen, "")[:, None, :]), axis=2)
    got = tf.function(history_hits)(tf.constant(ids), tf.constant(cells))
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert got.numpy().any() and not got.numpy().all()
    empty = history_hits(tf.zeros([0, 7], tf.string), tf.zeros([0], tf.string))
    assert empty.shape == (0, 7)


# --------------------------------------------------------------------------------------------
# served: TensorFlow's graph-mode loader in a clean interpreter, memory measured

SERVE = r'''
import json, sys, threading, time
spec = json.load(open(sys.argv[1]))
sys.path.extend(spec["site_packages"])  # no .pth processing: the project stays invisible
import numpy as np
import tensorflow as tf


def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


def peak_growth(fn):
    """Peak RSS growth of fn(): the kernel's high-water mark, reset first (or sampled)."""
    try:
        open("/proc/self/clear_refs", "w").write("5")
        base = rss("VmRSS:")
        out = fn()
        return rss("VmHWM:") - base, out
    except OSError:
        base, peak, done = rss("VmRSS:"), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss("VmRSS:"))
                time.sleep(0.002)
        t = threading.Thread(target=sample)
        t.start()
        out = fn()
        done.set()
        t.join()
        return max(peak[0], rss("VmRSS:")) - base, out


out = {"project_importable": True}
try:
    import tfrs_coldstart  # noqa: F401
except ImportError:
    out["project_importable"] = False
rows = {k: np.asarray(v, dtype=object if isinstance(v[0], str) else np.float32)
        for k, v in spec["rows"].items()}
graph = tf.Graph()
with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
    mg = tf.compat.v1.saved_model.loader.load(sess, ["serve"], spec["path"])

    def run(sig, feats, pick=None):
        sd = mg.signature_def[sig]
        pick = slice(None) if pick is None else pick
        feed = {sd.inputs[k].name: v[pick] for k, v in feats.items()}
        res = sess.run({k: v.name for k, v in sd.outputs.items()}, feed_dict=feed)
        return {k: v.astype(str).tolist() if v.dtype == object else v.tolist()
                for k, v in res.items()}

    for case in spec["cases"]:
        sig, key = case["signature"], case["input"]
        feats = dict(rows)
        for _ in range(2):  # first-call costs (graph optimisation, allocator) are not counted
            run(sig, feats, slice(0, 8))
        feats[key] = feats[key].copy()
        feats[key][case["row"]] = case["cell"]
        t0 = time.monotonic()
        growth, res = peak_growth(lambda: run(sig, feats))
        others = [i for i in range(len(feats[key])) if i != case["row"]]
        out[case["name"]] = {"growth": growth, "seconds": time.monotonic() - t0, "all": res,
                             "alone": run(sig, feats, [case["row"]]),
                             "others": run(sig, feats, others)}
with open(spec["out"], "w") as f:
    json.dump(out, f)
'''


@pytest.mark.slow
def test_served_long_cells_cost_their_tokens_not_rows_times_longest(
        exports: dict[str, Any], tmp_path: Path) -> None:
    """64 rows through the brute-force ``recommend`` export, one with a 1 MB tag cell
    (500,000 tags: padded, 3.3 GB and 10 s) and, for embed_user, one with a 1 MB history
    (100,000 IDs: padded, 489 MiB). Each row's answer is the one it gets alone."""
    from tfrs_coldstart.data.pipeline import feature_arrays
    from tfrs_coldstart.serving.export import BRUTE_FORCE_SUFFIX

    rec = exports["bf"]["recommend" + BRUTE_FORCE_SUFFIX]
    specs, ds = rec.module.specs, exports["dataset"]
    assert {"interests", HISTORY} <= set(specs)
    arrays = feature_arrays(ds.users.iloc[:64], ds.schema.user_features, "user_id")
    arrays[HISTORY] = np.full(64, "", dtype=object)
    rows = {k: [x.tolist() if isinstance(x, np.ndarray) else
                (str(x) if isinstance(x, str) else float(x)) for x in arrays[k]] for k in specs}
    items = [str(i) for i in ds.items["item_id"]]
    long_history = SEP.join(items[i % len(items)] for i in range(100_000))
    long_history = long_history[:1_000_000].rsplit(SEP, 1)[0]
    cases = [{"name": "tags", "signature": "serving_default", "input": "interests", "row": 5,
              "cell": "a|" * 500_000},
             {"name": "history", "signature": "embed_user", "input": HISTORY, "row": 5,
              "cell": long_history}]
    site_packages = [p for p in site.getsitepackages()
                     if Path(p).name in ("site-packages", "dist-packages")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    for case, bound in zip(cases, (TAGS_RSS_BOUND, HISTORY_RSS_BOUND), strict=True):
        # one process per case: memory freed by one call is reused by the next unseen
        spec = {"site_packages": site_packages, "path": str(rec.path), "rows": rows,
                "cases": [case], "out": str(tmp_path / f"{case['name']}.json")}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", SERVE,
                               str(tmp_path / "spec.json")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(Path(spec["out"]).read_text())
        assert out["project_importable"] is False
        res = out[case["name"]]
        print(f"{case['name']}: 64 rows, one 1 MB cell: peak RSS growth "
              f"{res['growth'] / MiB:.1f} MiB in {res['seconds']:.2f} s")
        for name in res["all"]:
            got = res["all"][name]
            want = res["others"][name][:5] + res["alone"][name] + res["others"][name][5:]
            if name == "item_ids":
                assert got == want
            else:
                np.testing.assert_allclose(got, want, atol=1e-5)
        assert res["growth"] < bound, f"{case['name']}: peak RSS grew {res['growth'] / MiB:.0f} MiB"
