"""Shared fixtures. Fast tier: tiny random models (no marker). Slow tier: `default_model`, `notebook`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpack_integrations import PackStore

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FACTS = [
    "Norhaven Labs is a drone maker in Kelmark.",
    "The Aurora X2 flies for 48 minutes.",
    "Quill Energy makes the Tessel-9 battery.",
]
QUESTION = "Which company makes the battery?"


@pytest.fixture
def store(tmp_path: Path) -> PackStore:
    return PackStore(tmp_path / "store")
