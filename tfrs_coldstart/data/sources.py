"""Loading the three tables (interactions, users, items) from files, pandas, MovieLens or TFDS.

Every source ends in :func:`load_tables`, which validates and normalises dtypes, so the model
code sees one shape of data whatever the origin:

- ids: Python ``str`` (object dtype); integer ids become ``"196"``, never ``"196.0"``;
- categorical / text: ``str`` (stripped); multi_hot: ``str`` joined with the spec's separator;
- numeric: float32; dense_vector: cells are float32 ``np.ndarray`` of length ``spec.dim``;
- interactions: ``user_id``, ``item_id``, optional ``timestamp`` (int64), optional
  ``weight`` (float32), in file order.

Bad input raises :class:`DataError` naming the file (or ``<DataFrame interactions>``), the
column, the first offending row and what to do next. Loading never writes anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tfrs_coldstart.data.schema import DataError, FeatureSpec, FeatureType, Schema

__all__ = [
    "DataError",
    "Dataset",
    "MOVIELENS_SCHEMA",
    "TABLE_SUFFIXES",
    "load_dataset",
    "load_movielens",
    "load_tables",
    "load_tfds",
]

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst")
_FORMATS = ("synthetic", "movielens", "tables", "tfds")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Validated, dtype-normalised tables plus their schema (see the module docstring)."""

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    schema: Schema

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_interactions(self) -> int:
        return len(self.interactions)

    def summary(self) -> dict[str, Any]:
        """Sizes and feature names, for logs and manifests."""
        return {
            "name": self.name,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_interactions": self.n_interactions,
            "user_features": list(self.schema.names("user")),
            "item_features": list(self.schema.names("item")),
        }


# --------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class _Source:
    """Where a table came from; formats row references for error messages."""

    label: str
    line_offset: int | None = None  # file line of row 0 for text files (header = line 1)
    index: pd.Index | None = None  # original DataFrame index, when not 0..n-1

    def row(self, pos: int) -> str:
        text = f"row {pos}"
        if self.line_offset is not None:
            text += f" (line {pos + self.line_offset} of the file)"
        elif self.index is not None:
            label = self.index[pos]
            label = label.item() if isinstance(label, np.generic) else label
            text += f" (index label {label!r})"
        return text

    def error(self, column: str, pos: int | None, problem: str, hint: str) -> DataError:
        where = "header row" if pos is None else self.row(pos)
        return DataError(f"{self.label}: column '{column}', {where}: {problem}. {hint}")


def _table_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_table(obj: Any, role: str) -> tuple[pd.DataFrame, _Source]:
    """Read one table; returns a RangeIndex frame (file order) and its source descriptor."""
    if isinstance(obj, pd.DataFrame):
        df = obj
        id_col = "user_id" if role == "users" else "item_id" if role == "items" else None
        if id_col and id_col not in df.columns and df.index.name == id_col:
            df = df.reset_index()
        index = None if isinstance(df.index, pd.RangeIndex) and df.index.start == 0 else df.index
        if index is not None and index.equals(pd.RangeIndex(len(df))):
            index = None
        return df.reset_index(drop=True), _Source(f"<DataFrame {role}>", index=index)
    if not isinstance(obj, (str, os.PathLike)):
        raise DataError(
            f"{role}: expected a file path or a pandas DataFrame, got {type(obj).__name__}"
        )
    path = Path(obj)
    label = str(path)
    if not path.is_file():
        raise DataError(
            f"{label}: {role} file not found. Check the path; accepted formats are "
            f"{', '.join(TABLE_SUFFIXES)} (optionally compressed) or a pandas DataFrame."
        )
    suffix = _table_suffix(path)
    try:
        if suffix in (".csv", ".tsv"):
            # Everything as text: ids like "007" keep their form and we parse numbers ourselves,
            # so a bad cell is reported by row instead of silently turning the column to object.
            df = pd.read_csv(
                path,
                sep="\t" if suffix == ".tsv" else ",",
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                encoding="utf-8",
            )
            return df, _Source(label, line_offset=2)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path).reset_index(drop=True), _Source(label)
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not UTF-8 text ({e}); re-save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{label}: the {role} file is empty (no header, no rows); it needs a header and "
            "at least one row"
        ) from None
    except Exception as e:  # parser/arrow errors come in many classes; all mean "unreadable"
        raise DataError(
            f"{label}: could not read the {role} table ({type(e).__name__}: {e}); check that "
            "the file is a valid CSV/TSV (header row, one record per line) or Parquet file"
        ) from None
    raise DataError(
        f"{label}: unknown file type {suffix or '(no extension)'!r} for the {role} table; "
        f"accepted: {', '.join(TABLE_SUFFIXES)} (optionally .gz/.bz2/.zip/.xz/.zst) "
        "or a pandas DataFrame"
    )


