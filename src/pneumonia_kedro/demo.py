"""A demo dataset in the competition's exact layout: real label geometry, synthetic pixels.

Patients, boxes, view positions, ages, sexes and pixel spacings come from the real stage-2
tables when they are available (``torchxrayvision`` ships them); otherwise from distributions
fitted to the same tables (see ``shared/reference/rsna.md``). Pixels are a synthetic chest:
body, lung fields, ribs, mediastinum, noise, and an opacity texture inside every box. Files are
1024x1024 MONOCHROME2 8-bit JPEG Baseline Secondary Capture DICOMs, like the competition's.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, JPEGBaseline8Bit, generate_uid

from pneumonia_kedro.config import NON_NEGATIVE, Range
from pneumonia_kedro.dicom import lenient_values
from pneumonia_kedro.labels import NEGATIVE_CLASSES, OPACITY_CLASS

IMAGE_SIZE = 1024
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Fitted to the stage-2 training set (rsna.md): P(AP | positive) and P(AP | negative).
P_AP_POSITIVE = 4662 / 6012
P_AP_NEGATIVE = 7511 / 20672
P_NORMAL_GIVEN_NEGATIVE = 8851 / 20672
BOXES_PER_IMAGE = {1: 2614, 2: 3266, 3: 119, 4: 13}
HEADER_COLUMNS = ("patientId", "view_position", "patient_sex", "patient_age", "pixel_spacing")


@dataclass(frozen=True)
class DemoConfig:
    """Size and seed of the demo dataset."""

    RANGES = {"n_positive": NON_NEGATIVE, "n_negative": NON_NEGATIVE, "n_test": NON_NEGATIVE,
              "jpeg_quality": Range(1, 100), "difficulty": Range(0, 1)}

    n_positive: int = 100
    n_negative: int = 100
    n_test: int = 20
    seed: int = 42
    jpeg_quality: int = 92
    difficulty: float = 0.0  # 0: clear opacities; towards 1: as hard as the real task


def _rng(*keys: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


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


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
             softness: float = 0.08) -> np.ndarray:
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1 + softness - r) / (2 * softness), 0, 1)


def render_chest(patient_id: str, view_position: str, boxes_xywh: object, seed: int,
                 size: int = IMAGE_SIZE, difficulty: float = 0.0,
                 detailed_class: str | None = None) -> np.ndarray:
    """A synthetic chest radiograph (uint8, ``size`` x ``size``) with opacities in the boxes.

    ``difficulty`` 0 gives clear, well-defined opacities on a standard chest. Towards 1 the
    realism pass makes it as hard as the task: faint, ill-defined, patchy opacities; body
    size, position, exposure, contrast and noise that vary per image; support devices, lines
    and text markers; and negatives of the "No Lung Opacity / Not Normal" class carrying
    other findings (a large heart, effusions, nodules, scars) that a detector must not box.
    """
    rng = _rng(seed, patient_id)
    d = float(difficulty)
    # Its own stream: difficulty 0 draws nothing from it, so those files stay as they were.
    realism = _rng(seed, patient_id, "realism")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ap = view_position == "AP"
    jitter = rng.normal(0, 0.015, size=6)
    scale, dx, dy = (1 + d * realism.uniform(-0.15, 0.15), *realism.normal(0, 0.03 * d, 2)) \
        if d else (1.0, 0.0, 0.0)
    image = np.full((size, size), 0.06, dtype=np.float32)
    body = _ellipse(yy, xx, 0.55 + jitter[0] + dy, 0.5 + dx, 0.62 * scale,
                    (0.47 + jitter[1]) * scale, 0.05)
    image += 0.38 * body
    lung_ry, lung_rx = (0.30 + jitter[2]) * scale, (0.16 + jitter[3]) * scale
    lung_dx = (0.20 - jitter[4]) * scale
    lungs = np.maximum(
        _ellipse(yy, xx, 0.47 + dy, 0.5 - lung_dx + dx, lung_ry, lung_rx, 0.12),
        _ellipse(yy, xx, 0.47 + dy, 0.5 + lung_dx + dx, lung_ry, lung_rx, 0.12),
    )
    image -= 0.26 * lungs
    # Ribs: bright bands that curve down across each lung field.
    rib_phase = ((yy - dy) * 11.0 / scale - 1.8 * (xx - 0.5 - dx) ** 2 * 11.0) % 1.0
    image += 0.07 * lungs * np.exp(-(((rib_phase - 0.5) / 0.09) ** 2))
    # Mediastinum and heart: wider on AP (magnified by the projection), narrower on PA.
    not_normal = d > 0 and not len(np.asarray(boxes_xywh).reshape(-1)) and (
        detailed_class == NEGATIVE_CLASSES[0] if detailed_class is not None
        else realism.random() > P_NORMAL_GIVEN_NEGATIVE)
    findings = set(realism.choice(["heart", "effusion", "nodules", "scar"], size=2,
                                  replace=False)) if not_normal else set()
    heart_rx = (0.13 if ap else 0.10) * (1.45 if "heart" in findings else 1.0) * scale
    image += 0.30 * _ellipse(yy, xx, 0.40 + dy, 0.5 + dx, 0.30 * scale, 0.055 * scale, 0.3)
    image += 0.25 * _ellipse(yy, xx, 0.66 + dy, 0.53 + jitter[5] + dx, 0.13 * scale, heart_rx,
                             0.25)
    image += 0.30 * np.clip((yy - 0.80 - dy - 0.05 * np.abs(xx - 0.5)) * 6, 0, 1) * body
    for box in np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4) / size:
        x, y, w, h = box
        # A patchy consolidation that fills its box: well defined at difficulty 0, faint,
        # ill-defined and patchy towards 1.
        cloud = _ellipse(yy, xx, y + h / 2, x + w / 2, h / 2, w / 2, 0.15 + 0.45 * d)
        texture = (0.7 - 0.5 * d) + (0.3 + 0.6 * d) * _smooth_noise(rng, (size, size), 24)
        image += (0.26 + 0.06 * rng.random()) * (1 - 0.65 * d) * cloud \
            * np.clip(texture, 0, 1.2)
    if findings:
        image += _findings(findings, yy, xx, lungs, dy, realism) * min(1.0, 0.4 + d)
    if d:
        image += _devices_and_markers(size, d, realism)
    if ap:
        image = 0.9 * image + 0.05  # portable AP films: lower contrast
        image[int(0.05 * size):int(0.09 * size), int(0.85 * size):int(0.92 * size)] = 0.95
    if d:  # exposure and contrast of this film
        gamma = float(np.exp(realism.normal(0, 0.25 * d)))
        contrast = 1 + d * realism.uniform(-0.3, 0.15)
        image = (np.clip(image, 0, 1) ** gamma - 0.5) * contrast + 0.5 \
            + realism.normal(0, 0.04 * d)
    image += 0.03 * _smooth_noise(rng, (size, size), 48)
    noise = 0.015 * (1 + 2 * d * realism.random()) if d else 0.015
    image += noise * rng.standard_normal((size, size)).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _findings(findings: set[str], yy: np.ndarray, xx: np.ndarray, lungs: np.ndarray,
              dy: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness of non-opacity findings (the heart is enlarged by the caller)."""
    extra = np.zeros_like(yy)
    if "effusion" in findings:  # fluid at one lung base: a bright meniscus
        side = 1.0 if rng.random() < 0.5 else -1.0
        level = 0.62 + dy + rng.uniform(0, 0.08)
        extra += 0.22 * lungs * np.clip((yy - level) * 12, 0, 1) * (np.sign(xx - 0.5) == side)
    if "nodules" in findings:  # a few small round densities
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.uniform(0.25, 0.7), rng.choice([0.3, 0.7]) + rng.normal(0, 0.06)
            radius = rng.uniform(0.008, 0.02)
            extra += 0.25 * _ellipse(yy, xx, cy, cx, radius, radius, 0.3) * lungs
    if "scar" in findings:  # a thin linear band (plate atelectasis, fibrosis)
        cy, cx, angle = rng.uniform(0.4, 0.7), rng.choice([0.3, 0.7]), rng.uniform(-0.4, 0.4)
        distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        along = np.abs((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle))
        extra += 0.18 * np.exp(-((distance / 0.006) ** 2)) * (along < 0.08) * lungs
    return extra


