"""The MLflow pyfunc model: DICOM files in, competition PredictionStrings out.

Logged with MLflow's "models from code": this file's source is stored with the model and the
weights travel as a ``torch.save`` file of tensors loaded with ``weights_only=True``, so loading
the model runs this project's code, never code unpickled from the artefact. The same
preprocessing (``imagecache.preprocess``) and post-processing (``postprocess``) as the
pipelines are used, with the settings saved beside the weights.

Input: a DataFrame with a ``dicom`` column holding, per row, the file's bytes, its base64 text,
or (only when the model was logged with ``allow_paths``) a path; an optional ``patientId``
column names the rows. Output: ``patientId, PredictionString, image_probability``.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pneumonia_kedro.boxes import xyxy_to_xywh
from pneumonia_kedro.dicom import decode
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.imagecache import preprocess
from pneumonia_kedro.models import detect, model_from_state
from pneumonia_kedro.postprocess import (
    PostprocessConfig,
    image_probabilities,
    postprocess,
    predictions_table,
)
from pneumonia_kedro.submission import build_submission


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # served as HTTP 400


class OpacityDetector(mlflow.pyfunc.PythonModel):
    """Faster R-CNN opacity detector over DICOM files."""

    def load_context(self, context) -> None:
        payload = torch.load(context.artifacts["weights"], map_location="cpu",
                             weights_only=True)
        self.model = model_from_state(payload["model_config"], payload["state_dict"]).eval()
        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.image_size = int(settings["image_size"])
        self.postprocess = PostprocessConfig(**settings["postprocess"])
        self.max_files = int(settings.get("max_files_per_request", 64))
        self.max_file_bytes = int(settings.get("max_file_bytes", 64 * 2**20))
        self.allow_paths = bool(settings.get("allow_paths", False))
        self.no_box = settings.get("no_box", "empty")

    def _file_bytes(self, value: object, row: int) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
        elif isinstance(value, str) and self.allow_paths and Path(value).is_file():
            if Path(value).stat().st_size > self.max_file_bytes:
                raise _bad_request(f"row {row}: file larger than {self.max_file_bytes} bytes")
            data = Path(value).read_bytes()
        elif isinstance(value, str):
            if len(value) > self.max_file_bytes * 4 // 3 + 4:
                raise _bad_request(f"row {row}: file larger than {self.max_file_bytes} bytes")
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise _bad_request(f"row {row}: 'dicom' is neither base64 DICOM bytes nor an "
                                   "allowed path") from None
        else:
            raise _bad_request(f"row {row}: 'dicom' must be bytes or base64 text, got "
                               f"{type(value).__name__}")
        if len(data) > self.max_file_bytes:
            raise _bad_request(f"row {row}: file larger than {self.max_file_bytes} bytes")
        return data

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "dicom" not in model_input:
            raise _bad_request("input needs a 'dicom' column (bytes, base64 or path per row)")
        if len(model_input) > self.max_files:
            raise _bad_request(f"{len(model_input)} files in one request; at most "
                               f"{self.max_files} are accepted")
        ids = (model_input["patientId"].astype(str).tolist() if "patientId" in model_input
               else [f"row{i}" for i in range(len(model_input))])
        images, boxes = [], []
        for row, (name, value) in enumerate(zip(ids, model_input["dicom"], strict=True)):
            try:
                image = decode(self._file_bytes(value, row), name, target_size=self.image_size)
            except DicomError as exc:
                raise _bad_request(f"row {row}: {exc}") from None
            square, letterbox = preprocess(image, self.image_size)
            images.append(torch.from_numpy(square)[None])
            boxes.append(letterbox)
        raw_boxes, raw_scores = [], []
        for start in range(0, len(images), 8):
            batch = torch.stack(images[start:start + 8])
            for boxes_xyxy, scores in detect(self.model, batch, torch.device("cpu")):
                raw_boxes.append(boxes_xyxy.numpy())
                raw_scores.append(scores.numpy())
        original = [xyxy_to_xywh(lb.to_original(b)) for lb, b in zip(boxes, raw_boxes,
                                                                      strict=True)]
        raw = predictions_table(ids, original, raw_scores)
        candidates = postprocess(raw, self.postprocess, apply_threshold=False)
        final = postprocess(raw, self.postprocess)
        sizes = {pid: (lb.height, lb.width) for pid, lb in zip(ids, boxes, strict=True)}
        result = build_submission(final, ids, self.no_box, sizes)
        result["image_probability"] = np.round(image_probabilities(candidates, ids), 6)
        return result


mlflow.models.set_model(OpacityDetector())
