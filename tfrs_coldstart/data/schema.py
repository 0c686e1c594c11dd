"""Feature schema: which columns of the user and item tables are features, and of what type.

The schema is the one place that tells the preprocessing layers how to treat each column, so
it is validated strictly when read (a typo in a YAML file must stop the run, not silently drop
a feature).

A feature may be *derived* from source columns (``source`` + ``derive``, one of the closed set
:class:`Derive`): ``zip_prefix`` from ``zip_code`` (``prefix:2``), an age band from a raw age,
a title without its year, a year from a title or a date, a multi-hot from flag columns. The
loaders declare their derivations here instead of computing them in pandas, and one
implementation in TensorFlow ops (:mod:`tfrs_coldstart.data.derive`) makes the derived column
both when a table is loaded and inside every exported model, so served models, ``batch`` and
the clients take the source's own columns and training and serving cannot disagree.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tfrs_coldstart.errors import UserError
from tfrs_coldstart.fileio import atomic_write_text

__all__ = [
    "AGE_BUCKETS",
    "DataError",
    "Derive",
    "FeatureSpec",
    "FeatureType",
    "ID_COLUMNS",
    "ID_SIDES",
    "Schema",
    "SourceColumn",
    "input_names",
    "source_columns",
]

#: Reserved id column per side; never a feature name.
ID_COLUMNS = {"user": "user_id", "item": "item_id"}


class DataError(UserError, ValueError):
    """The one error type for bad input data or schema.

    Messages name the file (or DataFrame), the column, the first offending row and what to do
    next. Defined here, at the bottom of the data package, so that every data module (and the
    schema itself) can raise it without importing the loaders.
    """


class FeatureType(enum.StrEnum):
    """How a feature column is encoded by the towers (a str: ``FeatureType.TEXT == "text"``)."""

    CATEGORICAL = "categorical"
    NUMERIC = "numeric"
    TEXT = "text"
    MULTI_HOT = "multi_hot"
    DENSE_VECTOR = "dense_vector"


#: ML-1M age bands (lower bound -> label): what ``derive: age_bucket`` maps an age to (raw
#: years, or an ML-1M age code, which is its band's lower bound).
AGE_BUCKETS = ((1, "Under 18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"),
               (50, "50-55"), (56, "56+"))


class Derive(enum.StrEnum):
    """How a derived feature is made from its source column(s) (schema ``derive:``).

    ``prefix:N`` (one string column -> its first N characters, e.g. a zip code's area),
    ``age_bucket`` (a number of years, or an ML-1M age code -> the ML-1M age band label),
    ``code_label`` (an integer code -> ``labels[code]``; other codes -> the code as text),
    ``strip_year`` (a title -> the title without a trailing "(1995)"),
    ``year_from_title`` (a title -> the year in a trailing "(1995)"; with a second source, a
    date string read as ``year_from_date`` when the title has none; else ``fill``),
    ``year_from_date`` (a date string -> the year, the first group of exactly four digits:
    "01-Jan-1995", "1995-01-01"; else ``fill``),
    ``flags_to_multi_hot`` (flag columns, a number each -> the ``labels`` of the flags > 0
    joined by the feature's separator; ``labels`` default to the column names).
    """

    PREFIX = "prefix"
    AGE_BUCKET = "age_bucket"
    CODE_LABEL = "code_label"
    STRIP_YEAR = "strip_year"
    YEAR_FROM_TITLE = "year_from_title"
    YEAR_FROM_DATE = "year_from_date"
    FLAGS_TO_MULTI_HOT = "flags_to_multi_hot"


@dataclass(frozen=True)
class _Rule:
    """What one :class:`Derive` kind reads and makes."""

    numeric_sources: bool  # source cells are numbers (else strings)
    min_sources: int
    max_sources: int | None  # None: any number
    outputs: tuple[FeatureType, ...]
    labels: str  # "no" | "optional" | "required"
    fill: bool  # takes ``fill`` (the value where nothing is found; missing sources allowed)


_RULES: dict[Derive, _Rule] = {
    Derive.PREFIX: _Rule(False, 1, 1, (FeatureType.CATEGORICAL, FeatureType.TEXT), "no", False),
    Derive.AGE_BUCKET: _Rule(True, 1, 1, (FeatureType.CATEGORICAL,), "no", False),
    Derive.CODE_LABEL: _Rule(True, 1, 1, (FeatureType.CATEGORICAL,), "required", False),
    Derive.STRIP_YEAR: _Rule(False, 1, 1, (FeatureType.TEXT, FeatureType.CATEGORICAL), "no",
                             False),
    Derive.YEAR_FROM_TITLE: _Rule(False, 1, 2, (FeatureType.NUMERIC,), "no", True),
    Derive.YEAR_FROM_DATE: _Rule(False, 1, 1, (FeatureType.NUMERIC,), "no", True),
    Derive.FLAGS_TO_MULTI_HOT: _Rule(True, 1, None, (FeatureType.MULTI_HOT,), "optional",
                                     False),
}

_STRING_TYPES = (FeatureType.CATEGORICAL, FeatureType.TEXT, FeatureType.MULTI_HOT)
_SPEC_KEYS = ("name", "type", "separator", "dim", "nullable", "max_tokens", "ids_of", "source",
              "derive", "labels", "fill")
#: Feature types whose values may be declared as IDs of users or items (``ids_of``).
_ID_VALUED_TYPES = (FeatureType.CATEGORICAL, FeatureType.MULTI_HOT)
#: The sides an ``ids_of`` feature may name.
ID_SIDES = tuple(ID_COLUMNS)


@dataclass(frozen=True)
class FeatureSpec:
    """One feature column.

    ``separator`` only matters for ``multi_hot``; ``dim`` is required for ``dense_vector``;
    ``nullable`` allows missing values (filled with ``""`` for string types and ``0.0`` /
    zeros for numbers); ``max_tokens`` optionally caps the vocabulary of string features.
    ``ids_of`` ("user" or "item", categorical and multi_hot only) declares that the values are
    IDs of that side (a user's friends, an item's series): a student then embeds them through
    the teacher's trained ID table instead of learning one embedding per value from scratch.

    ``source`` and ``derive`` make a derived feature: ``derive`` (see :class:`Derive`) applied
    to the ``source`` column(s), e.g. ``{name: zip_prefix, type: categorical, source:
    zip_code, derive: "prefix:2"}``; tables then hold the source columns and the served
    models take them. ``labels`` name the flags of ``flags_to_multi_hot`` or the codes of
    ``code_label``; ``fill`` is the year where ``year_from_*`` finds none (when not given,
    the median found year of the table, computed once at load time and saved with the run's
    schema). A derived feature's name is never one of its side's source columns.
    """

    name: str
    type: FeatureType
    separator: str = "|"
    dim: int | None = None
    nullable: bool = False
    max_tokens: int | None = None
    ids_of: str | None = None
    source: tuple[str, ...] = ()
    derive: str | None = None
    labels: tuple[str, ...] = ()
    fill: float | None = None

    def __post_init__(self) -> None:
        # Accept the plain string form ("numeric") so specs can be built by hand easily.
        if not isinstance(self.type, FeatureType):
            try:
                object.__setattr__(self, "type", FeatureType(str(self.type)))
            except ValueError:
                raise DataError(
                    f"feature '{self.name}': unknown type {self.type!r}; "
                    f"use one of {[t.value for t in FeatureType]}"
                ) from None
        if not isinstance(self.name, str) or not self.name.strip():
            raise DataError(f"feature {self.name!r}: a feature needs a non-empty string name")
        if self.name in ID_COLUMNS.values():
            raise DataError(
                f"feature '{self.name}': '{self.name}' is the id column, not a feature; "
                "remove it from the schema"
            )
        if self.type is FeatureType.DENSE_VECTOR:
            if self.dim is None:
                raise DataError(
                    f"feature '{self.name}': dense_vector needs 'dim' (the vector length), "
                    "e.g. {name: %s, type: dense_vector, dim: 64}" % self.name
                )
            if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
                raise DataError(
                    f"feature '{self.name}': 'dim' must be a positive integer, got {self.dim!r}"
                )
        elif self.dim is not None:
            raise DataError(
                f"feature '{self.name}': 'dim' only applies to dense_vector features "
                f"(this one is {self.type.value}); remove it"
            )
        if self.type is FeatureType.MULTI_HOT and (
            not isinstance(self.separator, str) or not self.separator
        ):
            raise DataError(
                f"feature '{self.name}': multi_hot 'separator' must be a non-empty string"
            )
        if self.max_tokens is not None:
            if self.type not in _STRING_TYPES:
                raise DataError(
                    f"feature '{self.name}': 'max_tokens' only applies to categorical, text "
                    f"and multi_hot features (this one is {self.type.value}); remove it"
                )
            if (
                isinstance(self.max_tokens, bool)
                or not isinstance(self.max_tokens, int)
                or self.max_tokens < 1
            ):
                raise DataError(
                    f"feature '{self.name}': 'max_tokens' must be a positive integer, "
                    f"got {self.max_tokens!r}"
                )
        if not isinstance(self.nullable, bool):
            raise DataError(
                f"feature '{self.name}': 'nullable' must be true or false, got {self.nullable!r}"
            )
        if self.ids_of is not None:
            if self.type not in _ID_VALUED_TYPES:
                raise DataError(
                    f"feature '{self.name}': 'ids_of' only applies to categorical and multi_hot "
                    f"features (this one is {self.type.value}); remove it"
                )
            if self.ids_of not in ID_SIDES:
                raise DataError(
                    f"feature '{self.name}': 'ids_of' must be 'user' or 'item' (whose IDs the "
                    f"values are), got {self.ids_of!r}"
                )
        self._check_derivation()

    def _check_derivation(self) -> None:
        """``source``/``derive``/``labels``/``fill``: the closed set of :class:`Derive`."""
        where = f"feature '{self.name}'"
        for key in ("source", "labels"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, str) and v.strip() for v in value):
                raise DataError(f"{where}: '{key}' must be a column name or a list of "
                                f"non-empty strings, got {value!r}")
            object.__setattr__(self, key, tuple(v.strip() for v in value))
        if self.fill is not None:
            if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float)) or (
                    self.fill != self.fill or self.fill in (float("inf"), float("-inf"))):
                raise DataError(f"{where}: 'fill' must be a finite number, got {self.fill!r}")
            object.__setattr__(self, "fill", float(self.fill))
        if self.derive is None:
            extra = [k for k in ("source", "labels") if getattr(self, k)]
            extra += ["fill"] if self.fill is not None else []
            if extra:
                raise DataError(f"{where}: {extra} only apply to a derived feature; add "
                                f"'derive' (one of {_derive_names()}) or remove them")
            return
        kind, _ = _parse_derive(self.derive, where)
        rule = _RULES[kind]
        if not self.source:
            raise DataError(f"{where}: derive {self.derive!r} needs 'source', the column(s) "
                            "it reads, e.g. {name: zip_prefix, type: categorical, "
                            "source: zip_code, derive: 'prefix:2'}")
        n = len(self.source)
        if n < rule.min_sources or (rule.max_sources is not None and n > rule.max_sources):
            want = (f"{rule.min_sources}" if rule.max_sources == rule.min_sources else
                    f"{rule.min_sources} to {rule.max_sources}" if rule.max_sources else
                    f"at least {rule.min_sources}")
            raise DataError(f"{where}: derive {kind.value!r} reads {want} source column(s), "
                            f"got {list(self.source)}")
        if len(set(self.source)) != n:
            raise DataError(f"{where}: a source column is listed twice in {list(self.source)}")
        ids = [c for c in self.source if c in ID_COLUMNS.values()]
        if ids:
            raise DataError(f"{where}: the id column {ids[0]!r} cannot be a source; derive "
                            "from feature columns")
        if self.name in self.source:
            raise DataError(f"{where}: a derived feature cannot have the name of its source "
                            f"column (tables hold both); name it e.g. '{self.name}_{kind.value}'")
        if self.type not in rule.outputs:
            raise DataError(f"{where}: derive {kind.value!r} makes a "
                            f"{' or '.join(t.value for t in rule.outputs)} feature, not "
                            f"{self.type.value}; change 'type'")
        if self.ids_of is not None:
            raise DataError(f"{where}: 'ids_of' and 'derive' do not go together; remove one")
        if rule.labels == "no" and self.labels:
            raise DataError(f"{where}: derive {kind.value!r} takes no 'labels'; remove them")
        if rule.labels == "required" and not self.labels:
            raise DataError(f"{where}: derive {kind.value!r} needs 'labels' (the label of "
                            "code 0, 1, ...)")
        if kind is Derive.FLAGS_TO_MULTI_HOT and self.labels:
            if len(self.labels) != n:
                raise DataError(f"{where}: {len(self.labels)} labels for {n} flag columns; "
                                "give one label per source column")
            bad = [lab for lab in self.labels if self.separator in lab]
            if bad:
                raise DataError(f"{where}: label {bad[0]!r} holds the separator "
                                f"{self.separator!r}; rename it")
        if self.fill is not None and not rule.fill:
            raise DataError(f"{where}: derive {kind.value!r} takes no 'fill'; remove it")

    @property
    def derivation(self) -> tuple[Derive, int | None] | None:
        """``(kind, argument)`` of a derived feature (``prefix:2`` -> ``(PREFIX, 2)``), else
        None."""
        if self.derive is None:
            return None
        return _parse_derive(self.derive, f"feature '{self.name}'")

    @property
    def numeric_sources(self) -> bool:
        """Whether the source cells of this derived feature are numbers (else strings)."""
        d = self.derivation
        return d is not None and _RULES[d[0]].numeric_sources

    @property
    def takes_fill(self) -> bool:
        """Whether this derived feature has a ``fill`` (``year_from_*``): where it finds no
        value it gives ``fill``, so its sources may be missing."""
        d = self.derivation
        return d is not None and _RULES[d[0]].fill

    def underived(self) -> FeatureSpec:
        """This spec without its derivation (what a run trained on the derived column alone
        saved before schemas declared derivations)."""
        return dataclasses.replace(self, source=(), derive=None, labels=(), fill=None)

    @property
    def is_string(self) -> bool:
        """True for features stored as str cells (categorical, text, multi_hot)."""
        return self.type in _STRING_TYPES

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with only the non-default fields (what a hand-written YAML would hold)."""
        d: dict[str, Any] = {"name": self.name, "type": self.type.value}
        if self.type is FeatureType.MULTI_HOT and self.separator != "|":
            d["separator"] = self.separator
        if self.dim is not None:
            d["dim"] = self.dim
        if self.nullable:
            d["nullable"] = True
        if self.max_tokens is not None:
            d["max_tokens"] = self.max_tokens
        if self.ids_of is not None:
            d["ids_of"] = self.ids_of
        if self.derive is not None:
            d["source"] = self.source[0] if len(self.source) == 1 else list(self.source)
            d["derive"] = self.derive
        if self.labels:
            d["labels"] = list(self.labels)
        if self.fill is not None:
            d["fill"] = self.fill
        return d


def _derive_names() -> list[str]:
    return [f"{k.value}:N" if k is Derive.PREFIX else k.value for k in Derive]


def _parse_derive(text: Any, where: str) -> tuple[Derive, int | None]:
    """``"prefix:2"`` -> ``(Derive.PREFIX, 2)``; ``"age_bucket"`` -> ``(AGE_BUCKET, None)``."""
    if not isinstance(text, str):
        raise DataError(f"{where}: 'derive' must be a string, one of {_derive_names()}; got "
                        f"{text!r}")
    name, _, arg = text.strip().partition(":")
    try:
        kind = Derive(name.strip())
    except ValueError:
        raise DataError(f"{where}: unknown derive {text!r}; use one of {_derive_names()}"
                        ) from None
    if kind is Derive.PREFIX:
        if not arg.strip().isdigit() or int(arg) < 1:
            raise DataError(f"{where}: derive 'prefix' needs a length, e.g. 'prefix:2'; got "
                            f"{text!r}")
        return kind, int(arg)
    if arg:
        raise DataError(f"{where}: derive {kind.value!r} takes no argument; got {text!r}")
    return kind, None


@dataclass(frozen=True)
class SourceColumn:
    """A source column that derived features read and that is not a feature itself: a
    served input of the side.

    ``numeric``: its cells are numbers (``float32``; missing: NaN), else strings (missing:
    ``""``); ``nullable``: a cell may be missing (every feature reading it allows that:
    ``year_from_*`` always does, it gives its ``fill``); ``features``: the features it makes.
    """

    name: str
    numeric: bool
    nullable: bool
    features: tuple[str, ...]


def source_columns(specs: tuple[FeatureSpec, ...]) -> tuple[SourceColumn, ...]:
    """The source columns of ``specs`` that are not features themselves, in order of first
    use."""
    plain = {s.name for s in specs}
    order: list[str] = []
    readers: dict[str, list[FeatureSpec]] = {}
    for spec in specs:
        for col in spec.source:
            if col in plain:
                continue
            if col not in readers:
                order.append(col)
            readers.setdefault(col, []).append(spec)
    return tuple(SourceColumn(
        col, readers[col][0].numeric_sources,
        all(r.takes_fill or r.nullable for r in readers[col]),
        tuple(r.name for r in readers[col])) for col in order)


def input_names(specs: tuple[FeatureSpec, ...]) -> tuple[str, ...]:
    """The columns a table (or a served request) gives for ``specs``: each plain feature and,
    in place of each derived one, its source columns; in schema order, each once."""
    out: list[str] = []
    for spec in specs:
        for col in (spec.source if spec.derive is not None else (spec.name,)):
            if col not in out:
                out.append(col)
    return tuple(out)


def _check_sources(side: str, specs: tuple[FeatureSpec, ...]) -> None:
    """Source columns agree across one side's features (see :class:`FeatureSpec`)."""
    by_name = {s.name: s for s in specs}
    kinds: dict[str, tuple[bool, str]] = {}
    for spec in specs:
        for col in spec.source:
            other = by_name.get(col)
            if other is not None and other.derive is not None:
                raise DataError(
                    f"{side}_features: feature '{spec.name}' reads '{col}', which is itself a "
                    f"derived feature; derive from source columns only")
            if other is not None and (other.type is FeatureType.DENSE_VECTOR or (
                    other.type is FeatureType.NUMERIC) != spec.numeric_sources):
                raise DataError(
                    f"{side}_features: feature '{spec.name}' ({spec.derive}) reads '{col}' as "
                    f"{'numbers' if spec.numeric_sources else 'strings'}, but '{col}' is a "
                    f"{other.type.value} feature")
            seen = kinds.setdefault(col, (spec.numeric_sources, spec.name))
            if seen[0] != spec.numeric_sources:
                raise DataError(
                    f"{side}_features: '{col}' is read as numbers by one of '{seen[1]}' and "
                    f"'{spec.name}' and as strings by the other; use separate columns")


@dataclass(frozen=True)
class Schema:
    """Feature specs of both sides; either side may be empty (featureless users or items)."""

    user_features: tuple[FeatureSpec, ...] = field(default_factory=tuple)
    item_features: tuple[FeatureSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "user_features", tuple(self.user_features))
        object.__setattr__(self, "item_features", tuple(self.item_features))
        for side in ("user", "item"):
            seen: set[str] = set()
            for spec in self.side(side):
                if not isinstance(spec, FeatureSpec):
                    raise DataError(f"{side}_features must hold FeatureSpec, got {spec!r}")
                if spec.name in seen:
                    raise DataError(
                        f"{side}_features: feature '{spec.name}' is listed twice; "
                        "keep one entry per column"
                    )
                seen.add(spec.name)
            _check_sources(side, self.side(side))

    def side(self, side: str) -> tuple[FeatureSpec, ...]:
        """Feature specs of ``side`` ("user" or "item")."""
        if side == "user":
            return self.user_features
        if side == "item":
            return self.item_features
        raise ValueError(f"side must be 'user' or 'item', got {side!r}")

    def names(self, side: str) -> tuple[str, ...]:
        """Feature column names of ``side``, in schema order."""
        return tuple(s.name for s in self.side(side))

    def feature(self, side: str, name: str) -> FeatureSpec:
        """The spec of feature ``name`` on ``side`` (KeyError if absent)."""
        for spec in self.side(side):
            if spec.name == name:
                return spec
        raise KeyError(f"no {side} feature named {name!r}")

    def sources(self, side: str) -> tuple[SourceColumn, ...]:
        """The source columns of ``side`` that are not features (see :func:`source_columns`)."""
        return source_columns(self.side(side))

    def inputs(self, side: str) -> tuple[str, ...]:
        """The columns a ``side`` table or request gives (see :func:`input_names`)."""
        return input_names(self.side(side))

    @property
    def derives(self) -> bool:
        """Whether any feature is derived from source columns."""
        return any(s.derive is not None for s in self.user_features + self.item_features)

    def underived(self) -> Schema:
        """The schema without derivations (each feature as a plain column)."""
        return Schema(tuple(s.underived() for s in self.user_features),
                      tuple(s.underived() for s in self.item_features))

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_features": [s.to_dict() for s in self.user_features],
            "item_features": [s.to_dict() for s in self.item_features],
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> Schema:
        """Build from the YAML form; errors name ``source`` and the offending feature."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise DataError(
                f"{source}: a schema must be a mapping with 'user_features' and "
                f"'item_features' lists, got {type(d).__name__}"
            )
        unknown = sorted(set(d) - {"user_features", "item_features"})
        if unknown:
            raise DataError(
                f"{source}: unknown top-level key(s) {unknown}; a schema has only "
                "'user_features' and 'item_features'"
            )
        sides: dict[str, tuple[FeatureSpec, ...]] = {}
        for key in ("user_features", "item_features"):
            raw = d.get(key) or []
            if not isinstance(raw, list):
                raise DataError(f"{source}: '{key}' must be a list of features, got {raw!r}")
            specs = []
            for i, entry in enumerate(raw):
                specs.append(_spec_from_dict(entry, f"{source}: {key}[{i}]"))
            sides[key] = tuple(specs)
        try:
            return cls(**sides)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Schema:
        """Read a schema YAML file (see :meth:`from_dict` for the form)."""
        p = Path(path)
        if not p.is_file():
            raise DataError(
                f"{p}: schema file not found; pass the path of a YAML file like "
                "'user_features: [{name: age, type: numeric}]\\nitem_features: [...]'"
            )
        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: not valid YAML ({e}); fix the file") from None
        return cls.from_dict(d, source=str(p))

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temp file + rename) so a reader never sees half a schema.

        The file gets the mode a plain ``open`` would give (the umask's), not ``mkstemp``'s 0600.
        """
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _spec_from_dict(entry: Any, where: str) -> FeatureSpec:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: each feature must be a mapping like {{name: x, type: y}}")
    name = entry.get("name")
    label = f"feature '{name}'" if name else "feature without a name"
    if not name or not isinstance(name, str):
        raise DataError(f"{where}: {label}: every feature needs a 'name'")
    unknown = sorted(set(entry) - set(_SPEC_KEYS))
    if unknown:
        raise DataError(
            f"{where}: {label}: unknown key(s) {unknown}; allowed keys are {list(_SPEC_KEYS)}"
        )
    if "type" not in entry:
        raise DataError(
            f"{where}: {label}: missing 'type'; use one of {[t.value for t in FeatureType]}"
        )
    try:
        return FeatureSpec(**entry)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
