"""DICOM Structured Reports: read back with highdicom and pydicom, coordinates, references,
identity, and Debian's dciodvfy."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from pneumonia_kedro.dicom.folder import FolderChunk
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.structured_report import report_bytes
from tests.dicom_files import native_dicom

BOXES = [[100.25, 200.5, 300.0, 400.75], [600.0, 150.0, 220.5, 310.0]]
SCORES = [0.91, 0.42]


@pytest.fixture(scope="module")
def source() -> bytes:
    from tests.demo_folder import one_demo_file

    return one_demo_file(seed=4)


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """Error lines of dciodvfy (dicom3tools, installed by `make test`)."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is missing: `make test` installs Debian's dicom3tools")
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; `make test` "
                    "installs it when it may use apt-get)")
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                            check=False, timeout=60)
    output = result.stdout + result.stderr
    assert "Comprehensive3DSR" in output, output
    return [line for line in output.splitlines() if line.startswith("Error")]


def text_values(group: pydicom.Dataset | pydicom.Sequence, code: str) -> list[str]:
    """TEXT items under ``group`` with the DCM concept name ``code`` (at any depth)."""
    found = []
    for item in group if isinstance(group, pydicom.Sequence) else group.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == code and item.ValueType == "TEXT":
            found.append(item.TextValue)
        if "ContentSequence" in item:
            found += text_values(item, code)
    return found


def read_back(data: bytes) -> tuple[pydicom.Dataset, hd.sr.Comprehensive3DSR]:
    return pydicom.dcmread(io.BytesIO(data)), hd.sr.srread(io.BytesIO(data))


