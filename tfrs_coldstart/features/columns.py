"""Typed feature columns: one class per feature type, the one place a feature type is defined.

A column owns everything the model needs to know about one input of one tower:

- its *state*, built from the training entities' column only (vocabularies, statistics) and
  saved as plain JSON (a run's ``preprocessing.json`` maps state key -> :meth:`to_dict`);
- its Keras layers (:meth:`build_layers`) and the encode step (:meth:`encode`) that turns the
  raw input into a ``float32 [batch, width]`` block of the tower's input;
- its served input (:meth:`input_spec`, batch first), whether it is served at all
  (:attr:`served`: the student's training-only ID sink is not), a one-row dummy value to
  build variables or warm a model up (:meth:`dummy`), and the array a served model takes
  for a pandas column (:meth:`to_array`).

Served input specs, by type: ``categorical``/``text``/``multi_hot`` and IDs:
``tf.string [batch]``; ``numeric``: ``tf.float32 [batch]``; ``dense_vector``:
``tf.float32 [batch, dim]``. Every lookup has an OOV bucket, so an unseen ID or value
maps there and never crashes.

Adding a feature type: a :class:`FeatureType` member in ``data/schema.py`` (and how its cells
are validated in ``data/tables.py``), one class here registered in :data:`COLUMN_TYPES`, and,
if its served array is not a string, float or float-vector array, a branch in
``data.pipeline.feature_arrays`` (``tests/test_features.py`` checks the two agree).

Example::

    col = CategoricalColumn.from_training(FeatureSpec("genre", "categorical"),
                                          items["genre"], cfg)
    saved = json.dumps({col.name: col.to_dict()})
    col = column_from_dict("genre", json.loads(saved)["genre"])
"""

from __future__ import annotations

import abc
import collections
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrs_coldstart.config import TowerConfig
from tfrs_coldstart.data.pipeline import cut_text
from tfrs_coldstart.data.schema import FeatureSpec, FeatureType
from tfrs_coldstart.errors import ConfigError, RunError

__all__ = [
    "COLUMN_TYPES",
    "ID_FEATURE",
    "CategoricalColumn",
    "DenseVectorColumn",
    "FeatureColumn",
    "IdColumn",
    "IdsOfColumn",
    "MultiHotColumn",
    "NumericColumn",
    "SharedIds",
    "TextColumn",
    "build_columns",
    "column_from_dict",
    "columns_from_state",
    "columns_to_state",
    "input_array",
    "spec_for_input",
]

ID_FEATURE = "__id__"  # state key of the ID column
TEXT_LEN = 16  # title-like texts; longer texts are truncated
_EMPTY_VOCABULARY = ["[EMPTY]"]  # a lookup needs one entry; every value then maps to OOV

#: The layers of one column by role ("lookup", "emb", ...); the keys are part of the
#: checkpoint paths (``encoder/_parts/<state key>/<role>``), so they never change.
Layers = Mapping[str, Any]
#: The teacher's ID layers by side: ``{"user": {"lookup": StringLookup, "emb": Embedding}}``.
SharedIds = Mapping[str, Mapping[str, Any]]
#: How a student embeds an ``ids_of`` feature (``TowerConfig.id_features``).
SHARED_ID_MODES = ("frozen", "finetune")


# --------------------------------------------------------------------------------------------
# vocabularies and helpers


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
    # the cells as the training pipeline cuts them (data.pipeline.TEXT_MAX_CHARS)
    texts = tf.data.Dataset.from_tensor_slices(cut_text(col).to_numpy()).batch(4096)
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


