"""The servable MLflow model, prepared as files: MLflow "models from code" (``serving.py``
and this package's source), every ensemble member's weights as tensors-only files, the
settings it serves with, and pinned pip requirements. The ``mlflow_model`` dataset logs the
prepared files in the run; nothing here talks to a tracking server."""

from __future__ import annotations

import json
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow

import pneumonia_kedro
from pneumonia_kedro.ensemble import Ensemble, save_ensemble

PACKAGE = Path(pneumonia_kedro.__file__).parent
# What the served model imports; pinned to the versions installed where it was packaged.
SERVING_DISTRIBUTIONS = (
    "torch", "torchvision", "pydicom", "highdicom", "pylibjpeg", "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg", "pillow", "opencv-python-headless", "pandas", "numpy", "fsspec",
    "tqdm", "mlflow", "ensemble-boxes",
)


def serving_requirements() -> list[str]:
    """pip requirements of the served model, from the installed distributions."""
    # A local build tag (torch's "+cu128") names no package on PyPI.
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_DISTRIBUTIONS]


def package_detector(ensemble: Ensemble, settings: dict) -> dict[str, bytes]:
    """The MLflow model folder of ``ensemble`` (every fold's detector, and the image-level
    classifiers that gate them) with ``settings``, as {relative path: bytes}."""
    with tempfile.TemporaryDirectory() as folder:
        inputs, model = Path(folder) / "inputs", Path(folder) / "model"
        inputs.mkdir()
        (inputs / "settings.json").write_text(json.dumps(settings, indent=2))
        artifacts = {"weights": str(inputs / "weights.pt"),
                     "settings": str(inputs / "settings.json")}
        if save_ensemble(ensemble, inputs / "weights.pt", inputs / "classifier.pt"):
            artifacts["classifier"] = str(inputs / "classifier.pt")
        mlflow.pyfunc.save_model(
            path=str(model),
            python_model=str(PACKAGE / "serving.py"),
            artifacts=artifacts,
            code_paths=[str(PACKAGE)],
            pip_requirements=serving_requirements(),
        )
        # Bytecode of the source tree is no part of the model (MLflow's log_model drops it).
        return {path.relative_to(model).as_posix(): path.read_bytes()
                for path in sorted(model.rglob("*"))
                if path.is_file() and "__pycache__" not in path.parts}
