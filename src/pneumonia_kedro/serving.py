"""The MLflow pyfunc model: DICOM files in, competition PredictionStrings out.

Logged with MLflow's "models from code": this file's source is stored with the model and the
weights travel as a ``torch.save`` file of tensors loaded with ``weights_only=True``, so loading
the model runs this project's code, never code unpickled from the artefact. The same
preprocessing (``imagecache.preprocess``) and prediction (``prediction.predict``: the tuned
test-time augmentation, fusion, classifier gating and post-processing) as the inference
pipeline are used, with the settings saved beside the weights.

Input: a DataFrame with a ``dicom`` column holding, per row, the file's bytes, its base64 text,
or (only when the model was logged with ``allow_paths``) a path; an optional ``patientId``
column names the rows. Output, one row per input row (in order, also when two rows share a
``patientId``): ``patientId, PredictionString, image_probability, quality_flags,
skip_reason``, ``classifier_probability`` (the image-level classifier's, when the model was
logged with one) and, when the model was logged with ``dicom_sr``, ``dicom_sr`` (the base64 DICOM
Structured Report). Files the input quality gate skips get an empty PredictionString, no
probability and the reason; a gate policy ``error`` answers HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pneumonia_kedro.dicom.quality import QualityConfig
from pneumonia_kedro.ensemble import load_ensemble
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.imagecache import decode_checked, preprocess
from pneumonia_kedro.inference import Square
from pneumonia_kedro.prediction import Prediction, predict, prediction_settings
from pneumonia_kedro.structured_report import boxes_and_scores, report_bytes
from pneumonia_kedro.submission import build_submission


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # served as HTTP 400


class OpacityDetector(mlflow.pyfunc.PythonModel):
    """Opacity detector over DICOM files: one model, or every cross-validation
    fold's fused (the same ``prediction.predict`` as the inference pipeline)."""

    def load_context(self, context) -> None:
        ensemble = load_ensemble(Path(context.artifacts["weights"]),
                                 Path(context.artifacts["classifier"])
                                 if "classifier" in context.artifacts else None)
        self.networks = ensemble.build("cpu")
        self.version = ensemble.version
        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.image_size = int(settings["image_size"])
        self.tta, self.postprocess = prediction_settings(settings["postprocess"])
        self.max_files = int(settings.get("max_files_per_request", 64))
        self.max_file_bytes = int(settings.get("max_file_bytes", 64 * 2**20))
        self.allow_paths = bool(settings.get("allow_paths", False))
        self.no_box = settings.get("no_box", "empty")
        # The gate packaged with the model (params:quality, inference policies, and the
        # training images' appearance reference); a package without one is refused.
        self.quality = QualityConfig.from_dict(settings.get("quality") or {})
        self.dicom_sr = bool(settings.get("dicom_sr", False))

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

    def _decoded(self, model_input: pd.DataFrame, ids: list[str]
                 ) -> tuple[list[bytes], list[Square], list[str], list[str]]:
        """Per row: the file, its square (only for files the gate passes; keyed by the row,
        as two rows may share a patientId and still be two images), flags and skip reason."""
        files, squares, flags, skips = [], [], [], []
        for row, (name, value) in enumerate(zip(ids, model_input["dicom"], strict=True)):
            files.append(self._file_bytes(value, row))
            try:
                image, skip_reason, flag_text = decode_checked(
                    files[-1], name, self.image_size, self.quality)
            except DicomError as exc:
                raise _bad_request(f"row {row}: {exc}") from None
            flags.append(flag_text)
            skips.append(skip_reason)
            if image is not None:
                squares.append(Square(str(row), *preprocess(image, self.image_size)))
        return files, squares, flags, skips

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "dicom" not in model_input:
            raise _bad_request("input needs a 'dicom' column (bytes, base64 or path per row)")
        if len(model_input) > self.max_files:
            raise _bad_request(f"{len(model_input)} files in one request; at most "
                               f"{self.max_files} are accepted")
        ids = (model_input["patientId"].astype(str).tolist() if "patientId" in model_input
               else [f"row{i}" for i in range(len(model_input))])
        files, squares, flags, skips = self._decoded(model_input, ids)
        # The inference pipeline's own prediction: detectors, TTA, fusion, gating, post-processing.
        prediction = predict(self.networks, squares, self.tta, self.postprocess, batch_size=8)
        keys = [str(row) for row in range(len(ids))]
        sizes = {square.key: (square.letterbox.height, square.letterbox.width)
                 for square in squares}
        result = build_submission(prediction.boxes, keys, self.no_box, sizes)
        predicted = set(prediction.patient_ids)
        # Skipped by the gate: no prediction, not even no_box's.
        result.loc[[key not in predicted for key in keys], "PredictionString"] = ""
        result["image_probability"] = np.round(
            prediction.image_probability.reindex(keys).to_numpy(float), 6)
        if prediction.classifier_probability is not None:
            result["classifier_probability"] = np.round(
                prediction.classifier_probability.reindex(keys).to_numpy(float), 6)
        result["patientId"] = ids
        result["quality_flags"] = flags
        result["skip_reason"] = skips
        if self.dicom_sr:
            result["dicom_sr"] = [
                "" if key not in predicted else self._report(files[row], ids[row], prediction,
                                                             key)
                for row, key in enumerate(keys)]
        return result

    def _report(self, file: bytes, name: str, prediction: Prediction, key: str) -> str:
        """The base64 DICOM SR of one predicted file."""
        boxes = prediction.boxes
        return base64.b64encode(report_bytes(
            file, name, *boxes_and_scores(boxes.loc[boxes["patientId"] == key]),
            float(prediction.image_probability[key]), self.version)).decode("ascii")


mlflow.models.set_model(OpacityDetector())