def _devices_and_markers(size: int, d: float, rng: np.random.Generator) -> np.ndarray:
    """ECG leads with wires, a tube or line, and a burned-in text marker: bright, sharp."""
    canvas = np.zeros((size, size), dtype=np.float32)
    unit = size / 1024
    if rng.random() < 0.6 * d:  # ECG electrodes and their wires
        for _ in range(rng.integers(2, 5)):
            centre = rng.uniform([150, 150], [874, 700]) * unit
            cv2.circle(canvas, tuple(int(v) for v in centre), int(14 * unit), 0.5, -1)
            end = (int(rng.uniform(0, size)), 0 if rng.random() < 0.5 else size - 1)
            middle = (centre + np.array(end)) / 2 + rng.normal(0, 80 * unit, 2)
            wire = np.array([centre, middle, end], dtype=np.int32)
            cv2.polylines(canvas, [wire], False, 0.35, max(1, int(3 * unit)))
    if rng.random() < 0.5 * d:  # an endotracheal tube or a central line down the middle
        x0 = size / 2 + rng.normal(0, 20 * unit)
        points = np.array([[x0, 0], [x0 + rng.normal(0, 15 * unit), 0.25 * size],
                           [x0 + rng.normal(0, 40 * unit), rng.uniform(0.35, 0.6) * size]],
                          dtype=np.int32)
        cv2.polylines(canvas, [points], False, 0.45, max(1, int(6 * unit)))
    if rng.random() < d:  # a text marker: a row of letter-sized blocks in a top corner
        x = int(rng.choice([0.04, 0.80]) * size)
        for i in range(rng.integers(1, 6)):
            left = x + int(i * 22 * unit)
            cv2.rectangle(canvas, (left, int(40 * unit)), (left + int(14 * unit),
                                                            int(66 * unit)), 0.9, -1)
    return cv2.GaussianBlur(canvas, (0, 0), max(0.5, 1.2 * unit))


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG bytes of a uint8 grayscale image (libjpeg-turbo through Pillow)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=quality,
                                          optimize=False, progressive=False)
    return buffer.getvalue()


