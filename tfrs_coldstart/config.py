"""Typed, frozen run configuration with YAML files and ``--set a.b=value`` overrides.

Modelled on tensorflow/models' config dataclasses: every run writes its resolved
config (``config.yaml``) next to its outputs so that it can be reproduced.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tfrs_coldstart.errors import ConfigError
from tfrs_coldstart.fileio import atomic_write_text


class _FieldError(ConfigError):
    """A field's value is out of range; :func:`_build` prefixes the field's full key."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"config key '{field_name}' {reason}")
        self.field_name, self.reason = field_name, reason


def _check(obj: Any, name: str, ok: bool, reason: str) -> None:
    if not ok:
        raise _FieldError(name, f"{reason}, got {getattr(obj, name)!r}")


def _at_least(obj: Any, minimum: float, *names: str) -> None:
    for name in names:
        _check(obj, name, getattr(obj, name) >= minimum, f"must be at least {minimum}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        _check(obj, name, v > 0 and v == v and v != float("inf"), "must be a finite number > 0")


def _fraction(obj: Any, *names: str, upper_inclusive: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        ok = 0.0 < v <= 1.0 if upper_inclusive else 0.0 < v < 1.0
        _check(obj, name, ok, "must be in (0, 1]" if upper_inclusive else "must be in (0, 1)")


def _one_of(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    _check(obj, name, getattr(obj, name) in allowed, f"must be one of {', '.join(allowed)}")


WEIGHT_TRANSFORMS = ("none", "raw", "log1p", "threshold:<value>")


def check_weight_transform(transform: str) -> None:
    """Raise ValueError unless ``transform`` is one of :data:`WEIGHT_TRANSFORMS`."""
    if transform in ("none", "raw", "log1p"):
        return
    head, _, value = transform.partition(":")
    try:
        ok = head == "threshold" and float(value) == float(value)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"must be one of {', '.join(WEIGHT_TRANSFORMS)}, got {transform!r}")


def _weight_transform(obj: Any) -> None:
    try:
        check_weight_transform(obj.interaction_weight)
    except ValueError as e:
        raise _FieldError("interaction_weight", str(e)) from None


DATA_FORMATS = ("synthetic", "movielens", "tables", "tfds", "stream")
INDEX_KINDS = ("scann", "partitioned", "brute-force")
DISTILL_SIDES = ("auto", "both", "user", "item")
STUDENT_METHODS = ("ridge", "aligned", "own")
COLD_PATH_CHOICES = ("auto", "student", "teacher")  # student.cold_path_*: see StudentConfig
RIDGE_ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0)
ITEM_MAPS = ("auto", "linear", "kernel")  # student.item_map (method=ridge)
ID_FEATURE_MODES = ("frozen", "finetune", "learned")
TRAIN_STRATEGIES = ("none", "mirrored", "multi_worker")
COLLECTIVES = ("auto", "ring", "nccl")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split."""

    format: str = "synthetic"  # synthetic | movielens | tables | tfds | stream
    data_dir: str | None = None  # movielens folder, or folder with interactions/users/items tables
    schema: str | None = None  # schema YAML for `tables` and `stream`
    # `stream`: the interaction shards (Parquet, CSV/TSV, TFRecord), a glob, folder or file, any
    # tf.io.gfile path (gs://...); default <data_dir>/interactions/. Users/items as for tables.
    interactions: str | None = None
    stream_chunk_rows: int = 65_536  # rows read at a time from a shard
    stream_shuffle_buffer: int = 100_000  # rows in the streamed input's shuffle buffer
    # The streaming pass on Apache Beam, per shard in parallel (same split): its pipeline options
    # as one string, e.g. "--runner=DirectRunner --direct_num_workers=4" or a Dataflow runner's;
    # None: one ordered pass in this process. stream_beam_dir: where the workers leave per-shard
    # results (shared storage such as gs://...; default a local temporary folder).
    stream_beam: str | None = None
    stream_beam_dir: str | None = None
    tfds_name: str = "movielens/100k-ratings"
    synthetic_users: int = 2000
    synthetic_items: int = 1000
    synthetic_interactions: int = 40_000  # keeps `make run` well under 3 minutes on 2 cores
    synthetic_seed: int = 0
    split_seed: int = 42
    cold_item_frac: float = 0.2
    cold_user_frac: float = 0.2
    warm_test_frac: float = 0.1

    def __post_init__(self) -> None:
        _one_of(self, "format", DATA_FORMATS)
        _at_least(self, 1, "synthetic_users", "synthetic_items", "synthetic_interactions",
                  "stream_chunk_rows", "stream_shuffle_buffer")
        _fraction(self, "cold_item_frac", "cold_user_frac", "warm_test_frac")


@dataclass(frozen=True)
class TowerConfig:
    """Sizes of one two-tower model (both towers share them)."""

    id_dim: int = 64  # 0 disables ID embeddings
    feature_dim: int = 32  # embedding width of each categorical/text/multi-hot feature
    hidden: tuple[int, ...] = (256,)
    output_dim: int = 64
    dropout: float = 0.0
    text_max_tokens: int = 20_000
    multi_hot_max_tokens: int = 50_000
    # Quantile buckets of a numeric feature (plus its z-score); ties merge buckets, so a
    # year-like feature gets one bucket per common value.
    numeric_buckets: int = 10
    min_count: int = 1  # feature values rarer than this (in training entities) go to OOV
    # Training only: each content feature of an example is blanked with this probability, so
    # the tower cannot lean on one near-unique feature (a title) as an ID would be leaned on.
    feature_dropout: float = 0.0
    # Student towers only: how a feature declared `ids_of: user|item` is embedded. frozen: the
    # teacher's trained ID table, fixed; finetune: a trained copy of it; learned: one embedding
    # per value from scratch, as an ordinary feature. The teacher always learns it per value.
    # finetune: best on validation in two seeds of the social synthetic data (BENCHMARKS.md).
    id_features: str = "finetune"

    def __post_init__(self) -> None:
        _one_of(self, "id_features", ID_FEATURE_MODES)
        for name in ("feature_dim", "output_dim", "numeric_buckets", "min_count"):
            if getattr(self, name) < 1:
                raise _FieldError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.id_dim < 0:
            raise _FieldError("id_dim", f"must be 0 (no IDs) or more, got {self.id_dim}")
        for name in ("dropout", "feature_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise _FieldError(name, f"must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher: IDs plus content, in-batch softmax with log-Q correction."""

    tower: TowerConfig = field(default_factory=TowerConfig)
    temperature: float = 0.05
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    learning_rate: float = 0.005
    batch_size: int = 1024
    epochs: int = 40
    patience: int = 4
    weight_decay: float = 0.0  # Adam's decoupled weight decay (0: none)
    # How an interaction's `weight` column (rating, play count) weighs it in the loss:
    # none | raw | log1p | threshold:X (1 at or above X, else 0); see pipeline.interaction_weights.
    # none chosen on validation (ML-100K ratings; BENCHMARKS.md: log1p within noise, threshold:4
    # clearly worse, since every interaction is a positive of the benchmark)
    interaction_weight: str = "none"
    # Training only: share of examples whose user ID and (independently) item ID are replaced
    # by the OOV ID, so the content path is trained too (DropoutNet). 0 chosen on validation
    # (BENCHMARKS.md, issue 13: 0.25 lowered the teacher's content path, ridge within noise).
    id_dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "temperature", "learning_rate")
        _at_least(self, 1, "batch_size", "epochs")
        _at_least(self, 0, "patience", "weight_decay")
        _weight_transform(self)
        _check(self, "id_dropout", 0.0 <= self.id_dropout < 1.0, "must be in [0, 1)")


