"""Nodes of the ingest pipeline: validate labels, read DICOM headers, build the patient table."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from pneumonia_kedro.config import AT_LEAST_ONE, from_params
from pneumonia_kedro.dicom import DicomFolder, header_table
from pneumonia_kedro.errors import MissingDataError
from pneumonia_kedro.labels import (
    build_patient_table,
    patient_targets,
    validate_class_info,
    validate_labels,
)
from pneumonia_kedro.reporting import REPORT_LIMIT, capped

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    """Competition image size (for box bounds), what to do with patients lacking a DICOM and
    with conflicting duplicates. (The input quality gate of training images: params:quality.)"""

    RANGES = {"image_size": AT_LEAST_ONE}

    image_size: int = 1024
    on_missing_image: Literal["error", "exclude"] = "error"
    # One image (byte-identical pixel data) labelled positive under one patientId and
    # negative under another: warn (train on both, warned), drop (leave the whole group out)
    # or error (stop).
    on_conflicting_duplicates: Literal["warn", "drop", "error"] = "warn"


def duplicate_groups(table: pd.DataFrame, limit: int = REPORT_LIMIT) -> dict:
    """Patients whose images have the same pixel data: groups, and those whose labels differ."""
    hashed = table.loc[table["pixel_hash"].fillna("") != ""]
    groups = [sorted(group["patientId"]) for _, group in hashed.groupby("pixel_hash")
              if len(group) > 1]
    conflicting = [ids for ids in groups
                   if table.loc[table["patientId"].isin(ids), "Target"].nunique() > 1]
    return {"groups": len(groups), "patients": sum(map(len, groups)),
            "with_different_labels": len(conflicting), "first": sorted(groups)[:limit]}


def conflicting_duplicates(table: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, list]:
    """Apply ``ingest.on_conflicting_duplicates`` to the groups of patients whose images are
    byte-identical but whose labels differ: the table (without them when dropped) and the
    dropped patientIds. Either way the console says which groups they are."""
    groups = duplicate_groups(table, limit=len(table))
    conflicting = [ids for ids in groups["first"]
                   if table.loc[table["patientId"].isin(ids), "Target"].nunique() > 1]
    if not conflicting:
        return table, []
    shown = "; ".join(" = ".join(ids) for ids in conflicting[:5])
    more = f" and {len(conflicting) - 5} more" if len(conflicting) > 5 else ""
    message = (f"{len(conflicting)} image(s) appear under several patientIds with different "
               f"labels (Target 0 and 1): {shown}{more}")
    if policy == "error":
        raise MissingDataError(f"{message}. Correct the labels, or set "
                               "ingest.on_conflicting_duplicates: drop to leave them out")
    if policy == "warn":
        logger.warning("%s. They are trained on as labelled; set "
                       "ingest.on_conflicting_duplicates: drop to leave them out", message)
        return table, []
    dropped = sorted(pid for ids in conflicting for pid in ids)
    logger.warning("%s. Leaving out their %d patients (ingest.on_conflicting_duplicates: "
                   "drop)", message, len(dropped))
    return table.loc[~table["patientId"].isin(dropped)].reset_index(drop=True), dropped


def validate_patients(
    train_labels: pd.DataFrame, class_info: pd.DataFrame, params: dict
) -> tuple[pd.DataFrame, dict]:
    """Validate both CSVs; return one row per patient and the label counts for the report."""
    config = from_params(IngestConfig, params, "ingest")
    labels, n_duplicates = validate_labels(
        train_labels, train_labels.attrs.get("source", "labels CSV"), config.image_size
    )
    classes = validate_class_info(
        class_info, patient_targets(labels), class_info.attrs.get("source", "class info CSV")
    )
    patients = build_patient_table(labels, classes)
    checks = {"label_rows": len(train_labels), "duplicate_rows_dropped": n_duplicates}
    return patients, checks


def read_dicom_headers(patients: pd.DataFrame, train_dicoms: DicomFolder) -> pd.DataFrame:
    """Non-identifying header values (view position, sex, age, spacing, size) per patient."""
    present = [pid for pid in patients["patientId"] if pid in train_dicoms]
    return header_table(train_dicoms, present)


def attach_images(
    patients: pd.DataFrame,
    dicom_headers: pd.DataFrame,
    train_dicoms: DicomFolder,
    label_checks: dict,
    params: dict,
) -> tuple[pd.DataFrame, dict]:
    """Join header values to patients; stop on or exclude patients without a readable DICOM."""
    config = from_params(IngestConfig, params, "ingest")
    headers = dicom_headers.set_index("patientId")
    missing = sorted(set(patients["patientId"]) - set(headers.index))
    unreadable = headers.loc[headers["error"] != "", "error"].to_dict()
    if (missing or unreadable) and config.on_missing_image == "error":
        listed = [f"{pid}: {train_dicoms.absence_reason(pid)}" for pid in missing[:10]]
        listed += [reason for reason in list(unreadable.values())[:10]]
        raise MissingDataError(
            f"{len(missing)} patient(s) without a DICOM file and {len(unreadable)} unreadable "
            f"in {train_dicoms.root}:\n  " + "\n  ".join(listed) +
            "\nSet ingest.on_missing_image: exclude to leave them out (they are listed in the "
            "ingest report). With --env demo: a generation stopped part-way leaves new labels "
            "beside the earlier images; `make demo-data` regenerates it."
        )
    excluded = set(missing) | set(unreadable)
    if excluded:
        logger.warning("excluding %d patient(s) without a readable DICOM", len(excluded))
    table = patients.loc[~patients["patientId"].isin(excluded)].merge(
        dicom_headers.drop(columns=["error"]), on="patientId", how="left"
    )
    duplicates = duplicate_groups(table)
    table, dropped = conflicting_duplicates(table, config.on_conflicting_duplicates)
    report = {
        **label_checks,
        "patients": len(table),
        "positive_patients": int((table["Target"] == 1).sum()),
        "negative_patients": int((table["Target"] == 0).sum()),
        "boxes": int(table["n_boxes"].sum()),
        "boxes_per_image": {str(k): int(v) for k, v in
                            table["n_boxes"].value_counts().sort_index().items()},
        "detailed_class": {str(k): int(v) for k, v in
                           table["detailed_class"].value_counts().sort_index().items()},
        "view_position": {str(k): int(v) for k, v in
                          table["view_position"].value_counts().sort_index().items()},
        # Files without a label row are not used; count them so that none goes unnoticed.
        "unlabelled_dicoms": capped(sorted(set(train_dicoms.patient_ids)
                                           - set(patients["patientId"]))),
        # Byte-identical pixel data under several patientIds (a copied file): reported, and
        # the split keeps each such group in one split.
        "duplicate_images": {**duplicates, "dropped_patients": capped(dropped)},
        "patient_id_mismatches": capped(sorted(
            table.loc[table["patient_id_matches"].eq(False), "patientId"])),
        "missing_images": capped(missing),
        "unreadable_images": capped(unreadable),
        "rejected_files": capped(train_dicoms.rejected),
        "excluded_patients": len(excluded),
    }
    return table.reset_index(drop=True), report
