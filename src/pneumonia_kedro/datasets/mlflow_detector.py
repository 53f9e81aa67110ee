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
import torch
from kedro.io import AbstractDataset, DatasetError

import pneumonia_kedro
from pneumonia_kedro.classifier import TrainedClassifier
from pneumonia_kedro.models import TrainedModel

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


def log_detector(model: TrainedModel, settings: dict, name: str = "model",
                 registered_model_name: str | None = None,
                 classifier: TrainedClassifier | None = None) -> mlflow.models.model.ModelInfo:
    """Log ``model`` (and the image-level ``classifier`` that gates it) in the active MLflow
    run: models from code, weights as tensors only."""
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "weights.pt"
        torch.save({"model_config": model.config.to_dict(), "state_dict": model.state_dict},
                   weights)
        settings_file = Path(folder) / "settings.json"
        settings_file.write_text(json.dumps(settings, indent=2))
        artifacts = {"weights": str(weights), "settings": str(settings_file)}
        if classifier is not None:
            artifacts["classifier"] = str(Path(folder) / "classifier.pt")
            torch.save(classifier.to_payload(), artifacts["classifier"])
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PACKAGE / "serving.py"),
            artifacts=artifacts,
            code_paths=[str(PACKAGE)],
            pip_requirements=serving_requirements(),
            registered_model_name=registered_model_name,
        )


@functools.lru_cache(maxsize=2)
def load_logged_detector(model_uri: str
                         ) -> tuple[TrainedModel, dict, TrainedClassifier | None]:
    """The weights (tensors only) and settings of a detector logged by ``log_detector``, and
    its classifier when it was logged with one.

    Cached: the inference pipeline asks for the same model in two nodes.
    """
    from pneumonia_kedro.classifier import TrainedClassifier
    from pneumonia_kedro.models import model_config_from_dict

    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                         dst_path=folder))
        payload = torch.load(local / "artifacts" / "weights.pt", map_location="cpu",
                             weights_only=True)
        settings = json.loads((local / "artifacts" / "settings.json").read_text())
        classifier_file = local / "artifacts" / "classifier.pt"
        classifier = TrainedClassifier.from_payload(torch.load(
            classifier_file, map_location="cpu", weights_only=True)) \
            if classifier_file.is_file() else None
    model = TrainedModel(config=model_config_from_dict(payload["model_config"]),
                         state_dict=payload["state_dict"], info={"model_uri": model_uri})
    return model, settings, classifier


class MlflowDetectorDataset(AbstractDataset[dict, None]):
    """Saving ``{"model": TrainedModel, "settings": {...}, "classifier": TrainedClassifier}``
    (the classifier optional) logs a servable MLflow model in
    the run kedro-mlflow opened (and registers it when ``registered_model_name`` is set)."""

    def __init__(self, *, name: str = "model", registered_model_name: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._name = name
        self._registered_model_name = registered_model_name or None
        self.metadata = metadata

    def save(self, data: dict) -> None:
        if mlflow.active_run() is None:
            raise DatasetError("no active MLflow run to log the model in")
        info = log_detector(data["model"], data["settings"], self._name,
                            self._registered_model_name, data.get("classifier"))
        mlflow.set_tag("model_uri", info.model_uri)
        logger.info("logged the MLflow model %s; serve it with `mlflow models serve -m %s "
                    "--env-manager local -h 127.0.0.1 -p 5001`", info.model_uri, info.model_uri)

    def load(self) -> None:
        raise DatasetError("load the logged model with mlflow.pyfunc.load_model(<model uri>)")

    def _describe(self) -> dict[str, Any]:
        return {"name": self._name, "registered_model_name": self._registered_model_name}
