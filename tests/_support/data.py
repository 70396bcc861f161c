"""The one place tests find ../shared/data (skipping with a clear reason where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_data(relative: str) -> Path:
    """Path under ``$LLMRAY_SHARED_DATA`` or ``<repo>/../shared/data``; skips the test if it is absent."""
    root = Path(os.environ.get("LLMRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = root / relative
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (set LLMRAY_SHARED_DATA to the folder holding it)")
    return path
