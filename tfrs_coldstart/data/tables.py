"""Tables from CSV/TSV/Parquet files or pandas: reading, validation and normalisation.

Every table source ends in :func:`load_tables`, which validates the three tables (interactions,
users, items) against the schema and normalises their dtypes to the form described in
:mod:`tfrs_coldstart.data.dataset`. The steps are public because batch retrieval and fine-tuning
validate their own users/items tables the same way (:func:`read_table`, :func:`feature_table`,
:func:`normalise_ids`, :func:`normalise_feature`).

A schema's derived features (``source`` + ``derive``, see :mod:`tfrs_coldstart.data.schema`)
are made here from the table's source columns, with the TensorFlow implementation the
exported models run (:mod:`tfrs_coldstart.data.derive`); a users or items table then holds its
id, its source columns and its features.

Bad input raises :class:`DataError` naming the file (or ``<DataFrame interactions>``), the
column, the first offending row and what to do next. Loading never writes anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tfrs_coldstart.data.dataset import Dataset
from tfrs_coldstart.data.schema import (
    DataError,
    FeatureSpec,
    FeatureType,
    Schema,
    SourceColumn,
    input_names,
    source_columns,
)

__all__ = [
    "COMPRESSION_SUFFIXES",
    "TABLE_SUFFIXES",
    "TableSource",
    "conform",
    "derived_table",
    "feature_table",
    "find_table",
    "interactions_table",
    "load_tables",
    "normalise_feature",
    "normalise_ids",
    "normalise_source",
    "object_series",
    "read_table",
    "table_suffix",
]

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst")


# --------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class TableSource:
    """Where a table came from; formats row references for error messages.

    Subclass it to report rows of a chunked read by their place in the whole file.
    """

    label: str
    line_offset: int | None = None  # file line of row 0 for text files (header = line 1)
    index: pd.Index | None = None  # original DataFrame index, when not 0..n-1

    def row(self, pos: int) -> str:
        """How an error names row ``pos`` (0-based, of this frame): file line or index label."""
        text = f"row {pos}"
        if self.line_offset is not None:
            text += f" (line {pos + self.line_offset} of the file)"
        elif self.index is not None:
            label = self.index[pos]
            label = label.item() if isinstance(label, np.generic) else label
            text += f" (index label {label!r})"
        return text

    def error(self, column: str, pos: int | None, problem: str, hint: str) -> DataError:
        """The :class:`DataError` naming this source, ``column`` and row ``pos`` (None: header)."""
        where = "header row" if pos is None else self.row(pos)
        return DataError(f"{self.label}: column '{column}', {where}: {problem}. {hint}")


def table_suffix(path: Path) -> str:
    """The format suffix of ``path`` ('.csv', ...), looking through a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_table(obj: Any, role: str) -> tuple[pd.DataFrame, TableSource]:
    """Read one table; returns a RangeIndex frame (file order) and its source descriptor."""
    if isinstance(obj, pd.DataFrame):
        df = obj
        id_col = "user_id" if role == "users" else "item_id" if role == "items" else None
        if id_col and id_col not in df.columns and df.index.name == id_col:
            df = df.reset_index()
        index = None if isinstance(df.index, pd.RangeIndex) and df.index.start == 0 else df.index
        if index is not None and index.equals(pd.RangeIndex(len(df))):
            index = None
        return df.reset_index(drop=True), TableSource(f"<DataFrame {role}>", index=index)
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
    suffix = table_suffix(path)
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
            return df, TableSource(label, line_offset=2)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path).reset_index(drop=True), TableSource(label)
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


def find_table(data_dir: Path, stem: str) -> Path | None:
    """The first ``<stem><suffix>[<compression>]`` file in ``data_dir``, or None."""
    for suffix in TABLE_SUFFIXES:
        for comp in ("",) + COMPRESSION_SUFFIXES:
            p = data_dir / f"{stem}{suffix}{comp}"
            if p.is_file():
                return p
    return None


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


def normalise_feature(
    series: pd.Series, spec: FeatureSpec, src: TableSource
) -> np.ndarray | pd.Series:
    """One feature column in its normalised form (see :mod:`tfrs_coldstart.data.dataset`).

    Raises :class:`DataError` at the first bad or (unless ``spec.nullable``) missing cell.
    """
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


