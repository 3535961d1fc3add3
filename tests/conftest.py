"""Shared pytest fixtures."""

from pathlib import Path

import pytest

# the read-only reference material sits beside the repository as ../shared
GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/golden``; tests that need it skip when it is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN} (expected ../shared/golden beside the repo)")
    return GOLDEN
