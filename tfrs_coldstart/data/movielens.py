"""MovieLens 100K and 1M: the raw GroupLens folders, and the schema of their features.

:data:`MOVIELENS_SCHEMA` and the helpers that turn raw fields into features (:func:`age_bucket`,
:func:`split_title`, :func:`fill_year`) are shared with the TFDS loader, so both sources give
the same tables.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tfrs_coldstart.data.dataset import Dataset
from tfrs_coldstart.data.schema import DataError, FeatureSpec, FeatureType, Schema
from tfrs_coldstart.data.tables import load_tables

__all__ = [
    "AGE_BUCKETS",
    "ML100K_GENRES",
    "ML1M_OCCUPATIONS",
    "MOVIELENS_SCHEMA",
    "age_bucket",
    "fill_year",
    "load_movielens",
    "split_title",
]

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


def split_title(title: str) -> tuple[str, float]:
    """'Toy Story (1995)' -> ('Toy Story', 1995.0); no year -> (title, nan)."""
    title = title.strip()
    m = _YEAR_IN_TITLE.search(title)
    if not m:
        return title, np.nan
    stripped = title[: m.start()].strip()
    return (stripped or title), float(m.group(1))


def fill_year(years: list[float]) -> np.ndarray:
    """Years as float32 with missing ones (nan) set to the median known year (0 if none)."""
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
            title, year = split_title(r[1])
            if np.isnan(year) and re.search(r"\d{4}$", r[2].strip()):
                year = float(r[2].strip()[-4:])
            flags = r[5 : 5 + len(genre_names)]
            names = [g for g, f in zip(genre_names, flags, strict=True) if f.strip() == "1"]
            titles.append(title)
            years.append(year)
            genres.append("|".join(names) or "unknown")
        items = pd.DataFrame({"item_id": [r[0] for r in item_rows], "title": titles,
                              "genres": genres, "year": fill_year(years)})
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
        split = [split_title(r[1]) for r in item_rows]
        items = pd.DataFrame({
            "item_id": [r[0] for r in item_rows],
            "title": [t for t, _ in split],
            "genres": [r[2].strip() or "unknown" for r in item_rows],
            "year": fill_year([y for _, y in split]),
        })
    try:
        return load_tables(inter, users, items, MOVIELENS_SCHEMA, name=variant)
    except DataError as e:
        raise DataError(f"MovieLens folder {d} ({variant}): {e}") from None

