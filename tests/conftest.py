"""Shared fixtures: where the real data lives, and small synthetic image trees for unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESFIT_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder with real data and pretrained sources; tests never write there."""
    if not (SHARED / "data").is_dir():
        pytest.fail(f"real data not found at {SHARED}: clone resfit beside ../shared or set RESFIT_SHARED")
    return SHARED


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's scan/feature caches out of the user's ~/.cache."""
    monkeypatch.setenv("RESFIT_CACHE", str(tmp_path_factory.mktemp("resfit-cache")))
