"""The demo's patients and boxes: real RSNA label geometry, or draws fitted to it."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd

from pneumonia_kedro.labels import NEGATIVE_CLASSES, OPACITY_CLASS

from .settings import IMAGE_SIZE, DemoConfig

# Fitted to the stage-2 training set (rsna.md): P(AP | positive) and P(AP | negative).
P_AP_POSITIVE = 4662 / 6012
P_AP_NEGATIVE = 7511 / 20672
P_NORMAL_GIVEN_NEGATIVE = 8851 / 20672
BOXES_PER_IMAGE = {1: 2614, 2: 3266, 3: 119, 4: 13}
HEADER_COLUMNS = ("patientId", "view_position", "patient_sex", "patient_age", "pixel_spacing")


def _synthetic_patients(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Patients drawn from distributions fitted to the real tables (fallback source)."""
    ids = [str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63))))
           for _ in range(n)]
    target = (rng.random(n) < 6012 / 26684).astype(int)
    p_ap = np.where(target == 1, P_AP_POSITIVE, P_AP_NEGATIVE)
    return pd.DataFrame({
        "patientId": ids,
        "Target": target,
        "view_position": np.where(rng.random(n) < p_ap, "AP", "PA"),
        "patient_sex": rng.choice(["M", "F"], size=n, p=[0.57, 0.43]),
        "patient_age": rng.normal(47, 16.5, size=n).clip(1, 92).round().astype(int),
        "pixel_spacing": rng.choice([0.139, 0.143, 0.168, 0.171], size=n),
    })


def _synthetic_boxes(patients: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Boxes inside the lung fields with the real count and size distributions (fallback)."""
    counts, weights = zip(*BOXES_PER_IMAGE.items(), strict=True)
    rows = []
    for pid in patients.loc[patients["Target"] == 1, "patientId"]:
        n = rng.choice(counts, p=np.asarray(weights) / sum(weights))
        for i in range(n):
            w = float(np.clip(rng.normal(217, 60), 40, 400))
            h = float(np.clip(rng.normal(298, 110), 45, 700))
            centre_x = (300.0 if i % 2 == 0 else 724.0) + rng.normal(0, 30)
            x = float(np.clip(round(centre_x - w / 2), 0, IMAGE_SIZE - w))
            y = float(np.clip(round(rng.uniform(180, 820) - h / 2), 0, IMAGE_SIZE - h))
            rows.append((pid, x, y, w, h, 1))
    return pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"])


def _real_patients(real_labels: pd.DataFrame, real_headers: pd.DataFrame) -> pd.DataFrame:
    targets = real_labels.groupby("patientId", sort=True)["Target"].max().rename("Target")
    headers = real_headers.rename(columns={
        "PatientID": "patientId", "ViewPosition": "view_position", "PatientSex": "patient_sex",
        "PatientAge": "patient_age", "PixelSpacing": "pixel_spacing",
    }).drop_duplicates("patientId").set_index("patientId")
    headers = headers.loc[:, list(HEADER_COLUMNS[1:])]
    patients = headers.join(targets, how="inner").reset_index()
    patients["pixel_spacing"] = patients["pixel_spacing"].astype(float).round(6)
    patients["patient_age"] = patients["patient_age"].astype(int)
    return patients.loc[:, ["patientId", "Target", *HEADER_COLUMNS[1:]]]


def sample_demo_patients(
    real_labels: pd.DataFrame | None, real_headers: pd.DataFrame | None, config: DemoConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Choose the demo's train and test patients.

    Returns the train labels (competition format, one row per box), the train patients' header
    values with their detailed class and boxes, and the test patients' header values and the
    hidden boxes their images will show.
    """
    rng = np.random.default_rng(config.seed)
    use_real = real_labels is not None and not real_labels.empty and real_headers is not None \
        and not real_headers.empty
    if use_real:
        pool = _real_patients(real_labels, real_headers)
    else:
        n_pool = 40 * (config.n_positive + config.n_negative + config.n_test)
        pool = _synthetic_patients(n_pool, rng)
    positives = pool.loc[pool["Target"] == 1]
    negatives = pool.loc[pool["Target"] == 0]
    if len(positives) < config.n_positive or len(negatives) < config.n_negative + config.n_test:
        raise ValueError("demo dataset is larger than the patient pool it samples from")
    chosen_pos = positives.sample(config.n_positive, random_state=rng.integers(2**31))
    rest = negatives.sample(config.n_negative + config.n_test, random_state=rng.integers(2**31))
    chosen_neg, test = rest.iloc[: config.n_negative], rest.iloc[config.n_negative:]
    train = pd.concat([chosen_pos, chosen_neg]).sort_values("patientId").reset_index(drop=True)
    train["detailed_class"] = np.where(
        train["Target"] == 1,
        OPACITY_CLASS,
        np.where(rng.random(len(train)) < P_NORMAL_GIVEN_NEGATIVE, NEGATIVE_CLASSES[1],
                 NEGATIVE_CLASSES[0]),
    )

    if use_real:
        boxes = real_labels.loc[real_labels["patientId"].isin(chosen_pos["patientId"])]
        boxes = boxes.loc[boxes["Target"] == 1, ["patientId", "x", "y", "width", "height",
                                                 "Target"]]
    else:
        boxes = _synthetic_boxes(chosen_pos, rng)
    negatives_rows = pd.DataFrame({"patientId": chosen_neg["patientId"], "Target": 0})
    labels = pd.concat([boxes, negatives_rows], ignore_index=True)
    labels = labels.sort_values("patientId", kind="stable").reset_index(drop=True)
    labels = labels.loc[:, ["patientId", "x", "y", "width", "height", "Target"]]
    train["boxes"] = _boxes_column(train["patientId"], labels)
    test = test.drop(columns=["Target"]).sort_values("patientId").reset_index(drop=True)
    # Test images carry opacities too (hidden labels), so predictions on them are meaningful.
    test_boxes = _synthetic_boxes(test.assign(Target=(rng.random(len(test)) < 0.3).astype(int)),
                                  rng)
    test["boxes"] = _boxes_column(test["patientId"], test_boxes)
    return labels, train, test


def _boxes_column(patient_ids: pd.Series, labels: pd.DataFrame) -> list[list[list[float]]]:
    """Each patient's ``xywh`` boxes from a labels table (empty list for a negative)."""
    positive = labels.loc[labels["Target"] == 1]
    grouped = {pid: rows[["x", "y", "width", "height"]].astype(float).to_numpy().tolist()
               for pid, rows in positive.groupby("patientId")}
    return [grouped.get(pid, []) for pid in patient_ids]