def _safe(name: str) -> str:
    """A state key as a Keras layer name (part of every variable name: never change it)."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name).strip("_") or "id"


def _masked_mean(emb: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    """Mean of embeddings ``[batch, len, dim]`` over non-padding ids; zeros for an empty row."""
    mask = tf.cast(ids > 0, emb.dtype)[..., None]
    total = tf.reduce_sum(emb * mask, axis=1)
    count = tf.reduce_sum(mask, axis=1)
    return tf.math.divide_no_nan(total, count)


def _split(cells: tf.Tensor, separator: str) -> tf.RaggedTensor:
    """``string [batch]`` cells -> their tokens, ``string [batch, (tokens)]`` (ragged; a cell
    "" is one token "").

    The list columns stay ragged end to end (lookup and embedding on ``flat_values``, then
    :func:`_row_sum`): padded to the longest row, one 1 MB cell among 64 rows of a call costs
    64 x its 500,000 tokens (measured: 2.4 GB in an exported student); ragged, the total
    number of tokens of the call.
    """
    return tf.strings.split(cells, sep=separator)


def _row_sum(emb: tf.Tensor, keep: tf.Tensor,
             tokens: tf.RaggedTensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per row of ``tokens``: the sum of the kept tokens' embeddings and how many were kept.

    ``emb`` ``float [n_tokens, dim]`` and ``keep`` ``bool [n_tokens]`` follow
    ``tokens.flat_values``. Returns ``total [batch, dim]`` and ``count [batch, 1]``: what a
    masked ``reduce_sum`` over the padded ``[batch, longest, dim]`` gives, the same values
    (dropped tokens are multiplied by 0, as padding was; a row with none kept sums to 0).
    The sums accumulate in float64 and are rounded once: float32 sums drift over long rows
    (measured relative error over 20,000-30,000 tokens: 6e-6 for a float32 segment sum,
    1e-6 to 3e-5 for the padded ``reduce_sum`` this replaces; float64: 5e-8).
    """
    mask = tf.cast(keep, tf.float64)
    rows, n = tokens.value_rowids(), tokens.nrows()
    total = tf.math.unsorted_segment_sum(tf.cast(emb, tf.float64) * mask[:, None], rows, n)
    count = tf.math.unsorted_segment_sum(mask, rows, n)[:, None]
    return tf.cast(total, emb.dtype), tf.cast(count, emb.dtype)


def _lookup_embedding(name: str, vocabulary: Sequence[str], width: int,
                      mask_token: str | None) -> dict[str, Any]:
    """A string lookup with one OOV bucket and its embedding table (created in that order)."""
    lookup = tf.keras.layers.StringLookup(vocabulary=list(vocabulary) or _EMPTY_VOCABULARY,
                                          mask_token=mask_token, num_oov_indices=1)
    emb = tf.keras.layers.Embedding(lookup.vocabulary_size(), width,
                                    name=f"{_safe(name)}_embedding")
    return {"lookup": lookup, "emb": emb}


def input_array(values: pd.Series | Sequence[Any] | np.ndarray,
                spec: tf.TensorSpec) -> np.ndarray:
    """Cells of one column as the array a served input of ``spec`` takes.

    Strings: ``object[n]`` of ``str``; floats ``[batch]``: ``float32[n]``; floats
    ``[batch, dim]``: ``float32[n, dim]`` (cells are vectors; an empty column gives
    ``[0, dim]``).
    """
    if spec.dtype == tf.string:
        col = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
        return col.astype(str).to_numpy(dtype=object)
    if spec.shape.rank == 2:
        cells = values.to_numpy() if isinstance(values, pd.Series) else values
        dim = spec.shape[1] if spec.shape[1] is not None else 0
        return (np.stack(list(cells)).astype(np.float32) if len(cells)
                else np.zeros((0, dim), np.float32))
    if isinstance(values, pd.Series):
        return values.to_numpy(dtype=np.float32)
    return np.asarray(values, dtype=np.float32)


def spec_for_input(name: str, spec: tf.TensorSpec) -> FeatureSpec:
    """How to read a served input's cells when no schema says: the inverse of
    :meth:`FeatureColumn.input_spec` (strings as categorical, ``[batch, dim]`` floats as a
    dense vector, other numbers as numeric)."""
    if spec.dtype == tf.string:
        return FeatureSpec(name, FeatureType.CATEGORICAL)
    if spec.shape.rank == 2:
        return FeatureSpec(name, FeatureType.DENSE_VECTOR, dim=int(spec.shape[1]))
    return FeatureSpec(name, FeatureType.NUMERIC)


# --------------------------------------------------------------------------------------------
# the column classes


