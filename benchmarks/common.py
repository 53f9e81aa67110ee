"""Helpers for the benchmark scripts: a folder of generated competition-like DICOMs."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from pneumonia_kedro.demo import DemoConfig

# The demo-folder writer lives with the tests; benchmarks run from the project root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.demo_folder import write_demo_folder  # noqa: E402


def write_dicoms(folder: Path, n: int, workers: int = 2, seed: int = 42) -> pd.DataFrame:
    """``n`` competition-like DICOMs (half with opacities) in ``folder``; their patients."""
    config = DemoConfig(n_positive=n // 2, n_negative=n - n // 2, n_test=0, seed=seed)
    return write_demo_folder(folder, config, workers)
