"""The :class:`Dataset` every loader returns: three validated tables and their schema.

Whatever the origin (files, pandas, MovieLens, TFDS, synthetic), the tables have one shape, so
the model code needs no per-source branches:

- ids: Python ``str`` (object dtype); integer ids become ``"196"``, never ``"196.0"``;
- categorical / text: ``str`` (stripped); multi_hot: ``str`` joined with the spec's separator;
- numeric: float32; dense_vector: cells are float32 ``np.ndarray`` of length ``spec.dim``;
- interactions: ``user_id``, ``item_id``, optional ``timestamp`` (int64), optional
  ``weight`` (float32), in file order.

Kept apart from the loaders so that each loader (and the synthetic generator) imports the type
without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from tfrs_coldstart.data.schema import Schema

__all__ = ["Dataset"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Validated, dtype-normalised tables plus their schema (see the module docstring)."""

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    schema: Schema
    # data.format=stream: the scan of the sharded interactions (data/stream.py), from which the
    # split, the fits and evaluation read what they need; ``interactions`` is then an empty
    # frame with the shards' columns (``stream.interactions()`` reads them all, if one must).
    # None when the interactions exist only as the frame above.
    stream: Any = None

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_interactions(self) -> int:
        return len(self.interactions) if self.stream is None else self.stream.n_interactions

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
