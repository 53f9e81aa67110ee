"""``MlflowDetectorDataset``: logs the detector to MLflow as a pyfunc from code."""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from kedro.io import AbstractDataset, DatasetError

import pneumonia_kedro
from pneumonia_kedro.ensemble import Ensemble, load_ensemble, save_ensemble

logger = logging.getLogger(__name__)

PACKAGE = Path(pneumonia_kedro.__file__).parent
# What the served model imports; pinned to the versions installed where it was logged.
SERVING_DISTRIBUTIONS = (
    "torch", "torchvision", "pydicom", "highdicom", "pylibjpeg", "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg", "pillow", "opencv-python-headless", "pandas", "numpy", "fsspec",
    "tqdm", "mlflow", "ensemble-boxes",
)


def serving_requirements() -> list[str]:
    """pip requirements of the served model, from the installed distributions."""
    # A local build tag (torch's "+cu128") names no package on PyPI.
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_DISTRIBUTIONS]


def log_detector(ensemble: Ensemble, settings: dict, name: str = "model",
                 registered_model_name: str | None = None) -> mlflow.models.model.ModelInfo:
    """Log ``ensemble`` (every fold's detector, and the image-level classifiers that gate
    them) in the active MLflow run as one model: models from code, weights as tensors only."""
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "weights.pt"
        classifiers = Path(folder) / "classifier.pt"
        settings_file = Path(folder) / "settings.json"
        settings_file.write_text(json.dumps(settings, indent=2))
        artifacts = {"weights": str(weights), "settings": str(settings_file)}
        if save_ensemble(ensemble, weights, classifiers):
            artifacts["classifier"] = str(classifiers)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PACKAGE / "serving.py"),
            artifacts=artifacts,
            code_paths=[str(PACKAGE)],
            pip_requirements=serving_requirements(),
            registered_model_name=registered_model_name,
        )


@functools.lru_cache(maxsize=2)
def load_logged_detector(model_uri: str) -> tuple[Ensemble, dict]:
    """The models (tensors only) and settings of an ensemble logged by ``log_detector``.

    Cached: the inference pipeline asks for the same model in several nodes.
    """
    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                         dst_path=folder))
        ensemble = load_ensemble(local / "artifacts" / "weights.pt",
                                 local / "artifacts" / "classifier.pt",
                                 info={"model_uri": model_uri})
        settings = json.loads((local / "artifacts" / "settings.json").read_text())
    return ensemble, settings


class MlflowDetectorDataset(AbstractDataset[dict, None]):
    """Saving ``{"ensemble": Ensemble, "settings": {...}}`` logs one servable MLflow model
    (every member's weights) in the run kedro-mlflow opened, and registers it when
    ``registered_model_name`` is set."""

    def __init__(self, *, name: str = "model", registered_model_name: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._name = name
        self._registered_model_name = registered_model_name or None
        self.metadata = metadata

    def save(self, data: dict) -> None:
        if mlflow.active_run() is None:
            raise DatasetError("no active MLflow run to log the model in")
        info = log_detector(data["ensemble"], data["settings"], self._name,
                            self._registered_model_name)
        mlflow.set_tag("model_uri", info.model_uri)
        logger.info("logged the MLflow model %s; serve it with `mlflow models serve -m %s "
                    "--env-manager local -h 127.0.0.1 -p 5001`", info.model_uri, info.model_uri)

    def load(self) -> None:
        raise DatasetError("load the logged model with mlflow.pyfunc.load_model(<model uri>)")

    def _describe(self) -> dict[str, Any]:
        return {"name": self._name, "registered_model_name": self._registered_model_name}
