"""Locations the suite reads from, each overridable: nothing here is global mutable state."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT_ENV = "RTQ_DATA_ROOT"


def default_data_root() -> Path:
    """`$RTQ_DATA_ROOT`, else `../shared/data` beside the checkout (where CI and sessions have it)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "data"


def default_repository() -> Path:
    return PROJECT_ROOT / "model_repository"


def default_results_dir() -> Path:
    return PROJECT_ROOT / "benchmarks" / "results"