def normalise_source(series: pd.Series, col: SourceColumn, src: TableSource) -> np.ndarray:
    """A source column's cells, read as the derivations take them: ``float32`` (missing: NaN)
    for a numeric source, else stripped ``str`` (missing: ``""``).

    Raises :class:`DataError` at the first unparseable cell, or missing one unless every
    feature made from the column allows that (:attr:`SourceColumn.nullable`).
    """
    made = ", ".join(f"'{f}'" for f in col.features)
    if col.numeric:
        vals, missing, bad = _numeric_cells(series)
        if bad.any():
            pos = int(np.argmax(bad))
            raise src.error(col.name, pos, f"value {series.iloc[pos]!r} is not a finite number "
                            f"(a source of {made}, read as numbers)", "Fix the value")
    else:
        try:
            vals, missing = _to_str_cells(series)
        except _CellError as e:
            raise src.error(col.name, e.pos, f"value is {e.reason}",
                            f"Give one value per cell (a source of {made})") from None
    if missing.any() and not col.nullable:
        raise src.error(col.name, int(np.argmax(missing)), "missing or empty value",
                        f"It is the source of {made}: fill it, drop the row, or mark the "
                        "feature(s) nullable in the schema")
    return vals.astype(np.float32) if col.numeric else vals


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def normalise_ids(series: pd.Series, column: str, src: TableSource) -> np.ndarray:
    """An id column as an object array of ``str``; a missing or list-valued id is an error."""
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


def object_series(values: np.ndarray) -> pd.Series:
    """``values`` as an object-dtype Series (str cells stay Python objects, not pandas strings)."""
    return pd.Series(values, dtype=object)


def _require_columns(df: pd.DataFrame, cols: list[str], src: TableSource, role: str,
                     specs: tuple[FeatureSpec, ...] = ()) -> None:
    for col in cols:
        if col not in df.columns:
            made = [s.name for s in specs if col in s.source and s.name != col]
            what = (f"the source column of {made} (derive: "
                    f"{next(s.derive for s in specs if s.name == made[0])})" if made else "")
            raise src.error(
                col,
                None,
                f"missing required column{' ' + what if what else ''} (the {role} table has "
                f"columns {list(df.columns)})",
                "Add the column, rename the existing one, or remove the feature from the schema",
            )


def _derive(spec: FeatureSpec, columns: dict[str, np.ndarray]) -> tuple[FeatureSpec, np.ndarray]:
    """The derived column of ``spec`` from the normalised ``columns``; a ``year_from_*``
    feature without a ``fill`` gets the median found value (0 if none) as its fill, returned
    in the spec so the run saves it and serving fills with the same constant."""
    # Imported here: it imports TensorFlow, which only a schema with derivations needs;
    # `import tfrs_coldstart.data` stays free of TensorFlow (see data/__init__).
    from tfrs_coldstart.data.derive import derive_column

    sources = [columns[c] for c in spec.source]
    if spec.takes_fill and spec.fill is None:
        found = derive_column(spec, sources)
        found = found[~np.isnan(found)].astype(np.float64)
        spec = dataclasses.replace(spec, fill=float(np.median(found)) if found.size else 0.0)
    return spec, derive_column(spec, sources)


def feature_table(
    df: pd.DataFrame, src: TableSource, side: str, specs: tuple[FeatureSpec, ...]
) -> pd.DataFrame:
    """A validated users or items table (``side`` "user"/"item"): the id column, the source
    columns of derived features (:func:`~tfrs_coldstart.data.schema.source_columns`) and
    ``specs``' features, in that order.

    The table must be non-empty, hold the id, every plain feature column and every source
    column, and have unique ids. Derived features are made from their sources (a column of
    that name in ``df`` is ignored); see :func:`derived_table` for the specs with their fills.
    """
    return derived_table(df, src, side, specs)[0]


