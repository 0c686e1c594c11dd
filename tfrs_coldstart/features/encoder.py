"""Keras preprocessing built from the schema, adapted on training entities only.

The preprocessing *state* (vocabularies, means, bucket boundaries) is plain data
(:func:`build_state`), saved as JSON next to a run, so a model can be rebuilt and
its checkpoint restored in another process (fine-tuning, export) without
re-reading the training data. Every lookup has an OOV bucket, so an unseen ID or
category value maps there and never crashes.

Input tensors (batch first) expected by :class:`FeatureEncoder`:
``categorical``/``text``/``multi_hot``/IDs: ``tf.string [batch]``;
``numeric``: ``tf.float32 [batch]``; ``dense_vector``: ``tf.float32 [batch, dim]``.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.data.schema import FeatureSpec, FeatureType

ID_FEATURE = "__id__"  # state key of the ID lookup
_TEXT_LEN = 16  # title-like texts; longer texts are truncated


def _vocabulary(values: pd.Series, max_tokens: int | None, min_count: int = 1) -> list[str]:
    """Most frequent first, ties by value, so vocabularies are deterministic.

    Values seen fewer than ``min_count`` times go to the OOV bucket: a value unique to one
    entity acts as its ID, which a content-only tower memorises instead of generalising.
    """
    counts = collections.Counter(v for v in values if v != "")
    ordered = sorted(((k, n) for k, n in counts.items() if n >= min_count),
                     key=lambda kv: (-kv[1], kv[0]))
    if max_tokens:
        ordered = ordered[:max_tokens]
    return [k for k, _ in ordered]


def _split_tags(col: pd.Series, sep: str) -> list[str]:
    return [t for cell in col.astype(str) for t in cell.split(sep) if t]


def _text_vocabulary(col: pd.Series, max_tokens: int, min_count: int = 1) -> list[str]:
    """TextVectorization's vocabulary; with ``min_count`` > 1 only tokens in that many rows."""
    layer = tf.keras.layers.TextVectorization(max_tokens=max_tokens + 2)
    texts = tf.data.Dataset.from_tensor_slices(col.astype(str).to_numpy()).batch(4096)
    layer.adapt(texts)
    vocab = layer.get_vocabulary()
    if min_count > 1:  # document frequency of each token, with the layer's own tokenisation
        df = np.zeros(len(vocab), np.int64)
        for batch in texts:
            ids = layer(batch).numpy()
            for row in ids:
                df[np.unique(row)] += 1
        vocab = [t for t, n in zip(vocab, df, strict=True) if n >= min_count]
    return [t for t in vocab if t not in ("", "[UNK]")]


def build_state(
    specs: tuple[FeatureSpec, ...],
    table: pd.DataFrame,
    id_column: str,
    use_ids: bool,
    cfg: TowerConfig,
) -> dict[str, Any]:
    """Vocabularies and statistics of one side, from the training entities' rows only."""
    state: dict[str, Any] = {}
    if use_ids:
        state[ID_FEATURE] = {"type": "id", "column": id_column,
                             "vocabulary": [str(v) for v in table[id_column]]}
    for spec in specs:
        col = table[spec.name]
        if spec.type is FeatureType.CATEGORICAL:
            vocab = _vocabulary(col.astype(str), spec.max_tokens, cfg.min_count)
            state[spec.name] = {"type": spec.type.value, "vocabulary": vocab}
        elif spec.type is FeatureType.MULTI_HOT:
            vocab = _vocabulary(pd.Series(_split_tags(col, spec.separator)),
                                spec.max_tokens or cfg.multi_hot_max_tokens, cfg.min_count)
            state[spec.name] = {"type": spec.type.value, "vocabulary": vocab,
                                "separator": spec.separator}
        elif spec.type is FeatureType.TEXT:
            vocab = _text_vocabulary(col, spec.max_tokens or cfg.text_max_tokens, cfg.min_count)
            state[spec.name] = {"type": spec.type.value, "vocabulary": vocab}
        elif spec.type is FeatureType.NUMERIC:
            x = col.to_numpy(dtype=np.float64)
            qs = np.unique(np.quantile(x, np.linspace(0, 1, cfg.numeric_buckets + 1)[1:-1]))
            state[spec.name] = {"type": spec.type.value, "mean": float(x.mean()),
                                "variance": float(max(x.var(), 1e-12)),
                                "boundaries": [float(q) for q in qs]}
        elif spec.type is FeatureType.DENSE_VECTOR:
            state[spec.name] = {"type": spec.type.value, "dim": int(spec.dim or 0)}
        else:  # pragma: no cover - FeatureType is closed
            raise ValueError(f"unsupported feature type {spec.type}")
    return state