# --------------------------------------------------------------------------------------------
# cell normalisation


def _is_missing_scalar(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, (float, np.floating)) and np.isnan(v)


def _scalar_to_str(v: Any) -> str:
    """Id/category cell -> str; integral numbers lose their '.0'."""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace").strip()
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return str(int(f)) if f.is_integer() else repr(f)
    if isinstance(v, (list, tuple, np.ndarray)):
        raise TypeError("a list, expected a single value")
    return str(v).strip()


def _to_str_cells(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Convert to an object array of stripped str; also return the missing/empty mask.

    Raises TypeError(pos, reason) via _CellError for cells that cannot be a single string.
    """
    n = len(series)
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object)
    missing = series.isna().to_numpy().copy()
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        out = np.where(missing, "", series.astype(str).to_numpy(dtype=object)).astype(object)
    elif pd.api.types.is_integer_dtype(dtype):
        filled = series.fillna(0) if missing.any() else series
        out = filled.astype("int64").astype(str).to_numpy(dtype=object)
    elif pd.api.types.is_float_dtype(dtype):
        vals = series.to_numpy(dtype=np.float64, na_value=np.nan)
        out = np.empty(n, dtype=object)
        for i, f in enumerate(vals):
            out[i] = "" if np.isnan(f) else (str(int(f)) if f.is_integer() else repr(float(f)))
    elif pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
        out = series.str.strip().to_numpy(dtype=object, na_value="")
    else:
        out = np.empty(n, dtype=object)
        for i, v in enumerate(series.to_numpy(dtype=object)):
            if _is_missing_scalar(v):
                missing[i] = True
                out[i] = ""
                continue
            try:
                out[i] = _scalar_to_str(v)
            except TypeError as e:
                raise _CellError(i, str(e)) from None
    out = np.array(out, dtype=object)  # own, writable copy (to_numpy may return a view)
    missing = missing | (out == "")
    out[missing] = ""
    return out, missing


class _CellError(Exception):
    def __init__(self, pos: int, reason: str) -> None:
        super().__init__(reason)
        self.pos = pos
        self.reason = reason


def _multi_hot_cells(series: pd.Series, sep: str) -> tuple[np.ndarray, np.ndarray]:
    """Tags joined by ``sep`` with whitespace and empty tags removed; lists are joined."""
    n = len(series)
    if pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
        missing = series.isna().to_numpy()
        out = np.array(series.to_numpy(dtype=object, na_value=""), dtype=object)
        s = re.escape(sep)
        dirty = series.str.contains(
            rf"^\s|\s$|\s{s}|{s}\s|{s}{s}|^{s}|{s}$", regex=True, na=False
        ).to_numpy()
        for i in np.flatnonzero(dirty):
            out[i] = sep.join(t.strip() for t in out[i].split(sep) if t.strip())
    else:
        missing = np.zeros(n, dtype=bool)
        out = np.empty(n, dtype=object)
        for i, v in enumerate(series.to_numpy(dtype=object)):
            if isinstance(v, (list, tuple, np.ndarray)):
                tags = [_scalar_to_str(t) for t in v if not _is_missing_scalar(t)]
                out[i] = sep.join(t for t in tags if t)
            elif _is_missing_scalar(v):
                missing[i] = True
                out[i] = ""
            else:
                text = _scalar_to_str(v)
                out[i] = sep.join(t.strip() for t in text.split(sep) if t.strip())
    missing = missing | (out == "")
    out[missing] = ""
    return out, missing


def _numeric_cells(series: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 values, missing mask, and mask of present-but-unparseable/non-finite cells."""
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        missing = series.isna().to_numpy()
        vals = series.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
    elif pd.api.types.is_numeric_dtype(dtype):
        missing = series.isna().to_numpy()
        vals = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        obj = series.astype(object)
        as_text = obj.map(lambda v: v.strip() if isinstance(v, str) else v)
        missing = as_text.map(lambda v: _is_missing_scalar(v) or v == "").to_numpy(dtype=bool)
        as_text = as_text.map(lambda v: np.nan if isinstance(v, bool) else v)
        vals = pd.to_numeric(as_text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~missing & ~np.isfinite(vals)
    return vals, missing, bad


_VEC_SPLIT = re.compile(r"[\s,;]+")


def _parse_vector(v: Any, dim: int) -> np.ndarray | None:
    """One dense-vector cell -> float32 array; None when missing; raises ValueError if bad."""
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1].strip()
        if not text:
            return None
        arr = np.array([float(t) for t in _VEC_SPLIT.split(text) if t], dtype=np.float32)
    elif isinstance(v, (list, tuple, np.ndarray)):
        arr = np.asarray(v, dtype=np.float32)
        if arr.ndim != 1:
            raise ValueError(f"a nested array of shape {arr.shape}, expected a flat vector")
    elif _is_missing_scalar(v):
        return None
    else:
        raise ValueError(f"a {type(v).__name__}, expected a list of numbers")
    if arr.shape[0] != dim:
        raise ValueError(f"length {arr.shape[0]}, expected dim={dim}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("non-finite values (nan/inf)")
    return arr


def _normalise_feature(
    series: pd.Series, spec: FeatureSpec, src: _Source
) -> np.ndarray | pd.Series:
    col = spec.name
    nullable_hint = (
        f"Fill the value, drop the row, or mark the feature nullable in the schema "
        f"({{name: {col}, type: {spec.type.value}, nullable: true}})"
    )
    if spec.type is FeatureType.NUMERIC:
        vals, missing, bad = _numeric_cells(series)
        if bad.any():
            pos = int(np.argmax(bad))
            raise src.error(
                col,
                pos,
                f"value {series.iloc[pos]!r} is not a finite number (numeric feature)",
                "Fix the value, or declare the column as categorical/text in the schema",
            )
        if missing.any():
            if not spec.nullable:
                raise src.error(col, int(np.argmax(missing)), "missing value", nullable_hint)
            vals = np.where(missing, 0.0, vals)
        return vals.astype(np.float32)
    if spec.type is FeatureType.DENSE_VECTOR:
        assert spec.dim is not None
        out = np.empty(len(series), dtype=object)
        for i, v in enumerate(series.to_numpy(dtype=object)):
            try:
                arr = _parse_vector(v, spec.dim)
            except (ValueError, TypeError) as e:
                raise src.error(
                    col,
                    i,
                    f"bad dense vector {_short(v)}: {e}",
                    f"Give {spec.dim} numbers per cell (Parquet list column, or in CSV a string "
                    "like '0.1 0.2 ...' or '[0.1, 0.2, ...]'), or fix 'dim' in the schema",
                ) from None
            if arr is None:
                if not spec.nullable:
                    raise src.error(col, i, "missing vector", nullable_hint)
                arr = np.zeros(spec.dim, dtype=np.float32)
            out[i] = arr
        return out
    try:
        if spec.type is FeatureType.MULTI_HOT:
            out, missing = _multi_hot_cells(series, spec.separator)
        else:
            out, missing = _to_str_cells(series)
    except _CellError as e:
        raise src.error(
            col, e.pos, f"value is {e.reason}", f"Give one {spec.type.value} value per cell"
        ) from None
    if missing.any() and not spec.nullable:
        raise src.error(col, int(np.argmax(missing)), "missing or empty value", nullable_hint)
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _normalise_ids(series: pd.Series, column: str, src: _Source) -> np.ndarray:
    try:
        out, missing = _to_str_cells(series)
    except _CellError as e:
        raise src.error(column, e.pos, f"id is {e.reason}", "Give one id per cell") from None
    if missing.any():
        raise src.error(
            column,
            int(np.argmax(missing)),
            "missing or empty id",
            "Every row needs an id; drop or fix the row",
        )
    return out


def _obj(values: np.ndarray) -> pd.Series:
    return pd.Series(values, dtype=object)


def _require_columns(df: pd.DataFrame, cols: list[str], src: _Source, role: str) -> None:
    for col in cols:
        if col not in df.columns:
            raise src.error(
                col,
                None,
                f"missing required column (the {role} table has columns {list(df.columns)})",
                "Add the column, rename the existing one, or remove the feature from the schema",
            )


def _feature_table(
    df: pd.DataFrame, src: _Source, side: str, specs: tuple[FeatureSpec, ...]
) -> pd.DataFrame:
    id_col = f"{side}_id"
    role = f"{side}s"
    if len(df) == 0:
        raise DataError(f"{src.label}: the {role} table is empty (0 rows); it needs one row per "
                        f"{side}")
    _require_columns(df, [id_col] + [s.name for s in specs], src, role)
    ids = _normalise_ids(df[id_col], id_col, src)
    dup = pd.Series(ids).duplicated(keep="first").to_numpy()
    if dup.any():
        pos = int(np.argmax(dup))
        first = int(np.flatnonzero(ids == ids[pos])[0])
        raise src.error(
            id_col,
            pos,
            f"duplicate {id_col} {ids[pos]!r} (first seen at {src.row(first)})",
            f"Keep one row per {side}",
        )
    data: dict[str, Any] = {id_col: _obj(ids)}
    for spec in specs:
        values = _normalise_feature(df[spec.name], spec, src)
        data[spec.name] = _obj(values) if values.dtype == object else values
    return pd.DataFrame(data)


def _interactions_table(df: pd.DataFrame, src: _Source) -> pd.DataFrame:
    if len(df) == 0:
        raise DataError(
            f"{src.label}: the interactions table is empty (0 rows); it needs at least one "
            "user_id,item_id row"
        )
    _require_columns(df, ["user_id", "item_id"], src, "interactions")
    data: dict[str, Any] = {
        "user_id": _obj(_normalise_ids(df["user_id"], "user_id", src)),
        "item_id": _obj(_normalise_ids(df["item_id"], "item_id", src)),
    }
    if "timestamp" in df.columns:
        data["timestamp"] = _timestamps(df["timestamp"], src)
    if "weight" in df.columns:
        vals, missing, bad = _numeric_cells(df["weight"])
        bad = bad | missing
        if bad.any():
            pos = int(np.argmax(bad))
            raise src.error(
                "weight",
                pos,
                f"value {df['weight'].iloc[pos]!r} is not a finite number",
                "Give every interaction a numeric weight, or drop the column",
            )
        data["weight"] = vals.astype(np.float32)
    return pd.DataFrame(data)


def _timestamps(series: pd.Series, src: _Source) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        missing = series.isna().to_numpy()
        if missing.any():
            raise src.error("timestamp", int(np.argmax(missing)), "missing timestamp",
                            "Fill it or drop the column")
        return (series.astype("datetime64[s]").astype("int64")).to_numpy(dtype=np.int64)
    vals, missing, bad = _numeric_cells(series)
    if bad.all():
        # No cell is a number: maybe ISO dates.
        parsed = pd.to_datetime(series, errors="coerce", utc=True)
        if not parsed.isna().any():
            return parsed.astype("int64").to_numpy(dtype=np.int64) // 10**9
    bad = bad | missing
    if bad.any():
        pos = int(np.argmax(bad))
        raise src.error(
            "timestamp",
            pos,
            f"value {series.iloc[pos]!r} is not an integer timestamp",
            "Use seconds since the epoch (or ISO dates), or drop the column",
        )
    return vals.astype(np.int64)


def load_tables(
    interactions: Any,
    users: Any,
    items: Any,
    schema: Schema,
    name: str = "tables",
) -> Dataset:
    """Read, validate and normalise the three tables.

    Each of ``interactions``/``users``/``items`` is a path (.csv, .tsv, .parquet/.pq) or a
    pandas DataFrame. ``users``/``items`` may be ``None`` when that side of the schema has no
    features: the table is then the unique ids of the interactions (featureless side).
    """
    if not isinstance(schema, Schema):
        raise DataError(f"schema must be a Schema (e.g. Schema.from_yaml(path)), got {schema!r}")
    inter_df, inter_src = _read_table(interactions, "interactions")
    inter = _interactions_table(inter_df, inter_src)
    tables: dict[str, tuple[pd.DataFrame, _Source | None]] = {}
    for side, obj in (("user", users), ("item", items)):
        id_col = f"{side}_id"
        if obj is None:
            if schema.side(side):
                raise DataError(
                    f"{name}: no {side}s table given but the schema has {side} features "
                    f"{list(schema.names(side))}; pass the {side}s table"
                )
            ids = pd.unique(inter[id_col].to_numpy())
            tables[side] = (pd.DataFrame({id_col: _obj(ids)}), None)
            continue
        df, src = _read_table(obj, f"{side}s")
        tables[side] = (_feature_table(df, src, side, schema.side(side)), src)
    for side in ("user", "item"):
        id_col = f"{side}_id"
        table, src = tables[side]
        unknown = ~inter[id_col].isin(table[id_col]).to_numpy()
        if unknown.any():
            pos = int(np.argmax(unknown))
            where = src.label if src is not None else "<derived>"
            raise inter_src.error(
                id_col,
                pos,
                f"{id_col} {inter[id_col].iloc[pos]!r} is not in the {side}s table ({where}); "
                f"{int(unknown.sum())} interaction(s) name unknown {side}s",
                f"Add the missing {side}s to the {side}s table or drop those interactions",
            )
    return Dataset(
        name=name,
        interactions=inter,
        users=tables["user"][0],
        items=tables["item"][0],
        schema=schema,
    )


# --------------------------------------------------------------------------------------------
# MovieLens

MOVIELENS_SCHEMA = Schema(
    user_features=(
        FeatureSpec("age", FeatureType.CATEGORICAL),
        FeatureSpec("gender", FeatureType.CATEGORICAL),
        FeatureSpec("occupation", FeatureType.CATEGORICAL),
        FeatureSpec("zip_prefix", FeatureType.CATEGORICAL),
    ),
    item_features=(
        FeatureSpec("title", FeatureType.TEXT),
        FeatureSpec("genres", FeatureType.MULTI_HOT, separator="|"),
        FeatureSpec("year", FeatureType.NUMERIC, nullable=True),
    ),
)

#: ML-1M age buckets (lower bound -> label), used for ML-100K raw ages too.
AGE_BUCKETS = ((1, "Under 18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"),
               (50, "50-55"), (56, "56+"))

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)

ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)

