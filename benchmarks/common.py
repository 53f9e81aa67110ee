"""Helpers for the benchmark scripts: a folder of generated competition-like DICOMs, and the
demo's detector settings."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import yaml

from pneumonia_kedro.config import from_params
from pneumonia_kedro.demo import DemoConfig
from pneumonia_kedro.models import ModelConfig

# The demo-folder writer lives with the tests; benchmarks run from the project root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.demo_folder import write_demo_folder  # noqa: E402

CONF_DEMO = Path(__file__).resolve().parents[1] / "conf/demo"


def write_dicoms(folder: Path, n: int, workers: int = 2, seed: int = 42) -> pd.DataFrame:
    """``n`` competition-like DICOMs (half with opacities) in ``folder``; their patients."""
    config = DemoConfig(n_positive=n // 2, n_negative=n - n // 2, n_test=0, seed=seed)
    return write_demo_folder(folder, config, workers)


def demo_model() -> tuple[str, ModelConfig]:
    """conf/demo's detector at conf/demo's cache size (the train node gives the model the
    cache's size), and a label naming both."""
    def params(name: str) -> dict:
        return yaml.safe_load((CONF_DEMO / f"parameters_{name}.yml").read_text())

    size = int(params("cache")["cache"]["image_size"])
    config = from_params(ModelConfig, {**params("train")["model"], "image_size": size}, "model")
    return f"demo {config.architecture}@{size}", config
