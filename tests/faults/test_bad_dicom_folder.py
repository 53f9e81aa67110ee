"""Every kind of bad DICOM, each among good files, through real ingest, split and cache runs.

For each case: an error of the project's own type that names the file and what is wrong, or a
row in the ingest/cache report; the good files are cached; the raw folder is left untouched.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pneumonia_kedro.errors import DicomError, MissingDataError
from tests.conftest import DEMO_RAW, run_session, tiny_demo_project

# Real Kedro sessions, servers or subprocesses: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow


def rewritten(good: bytes, change: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(good))
    change(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def without_pixel_data(ds: pydicom.Dataset) -> None:
    del ds.PixelData


def wrong_rows(ds: pydicom.Dataset) -> None:
    ds.Rows = 512


def unsupported_syntax(ds: pydicom.Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists


# case -> (file contents from a good competition file, expected reason)
CONTENT_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "zero_byte": (lambda good: b"", "empty file"),
    "random_bytes": (lambda good: np.random.default_rng(0).bytes(len(good)), "not a DICOM file"),
    "truncated": (lambda good: good[: len(good) // 2], "truncated file"),
    "no_pixel_data": (lambda good: rewritten(good, without_pixel_data), "no pixel data"),
    "wrong_rows": (lambda good: rewritten(good, wrong_rows),
                   "JPEG frame is 1024x1024 but the header says 1024x512"),
    "colour": (lambda good: Path(get_testdata_file("SC_rgb_jpeg.dcm")).read_bytes(),
               "colour or palette image"),
    "multi_frame": (lambda good: Path(get_testdata_file("rtdose.dcm")).read_bytes(),
                    "multi-frame image"),
    "unsupported_syntax": (lambda good: rewritten(good, unsupported_syntax),
                           "cannot decode transfer syntax 1.2.840.10008.1.2.4.100"),
}
# Not files the folder may read at all: rejected when the folder is scanned.
ENTRY_CASES = {"symlink_outside": "symlink pointing outside the data folder",
               "directory": "not a regular file (directory)"}
HEADER_UNREADABLE = {"zero_byte", "random_bytes"}


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry below ``folder`` with its kind and, for files, its bytes and mtime."""
    entries: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        if path.is_symlink():
            entries[str(path)] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[str(path)] = ("dir", stat.st_mtime_ns)
        else:
            entries[str(path)] = ("file", path.read_bytes(), stat.st_mtime_ns)
    return entries


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny demo data, with one bad file per case added as a labelled negative patient."""
    root = tmp_path_factory.mktemp("bad_dicoms")
    with pytest.MonkeyPatch.context() as patch:
        project = tiny_demo_project(root, patch)
    images = project / DEMO_RAW / "stage_2_train_images"
    good = sorted(images.glob("*.dcm"))[0].read_bytes()
    for case, (make, _) in CONTENT_CASES.items():
        (images / f"bad_{case}.dcm").write_bytes(make(good))
    outside = root / "outside"
    outside.mkdir()
    (outside / "elsewhere.dcm").write_bytes(good)
    (images / "bad_symlink_outside.dcm").symlink_to(outside / "elsewhere.dcm")
    (images / "bad_directory.dcm").mkdir()
    bad_ids = [f"bad_{case}" for case in [*CONTENT_CASES, *ENTRY_CASES]]
    for csv, row in (("stage_2_train_labels.csv", "{},,,,,0"),
                     ("stage_2_detailed_class_info.csv", "{},Normal")):
        with open(project / DEMO_RAW / csv, "a", newline="") as handle:
            handle.writelines(row.format(pid) + "\n" for pid in bad_ids)
    return project


def run(project: Path, monkeypatch: pytest.MonkeyPatch, **params: dict) -> Path:
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    base = {"split": {"stratify_by_view": False},
            "cache": {"image_size": 32, "workers": 2, "chunk_size": 2, "progress": False}}
    before = snapshot(project / DEMO_RAW)
    try:
        run_session(project, pipelines=["ingest", "split", "cache"],
                    params={**base, **params})
    finally:
        assert snapshot(project / DEMO_RAW) == before, "the raw data folder was changed"
    return project / "data"


def test_strict_ingest_stops_naming_every_unreadable_or_rejected_file(project, monkeypatch):
    with pytest.raises(MissingDataError) as info:
        run(project, monkeypatch)
    message = str(info.value)
    assert "2 patient(s) without a DICOM file and 2 unreadable" in message
    for case, reason in ENTRY_CASES.items():
        assert f"bad_{case}.dcm: {reason}" in message
    assert "bad_zero_byte.dcm: empty file" in message
    assert "bad_random_bytes.dcm: not a DICOM file" in message
    assert "ingest.on_missing_image: exclude" in message  # what to do next


def test_strict_cache_stops_at_a_bad_file_with_its_name_and_reason(project, monkeypatch):
    # The cache node decodes: its DicomError reaches the user as it is, not wrapped.
    with pytest.raises(DicomError) as info:
        run(project, monkeypatch, ingest={"on_missing_image": "exclude"})
    message = str(info.value)
    names = [case for case in CONTENT_CASES if case not in HEADER_UNREADABLE
             and f"bad_{case}.dcm: " in message]
    assert len(names) == 1, message
    assert CONTENT_CASES[names[0]][1] in message


def test_lenient_run_reports_every_bad_file_and_caches_every_good_one(project, monkeypatch):
    data = run(project, monkeypatch,
               ingest={"on_missing_image": "exclude"},
               quality={"policies": {"colour": {"training": "skip"}}},
               cache={"on_error": "skip"})
    ingest = json.loads((data / "08_reporting/demo/ingest_report.json").read_text())
    assert ingest["rejected_files"]["count"] == len(ENTRY_CASES)
    assert sorted(ingest["rejected_files"]["first"]) == [f"bad_{case}.dcm" for case in
                                                 sorted(ENTRY_CASES)]
    for case, reason in ENTRY_CASES.items():
        assert ingest["rejected_files"]["first"][f"bad_{case}.dcm"] == reason
    assert sorted(ingest["missing_images"]["first"]) == sorted(f"bad_{c}" for c in ENTRY_CASES)
    for case in HEADER_UNREADABLE:
        reason = ingest["unreadable_images"]["first"][f"bad_{case}"]
        assert reason.endswith(f"bad_{case}.dcm: {CONTENT_CASES[case][1]}") or \
            f"bad_{case}.dcm: {CONTENT_CASES[case][1]}" in reason
    assert ingest["patients"] == 16 + len(CONTENT_CASES) - len(HEADER_UNREADABLE)

    cache = json.loads((data / "08_reporting/demo/cache_report.json").read_text())
    skipped = {**cache["train"]["skipped"]["first"], **cache["validation"]["skipped"]["first"]}
    decodable_header = [c for c in CONTENT_CASES if c not in HEADER_UNREADABLE]
    assert sorted(skipped) == sorted(f"bad_{case}" for case in decodable_header)
    for case in decodable_header:
        # The colour image is skipped by the quality gate ("...: quality gate colour: ...").
        assert f"bad_{case}.dcm: " in skipped[f"bad_{case}"]
        assert CONTENT_CASES[case][1] in skipped[f"bad_{case}"]
        assert "Traceback" not in skipped[f"bad_{case}"]
    assert cache["train"]["images"] + cache["validation"]["images"] == 16
    split = pd.concat([pd.read_parquet(data / f"05_model_input/demo/{name}_patients.parquet")
                       for name in ("train", "validation")])
    assert len(split) == 16 + len(decodable_header)


def test_a_test_folder_of_upper_case_dcm_files_says_to_rename_them(project, tmp_path,
                                                                   monkeypatch):
    """It was reported as missing raw data, with advice to download the Kaggle files."""
    copy = tiny_demo_project(tmp_path, monkeypatch, raw=project / DEMO_RAW)
    test_images = copy / DEMO_RAW / "stage_2_test_images"
    for path in test_images.glob("*.dcm"):
        path.rename(path.with_suffix(".DCM"))
    (test_images / "series1").mkdir()
    with pytest.raises(MissingDataError) as info:
        run_session(copy, pipelines=["inference"])
    message = str(info.value)
    assert message.startswith(
        "Raw data for this run is there but cannot be read:\n  test_dicoms: "
        f"{test_images} holds no .dcm file it can read: 1 x a "
        "subfolder: images must lie directly in the folder; 3 x file name ends in '.DCM', "
        "not '.dcm' (names are case-sensitive)\nImages must lie directly in the folder, "
        "named <patientId>.dcm (lower case)."), message
    assert "Kaggle" not in message
