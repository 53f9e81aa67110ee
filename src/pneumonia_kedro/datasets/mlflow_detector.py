"""``MlflowDetectorDataset``: writes a prepared MLflow model into the active run as a logged
model; ``load_logged_detector`` reads one back."""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from kedro.io import AbstractDataset, DatasetError
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model

from pneumonia_kedro.ensemble import Ensemble, load_ensemble

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def load_logged_detector(model_uri: str) -> tuple[Ensemble, dict]:
    """The models (tensors only) and settings of an ensemble the evaluate pipeline logged.

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
    """Saving the files of an MLflow model folder ({relative path: bytes}, what the package
    node prepares) logs them in the run kedro-mlflow opened as one MLflow model (a
    LoggedModel, ``models:/<id>``), tags the run with its ``model_uri``, and registers it when
    ``registered_model_name`` is set."""

    def __init__(self, *, name: str = "model", registered_model_name: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._name = name
        self._registered_model_name = registered_model_name or None
        self.metadata = metadata

    def save(self, data: dict[str, bytes]) -> None:
        run = mlflow.active_run()
        if run is None:
            raise DatasetError("no active MLflow run to log the model in")
        client = mlflow.MlflowClient()
        # As MLflow's flavours log a model: it carries the run's parameters.
        model = mlflow.initialize_logged_model(
            name=self._name, source_run_id=run.info.run_id,
            params={k: str(v) for k, v in client.get_run(run.info.run_id).data.params.items()})
        try:
            with tempfile.TemporaryDirectory() as folder:
                for relative, content in data.items():
                    (Path(folder) / relative).parent.mkdir(parents=True, exist_ok=True)
                    (Path(folder) / relative).write_bytes(content)
                _name_the_logged_model(Path(folder) / "MLmodel", model, run.info.run_id)
                client.log_model_artifacts(model.model_id, folder)
            mlflow.log_outputs(models=[LoggedModelOutput(model.model_id, step=0)])
        except BaseException:
            mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        model_uri = f"models:/{model.model_id}"
        if self._registered_model_name:
            mlflow.register_model(model_uri, self._registered_model_name)
        mlflow.set_tag("model_uri", model_uri)
        logger.info("logged the MLflow model %s; serve it with `mlflow models serve -m %s "
                    "--env-manager local -h 127.0.0.1 -p 5001`", model_uri, model_uri)

    def load(self) -> None:
        raise DatasetError("load the logged model with mlflow.pyfunc.load_model(<model uri>)")

    def _describe(self) -> dict[str, Any]:
        return {"name": self._name, "registered_model_name": self._registered_model_name}


def _name_the_logged_model(mlmodel: Path, model: Any, run_id: str) -> None:
    """Write the logged model's identity (run, model id, artifact location) into its
    MLmodel file, where a flavour's own logging writes it."""
    description = Model.load(str(mlmodel))
    description.run_id = run_id
    description.model_id = description.model_uuid = model.model_id
    description.artifact_path = model.artifact_location
    description.save(str(mlmodel))
