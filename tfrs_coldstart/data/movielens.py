"""MovieLens 100K and 1M: the raw GroupLens folders, and the schema of their features.

The loader reads each file into a table with the file's own columns (:data:`USER_COLUMNS`,
:func:`ml100k_item_columns`, ...) and the schema *declares* how its features are derived from
them (age band from ``age``, ``zip_prefix`` from ``zip_code``, title without its year, year
from the title or the release date, genre flags to a multi-hot ``genres``); the derivations run
in TensorFlow ops at load time and inside the exported models, so a served model takes a
``u.user`` row as it is. The TFDS loader shares the user features.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from tfrs_coldstart.data.dataset import Dataset
from tfrs_coldstart.data.schema import AGE_BUCKETS, DataError, FeatureSpec, FeatureType, Schema
from tfrs_coldstart.data.tables import load_tables

__all__ = [
    "AGE_BUCKETS",
    "ML100K_GENRES",
    "ML1M_ITEM_COLUMNS",
    "ML1M_OCCUPATIONS",
    "ML1M_SCHEMA",
    "ML1M_USER_COLUMNS",
    "MOVIELENS_SCHEMA",
    "MOVIELENS_USER_FEATURES",
    "USER_COLUMNS",
    "genre_column",
    "load_movielens",
    "ml100k_item_columns",
    "ml100k_schema",
]

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

#: ``u.user``'s fields, in file order: what a served model takes for an ML-100K user.
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")
#: ``users.dat``'s fields (ML-1M), in file order; ``occupation`` is a code (0-20).
ML1M_USER_COLUMNS = ("user_id", "gender", "age", "occupation", "zip_code")
#: ``movies.dat``'s fields (ML-1M), in file order.
ML1M_ITEM_COLUMNS = ("item_id", "movie_title", "genres")

_AGE = FeatureSpec("age_bucket", FeatureType.CATEGORICAL, source="age", derive="age_bucket")
_ZIP = FeatureSpec("zip_prefix", FeatureType.CATEGORICAL, source="zip_code", derive="prefix:2")
_TITLE = FeatureSpec("title", FeatureType.TEXT, source="movie_title", derive="strip_year")
#: ML-100K's (and TFDS's) user features, from the columns of :data:`USER_COLUMNS`.
MOVIELENS_USER_FEATURES = (
    _AGE,
    FeatureSpec("gender", FeatureType.CATEGORICAL),
    FeatureSpec("occupation", FeatureType.CATEGORICAL),
    _ZIP,
)


def genre_column(genre: str) -> str:
    """The flag column of an ML-100K genre: ``"Children's"`` -> ``"genre_childrens"``, a
    name TF Serving takes as a signature input."""
    return "genre_" + re.sub(r"[^0-9a-z]+", "_", genre.lower().replace("'", "")).strip("_")


def ml100k_item_columns(genres: tuple[str, ...] = ML100K_GENRES) -> tuple[str, ...]:
    """``u.item``'s fields, in file order: what the item encoder takes for an ML-100K item."""
    return ("item_id", "movie_title", "release_date", "video_release_date", "imdb_url",
            *(genre_column(g) for g in genres))


def ml100k_schema(genres: tuple[str, ...] = ML100K_GENRES) -> Schema:
    """ML-100K's schema: ``u.user``'s and ``u.item``'s columns to the features (the genre
    names come from ``u.genre``)."""
    return Schema(
        user_features=MOVIELENS_USER_FEATURES,
        item_features=(
            _TITLE,
            FeatureSpec("genres", FeatureType.MULTI_HOT, separator="|",
                        source=tuple(genre_column(g) for g in genres),
                        derive="flags_to_multi_hot", labels=tuple(genres)),
            FeatureSpec("year", FeatureType.NUMERIC, nullable=True,
                        source=("movie_title", "release_date"), derive="year_from_title"),
        ),
    )


#: ML-100K's schema; a loaded dataset's also holds the year ``fill`` (the median year).
MOVIELENS_SCHEMA = ml100k_schema()
#: ML-1M's schema (``users.dat``'s occupation codes to ``occupation_name``).
ML1M_SCHEMA = Schema(
    user_features=(
        _AGE,
        FeatureSpec("gender", FeatureType.CATEGORICAL),
        FeatureSpec("occupation_name", FeatureType.CATEGORICAL, source="occupation",
                    derive="code_label", labels=ML1M_OCCUPATIONS),
        _ZIP,
    ),
    item_features=(
        _TITLE,
        FeatureSpec("genres", FeatureType.MULTI_HOT, separator="|"),
        FeatureSpec("year", FeatureType.NUMERIC, nullable=True, source="movie_title",
                    derive="year_from_title"),
    ),
)

_ML100K_FILES = ("u.data", "u.item", "u.user")
_ML1M_FILES = ("ratings.dat", "movies.dat", "users.dat")
_ML_ACCEPTED = (
    "accepted layouts: ml-100k (u.data, u.item, u.user) or ml-1m (ratings.dat, movies.dat, "
    "users.dat), as unzipped from https://grouplens.org/datasets/movielens/"
)


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
    """Load a raw MovieLens 100K or 1M folder: :data:`MOVIELENS_SCHEMA` or :data:`ML1M_SCHEMA`.

    Each file becomes a table with its own columns; the schema derives the features: the
    ML-1M age band, gender, occupation and the first two zip characters of each user; each
    item's title without its year, genres, and release year (from the title, else the
    release date; missing years are the median year, saved with the schema as ``fill``).
    Ratings become ``weight``; file order is kept.
    """
    if data_dir is None:
        raise DataError(f"load_movielens needs data_dir (a MovieLens folder); {_ML_ACCEPTED}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: MovieLens folder does not exist; {_ML_ACCEPTED}")
    d, variant = _find_movielens_dir(root)
    if variant == "ml-100k":
        inter = _read_ratings(d / "u.data", "\t")
        users = pd.DataFrame(_read_delimited(d / "u.user", "|", 5, "latin-1"),
                             columns=list(USER_COLUMNS))
        genres = ML100K_GENRES
        genre_file = d / "u.genre"
        if genre_file.is_file():
            pairs = _read_delimited(genre_file, "|", 2, "latin-1")
            genres = tuple(name for name, _ in sorted(pairs, key=lambda p: int(p[1])))
        columns = ml100k_item_columns(genres)
        items = pd.DataFrame(_read_delimited(d / "u.item", "|", len(columns), "latin-1"),
                             columns=list(columns))
        schema = ml100k_schema(genres)
    else:
        inter = _read_ratings(d / "ratings.dat", "::")
        users = pd.DataFrame(_read_delimited(d / "users.dat", "::", 5, "latin-1"),
                             columns=list(ML1M_USER_COLUMNS))
        items = pd.DataFrame(_read_delimited(d / "movies.dat", "::", 3, "latin-1"),
                             columns=list(ML1M_ITEM_COLUMNS))
        schema = ML1M_SCHEMA
    try:
        return load_tables(inter, users, items, schema, name=variant)
    except DataError as e:
        raise DataError(f"MovieLens folder {d} ({variant}): {e}") from None
