"""Project hooks."""

from __future__ import annotations

from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline

from pneumonia_kedro.datasets import DicomFolderDataset, LabelsCSVDataset
from pneumonia_kedro.errors import MissingDataError

RAW_DATASET_TYPES = (LabelsCSVDataset, DicomFolderDataset)


class RawDataPresenceHook:
    """Stops a run before any node when the competition files it reads are absent."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict, pipeline: Pipeline, catalog: DataCatalog
                            ) -> None:
        missing = []
        for name in sorted(pipeline.inputs()):
            if name.startswith("params:") or name == "parameters" or name not in catalog:
                continue
            dataset = catalog.get(name)
            if isinstance(dataset, RAW_DATASET_TYPES) and not dataset.exists():
                missing.append(f"{name}: {dataset._describe()}")
        if missing:
            env = run_params.get("env") or "local"
            raise MissingDataError(
                f"Raw data for this run (env '{env}') is missing:\n  " + "\n  ".join(missing)
                + "\nFor the real data, download the Kaggle competition "
                "'rsna-pneumonia-detection-challenge' and unzip it into "
                "data/01_raw/rsna-pneumonia-detection-challenge/ (stage_2_train_labels.csv, "
                "stage_2_train_images/, ...).\nTo try the project on generated data instead, "
                "run `make demo` (or `kedro run --env demo --pipelines demo_data` once, then "
                "`kedro run --env demo`)."
            )