@dataclass(frozen=True, eq=True)
class FeatureColumn(abc.ABC):
    """One input of a tower. Subclasses are frozen dataclasses holding the column's state.

    ``name`` is the state key (the schema's feature name, or :data:`ID_FEATURE`).
    """

    kind: ClassVar[str]  # the state's "type" (FeatureType value, or "id")
    content: ClassVar[bool] = True  # a content feature: feature dropout may blank it

    name: str

    @property
    def served(self) -> bool:
        """An input of the served model; False for a training-only input (the ID sink)."""
        return True

    @classmethod
    def from_training(cls, spec: FeatureSpec, values: pd.Series,
                      cfg: TowerConfig) -> FeatureColumn:
        """The state of feature ``spec`` from its column in the *training* entities."""
        raise NotImplementedError(f"{cls.__name__} is not built from a schema feature")

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, name: str, state: Mapping[str, Any]) -> FeatureColumn:
        """Read the JSON form written by :meth:`to_dict` (and by older runs)."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The JSON form saved in ``preprocessing.json``; always holds ``"type": kind``."""

    @abc.abstractmethod
    def build_layers(self, cfg: TowerConfig,
                     shared_ids: SharedIds | None = None) -> dict[str, Any]:
        """This column's Keras layers by role. The creation order and the layer names fix
        the variable names of saved weights: never change them for an existing type.

        ``shared_ids`` maps a side to the teacher's ID layers of that side (``"lookup"``,
        ``"emb"``); only an :class:`IdsOfColumn` reads it."""

    @abc.abstractmethod
    def encode(self, layers: Layers, inputs: Mapping[str, tf.Tensor],
               training: bool) -> tf.Tensor:
        """Raw input (``inputs[self.input_key]``) -> ``float32 [batch, width]``."""

    @abc.abstractmethod
    def input_spec(self) -> tf.TensorSpec:
        """The served input, batch first, named :attr:`input_key`."""

    @property
    def input_key(self) -> str:
        """The raw input key (signature input name) this column reads."""
        return self.name

    def dummy(self) -> tf.Tensor:
        """A one-row input matching :meth:`input_spec` ("" or zeros): builds the variables
        before weights are restored."""
        spec = self.input_spec()
        if spec.dtype == tf.string:
            return tf.constant([""])
        return tf.zeros([1, *spec.shape[1:]], spec.dtype)

    def to_array(self, values: pd.Series) -> np.ndarray:
        """A pandas column (normalised cells) as the array the served model takes."""
        return input_array(values, self.input_spec())

    def serving_layers(self, layers: Layers) -> Layers:
        """The layers a served model keeps (all of them, for a served column)."""
        return layers


def _string_spec(key: str) -> tf.TensorSpec:
    return tf.TensorSpec([None], tf.string, name=key)


def _check_kind(cls: type[FeatureColumn], name: str, state: Mapping[str, Any]) -> None:
    if state.get("type") != cls.kind:
        raise RunError(f"preprocessing state of '{name}' has type {state.get('type')!r}, "
                       f"not {cls.kind!r}")