_ML100K_FILES = ("u.data", "u.item", "u.user")
_ML1M_FILES = ("ratings.dat", "movies.dat", "users.dat")
_ML_ACCEPTED = (
    "accepted layouts: ml-100k (u.data, u.item, u.user) or ml-1m (ratings.dat, movies.dat, "
    "users.dat), as unzipped from https://grouplens.org/datasets/movielens/"
)
_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")


def age_bucket(age: Any) -> str:
    """ML-1M age bucket label of an age (raw years or an ML-1M bucket code)."""
    a = float(age)
    label = AGE_BUCKETS[0][1]
    for lower, name in AGE_BUCKETS:
        if a >= lower:
            label = name
    return label


def _split_title(title: str) -> tuple[str, float]:
    """'Toy Story (1995)' -> ('Toy Story', 1995.0); no year -> (title, nan)."""
    title = title.strip()
    m = _YEAR_IN_TITLE.search(title)
    if not m:
        return title, np.nan
    stripped = title[: m.start()].strip()
    return (stripped or title), float(m.group(1))


def _fill_year(years: list[float]) -> np.ndarray:
    arr = np.asarray(years, dtype=np.float64)
    known = arr[~np.isnan(arr)]
    fill = float(np.median(known)) if known.size else 0.0
    return np.where(np.isnan(arr), fill, arr).astype(np.float32)