class Untracked:
    """A value Keras must not wrap or track."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _MaskedMean(tf.keras.layers.Layer):
    """Mean of embeddings over non-padding positions; zeros for an empty row."""

    def call(self, emb: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
        mask = tf.cast(ids > 0, emb.dtype)[..., None]
        total = tf.reduce_sum(emb * mask, axis=1)
        count = tf.reduce_sum(mask, axis=1)
        return tf.math.divide_no_nan(total, count)


class FeatureEncoder(tf.keras.layers.Layer):
    """Encodes one side's raw feature dict into a single dense vector.

    Input: ``dict[name -> tensor]`` (see module docstring); extra keys are
    ignored, so a content-only encoder never sees an ID even when one is passed.
    Output: ``float32 [batch, output_width]``.
    """

    def __init__(self, state: dict[str, Any], cfg: TowerConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Held outside Keras' attribute tracking: vocabularies can hold a million ids.
        self._holder = Untracked(state)
        self.cfg = cfg
        self._parts: dict[str, dict[str, tf.keras.layers.Layer]] = {}
        for name, st in state.items():
            kind = st["type"]
            if kind in ("id", "categorical"):
                dim = st.get("dim", cfg.id_dim) if kind == "id" else cfg.feature_dim
                lookup = tf.keras.layers.StringLookup(vocabulary=st["vocabulary"] or ["[EMPTY]"],
                                                      mask_token=None, num_oov_indices=1)
                emb = tf.keras.layers.Embedding(lookup.vocabulary_size(), dim,
                                                name=f"{_safe(name)}_embedding")
                if st.get("train_only"):
                    emb.build((None,))  # never called at inference: build for checkpoints
                self._parts[name] = {"lookup": lookup, "emb": emb}
            elif kind == "multi_hot":
                lookup = tf.keras.layers.StringLookup(vocabulary=st["vocabulary"] or ["[EMPTY]"],
                                                      mask_token="", num_oov_indices=1)
                self._parts[name] = {"lookup": lookup, "emb": tf.keras.layers.Embedding(
                    lookup.vocabulary_size(), cfg.feature_dim, name=f"{_safe(name)}_embedding")}
            elif kind == "text":
                vec = tf.keras.layers.TextVectorization(
                    vocabulary=st["vocabulary"] or ["[EMPTY]"], output_sequence_length=_TEXT_LEN)
                self._parts[name] = {"lookup": vec, "emb": tf.keras.layers.Embedding(
                    vec.vocabulary_size(), cfg.feature_dim, name=f"{_safe(name)}_embedding")}
            elif kind == "numeric":
                disc = tf.keras.layers.Discretization(bin_boundaries=st["boundaries"] or [0.0])
                self._parts[name] = {"disc": disc, "emb": tf.keras.layers.Embedding(
                    len(st["boundaries"]) + 2, cfg.feature_dim, name=f"{_safe(name)}_embedding")}
            elif kind == "dense_vector":
                self._parts[name] = {"proj": tf.keras.layers.Dense(
                    cfg.feature_dim, name=f"{_safe(name)}_projection")}
        self._mean = _MaskedMean()

    @property
    def state(self) -> dict[str, Any]:
        return self._holder.value

    @property
    def train_only_weights(self) -> list[tf.Variable]:
        """Variables read in training only (a student's ID sink); not needed to serve."""
        return [w for name, st in self.state.items() if st.get("train_only")
                and "emb" in self._parts[name] for w in self._parts[name]["emb"].weights]

    def drop_train_only(self) -> None:
        """Forget the training-only parts, so an exported model does not carry them: the ID
        sink of a million-item catalogue is a 128 MB table and a million-string lookup that
        inference never reads. Outputs are unchanged; the encoder can no longer train them."""
        for name, st in self.state.items():
            part = self._parts[name]
            if st.get("train_only") and "emb" in part:
                self._parts[name] = {"width": int(part["emb"].output_dim)}

    @property
    def feature_names(self) -> list[str]:
        """The raw input keys this encoder reads (the ID column included if it uses IDs)."""
        return [st["column"] if st["type"] == "id" else name for name, st in self.state.items()
                if not st.get("train_only")]

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        outs = []
        for name, st in self.state.items():
            kind, part = st["type"], self._parts[name]
            if kind == "id" and st.get("train_only"):
                # A training-only ID "sink": it absorbs what is particular to each training
                # entity so the content weights learn what transfers; zeros at inference
                # (and whenever the ID is not passed, as in a SavedModel's traced call).
                n = tf.shape(next(iter(inputs.values())))[0]
                if training and st["column"] in inputs and "emb" in part:
                    sink = part["emb"](part["lookup"](inputs[st["column"]]))
                    if st.get("dropout", 0.0) > 0:  # sometimes absent, as at inference
                        keep = tf.random.uniform([n, 1]) >= st["dropout"]
                        sink *= tf.cast(keep, sink.dtype)
                    outs.append(sink)
                else:
                    width = part["emb"].output_dim if "emb" in part else part["width"]
                    outs.append(tf.zeros([n, width]))
            elif kind in ("id", "categorical"):
                x = inputs[st["column"] if kind == "id" else name]
                outs.append(part["emb"](part["lookup"](x)))
            elif kind == "multi_hot":
                tags = tf.strings.split(inputs[name], sep=st["separator"]).to_tensor("")
                ids = part["lookup"](tags)
                outs.append(self._mean(part["emb"](ids), ids))
            elif kind == "text":
                ids = part["lookup"](inputs[name])
                outs.append(self._mean(part["emb"](ids), ids))
            elif kind == "numeric":
                x = tf.cast(inputs[name], tf.float32)
                z = (x - st["mean"]) / float(np.sqrt(st["variance"]))
                outs.append(tf.concat([part["emb"](part["disc"](x)),
                                       tf.clip_by_value(z, -5.0, 5.0)[:, None]], axis=1))
            elif kind == "dense_vector":
                outs.append(part["proj"](tf.cast(inputs[name], tf.float32)))
        if not outs:
            raise ValueError("a tower needs at least one input: this side has no features "
                             "and no IDs")
        rate = self.cfg.feature_dropout
        if training and rate > 0:
            # Blank whole features per example (ID entries excepted): a missing-feature
            # dropout, not Keras' unit dropout, which never removes a feature entirely.
            n = tf.shape(outs[0])[0]
            outs = [o if st["type"] == "id" else
                    o * tf.cast(tf.random.uniform([n, 1]) >= rate, o.dtype)
                    for o, st in zip(outs, self.state.values(), strict=True)]
        return tf.concat(outs, axis=1)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name).strip("_") or "id"


def dummy_inputs(state: dict[str, Any]) -> dict[str, tf.Tensor]:
    """A one-row input dict for ``state``: builds a tower's variables before restoring weights."""
    out: dict[str, tf.Tensor] = {}
    for name, st in state.items():
        kind = st["type"]
        if kind == "id":
            if not st.get("train_only"):
                out[st["column"]] = tf.constant([""])
        elif kind == "numeric":
            out[name] = tf.constant([0.0], tf.float32)
        elif kind == "dense_vector":
            out[name] = tf.zeros([1, st["dim"]], tf.float32)
        else:
            out[name] = tf.constant([""])
    return out
