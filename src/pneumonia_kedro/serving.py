"""The MLflow pyfunc model: DICOM files in, competition PredictionStrings out.

Logged with MLflow's "models from code": this file's source is stored with the model and the
weights travel as a ``torch.save`` file of tensors loaded with ``weights_only=True``, so loading
the model runs this project's code, never code unpickled from the artefact. The same
preprocessing (``imagecache.preprocess``), prediction (``prediction.predict_batch`` with the
tuned test-time augmentation), classifier gating and post-processing as the pipelines are
used, with the settings saved beside the weights.

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
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pneumonia_kedro.dicom.quality import INFERENCE_QUALITY, QualityConfig
from pneumonia_kedro.ensemble import classify_batch, load_ensemble
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.imagecache import decode_checked, preprocess
from pneumonia_kedro.inference import detect_original, finalize
from pneumonia_kedro.postprocess import predictions_table
from pneumonia_kedro.prediction import prediction_settings
from pneumonia_kedro.structured_report import boxes_and_scores, report_bytes
from pneumonia_kedro.submission import build_submission


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # served as HTTP 400


class OpacityDetector(mlflow.pyfunc.PythonModel):
    """Faster R-CNN opacity detector over DICOM files: one model, or every cross-validation
    fold's fused (the same ``predict_batch`` as the inference pipeline)."""

    def load_context(self, context) -> None:
        ensemble = load_ensemble(Path(context.artifacts["weights"]),
                                 Path(context.artifacts["classifier"])
                                 if "classifier" in context.artifacts else None)
        self.models = ensemble.build()
        self.version = ensemble.version
        self.classifiers = ensemble.classifiers if ensemble.has_classifiers else []
        self.classifier_models = [c.build() for c in self.classifiers]
        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.image_size = int(settings["image_size"])
        self.tta, self.postprocess = prediction_settings(settings["postprocess"])
        self.max_files = int(settings.get("max_files_per_request", 64))
        self.max_file_bytes = int(settings.get("max_file_bytes", 64 * 2**20))
        self.allow_paths = bool(settings.get("allow_paths", False))
        self.no_box = settings.get("no_box", "empty")
        self.quality = QualityConfig(**settings["quality"]) if "quality" in settings \
            else INFERENCE_QUALITY
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

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "dicom" not in model_input:
            raise _bad_request("input needs a 'dicom' column (bytes, base64 or path per row)")
        if len(model_input) > self.max_files:
            raise _bad_request(f"{len(model_input)} files in one request; at most "
                               f"{self.max_files} are accepted")
        ids = (model_input["patientId"].astype(str).tolist() if "patientId" in model_input
               else [f"row{i}" for i in range(len(model_input))])
        # Rows are keyed by position: two rows may share a patientId and still be two images.
        keys = [str(row) for row in range(len(ids))]
        files, images, letterboxes, flags, skips = {}, {}, {}, [], []
        for row, (key, name, value) in enumerate(zip(keys, ids, model_input["dicom"],
                                                     strict=True)):
            files[key] = self._file_bytes(value, row)
            try:
                image, skip_reason, flag_text = decode_checked(
                    files[key], name, self.image_size, self.quality)
            except DicomError as exc:
                raise _bad_request(f"row {row}: {exc}") from None
            flags.append(flag_text)
            skips.append(skip_reason)
            if image is not None:
                square, letterboxes[key] = preprocess(image, self.image_size)
                images[key] = torch.from_numpy(square)[None]
        # The inference pipeline's own steps: detection in original pixels, the classifier's
        # probabilities, then finalize (gating, post-processing).
        predicted = list(images)
        raw_boxes, raw_scores, classifier_p = [], [], []
        cpu = torch.device("cpu")
        for start in range(0, len(predicted), 8):
            keys_in_batch = predicted[start:start + 8]
            batch = torch.stack([images[key] for key in keys_in_batch])
            for boxes_xywh, scores in detect_original(
                    self.models, batch, [letterboxes[key] for key in keys_in_batch], cpu,
                    self.tta):
                raw_boxes.append(boxes_xywh)
                raw_scores.append(scores)
            if self.classifiers:
                classifier_p.extend(classify_batch(self.classifier_models, self.classifiers,
                                                   batch, cpu, self.tta.hflip))
        classifier_probabilities = pd.Series(classifier_p, index=predicted, dtype=float) \
            if self.classifiers else None
        final, probabilities = finalize(predictions_table(predicted, raw_boxes, raw_scores),
                                        self.postprocess, predicted, classifier_probabilities)
        sizes = {key: (lb.height, lb.width) for key, lb in letterboxes.items()}
        result = build_submission(final, keys, self.no_box, sizes)
        for key in keys:
            if key not in images:  # skipped by the gate: no prediction, not even no_box's
                result.loc[int(key), "PredictionString"] = ""
        result["image_probability"] = np.round(probabilities.reindex(keys).to_numpy(float), 6)
        if classifier_probabilities is not None:
            result["classifier_probability"] = np.round(
                classifier_probabilities.reindex(keys).to_numpy(float), 6)
        result["patientId"] = ids
        result["quality_flags"] = flags
        result["skip_reason"] = skips
        if self.dicom_sr:
            result["dicom_sr"] = [
                "" if key not in images else base64.b64encode(report_bytes(
                    files[key], name,
                    *boxes_and_scores(final.loc[final["patientId"] == key]),
                    float(probabilities[key]), self.version)).decode("ascii")
                for key, name in zip(keys, ids, strict=True)]
        return result


mlflow.models.set_model(OpacityDetector())