@dataclass(frozen=True)
class StudentConfig:
    """Student: content-only towers distilled from the teacher.

    ``method`` (issue 13, chosen on validation: BENCHMARKS.md): ``ridge`` maps content into
    the *teacher's* embedding space with a linear tower fit in closed form (the weighted
    alignment term solved exactly; modeling/mapper.py), so one index serves the teacher's
    and the student's embeddings; ``own`` trains content towers in a space of their own with
    ``L_C + lambda * T^2 * KL`` (the fields below down to ``item_id_sink``); ``aligned``
    trains content towers *in the teacher's space* with ``L_C + lambda * (KL + alignment)``,
    each warm entity weighted by its reliability (modeling/aligned.py, ALDI-style).
    """

    method: str = "ridge"  # ridge | aligned (trained in the teacher's space) | own
    # None: each side's on validation, from RIDGE_ALPHAS and past its ends while it still rises
    ridge_alpha: float | None = None
    # method=ridge, the item side: a linear map, or kernel ridge with the degree-2 polynomial
    # kernel over up to kernel_landmarks warm items (a seeded sample beyond that); auto: the
    # better on validation (ridge_alpha then fixes both maps' penalty)
    item_map: str = "auto"
    kernel_landmarks: int = 2048
    reliability: str = "tanh"  # weight of a warm entity in the fit: tanh | linear | none
    reliability_scale: float = 10.0  # tanh(count / scale)
    # method=aligned: which cross terms L_C trains (tu_si: teacher user . student item,
    # su_ti: student user . teacher item, su_si: student . student) and the weight of the
    # listwise KL inside L_D (align_weight weighs the embedding alignment)
    aligned_terms: tuple[str, ...] = ("tu_si", "su_ti")
    kl_weight: float = 1.0

    tower: TowerConfig = field(
        default_factory=lambda: TowerConfig(id_dim=0, feature_dim=16, hidden=(64,), output_dim=32,
                                            dropout=0.3)
    )
    temperature: float = 0.05
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    distill_lambda: float = 1.0  # weight of the KL term; 0 = no distillation (the ablation)
    distill_temperature: float = 2.0  # T in the KL term
    align_weight: float = 0.0  # optional embedding-alignment term
    # Whether the teacher sees IDs when it scores a batch for the KL term: without them it
    # gives its content-only (cold-start) view, the part of its knowledge content can carry.
    distill_user_ids: bool = True
    distill_item_ids: bool = True
    distill_sides: str = "auto"  # auto | both | user | item: which sides get a content-only tower
    refit: bool = True  # after choosing the epoch count on pseudo-cold validation, refit on all
    popularity_prior: float | None = None  # weight of log(1+count) in ranking; None: tune on val
    # Width of a training-only item ID embedding (0: none; see models.student_states). It
    # absorbs what is particular to each training item, so the item content weights learn
    # what transfers to unseen items; zeros at inference, never a served input. Chosen on
    # validation (BENCHMARKS.md "Tuning": cold segments +0.04, warm -0.05 over 3 seeds).
    item_id_sink: int = 32
    item_id_sink_dropout: float = 0.0  # training: share of examples whose sink is zeroed
    # Issue 17 (method=ridge): the user tower also reads a request-time history of item IDs
    # through the teacher's item ID lookup (history_table: `embedding`, its final item
    # embeddings, or `id`, its ID rows; unknown IDs ignored), the block
    # history_scale * sum / (count + history_shrinkage).
    # The fit adds history_copies rows per warm user, each its training interactions (by
    # timestamp) truncated at a length drawn from 1..history_max, weighted history_weight
    # against the user's no-history row. Chosen on validation (BENCHMARKS.md, "Issue 17").
    history: bool = True
    history_max: int = 10
    history_copies: int = 4
    history_shrinkage: float = 1.0
    history_scale: float = 10.0
    history_table: str = "embedding"
    history_weight: float = 1.0
    # Where the served `recommend` model takes a new user's / item's embedding from:
    # `student` (this student, in the teacher's space), `teacher` (the teacher's own content
    # path: its ID falls into the OOV bucket) or `auto`: the better on the validation split's
    # cold segments, per side (a user tower that reads the history keeps the student, which
    # the history needs). Methods ridge and aligned (BENCHMARKS.md, "Cold path").
    cold_path_user: str = "auto"
    cold_path_item: str = "auto"
    interaction_weight: str = "none"  # as TeacherConfig.interaction_weight
    learning_rate: float = 0.005
    batch_size: int = 1024
    epochs: int = 40
    patience: int = 4

    def __post_init__(self) -> None:
        _positive(self, "temperature", "learning_rate", "distill_temperature")
        _at_least(self, 1, "batch_size", "epochs")
        _at_least(self, 0, "patience", "distill_lambda", "align_weight")
        _one_of(self, "distill_sides", DISTILL_SIDES)
        _weight_transform(self)
        _one_of(self, "method", STUDENT_METHODS)
        _one_of(self, "reliability", ("tanh", "linear", "log", "none"))
        _positive(self, "reliability_scale")
        if self.ridge_alpha is not None:
            _positive(self, "ridge_alpha")
        _one_of(self, "item_map", ITEM_MAPS)
        _at_least(self, 1, "kernel_landmarks")
        if self.popularity_prior is not None:
            _at_least(self, 0, "popularity_prior")
        if self.item_id_sink < 0:
            raise _FieldError("item_id_sink", f"must be 0 (none) or more, got {self.item_id_sink}")
        _at_least(self, 1, "history_max")
        _at_least(self, 0, "history_copies", "history_shrinkage", "history_weight")
        _positive(self, "history_scale")
        _one_of(self, "history_table", ("embedding", "id"))
        _one_of(self, "cold_path_user", COLD_PATH_CHOICES)
        _one_of(self, "cold_path_item", COLD_PATH_CHOICES)
        if self.cold_path_user == "teacher" and self.history:
            raise _FieldError("cold_path_user", "teacher cannot read the request-time history "
                              "(the student's user tower does): set student.history=false to "
                              "serve new users with the teacher's content path")
        if not 0.0 <= self.item_id_sink_dropout < 1.0:
            raise _FieldError("item_id_sink_dropout",
                              f"must be in [0, 1), got {self.item_id_sink_dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """How the Keras fits (teacher, student methods ``own`` and ``aligned``) are distributed.

    ``strategy``: ``none`` (one process, TensorFlow's default device placement);
    ``mirrored`` (``tf.distribute.MirroredStrategy``: one replica per GPU, or per logical CPU
    device when there is no GPU); ``multi_worker`` (``MultiWorkerMirroredStrategy``: one
    process per machine, the cluster read from ``TF_CONFIG``; every worker runs the same
    command, the chief writes the run folder). ``batch_size`` stays the *global* batch: it is
    split across the replicas, so in-batch negatives are per replica (README, "Distributed
    training"). ``communication``: the multi-worker all-reduce (``auto``, ``ring``: gRPC,
    what CPUs use; ``nccl``: GPUs).
    """

    strategy: str = "none"
    communication: str = "auto"

    def __post_init__(self) -> None:
        _one_of(self, "strategy", TRAIN_STRATEGIES)
        _one_of(self, "communication", COLLECTIVES)


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 20, 50)
    headline_k: int = 20  # the reports' headline and the early-stopping metric
    batch_size: int = 4096
    # Per split (test and validation), evaluate at most this many warm and this many cold users
    # (a seeded draw; every held-out row of a drawn user counts). 0: all. With data.format=stream
    # this bounds what evaluation holds in memory (README, "Streamed input").
    max_users: int = 0

    def __post_init__(self) -> None:
        _check(self, "ks", len(self.ks) > 0 and all(k >= 1 for k in self.ks),
               "must be a non-empty list of cut-offs >= 1")
        _at_least(self, 1, "headline_k", "batch_size")
        _at_least(self, 0, "max_users")

    @property
    def cutoffs(self) -> tuple[int, ...]:
        """Every K reported: ``ks`` and the headline K."""
        return tuple(sorted({*self.ks, self.headline_k}))


@dataclass(frozen=True)
class ExportConfig:
    base_dir: str = "export"
    index: str = "scann"  # scann | partitioned | brute-force
    k: int = 100
    recommend_name: str = "recommend"  # the unified model: teacher for known, student for new
    student_name: str = "student"
    teacher_name: str = "teacher"
    item_encoder_name: str = "student_items"
    ann_recall_gate: float = 0.95
    scann_num_leaves: int | None = None  # None: about sqrt(n_items)
    scann_leaves_to_search: int | None = None
    scann_reorder: int | None = None
    partitioned_num_clusters: int | None = None  # k-means cells; None: about sqrt(n_items)
    partitioned_leaves_to_search: int | None = None  # None: raised by the recall gate

    def __post_init__(self) -> None:
        _one_of(self, "index", INDEX_KINDS)
        _at_least(self, 1, "k")
        _fraction(self, "ann_recall_gate", upper_inclusive=True)
        for name in ("scann_num_leaves", "scann_leaves_to_search", "scann_reorder",
                     "partitioned_num_clusters", "partitioned_leaves_to_search"):
            if getattr(self, name) is not None:
                _at_least(self, 1, name)
        for name in ("recommend_name", "student_name", "teacher_name", "item_encoder_name"):
            v = getattr(self, name)
            _check(self, name, bool(v) and not v.startswith(".")
                   and all(c.isalnum() or c in "_-." for c in v),
                   "must be letters, digits, '_', '-', '.' and not start with '.'")


@dataclass(frozen=True)
class RunConfig:
    """Everything one `tfrs-coldstart run` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    output_dir: str = "runs/latest"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (tuples become lists so YAML stays readable)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or say why not."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>" or (
        origin is not None and type(None) in args and origin is not tuple
    ):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}"
        ) from None
    return value


def _build(cls: Any, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, v in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(v, hints[name], key)
    try:
        return dataclasses.replace(cls(), **kwargs)
    except _FieldError as e:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"config key '{where}{e.field_name}' {e.reason}") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"teacher.tower.id_dim=32"`` -> nested dict ``{"teacher": {"tower": {"id_dim": 32}}}``."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: RunConfig | None = None,
) -> RunConfig:
    """Defaults (or ``base``), then a YAML file, then ``key=value`` overrides, in that order."""
    values: dict[str, Any] = to_dict(base or RunConfig())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        values = _merge(values, loaded)
    for o in overrides:
        values = _merge(values, parse_override(o))
    return _build(RunConfig, values)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_yaml_dict(cls: Any, values: dict[str, Any]) -> Any:
    """Rebuild a saved config (e.g. a run's ``config.yaml``)."""
    return _build(cls, values)
