"""Demo DICOMs written straight into a folder, outside the catalog: for tests and benchmarks."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from pneumonia_kedro.demo import DemoConfig, demo_file, sample_demo_patients


def _write_demo_file(job: tuple[str, dict, DemoConfig]) -> None:
    folder, row, config = job
    (Path(folder) / f"{row['patientId']}.dcm").write_bytes(
        demo_file(row["patientId"], row, row["boxes"], config))


def write_demo_folder(folder: Path, config: DemoConfig, workers: int = 0) -> pd.DataFrame:
    """The train patients' demo DICOMs as ``folder/<patientId>.dcm`` (outside the catalog:
    for tests and benchmarks); returns those patients with their ``xywh`` boxes."""
    folder.mkdir(parents=True, exist_ok=True)
    _, patients, _ = sample_demo_patients(None, None, config)
    jobs = [(str(folder), row, config) for row in patients.to_dict("records")]
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_demo_file, jobs))
    else:
        for job in jobs:
            _write_demo_file(job)
    return patients


def one_demo_file(seed: int) -> bytes:
    """The bytes of one competition-like demo DICOM (a positive patient)."""
    config = DemoConfig(n_positive=1, n_negative=0, n_test=0, seed=seed)
    _, patients, _ = sample_demo_patients(None, None, config)
    row = patients.iloc[0].to_dict()
    return demo_file(row["patientId"], row, row["boxes"], config)