def _find_movielens_dir(data_dir: Path) -> tuple[Path, str]:
    candidates = [data_dir] + [data_dir / sub for sub in ("ml-100k", "ml-1m")]
    for d in candidates:
        if all((d / f).is_file() for f in _ML100K_FILES):
            return d, "ml-100k"
        if all((d / f).is_file() for f in _ML1M_FILES):
            return d, "ml-1m"
    for files in (_ML100K_FILES, _ML1M_FILES):
        present = [f for f in files if (data_dir / f).is_file()]
        if present:
            missing = [f for f in files if f not in present]
            raise DataError(
                f"{data_dir}: MovieLens file(s) {missing} missing (found {present}); "
                f"{_ML_ACCEPTED}"
            )
    raise DataError(f"{data_dir}: no MovieLens files found; {_ML_ACCEPTED}")


def _read_delimited(path: Path, sep: str, ncols: int, encoding: str) -> list[list[str]]:
    """Small MovieLens metadata files: split by hand (titles may contain the separator)."""
    rows = []
    with path.open(encoding=encoding, newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split(sep)
            if len(parts) < ncols:
                raise DataError(
                    f"{path}: line {lineno}: expected {ncols} fields separated by {sep!r}, got "
                    f"{len(parts)}; is this an unmodified MovieLens file?"
                )
            if len(parts) > ncols:  # separator inside the title field (field 1)
                extra = len(parts) - ncols
                parts = [parts[0], sep.join(parts[1 : 2 + extra])] + parts[2 + extra :]
            rows.append(parts)
    return rows


def _read_ratings(path: Path, sep: str) -> pd.DataFrame:
    try:
        if sep == "\t":
            df = pd.read_csv(path, sep="\t", header=None, names=["u", "i", "r", "t"],
                             dtype=str, keep_default_na=False)
        else:  # "::" split on ":" with the fast C parser; fields 0, 2, 4, 6
            df = pd.read_csv(path, sep=":", header=None, usecols=[0, 2, 4, 6],
                             names=["u", "_a", "i", "_b", "r", "_c", "t"], dtype=str,
                             keep_default_na=False)
    except Exception as e:
        raise DataError(f"{path}: could not read MovieLens ratings ({e})") from None
    return pd.DataFrame(
        {"user_id": df["u"], "item_id": df["i"], "timestamp": df["t"], "weight": df["r"]}
    )


def load_movielens(data_dir: str | os.PathLike[str]) -> Dataset:
    """Load a raw MovieLens 100K or 1M folder into :data:`MOVIELENS_SCHEMA` tables.

    Users get an ML-1M age bucket, gender, occupation and the first two zip characters;
    items get the title without its year, '|'-joined genres and the release year (missing
    years are filled with the median year). Ratings become ``weight``; file order is kept.
    """
    if data_dir is None:
        raise DataError(f"load_movielens needs data_dir (a MovieLens folder); {_ML_ACCEPTED}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: MovieLens folder does not exist; {_ML_ACCEPTED}")
    d, variant = _find_movielens_dir(root)
    if variant == "ml-100k":
        inter = _read_ratings(d / "u.data", "\t")
        user_rows = _read_delimited(d / "u.user", "|", 5, "latin-1")
        users = pd.DataFrame({
            "user_id": [r[0] for r in user_rows],
            "age": [age_bucket(r[1]) for r in user_rows],
            "gender": [r[2] for r in user_rows],
            "occupation": [r[3] for r in user_rows],
            "zip_prefix": [r[4].strip()[:2] for r in user_rows],
        })
        genre_names = list(ML100K_GENRES)
        genre_file = d / "u.genre"
        if genre_file.is_file():
            pairs = [r for r in _read_delimited(genre_file, "|", 2, "latin-1")]
            genre_names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
        item_rows = _read_delimited(d / "u.item", "|", 5 + len(genre_names), "latin-1")
        titles, years, genres = [], [], []
        for r in item_rows:
            title, year = _split_title(r[1])
            if np.isnan(year) and re.search(r"\d{4}$", r[2].strip()):
                year = float(r[2].strip()[-4:])
            flags = r[5 : 5 + len(genre_names)]
            names = [g for g, f in zip(genre_names, flags, strict=True) if f.strip() == "1"]
            titles.append(title)
            years.append(year)
            genres.append("|".join(names) or "unknown")
        items = pd.DataFrame({"item_id": [r[0] for r in item_rows], "title": titles,
                              "genres": genres, "year": _fill_year(years)})
    else:
        inter = _read_ratings(d / "ratings.dat", "::")
        user_rows = _read_delimited(d / "users.dat", "::", 5, "latin-1")
        occupations = []
        for r in user_rows:
            code = r[3].strip()
            occupations.append(
                ML1M_OCCUPATIONS[int(code)]
                if code.isdigit() and int(code) < len(ML1M_OCCUPATIONS) else code
            )
        users = pd.DataFrame({
            "user_id": [r[0] for r in user_rows],
            "age": [age_bucket(r[2]) for r in user_rows],
            "gender": [r[1] for r in user_rows],
            "occupation": occupations,
            "zip_prefix": [r[4].strip()[:2] for r in user_rows],
        })
        item_rows = _read_delimited(d / "movies.dat", "::", 3, "latin-1")
        split = [_split_title(r[1]) for r in item_rows]
        items = pd.DataFrame({
            "item_id": [r[0] for r in item_rows],
            "title": [t for t, _ in split],
            "genres": [r[2].strip() or "unknown" for r in item_rows],
            "year": _fill_year([y for _, y in split]),
        })
    try:
        return load_tables(inter, users, items, MOVIELENS_SCHEMA, name=variant)
    except DataError as e:
        raise DataError(f"MovieLens folder {d} ({variant}): {e}") from None


# --------------------------------------------------------------------------------------------
# TFDS


def load_tfds(
    name: str = "movielens/100k-ratings",
    data_dir: str | None = None,
    download: bool = True,
    batch_size: int = 65_536,
) -> Dataset:
    """Build the three tables from a TFDS MovieLens ratings dataset (``tfds.load``).

    User features come from each user's first rating row; datasets without user features
    (e.g. ``movielens/25m-ratings``) give a featureless user side.
    """
    # Lazy: heavy imports only this loader needs. The package __init__ (already run, since
    # this module lives in it) has set TF_USE_LEGACY_KERAS before TensorFlow loads.
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        ds, info = tfds.load(
            name, split="train", data_dir=data_dir, with_info=True, shuffle_files=False,
            download=download,
        )
    except Exception as e:
        raise DataError(
            f"tfds:{name}: could not load ({type(e).__name__}: {e}); check the dataset name "
            "(e.g. 'movielens/100k-ratings'), data_dir, and that it is downloaded"
        ) from None
    features = info.features
    needed = ("user_id", "movie_id", "movie_title", "movie_genres", "timestamp", "user_rating")
    missing = [f for f in needed if f not in features]
    if missing:
        raise DataError(
            f"tfds:{name}: feature(s) {missing} missing; use a MovieLens '*-ratings' dataset"
        )
    genre_names = tf.constant(list(features["movie_genres"].feature.names))
    has_users = all(
        f in features
        for f in ("user_gender", "bucketized_user_age", "user_occupation_text", "user_zip_code")
    )

    def _flatten(ex: dict[str, Any]) -> dict[str, Any]:
        out = {k: ex[k] for k in needed if k != "movie_genres"}
        out["movie_genres"] = tf.strings.reduce_join(
            tf.gather(genre_names, tf.cast(ex["movie_genres"], tf.int32)), separator="|"
        )
        if has_users:
            for k in ("user_gender", "bucketized_user_age", "user_occupation_text",
                      "user_zip_code"):
                out[k] = ex[k]
        return out

    columns: dict[str, list[np.ndarray]] = {}
    for batch in tfds.as_numpy(ds.map(_flatten).batch(batch_size)):
        for k, v in batch.items():
            columns.setdefault(k, []).append(v)
    if not columns:
        raise DataError(f"tfds:{name}: the dataset has no rows")
    cols = {k: np.concatenate(v) for k, v in columns.items()}

    def _text(a: np.ndarray) -> np.ndarray:
        return np.array([b.decode("utf-8", errors="replace") for b in a], dtype=object)

    uid, iid = _text(cols["user_id"]), _text(cols["movie_id"])
    inter = pd.DataFrame({"user_id": _obj(uid), "item_id": _obj(iid),
                          "timestamp": cols["timestamp"].astype(np.int64),
                          "weight": cols["user_rating"].astype(np.float32)})
    first_item = pd.Series(iid).drop_duplicates(keep="first").index.to_numpy()
    split = [_split_title(t) for t in _text(cols["movie_title"][first_item])]
    genres = _text(cols["movie_genres"][first_item])
    items = pd.DataFrame({
        "item_id": _obj(iid[first_item]),
        "title": [t for t, _ in split],
        "genres": [g or "unknown" for g in genres],
        "year": _fill_year([y for _, y in split]),
    })
    if has_users:
        first_user = pd.Series(uid).drop_duplicates(keep="first").index.to_numpy()
        users = pd.DataFrame({
            "user_id": _obj(uid[first_user]),
            "age": [age_bucket(a) for a in cols["bucketized_user_age"][first_user]],
            "gender": np.where(cols["user_gender"][first_user], "M", "F"),
            "occupation": _text(cols["user_occupation_text"][first_user]),
            "zip_prefix": [z.strip()[:2] for z in _text(cols["user_zip_code"][first_user])],
        })
        schema = MOVIELENS_SCHEMA
    else:
        users = None
        schema = Schema(user_features=(), item_features=MOVIELENS_SCHEMA.item_features)
    try:
        return load_tables(inter, users, items, schema, name=f"tfds:{name}")
    except DataError as e:
        raise DataError(f"tfds:{name}: {e}") from None


# --------------------------------------------------------------------------------------------
# one entry point


def _find_table(data_dir: Path, stem: str) -> Path | None:
    for suffix in TABLE_SUFFIXES:
        for comp in ("",) + _COMPRESSION_SUFFIXES:
            p = data_dir / f"{stem}{suffix}{comp}"
            if p.is_file():
                return p
    return None


def load_dataset(
    fmt: str,
    data_dir: str | os.PathLike[str] | None = None,
    schema_path: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> Dataset:
    """Load by format name: ``synthetic`` (kwargs go to :func:`synthetic.generate`),
    ``movielens`` (raw folder), ``tables`` (``interactions.*``, ``users.*``, ``items.*`` in
    ``data_dir`` or given as kwargs, schema from ``schema_path`` or ``data_dir/schema.yaml``)
    or ``tfds`` (kwargs ``name``, ``download``).
    """
    if fmt == "synthetic":
        from tfrs_coldstart.data.synthetic import generate

        return generate(**kw)
    if fmt == "movielens":
        return load_movielens(data_dir)  # type: ignore[arg-type]
    if fmt == "tfds":
        return load_tfds(data_dir=None if data_dir is None else str(data_dir), **kw)
    if fmt == "tables":
        root = Path(data_dir) if data_dir is not None else None
        if schema_path is None and root is not None and (root / "schema.yaml").is_file():
            schema_path = root / "schema.yaml"
        if schema_path is None:
            raise DataError(
                "format 'tables' needs a schema: pass schema_path (YAML) or put schema.yaml "
                "in data_dir"
            )
        schema = Schema.from_yaml(schema_path)
        tables: dict[str, Any] = {}
        for stem in ("interactions", "users", "items"):
            if kw.get(stem) is not None:
                tables[stem] = kw.pop(stem)
                continue
            found = _find_table(root, stem) if root is not None else None
            side = stem[:-1]
            if found is None and (stem == "interactions" or schema.side(side)):
                raise DataError(
                    f"{root}: no {stem} table found; expected {stem}"
                    f"{{{','.join(TABLE_SUFFIXES)}}} in data_dir, or pass {stem}=<path>"
                )
            tables[stem] = found
        name = kw.pop("name", root.name if root is not None else "tables")
        if kw:
            raise DataError(f"format 'tables': unknown argument(s) {sorted(kw)}")
        return load_tables(tables["interactions"], tables["users"], tables["items"], schema,
                           name=name)
    raise DataError(f"unknown data format {fmt!r}; use one of {list(_FORMATS)}")