@dataclass(frozen=True, eq=True)
class IdColumn(FeatureColumn):
    """The entity's own ID, embedded through a lookup of the training IDs (teacher towers).

    With ``train_only`` it is the student's ID *sink*: read in training only (its
    ``dropout`` blanks it for a share of examples), zeros of width ``dim`` at inference and
    whenever the ID is not passed; never an input of the served model.
    """

    kind: ClassVar[str] = "id"
    content: ClassVar[bool] = False

    column: str = "id"  # the raw ID column ("user_id"/"item_id")
    vocabulary: Sequence[str] = ()
    dim: int | None = None  # embedding width; None: the tower config's id_dim
    train_only: bool = False
    dropout: float = 0.0

    @classmethod
    def from_ids(cls, column: str, ids: pd.Series, name: str = ID_FEATURE) -> IdColumn:
        """The ID lookup of the training entities' ``column``, in table order."""
        return cls(name, column=column, vocabulary=[str(v) for v in ids])

    def as_sink(self, dim: int, dropout: float = 0.0) -> IdColumn:
        """This ID column as a training-only sink of width ``dim``."""
        return dataclasses.replace(self, train_only=True, dim=dim, dropout=dropout)

    @property
    def served(self) -> bool:
        return not self.train_only

    @property
    def input_key(self) -> str:
        return self.column

    @classmethod
    def from_dict(cls, name: str, state: Mapping[str, Any]) -> IdColumn:
        _check_kind(cls, name, state)
        dim = state.get("dim")
        return cls(name, column=str(state["column"]), vocabulary=state["vocabulary"],
                   dim=None if dim is None else int(dim),
                   train_only=bool(state.get("train_only", False)),
                   dropout=float(state.get("dropout", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "column": self.column,
                               "vocabulary": list(self.vocabulary)}
        if self.train_only:
            out["train_only"] = True
        if self.dim is not None:
            out["dim"] = self.dim
        if self.train_only or self.dropout:
            out["dropout"] = self.dropout
        return out

    def build_layers(self, cfg: TowerConfig,
                     shared_ids: SharedIds | None = None) -> dict[str, Any]:
        width = cfg.id_dim if self.dim is None else self.dim
        layers = _lookup_embedding(self.name, self.vocabulary, width, mask_token=None)
        if self.train_only:
            layers["emb"].build((None,))  # never called at inference: build for checkpoints
        return layers

    def encode(self, layers: Layers, inputs: Mapping[str, tf.Tensor],
               training: bool) -> tf.Tensor:
        if not self.train_only:
            return layers["emb"](layers["lookup"](inputs[self.column]))
        # The sink absorbs what is particular to each training entity, so the content weights
        # learn what transfers; zeros at inference (and whenever the ID is not passed, as in
        # a SavedModel's traced call).
        n = tf.shape(next(iter(inputs.values())))[0]
        if training and self.column in inputs and "emb" in layers:
            sink = layers["emb"](layers["lookup"](inputs[self.column]))
            if self.dropout > 0:  # sometimes absent, as at inference
                keep = tf.random.uniform([n, 1]) >= self.dropout
                sink *= tf.cast(keep, sink.dtype)
            return sink
        width = layers["emb"].output_dim if "emb" in layers else layers["width"]
        return tf.zeros([n, width])

    def input_spec(self) -> tf.TensorSpec:
        return _string_spec(self.input_key)

    def serving_layers(self, layers: Layers) -> Layers:
        """A sink keeps only its width: at a million items it is a 128 MB table and a
        million-string lookup that inference never reads."""
        if self.train_only and "emb" in layers:
            return {"width": int(layers["emb"].output_dim)}
        return layers


@dataclass(frozen=True, eq=True)
class CategoricalColumn(FeatureColumn):
    """One string value per entity -> its embedding (``feature_dim`` wide)."""

    kind: ClassVar[str] = FeatureType.CATEGORICAL.value

    vocabulary: Sequence[str] = ()

    @classmethod
    def from_training(cls, spec: FeatureSpec, values: pd.Series,
                      cfg: TowerConfig) -> CategoricalColumn:
        return cls(spec.name, _vocabulary(values.astype(str), spec.max_tokens, cfg.min_count))

    @classmethod
    def from_dict(cls, name: str, state: Mapping[str, Any]) -> CategoricalColumn:
        _check_kind(cls, name, state)
        return cls(name, state["vocabulary"])

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocabulary": list(self.vocabulary)}

    def build_layers(self, cfg: TowerConfig,
                     shared_ids: SharedIds | None = None) -> dict[str, Any]:
        return _lookup_embedding(self.name, self.vocabulary, cfg.feature_dim, mask_token=None)

    def encode(self, layers: Layers, inputs: Mapping[str, tf.Tensor],
               training: bool) -> tf.Tensor:
        return layers["emb"](layers["lookup"](inputs[self.name]))

    def input_spec(self) -> tf.TensorSpec:
        return _string_spec(self.input_key)


@dataclass(frozen=True, eq=True)
class MultiHotColumn(FeatureColumn):
    """Separator-joined tags -> the mean of their embeddings (zeros for no tags)."""

    kind: ClassVar[str] = FeatureType.MULTI_HOT.value

    vocabulary: Sequence[str] = ()
    separator: str = "|"

    @classmethod
    def from_training(cls, spec: FeatureSpec, values: pd.Series,
                      cfg: TowerConfig) -> MultiHotColumn:
        vocab = _vocabulary(pd.Series(_split_tags(values, spec.separator)),
                            spec.max_tokens or cfg.multi_hot_max_tokens, cfg.min_count)
        return cls(spec.name, vocab, spec.separator)

    @classmethod
    def from_dict(cls, name: str, state: Mapping[str, Any]) -> MultiHotColumn:
        _check_kind(cls, name, state)
        return cls(name, state["vocabulary"], str(state["separator"]))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocabulary": list(self.vocabulary),
                "separator": self.separator}

    def build_layers(self, cfg: TowerConfig,
                     shared_ids: SharedIds | None = None) -> dict[str, Any]:
        return _lookup_embedding(self.name, self.vocabulary, cfg.feature_dim, mask_token="")

    def encode(self, layers: Layers, inputs: Mapping[str, tf.Tensor],
               training: bool) -> tf.Tensor:
        tags = _split(inputs[self.name], self.separator)  # [batch, (tags)]
        ids = layers["lookup"](tags.flat_values)  # [n_tags]; "" (an empty cell or tag): 0
        total, count = _row_sum(layers["emb"](ids), ids > 0, tags)
        return tf.math.divide_no_nan(total, count)  # the mean; zeros for no tags

    def input_spec(self) -> tf.TensorSpec:
        return _string_spec(self.input_key)


@dataclass(frozen=True, eq=True)
class TextColumn(FeatureColumn):
    """Free text -> the mean embedding of its first :data:`TEXT_LEN` known words."""

    kind: ClassVar[str] = FeatureType.TEXT.value

    vocabulary: Sequence[str] = ()

    @classmethod
    def from_training(cls, spec: FeatureSpec, values: pd.Series,
                      cfg: TowerConfig) -> TextColumn:
        vocab = _text_vocabulary(values, spec.max_tokens or cfg.text_max_tokens, cfg.min_count)
        return cls(spec.name, vocab)

    @classmethod
    def from_dict(cls, name: str, state: Mapping[str, Any]) -> TextColumn:
        _check_kind(cls, name, state)
        return cls(name, state["vocabulary"])

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocabulary": list(self.vocabulary)}

    def build_layers(self, cfg: TowerConfig,
                     shared_ids: SharedIds | None = None) -> dict[str, Any]:
        vec = tf.keras.layers.TextVectorization(
            vocabulary=list(self.vocabulary) or _EMPTY_VOCABULARY,
            output_sequence_length=TEXT_LEN)
        return {"lookup": vec, "emb": tf.keras.layers.Embedding(
            vec.vocabulary_size(), cfg.feature_dim, name=f"{_safe(self.name)}_embedding")}

    def encode(self, layers: Layers, inputs: Mapping[str, tf.Tensor],
               training: bool) -> tf.Tensor:
        ids = layers["lookup"](inputs[self.name])
        return _masked_mean(layers["emb"](ids), ids)

    def input_spec(self) -> tf.TensorSpec:
        return _string_spec(self.input_key)


@dataclass(frozen=True, eq=True)
class NumericColumn(FeatureColumn):
    """A number -> its quantile bucket's embedding plus its clipped z-score (one more unit)."""

    kind: ClassVar[str] = FeatureType.NUMERIC.value

    mean: float = 0.0
    variance: float = 1.0
    boundaries: Sequence[float] = ()

    @classmethod
    def from_training(cls, spec: FeatureSpec, values: pd.Series,
                      cfg: TowerConfig) -> NumericColumn:
        x = values.to_numpy(dtype=np.float64)
        qs = np.unique(np.quantile(x, np.linspace(0, 1, cfg.numeric_buckets + 1)[1:-1]))
        return cls(spec.name, float(x.mean()), float(max(x.var(), 1e-12)),
                   [float(q) for q in qs])

    @classmethod
    def from_dict(cls, name: str, state: Mapping[str, Any]) -> NumericColumn:
        _check_kind(cls, name, state)
        return cls(name, float(state["mean"]), float(state["variance"]),
                   [float(b) for b in state["boundaries"]])

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "mean": self.mean, "variance": self.variance,
                "boundaries": list(self.boundaries)}

    def build_layers(self, cfg: TowerConfig,
                     shared_ids: SharedIds | None = None) -> dict[str, Any]:
        disc = tf.keras.layers.Discretization(bin_boundaries=list(self.boundaries) or [0.0])
        return {"disc": disc, "emb": tf.keras.layers.Embedding(
            len(self.boundaries) + 2, cfg.feature_dim, name=f"{_safe(self.name)}_embedding")}

    def encode(self, layers: Layers, inputs: Mapping[str, tf.Tensor],
               training: bool) -> tf.Tensor:
        x = tf.cast(inputs[self.name], tf.float32)
        z = (x - self.mean) / float(np.sqrt(self.variance))
        return tf.concat([layers["emb"](layers["disc"](x)),
                          tf.clip_by_value(z, -5.0, 5.0)[:, None]], axis=1)

    def input_spec(self) -> tf.TensorSpec:
        return tf.TensorSpec([None], tf.float32, name=self.input_key)


