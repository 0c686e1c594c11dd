"""One entry point: load a dataset by format name (what ``data.format`` in the config selects)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tfrs_coldstart.data.dataset import Dataset
from tfrs_coldstart.data.movielens import load_movielens
from tfrs_coldstart.data.schema import DataError, Schema
from tfrs_coldstart.data.synthetic import generate
from tfrs_coldstart.data.tables import TABLE_SUFFIXES, find_table, load_tables
from tfrs_coldstart.data.tfds import load_tfds

__all__ = ["FORMATS", "load_dataset"]

FORMATS = ("synthetic", "movielens", "tables", "tfds", "stream")


def load_dataset(
    fmt: str,
    data_dir: str | os.PathLike[str] | None = None,
    schema_path: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> Dataset:
    """Load by format name: ``synthetic`` (kwargs go to :func:`synthetic.generate`),
    ``movielens`` (raw folder), ``tables`` (``interactions.*``, ``users.*``, ``items.*`` in
    ``data_dir`` or given as kwargs, schema from ``schema_path`` or ``data_dir/schema.yaml``)
    or ``tfds`` (kwargs ``name``, ``download``) or ``stream`` (users/items/schema as for
    ``tables``, the sharded interactions from kwarg ``interactions``; the other kwargs go to
    :func:`stream.load_stream`).
    """
    if fmt == "stream":
        # Lazy: stream imports TensorFlow, which `import tfrs_coldstart.data` does not need.
        from tfrs_coldstart.data.stream import load_stream

        return load_stream(None if data_dir is None else str(data_dir),
                           None if schema_path is None else str(schema_path), **kw)
    if fmt == "synthetic":
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
            found = find_table(root, stem) if root is not None else None
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
    raise DataError(f"unknown data format {fmt!r}; use one of {list(FORMATS)}")
