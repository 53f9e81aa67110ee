"""How well the quality gate's appearance check separates chest X-rays from other images.

    .venv/bin/python benchmarks/appearance_separation.py [--train 400] [--difficulty 0.6]
        [--chest 60] [--size 256]

The project's own path, end to end: ``--train`` demo DICOMs (at the demo's ``--difficulty``)
are cached through the training gate, the cache pipeline's ``calibrate_appearance`` node
makes the reference with conf/base's ``quality.appearance`` settings, and every evaluated
file goes through ``decode_checked`` with the inference gate (``inference_gate``), as the
inference pipeline and the served model do. Evaluated:

- chest: ``--chest`` new demo DICOMs (other seed) at difficulties 0, 0.3, 0.6 and 1.0;
- non-chest: every single-frame grayscale file bundled with pydicom that decodes (CT, MR,
  NM, OT, SEG, RTDOSE), once with its own header and once with its pixels under a chest
  radiograph's header (CR, secondary capture, CHEST, PA: only the appearance check can see
  them), and four synthetic test patterns under the same header.

Printed per file: distance / threshold (above 1: flagged), and whether the whole inference
gate skips it; then a summary per group. ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.data import get_testdata_files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumonia_kedro.demo import DemoConfig  # noqa: E402
from pneumonia_kedro.dicom import DicomFolder, decode  # noqa: E402
from pneumonia_kedro.dicom.appearance import features  # noqa: E402
from pneumonia_kedro.dicom.quality_settings import inference_gate, training_gate  # noqa: E402
from pneumonia_kedro.errors import DicomError  # noqa: E402
from pneumonia_kedro.imagecache import (  # noqa: E402
    CacheConfig,
    ImageCache,
    build,
    decode_checked,
    plan,
)
from pneumonia_kedro.pipelines.cache.nodes import calibrate_appearance  # noqa: E402
from tests.demo_folder import write_demo_folder  # noqa: E402
from tests.dicom_files import native_dicom  # noqa: E402

PARAMS = yaml.safe_load((ROOT / "conf/base/parameters_quality.yml").read_text())["quality"]


def non_chest_files() -> dict[str, bytes]:
    """pydicom's bundled single-frame grayscale images that this project's reader decodes."""
    files, seen = {}, set()
    for path in sorted(map(Path, get_testdata_files("*"))):
        if path.suffix.lower() != ".dcm":
            continue
        data = path.read_bytes()
        try:
            image = decode(data, path.name)
            modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
        except (DicomError, Exception):  # noqa: BLE001 - anything pydicom cannot read is out
            continue
        digest = hash(image.pixels.tobytes())  # MR_small comes in eight encodings
        if digest not in seen:
            seen.add(digest)
            files[f"{path.name} ({modality or 'no Modality'})"] = data
    return files


def patterns() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:512, 0:512]
    return {"horizontal ramp": (xx // 2).astype(np.uint8),
            "vertical ramp": (yy // 2).astype(np.uint8),
            "bars": ((xx // 64) % 2 * 255).astype(np.uint8),
            "checkerboard": (((xx // 64) + (yy // 64)) % 2 * 200).astype(np.uint8)}


def score(files: dict[str, bytes], gate, size: int) -> list[dict]:
    rows = []
    for name, data in files.items():
        image, reason, flags = decode_checked(data, name, size, gate)
        pixels = decode(data, name, size).pixels
        ratio = gate.reference.distance(features(pixels)) / gate.reference.threshold
        rows.append({"file": name, "ratio": round(ratio, 3),
                     "appearance": "appearance:" in flags, "skipped": image is None,
                     "skip_reason": reason.split("quality gate ", 1)[-1][:60]})
    return rows


def summary(rows: list[dict]) -> dict:
    ratios = np.array([row["ratio"] for row in rows])
    return {"files": len(rows), "min": round(float(ratios.min()), 2),
            "median": round(float(np.median(ratios)), 2),
            "max": round(float(ratios.max()), 2),
            "flagged by appearance": int(sum(row["appearance"] for row in rows)),
            "skipped by the gate": int(sum(row["skipped"] for row in rows))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--difficulty", type=float, default=0.6)
    parser.add_argument("--chest", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo_folder(root / "train", DemoConfig(
            n_positive=arguments.train // 2, n_negative=arguments.train - arguments.train // 2,
            n_test=0, seed=42, difficulty=arguments.difficulty), workers=2)
        folder = DicomFolder.scan(str(root / "train"))
        build(plan(folder, folder.patient_ids, CacheConfig(
            image_size=arguments.size, workers=2, progress=False,
            quality=training_gate(PARAMS))), root / "cache")
        calibration = calibrate_appearance(ImageCache(root / "cache"), PARAMS)
        gate = inference_gate(PARAMS, calibration)
        groups: dict[str, list[dict]] = {}
        for difficulty in (0.0, 0.3, 0.6, 1.0):
            chest = root / f"chest_{difficulty}"
            write_demo_folder(chest, DemoConfig(
                n_positive=arguments.chest // 2, n_negative=arguments.chest - arguments.chest // 2,
                n_test=0, seed=7, difficulty=difficulty), workers=2)
            groups[f"chest, difficulty {difficulty}"] = score(
                {p.name: p.read_bytes() for p in sorted(chest.glob("*.dcm"))}, gate,
                arguments.size)
    others = non_chest_files()
    groups["non-chest, own header"] = score(others, gate, arguments.size)
    groups["non-chest pixels, chest header"] = score(
        {name: native_dicom(decode(data, name).pixels) for name, data in others.items()},
        gate, arguments.size)
    groups["test patterns, chest header"] = score(
        {name: native_dicom(pixels) for name, pixels in patterns().items()}, gate,
        arguments.size)
    print(f"reference: {calibration['training_images']} training images at difficulty "
          f"{arguments.difficulty}, threshold {gate.reference.threshold:.3f}, held-out "
          f"distance quantiles {calibration['held_out_distance_quantiles']}")
    for group, rows in groups.items():
        print(f"\n{group}: {summary(rows)}")
        if not group.startswith("chest"):
            for row in rows:
                print(f"  {row['file']:<42} {row['ratio']:6.2f}  skipped={row['skipped']}  "
                      f"{row['skip_reason']}")
    if arguments.json:
        arguments.json.write_text(json.dumps({
            "calibration": {k: v for k, v in calibration.items() if k != "reference"},
            "threshold": gate.reference.threshold,
            "summary": {group: summary(rows) for group, rows in groups.items()},
            "files": groups}, indent=1))


if __name__ == "__main__":
    main()
