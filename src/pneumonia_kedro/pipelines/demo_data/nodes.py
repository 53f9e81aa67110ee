"""Nodes of the demo_data pipeline: sample real label geometry, render synthetic DICOMs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pandas as pd

from pneumonia_kedro.config import from_params
from pneumonia_kedro.demo import DemoConfig, demo_file, sample_demo_patients
from pneumonia_kedro.dicom.folder import DicomFolder, FolderChunk, folder_chunks

RENDER_CHUNK = 32  # files per saved chunk: memory holds one chunk's files


def sample_patients(
    real_labels: pd.DataFrame, real_headers: pd.DataFrame, params: dict
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Choose demo patients; return labels CSV, class info CSV, train and test patients."""
    config = from_params(DemoConfig, params, "demo_data")
    labels, train, test = sample_demo_patients(real_labels, real_headers, config)
    class_info = labels.loc[:, ["patientId"]].merge(
        train.loc[:, ["patientId", "detailed_class"]], on="patientId", how="left"
    ).rename(columns={"detailed_class": "class"})
    return labels, class_info, train, test


def render_images(patients: pd.DataFrame, params: dict) -> Iterator[FolderChunk]:
    """One DICOM per patient, with an opacity inside each of its boxes, yielded in chunks
    that Kedro saves as they come (at least one, empty when there are no patients). The
    last is marked, so the image folder becomes this run's files only (no file of an earlier,
    larger generation stays) or, if the run stops before it, stays the earlier run's. The
    label CSVs are written before the images, ``describe_generation``'s file after both: a run
    stopped part-way leaves CSVs newer than that file, and ``make demo-data`` regenerates."""
    config = from_params(DemoConfig, params, "demo_data")
    rows = {row["patientId"]: row for row in patients.to_dict("records")}
    yield from folder_chunks(list(rows), lambda patient_id: demo_file(
        patient_id, rows[patient_id], rows[patient_id]["boxes"], config), RENDER_CHUNK)


def sample_submission(test: pd.DataFrame) -> pd.DataFrame:
    """The competition's sample submission for the test patients."""
    return pd.DataFrame({"patientId": test["patientId"], "PredictionString": "0.5 0 0 100 100"})


def describe_generation(train_labels: pd.DataFrame, train_dicoms: DicomFolder,
                        test_dicoms: DicomFolder, submission: pd.DataFrame, params: dict) -> dict:
    """The generation's settings and counts, saved after everything else it writes (its inputs
    are the other outputs): the data set is whole only when this file is newer than the label
    CSVs, which is what ``make demo-data`` checks."""
    config = from_params(DemoConfig, params, "demo_data")
    return {**dataclasses.asdict(config),
            "train_patients": int(train_labels["patientId"].nunique()),
            "train_images": len(train_dicoms), "test_images": len(test_dicoms),
            "submission_rows": len(submission)}