def _uid(seed: int, patient_id: str, kind: str) -> str:
    return generate_uid(entropy_srcs=[str(seed), patient_id, kind])


def competition_dicom(patient_id: str, pixels: np.ndarray, header: dict, seed: int,
                      jpeg_quality: int = 92) -> Dataset:
    """A DICOM dataset shaped like the competition's files, pixels JPEG Baseline encoded."""
    sop_instance = _uid(seed, patient_id, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {header['view_position']}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = header["patient_sex"]
    with lenient_values():  # the competition writes a bare number, not "054Y"
        ds.PatientAge = str(int(header["patient_age"]))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = header["view_position"]
    ds.StudyInstanceUID = _uid(seed, patient_id, "study")
    ds.SeriesInstanceUID = _uid(seed, patient_id, "series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    spacing = f"{float(header['pixel_spacing']):.6g}"
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([encode_jpeg(pixels, jpeg_quality)])
    ds["PixelData"].VR = "OB"
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """Serialise ``ds`` as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def demo_file(patient_id: str, header: dict, boxes_xywh: object, config: DemoConfig) -> bytes:
    """The bytes of one demo DICOM file."""
    pixels = render_chest(patient_id, header["view_position"], boxes_xywh, config.seed,
                          difficulty=config.difficulty,
                          detailed_class=header.get("detailed_class"))
    return dicom_bytes(competition_dicom(patient_id, pixels, header, config.seed,
                                         config.jpeg_quality))
