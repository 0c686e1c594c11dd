"""Feature schema: which columns of the user and item tables are features, and of what type.

The schema is the one place that tells the preprocessing layers how to treat each column, so
it is validated strictly when read (a typo in a YAML file must stop the run, not silently drop
a feature).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tfrs_coldstart.errors import UserError
from tfrs_coldstart.fileio import atomic_write_text

__all__ = ["DataError", "FeatureSpec", "FeatureType", "Schema", "ID_COLUMNS", "ID_SIDES"]

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


_STRING_TYPES = (FeatureType.CATEGORICAL, FeatureType.TEXT, FeatureType.MULTI_HOT)
_SPEC_KEYS = ("name", "type", "separator", "dim", "nullable", "max_tokens", "ids_of")
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
    """

    name: str
    type: FeatureType
    separator: str = "|"
    dim: int | None = None
    nullable: bool = False
    max_tokens: int | None = None
    ids_of: str | None = None

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
        return d


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