@dataclass(frozen=True, eq=True)
class DenseVectorColumn(FeatureColumn):
    """A fixed-length float vector (e.g. a pretrained embedding) -> a linear projection."""

    kind: ClassVar[str] = FeatureType.DENSE_VECTOR.value

    dim: int = 0

    @classmethod
    def from_training(cls, spec: FeatureSpec, values: pd.Series,
                      cfg: TowerConfig) -> DenseVectorColumn:
        return cls(spec.name, int(spec.dim or 0))

    @classmethod
    def from_dict(cls, name: str, state: Mapping[str, Any]) -> DenseVectorColumn:
        _check_kind(cls, name, state)
        return cls(name, int(state["dim"]))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "dim": self.dim}

    def build_layers(self, cfg: TowerConfig,
                     shared_ids: SharedIds | None = None) -> dict[str, Any]:
        return {"proj": tf.keras.layers.Dense(cfg.feature_dim,
                                              name=f"{_safe(self.name)}_projection")}

    def encode(self, layers: Layers, inputs: Mapping[str, tf.Tensor],
               training: bool) -> tf.Tensor:
        return layers["proj"](tf.cast(inputs[self.name], tf.float32))

    def input_spec(self) -> tf.TensorSpec:
        return tf.TensorSpec([None, self.dim], tf.float32, name=self.input_key)


