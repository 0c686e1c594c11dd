"""Shared fixtures: the real MovieLens-100K folder (or a clean skip) and a tiny synthetic set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any TF import)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """Raw ML-100K folder from $TFRS_COLDSTART_ML100K or <repo>/../shared/data/ml-100k."""
    env = os.environ.get("TFRS_COLDSTART_ML100K")
    path = Path(env) if env else REPO.parent / "shared" / "data" / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {path} (set TFRS_COLDSTART_ML100K)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset():
    """300 users, 200 items, 6000 interactions. Shared by the session: do not mutate it."""
    from tfrs_coldstart.data import generate

    return generate(n_users=300, n_items=200, n_interactions=6000, seed=0)