def derived_table(
    df: pd.DataFrame, src: TableSource, side: str, specs: tuple[FeatureSpec, ...]
) -> tuple[pd.DataFrame, tuple[FeatureSpec, ...]]:
    """:func:`feature_table` and ``specs`` with each ``year_from_*`` fill resolved (the
    median found year of this table where the spec gives none)."""
    id_col = f"{side}_id"
    role = f"{side}s"
    if len(df) == 0:
        raise DataError(f"{src.label}: the {role} table is empty (0 rows); it needs one row per "
                        f"{side}")
    _require_columns(df, [id_col] + list(input_names(specs)), src, role, specs)
    ids = normalise_ids(df[id_col], id_col, src)
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
    data: dict[str, Any] = {id_col: object_series(ids)}
    columns: dict[str, np.ndarray] = {}  # normalised inputs (sources, plain features) by name
    for col in source_columns(specs):
        columns[col.name] = data[col.name] = normalise_source(df[col.name], col, src)
    for spec in specs:
        if spec.derive is None:
            columns[spec.name] = normalise_feature(df[spec.name], spec, src)
    resolved = []
    for spec in specs:
        if spec.derive is None:
            values = columns[spec.name]
        else:
            spec, made = _derive(spec, columns)
            try:
                values = normalise_feature(pd.Series(made, dtype=made.dtype), spec, src)
            except DataError as e:
                raise DataError(f"{e} (feature '{spec.name}' is derived by {spec.derive!r} "
                                f"from {list(spec.source)})") from None
        data[spec.name] = values
        resolved.append(spec)
    data = {k: object_series(v) if isinstance(v, np.ndarray) and v.dtype == object else v
            for k, v in data.items()}
    return pd.DataFrame(data), tuple(resolved)


def interactions_table(df: pd.DataFrame, src: TableSource) -> pd.DataFrame:
    """A validated interactions table: ids, optional int64 ``timestamp``, float32 ``weight``."""
    if len(df) == 0:
        raise DataError(
            f"{src.label}: the interactions table is empty (0 rows); it needs at least one "
            "user_id,item_id row"
        )
    _require_columns(df, ["user_id", "item_id"], src, "interactions")
    data: dict[str, Any] = {
        "user_id": object_series(normalise_ids(df["user_id"], "user_id", src)),
        "item_id": object_series(normalise_ids(df["item_id"], "item_id", src)),
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


def _timestamps(series: pd.Series, src: TableSource) -> np.ndarray:
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
    inter_df, inter_src = read_table(interactions, "interactions")
    inter = interactions_table(inter_df, inter_src)
    tables: dict[str, tuple[pd.DataFrame, TableSource | None]] = {}
    for side, obj in (("user", users), ("item", items)):
        id_col = f"{side}_id"
        if obj is None:
            if schema.side(side):
                raise DataError(
                    f"{name}: no {side}s table given but the schema has {side} features "
                    f"{list(schema.names(side))}; pass the {side}s table"
                )
            ids = pd.unique(inter[id_col].to_numpy())
            tables[side] = (pd.DataFrame({id_col: object_series(ids)}), None)
            continue
        df, src = read_table(obj, f"{side}s")
        table, specs = derived_table(df, src, side, schema.side(side))
        tables[side] = (table, src)
        schema = (Schema(specs, schema.item_features) if side == "user"
                  else Schema(schema.user_features, specs))
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


def conform(ds: Dataset, saved: Schema) -> Dataset:
    """``ds`` as a run trained with ``saved`` reads it.

    A run saved before its loader declared derivations (its schema has none, e.g. a MovieLens
    run with the feature ``age`` holding age bands) meets tables whose derived features have
    names of their own (``age_bucket``, made from the source column ``age``). Each of its
    features is found under its own name, or as the derived feature of the same type made
    from the one source column of that name; the result holds the id and those columns under
    the saved names, with schema ``saved``. When ``ds`` already has schema ``saved``, or some
    saved feature has no counterpart, ``ds`` is returned unchanged (the caller's schema
    check then names the difference).
    """
    if saved == ds.schema or saved.derives or not ds.schema.derives:
        return ds
    tables = {}
    for side in ("user", "item"):
        have = ds.schema.side(side)
        by_name = {s.name: s for s in have}
        table = ds.users if side == "user" else ds.items
        data: dict[str, Any] = {f"{side}_id": table[f"{side}_id"]}
        for spec in saved.side(side):
            match = by_name.get(spec.name)
            if match is None or match.underived() != spec:
                match = next((s for s in have if s.source == (spec.name,) and dataclasses.replace(
                    s.underived(), name=spec.name) == spec), None)
            if match is None:
                return ds
            data[spec.name] = table[match.name]
        tables[side] = pd.DataFrame(data)
    return dataclasses.replace(ds, users=tables["user"], items=tables["item"], schema=saved)
