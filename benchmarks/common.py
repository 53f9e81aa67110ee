"""Helpers for the benchmark scripts: a folder of generated competition-like DICOMs."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from pneumonia_kedro.demo import DemoConfig, demo_file, sample_demo_patients


def _write(args: tuple) -> None:
    folder, row, config = args
    (Path(folder) / f"{row['patientId']}.dcm").write_bytes(
        demo_file(row["patientId"], row, row["boxes"], config))


def write_dicoms(folder: Path, n: int, workers: int = 2, seed: int = 42) -> pd.DataFrame:
    """``n`` competition-like DICOMs (half with opacities) in ``folder``; their patients."""
    folder.mkdir(parents=True, exist_ok=True)
    config = DemoConfig(n_positive=n // 2, n_negative=n - n // 2, n_test=0, seed=seed)
    _, patients, _ = sample_demo_patients(None, None, config)
    jobs = [(str(folder), row, config) for row in patients.to_dict("records")]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write, jobs))
    return patients