@dataclass(frozen=True, eq=True)
class IdsOfColumn(FeatureColumn):
    """A feature whose values are IDs of users or items (schema ``ids_of``), in a student.

    Embedded through the *teacher's* trained ID table of that side (its ``__id__`` lookup and
    embedding), so a new user's friends place them where the teacher put those friends: a
    ``multi_hot`` list gives the mean of its IDs' rows, a ``categorical`` value its ID's row;
    an ID unknown to the teacher gets the teacher's OOV row and an empty cell zeros. ``mode``
    ``frozen`` reads the teacher's table itself (never trained here, and saved once: it is
    the teacher's variable); ``finetune`` trains a copy, initialised from the teacher's.
    The block is the teacher's ``id_dim`` wide. The teacher itself embeds such a feature as an
    ordinary one (learned per value): it is what trains the ID tables.

    ``ignore_unknown`` (the request-time history, issue 17) leaves IDs unknown to the teacher
    out of the mean instead of averaging in the OOV row; ``shrinkage`` ``c`` divides the sum
    of the known rows by ``count + c`` instead of ``count``, so a short list weighs less than
    a long one (0: the plain mean), and ``scale`` multiplies the block (in a ridge fit: a
    weaker penalty on this block alone). A list with no known ID gives zeros either way.
    ``table`` ``embedding`` (``dim`` wide) reads, through the teacher's ID lookup, a frozen
    table of the teacher's final embeddings of those IDs instead of its ID rows; the table is
    filled after the teacher is trained (``training.fill_history_table``) and saved with the
    student.
    """

    kind: ClassVar[str] = "ids_of"

    ids_of: str = "user"  # whose IDs the values are
    multi: bool = True  # multi_hot (a list); False: categorical (one ID)
    separator: str = "|"
    mode: str = "frozen"  # frozen | finetune
    ignore_unknown: bool = False  # leave unknown IDs out (True) or average in the OOV row
    shrinkage: float = 0.0  # sum / (count + shrinkage); 0: the mean
    scale: float = 1.0  # the block times this
    table: str = "id"  # id: the teacher's ID rows | embedding: its final embeddings (dim wide)
    dim: int = 0  # the width of an ``embedding`` table

    def __post_init__(self) -> None:
        if self.mode not in SHARED_ID_MODES:
            raise RunError(f"preprocessing state of '{self.name}': mode must be one of "
                           f"{SHARED_ID_MODES}, got {self.mode!r}")
        if not self.shrinkage >= 0:
            raise RunError(f"preprocessing state of '{self.name}': shrinkage must be >= 0, "
                           f"got {self.shrinkage!r}")
        if self.table not in ("id", "embedding") or (self.table == "embedding"
                                                     and self.dim < 1):
            raise RunError(f"preprocessing state of '{self.name}': table must be id or "
                           f"embedding (with dim >= 1), got {self.table!r}, dim {self.dim}")

    @classmethod
    def from_spec(cls, spec: FeatureSpec, mode: str) -> IdsOfColumn:
        """The column of an ``ids_of`` feature; it has no state of its own to adapt."""
        return cls(spec.name, ids_of=str(spec.ids_of),
                   multi=spec.type is FeatureType.MULTI_HOT, separator=spec.separator,
                   mode=mode)

    @classmethod
    def from_dict(cls, name: str, state: Mapping[str, Any]) -> IdsOfColumn:
        _check_kind(cls, name, state)
        return cls(name, ids_of=str(state["ids_of"]), multi=bool(state["multi"]),
                   separator=str(state.get("separator", "|")), mode=str(state["mode"]),
                   ignore_unknown=bool(state.get("ignore_unknown", False)),
                   shrinkage=float(state.get("shrinkage", 0.0)),
                   scale=float(state.get("scale", 1.0)), table=str(state.get("table", "id")),
                   dim=int(state.get("dim", 0)))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "ids_of": self.ids_of, "multi": self.multi,
                               "separator": self.separator, "mode": self.mode}
        if self.ignore_unknown:
            out["ignore_unknown"] = True
        if self.shrinkage:
            out["shrinkage"] = self.shrinkage
        if self.scale != 1.0:
            out["scale"] = self.scale
        if self.table != "id":
            out["table"], out["dim"] = self.table, self.dim
        return out

    def build_layers(self, cfg: TowerConfig,
                     shared_ids: SharedIds | None = None) -> dict[str, Any]:
        teacher = (shared_ids or {}).get(self.ids_of)
        if not teacher:
            raise ConfigError(
                f"feature '{self.name}' holds {self.ids_of} IDs and is embedded through the "
                f"teacher's {self.ids_of} ID table (id_features={self.mode}), but no teacher "
                f"with {self.ids_of} IDs was given; pass the teacher, or set "
                "student.tower.id_features=learned")
        lookup, emb = teacher["lookup"], teacher["emb"]
        if not emb.built:  # a teacher not called yet: its weights are restored later
            emb.build((None,))
        if self.table == "embedding":  # filled once the teacher is trained; never trained
            table = tf.keras.layers.Embedding(emb.input_dim, self.dim, trainable=False,
                                              name=f"{_safe(self.name)}_table")
            table.build((None,))
            return {"lookup": lookup, "emb": table}
        if self.mode == "frozen":
            return {"lookup": lookup, "emb": emb}
        copy = tf.keras.layers.Embedding(emb.input_dim, emb.output_dim,
                                         name=f"{_safe(self.name)}_embedding")
        copy.build((None,))
        copy.embeddings.assign(emb.embeddings)  # starts at the teacher's trained table
        return {"lookup": lookup, "emb": copy}

    def encode(self, layers: Layers, inputs: Mapping[str, tf.Tensor],
               training: bool) -> tf.Tensor:
        if self.name not in inputs and self.ignore_unknown and inputs:
            # an optional list (the request-time history) not passed: no IDs, zeros
            n = tf.shape(next(iter(inputs.values())))[0]
            return tf.zeros([n, int(layers["emb"].output_dim)])
        raw = inputs[self.name]
        if self.multi:  # a list: its IDs, ragged [batch, (ids)]
            tokens = _split(raw, self.separator)
        else:  # one ID per row
            tokens = tf.RaggedTensor.from_tensor(tf.reshape(raw, [-1, 1]))
        ids = tokens.flat_values  # [n_ids]
        index = layers["lookup"](ids)
        emb = layers["emb"](index)  # unknown ids: the teacher's OOV row (index 0)
        if self.mode == "frozen":
            emb = tf.stop_gradient(emb)
        keep = tf.not_equal(ids, "")  # empty cells and empty list entries
        if self.ignore_unknown:
            keep = tf.logical_and(keep, index > 0)
        total, count = _row_sum(emb, keep, tokens)
        if self.shrinkage:
            out = total / (count + self.shrinkage)
        else:
            out = tf.math.divide_no_nan(total, count)
        return out * self.scale if self.scale != 1.0 else out

    def input_spec(self) -> tf.TensorSpec:
        return _string_spec(self.input_key)

    def count(self, layers: Layers, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """``float32 [batch]``: how many IDs of each row :meth:`encode` averages (empty
        entries, and with ``ignore_unknown`` IDs the teacher does not know, left out)."""
        if self.name not in inputs:
            if not inputs:
                raise ValueError(f"{self.name}: no inputs to count")
            return tf.zeros(tf.shape(next(iter(inputs.values())))[:1])
        raw = inputs[self.name]
        tokens = (_split(raw, self.separator) if self.multi  # as encode tokenises
                  else tf.RaggedTensor.from_tensor(tf.reshape(raw, [-1, 1])))
        keep = tf.not_equal(tokens.flat_values, "")
        if self.ignore_unknown:
            keep = tf.logical_and(keep, layers["lookup"](tokens.flat_values) > 0)
        return tf.cast(tf.math.unsorted_segment_sum(tf.cast(keep, tf.int32),
                                                    tokens.value_rowids(), tokens.nrows()),
                       tf.float32)


#: The request-time history (issue 17): a user's item IDs, joined by HISTORY_SEPARATOR, ""
#: for none; a student's user tower reads it as an ``ids_of=item`` column.
HISTORY = "history"
HISTORY_SEPARATOR = "|"


def history_column(shrinkage: float = 0.0, scale: float = 1.0, table: str = "id",
                   dim: int = 0) -> IdsOfColumn:
    """The user tower's history column: item IDs through the teacher's item ID lookup (its
    ID rows, or with ``table="embedding"`` its final item embeddings), IDs the teacher does
    not know left out, ``scale *`` the sum divided by ``count + shrinkage``."""
    return IdsOfColumn(HISTORY, ids_of="item", multi=True, separator=HISTORY_SEPARATOR,
                       mode="frozen", ignore_unknown=True, shrinkage=shrinkage, scale=scale,
                       table=table, dim=dim)


def history_hits(ids: tf.Tensor, history: tf.Tensor,
                 separator: str = HISTORY_SEPARATOR) -> tf.Tensor:
    """``bool [batch, k]``: whether each result ID of a row (``ids``, ``string [batch, k]``)
    is in that row's ``history`` (``string [batch]``, IDs joined by ``separator``; empty
    entries match nothing): what ``ids[:, :, None] == padded_history[:, None, :]`` gives.

    Exact, with memory proportional to the call's history IDs plus ``batch x k``: the padded
    comparison costs ``batch x k x`` the longest history (one 1 MB history among 64 rows,
    k + 50 = 70 results: ~580 MiB and 20 s in an exported student). Each distinct ID gets a
    number (``tf.unique``), each (row, ID) pair another; a result is a hit if its pair was
    seen in the row's history.
    """
    seen = tf.strings.split(history, sep=separator)  # [batch, (h)]
    words = seen.flat_values
    shape = tf.shape(ids, out_type=tf.int64)
    n_seen = tf.size(words, out_type=tf.int64)
    distinct, word = tf.unique(tf.concat([words, tf.reshape(ids, [-1])], 0), out_idx=tf.int64)
    rows = tf.concat([seen.value_rowids(), tf.repeat(tf.range(shape[0]), shape[1])], 0)
    pairs, pair = tf.unique(rows * tf.size(distinct, out_type=tf.int64) + word,
                            out_idx=tf.int64)
    in_history = tf.math.unsorted_segment_sum(tf.cast(tf.not_equal(words, ""), tf.int32),
                                              pair[:n_seen], tf.size(pairs, out_type=tf.int64))
    return tf.reshape(tf.gather(in_history, pair[n_seen:]) > 0, shape)


#: Column class by state "type": every FeatureType value, plus "id" and "ids_of".
COLUMN_TYPES: dict[str, type[FeatureColumn]] = {
    cls.kind: cls for cls in (IdColumn, CategoricalColumn, NumericColumn, TextColumn,
                              MultiHotColumn, DenseVectorColumn, IdsOfColumn)
}


# --------------------------------------------------------------------------------------------
# a tower's columns <-> its preprocessing state (the JSON of preprocessing.json, per side)


def column_from_dict(name: str, state: Mapping[str, Any]) -> FeatureColumn:
    """The column saved under state key ``name``."""
    cls = COLUMN_TYPES.get(str(state.get("type")))
    if cls is None:
        raise RunError(f"preprocessing state of '{name}' has unknown type {state.get('type')!r}; "
                       f"known types: {sorted(COLUMN_TYPES)} (was the run written by a newer "
                       "version of tfrs-coldstart?)")
    return cls.from_dict(name, state)


def columns_from_state(state: Mapping[str, Mapping[str, Any]]) -> dict[str, FeatureColumn]:
    """One side's preprocessing state -> its columns, by state key, in state order."""
    return {name: column_from_dict(name, st) for name, st in state.items()}


def columns_to_state(columns: Sequence[FeatureColumn]) -> dict[str, dict[str, Any]]:
    """Columns -> the JSON-ready state, keyed by column name, in the given order."""
    return {col.name: col.to_dict() for col in columns}


def build_columns(specs: Sequence[FeatureSpec], table: pd.DataFrame, id_column: str,
                  use_ids: bool, cfg: TowerConfig,
                  id_features: str = "learned") -> list[FeatureColumn]:
    """One side's columns from the *training* entities' rows only: the ID column first (when
    ``use_ids``), then the schema's features in schema order.

    ``id_features`` (a student's ``TowerConfig.id_features``) says how ``ids_of`` features
    are embedded: ``frozen``/``finetune`` through the teacher's ID table (an
    :class:`IdsOfColumn`), ``learned`` (the teacher's way) as ordinary features.
    """
    columns: list[FeatureColumn] = []
    if use_ids:
        columns.append(IdColumn.from_ids(id_column, table[id_column]))
    for spec in specs:
        if spec.ids_of is not None and id_features in SHARED_ID_MODES:
            columns.append(IdsOfColumn.from_spec(spec, id_features))
        else:
            columns.append(
                COLUMN_TYPES[spec.type.value].from_training(spec, table[spec.name], cfg))
    return columns