def test_boxes_round_trip_with_references_identity_and_codes(source):
    data = report_bytes(source, "s.dcm", BOXES, SCORES, 0.93, "mobilenet-abc")
    ds, sr = read_back(data)
    original = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.StudyInstanceUID == original.StudyInstanceUID
    assert ds.SeriesInstanceUID != original.SeriesInstanceUID
    assert (ds.PatientID, str(ds.PatientName)) == (original.PatientID,
                                                    str(original.PatientName))
    assert ds.PatientAge == f"{int(original.PatientAge):03d}Y"  # made conformant
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == original.SOPInstanceUID

    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    for group, box, score in zip(groups, BOXES, SCORES, strict=True):
        x, y, width, height = box
        points = np.asarray(group.roi.value)
        expected = [[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]]
        np.testing.assert_allclose(points, expected, atol=0.5)
        assert group.roi.GraphicType == "POLYLINE"
        source_image = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert source_image.ReferencedSOPInstanceUID == original.SOPInstanceUID
        assert group.finding_type == codes.DCM.Opacity
        assert group.finding_sites[0].value == codes.SCT.Lung
        (certainty,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert certainty.value == pytest.approx(score)
        assert text_values(group, "111001")[0].startswith("pneumonia-kedro")  # name
        assert set(text_values(group, "111003")) == {"mobilenet-abc"}  # version
    (image_level,) = sr.content.get_image_measurement_groups()
    (presence,) = image_level.get_qualitative_evaluations(name=codes.DCM.PresenceOfProperty)
    assert presence.value == codes.SCT.Present
    (probability,) = image_level.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(0.93)


def test_an_image_without_boxes_says_no_opacity_was_found(source):
    data = report_bytes(source, "s.dcm", [], [], None, "v")
    _, sr = read_back(data)
    assert sr.content.get_planar_roi_measurement_groups() == []
    (image_level,) = sr.content.get_image_measurement_groups()
    (presence,) = image_level.get_qualitative_evaluations(name=codes.DCM.PresenceOfProperty)
    assert presence.value == codes.SCT.Absent
    assert image_level.get_measurements(name=codes.DCM.Probability) == []


@pytest.mark.slow  # a dciodvfy subprocess per report: outside the quick loop
@pytest.mark.parametrize(("boxes", "scores", "probability"),
                         [(BOXES, SCORES, 0.93), ([], [], None)])
def test_dciodvfy_finds_no_error(source, tmp_path, boxes, scores, probability):
    data = report_bytes(source, "s.dcm", boxes, scores, probability, "mobilenet-abc")
    assert dciodvfy_errors(data, tmp_path) == []


def test_a_rerun_keeps_the_uids_and_another_model_gets_new_ones(source):
    def uids(version: str) -> tuple[str, str]:
        ds = pydicom.dcmread(io.BytesIO(report_bytes(source, "s.dcm", BOXES, SCORES, 0.9,
                                                     version)))
        return ds.SOPInstanceUID, ds.SeriesInstanceUID

    first = uids("v1")
    assert uids("v1") == first
    assert set(uids("v2")).isdisjoint(first)


def test_a_source_without_uids_gets_a_clear_error():
    data = native_dicom(np.zeros((8, 8), np.uint8))
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.StudyInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(DicomError, match=r"^/in/x\.dcm: no StudyInstanceUID: a structured "
                                         "report cannot reference this image"):
        report_bytes(buffer.getvalue(), "/in/x.dcm", [], [], None, "v")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


DEAD_PID = 4_194_400  # above Linux's largest pid: no process has it


def test_the_report_folder_holds_one_whole_run_or_the_earlier_one(tmp_path):
    from kedro.io import DatasetError

    from pneumonia_kedro.datasets import DicomFolderDataset

    folder = tmp_path / "structured_reports"
    first_run = DicomFolderDataset(path=str(folder), overwrite=True)
    first_run.save(FolderChunk({"a": b"1", "b": b"2"}))
    assert not folder.exists()  # written aside until the last chunk
    first_run.save(FolderChunk({"c": b"3"}, last=True))
    assert _files(folder) == {"a.dcm": b"1", "b.dcm": b"2", "c.dcm": b"3"}

    stopped = DicomFolderDataset(path=str(folder), overwrite=True)
    stopped.save(FolderChunk({"b": b"22"}))  # the run then fails: its last chunk never comes
    assert _files(folder) == {"a.dcm": b"1", "b.dcm": b"2", "c.dcm": b"3"}
    (leftover,) = tmp_path.glob(".structured_reports.partial-*")
    assert _files(leftover) == {"b.dcm": b"22"}
    leftover.rename(tmp_path / f".structured_reports.partial-{DEAD_PID}-0")  # a killed run's

    second_run = DicomFolderDataset(path=str(folder), overwrite=True)
    second_run.save(FolderChunk({"b": b"222"}))
    second_run.save(FolderChunk(last=True))
    assert _files(folder) == {"b.dcm": b"222"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["structured_reports"]  # no leftover

    # Killed between the swap's two renames: the earlier set is put back by the next run.
    folder.rename(tmp_path / f"structured_reports.replaced-{DEAD_PID}-0")
    DicomFolderDataset(path=str(folder), overwrite=True).save(FolderChunk({"x": b"9"}))
    assert _files(folder) == {"b.dcm": b"222"}

    empty_run = DicomFolderDataset(path=str(folder), overwrite=True)
    empty_run.save(FolderChunk(last=True))  # dicom_sr off: the node's one empty chunk
    assert list(folder.iterdir()) == []
    with pytest.raises(DatasetError, match="unsafe patientId"):
        empty_run.save(FolderChunk({"../escape": b"x"}))
    with pytest.raises(DatasetError, match="read-only"):
        DicomFolderDataset(path=str(folder), read_only=True).save({"d": b"4"})
    # Read-only wins over overwrite (the raw folders have both): nothing is touched.
    folder.joinpath("kept.dcm").write_bytes(b"raw")
    beside = sorted(tmp_path.iterdir())
    with pytest.raises(DatasetError, match="read-only"):
        DicomFolderDataset(path=str(folder), read_only=True, overwrite=True).save(
            FolderChunk({"d": b"4"}, last=True))
    assert _files(folder) == {"kept.dcm": b"raw"}
    assert sorted(tmp_path.iterdir()) == beside  # no staging folder started


def test_plain_chunks_still_replace_the_folder_at_the_first_save(tmp_path):
    """Producers that do not mark their last chunk (the deliver pipeline's overlays)."""
    from pneumonia_kedro.datasets import DicomFolderDataset

    folder = tmp_path / "overlays"
    DicomFolderDataset(path=str(folder), overwrite=True).save({"a": b"1"})
    run = DicomFolderDataset(path=str(folder), overwrite=True)
    run.save({"b": b"2"})
    run.save({"c": b"3"})
    assert _files(folder) == {"b.dcm": b"2", "c.dcm": b"3"}


def test_the_folder_goes_to_mlflow_once_when_the_run_s_set_is_complete(tmp_path, monkeypatch):
    import mlflow

    from pneumonia_kedro.datasets import DicomFolderDataset

    monkeypatch.chdir(tmp_path)  # the default experiment's artefacts go to ./mlruns
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    dataset = DicomFolderDataset(path=str(tmp_path / "structured_reports"), overwrite=True,
                                 mlflow_artifact_path="structured_reports")
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        dataset.save(FolderChunk({"a": b"1"}))
        dataset.save(FolderChunk({"b": b"2"}))
        # kedro-mlflow's artifact wrapper uploaded the folder here, after every chunk.
        assert client.list_artifacts(run.info.run_id) == []
        dataset.save(FolderChunk({"c": b"3"}, last=True))
    logged = client.list_artifacts(run.info.run_id, "structured_reports")
    assert sorted(Path(a.path).name for a in logged) == ["a.dcm", "b.dcm", "c.dcm"]
