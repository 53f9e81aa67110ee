"""The PACS round trip through the project's own catalog and pipelines, against a real Orthanc:
the inference pipeline pulls two studies over DICOMweb (``test_dicoms`` swapped for a
``DicomWebDataset`` in a conf file, the login from the environment), predicts, writes SRs; the
deliver pipeline builds the overlays and sends both; Orthanc is stopped mid-delivery, started
again, and the rerun sends exactly what was missing. A corrupt SR costs its image's objects
only; the presentation state goes with the others when asked for."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import MemoryDataset
from kedro.runner import SequentialRunner

from pneumonia_kedro.datasets import DicomWebDataset
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.ensemble import Ensemble
from pneumonia_kedro.models import TrainedModel, build_model
from pneumonia_kedro.pacs.overlay import BOX_COLOUR, findings_from_sr, line_thickness
from pneumonia_kedro.pacs.send import StowSender
from pneumonia_kedro.pacs.server import PacsError, PacsServer
from pneumonia_kedro.pipelines import deliver, inference
from pneumonia_kedro.pipelines.deliver.nodes import build_secondary_captures, deliver_results
from pneumonia_kedro.structured_report import report_bytes
from tests.conftest import copy_project
from tests.orthanc import AET, PASSWORD, USER, running_orthanc
from tests.submission_format import parse_prediction_string
from tests.test_pacs import IDENTITY, hospital_file
from tests.test_training import TINY_MODEL

pytestmark = pytest.mark.slow

# Keep every box an untrained model proposes, so there is something to draw and compare.
POSTPROCESSING = {"score_threshold": 0.0, "nms_iou": 0.5, "max_boxes": 3, "shrink": 1.0}
PARAMS = {"inference": {"dicom_sr": True, "progress": False, "batch_size": 4,
                        "cache": {"workers": 0, "progress": False}}}


@pytest.fixture
def orthanc(tmp_path):
    yield from running_orthanc(tmp_path / "orthanc")


def pacs_project(tmp_path: Path, studies: list[str], monkeypatch) -> Path:
    """A project copy whose demo environment reads test_dicoms from the PACS."""
    project = copy_project(tmp_path)
    (project / "conf" / "demo" / "catalog_pacs.yml").write_text(
        "test_dicoms:\n"
        "  type: pneumonia_kedro.datasets.DicomWebDataset\n"
        "  path: data/01_raw/pacs_incoming\n"
        f"  query: {{study_instance_uids: {json.dumps(studies)}}}\n")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    return project


def run(project: Path, pipeline, ensemble: Ensemble) -> None:
    """The pipeline on the project's own catalog (demo env), the model given in memory."""
    with KedroSession.create(project_path=project, env="demo", runtime_params=PARAMS) as session:
        catalog = session.load_context().catalog
        catalog["ensemble"] = MemoryDataset(ensemble, copy_mode="assign")
        # Tuned for this ensemble: post-processing names the models it was tuned for.
        catalog["postprocessing"] = MemoryDataset({**POSTPROCESSING,
                                                   "models": ensemble.record()})
        # No cache pipeline ran here: no appearance reference (the gate's check is off).
        catalog["appearance_reference"] = MemoryDataset({"reason": "not calibrated here"})
        assert isinstance(catalog.get("test_dicoms"), DicomWebDataset)
        SequentialRunner().run(pipeline, catalog)


def yellow_box_edges(pixels: np.ndarray) -> np.ndarray:
    return np.all(pixels == BOX_COLOUR, axis=2)


def test_pull_predict_deliver_survives_a_pacs_outage(orthanc, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    files = [hospital_file(seed) for seed in (11, 12, 13)]
    for data in files:
        orthanc.upload(data)
    sources = [pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True) for d in files]
    studies = [str(s.StudyInstanceUID) for s in sources[:2]]  # the third study is not asked
    project = pacs_project(tmp_path, studies, monkeypatch)
    for variable, value in (("PACS_DICOMWEB_URL", orthanc.dicomweb_url),
                            ("PACS_USERNAME", USER), ("PACS_PASSWORD", PASSWORD)):
        monkeypatch.setenv(variable, value)
    torch_model = build_model(TINY_MODEL)
    ensemble = Ensemble.of(TrainedModel(config=TINY_MODEL, state_dict=torch_model.state_dict(),
                                        info={}), None)

    # Orthanc goes down after two objects of four: the run fails naming server and objects.
    real_send, sent = StowSender.send, []

    def send_then_fail(self, dataset, what):
        if len(sent) == 2:
            orthanc.stop()
        sent.append(what)
        return real_send(self, dataset, what)

    monkeypatch.setattr(StowSender, "send", send_then_fail)
    everything = inference.create_pipeline(folds=1).from_inputs("ensemble") + \
        deliver.create_pipeline()
    with pytest.raises(PacsError, match="incomplete: 2 of 4 object") as error:
        run(project, everything, ensemble)
    assert orthanc.dicomweb_url in str(error.value)
    output = project / "data/07_model_output/demo"
    reports = sorted((output / "structured_reports").glob("*.dcm"))
    overlays = sorted((output / "pacs_secondary_captures").glob("*.dcm"))
    assert [p.stem for p in reports] == sorted(str(s.SOPInstanceUID) for s in sources[:2])
    assert [p.stem for p in overlays] == [p.stem for p in reports]  # results stay on disk
    report_file = project / "data/08_reporting/demo/delivery_report.json"
    first = json.loads(report_file.read_text())
    assert (first["stored"], first["failed"], first["not_sent"]) == (2, 1, 1)

    # Back up, then a later `kedro run --pipelines deliver` sends exactly what is missing.
    orthanc.start()
    monkeypatch.setattr(StowSender, "send", real_send)
    run(project, deliver.create_pipeline(), ensemble)
    second = json.loads(report_file.read_text())
    assert (second["stored"], second["already_delivered"], second["complete"]) == (2, 2, True)
    resent = {e["sop_instance_uid"] for e in second["deliveries"] if e["status"] == "stored"}
    assert resent == {e["sop_instance_uid"] for e in first["deliveries"]
                      if e["status"] != "stored"}  # nothing twice, nothing lost

    submission = (output / "submission.csv").read_text().splitlines()[1:]
    strings = dict(line.split(",", 1) for line in submission)
    for source, sr_path, sc_path in zip(sources[:2], reports, overlays, strict=True):
        instances = orthanc.find("Instance", {"StudyInstanceUID": source.StudyInstanceUID})
        by_uid = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in instances}
        sr = pydicom.dcmread(sr_path)
        sc = pydicom.dcmread(sc_path)
        assert len(instances) == 3 == len(by_uid)  # radiograph, SR, overlay: one copy each
        assert set(by_uid) == {source.SOPInstanceUID, sr.SOPInstanceUID, sc.SOPInstanceUID}
        stored = pydicom.dcmread(io.BytesIO(orthanc.file(by_uid[sr.SOPInstanceUID]["ID"])))
        assert stored == sr  # the SR read back from Orthanc equals the file on disk
        stored_sc = pydicom.dcmread(io.BytesIO(orthanc.file(by_uid[sc.SOPInstanceUID]["ID"])))
        check_overlay(stored_sc, sr_path.read_bytes(), strings[str(source.SOPInstanceUID)])

    # Privacy: no identification in the delivery report, the submission, the logs.
    for text in (report_file.read_text(), (output / "submission.csv").read_text(),
                 caplog.text):
        assert not [v for v in IDENTITY.values() if v.lower() in text.lower()]
    assert sources[2].SOPInstanceUID not in report_file.read_text()


def check_overlay(sc: pydicom.Dataset, sr: bytes, prediction_string: str) -> None:
    """The overlay's yellow borders are the SR's boxes drawn to the nearest pixel edge (so
    within half a pixel of them), and the SR's boxes are the submission's (which writes
    tenths of a pixel): the overlay shows the submission within half a pixel plus 0.05."""
    boxes, _ = parse_prediction_string(prediction_string)
    drawn = np.asarray(findings_from_sr(sr, "sr").boxes)
    np.testing.assert_allclose(drawn, boxes, atol=0.05 + 1e-6)
    yellow = yellow_box_edges(sc.pixel_array)
    assert len(boxes) > 0 and yellow.any()
    t = line_thickness(sc.Rows, sc.Columns)
    expected = np.zeros_like(yellow)
    for x, y, width, height in drawn:
        x0, y0 = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        x1, y1 = int(np.floor(x + width + 0.5)), int(np.floor(y + height + 0.5))
        assert max(abs(x0 - x), abs(y0 - y), abs(x1 - x - width), abs(y1 - y - height)) <= 0.5
        border = np.zeros_like(yellow)
        border[y0:y1, x0:x1] = True
        border[y0 + t:y1 - t, x0 + t:x1 - t] = False
        expected |= border
    np.testing.assert_array_equal(yellow, expected)


def folder_of(path: Path, files: dict[str, bytes]) -> DicomFolder:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / f"{name}.dcm").write_bytes(data)
    return DicomFolder.scan(str(path))


def test_a_corrupt_sr_fails_its_image_only_and_presentation_states_go_along(orthanc, tmp_path,
                                                                            caplog):
    files = [hospital_file(seed) for seed in (31, 32)]
    good, bad = (str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in files)
    for data in files:
        orthanc.upload(data)
    sr = report_bytes(files[0], good, [[50.0, 60.0, 70.0, 80.0]], [0.7], 0.8, "model-v1")
    test_dicoms = folder_of(tmp_path / "dicoms", dict(zip((good, bad), files, strict=True)))
    reports = folder_of(tmp_path / "srs", {good: sr, bad: b"garbled"})
    params = {"protocol": "c_store", "presentation_state": True}
    overlays = {}
    for chunk in build_secondary_captures(reports, test_dicoms, params):
        overlays.update(chunk)
    assert list(overlays) == [good] and f"no overlay for image {bad}" in caplog.text
    only_bad = folder_of(tmp_path / "bad_srs", {bad: b"garbled"})
    # Still one (empty) chunk: the overlay folder is replaced, no earlier run's files left.
    assert list(build_secondary_captures(only_bad, test_dicoms, params)) == [{}]
    server = PacsServer(dicomweb_url=orthanc.dicomweb_url, username=USER, password=PASSWORD,
                        dimse_host="127.0.0.1", dimse_port=orthanc.dicom_port, called_ae=AET)
    report = deliver_results(reports, folder_of(tmp_path / "overlays", overlays), test_dicoms,
                             server, {}, params)
    status = {(e["image"], e["kind"]): e["status"] for e in report["deliveries"]}
    kinds = ("structured_report", "secondary_capture", "presentation_state")
    assert status == {**{(good, kind): "stored" for kind in kinds},
                      **{(bad, kind): "failed" for kind in kinds}}
    for entry in report["deliveries"]:
        if entry["status"] == "failed":
            assert entry["answer"].startswith(f"{entry['kind']} of image {bad} cannot be read")
    study = pydicom.dcmread(io.BytesIO(files[0])).StudyInstanceUID
    stored = orthanc.find("Instance", {"StudyInstanceUID": study})
    classes = [str(pydicom.dcmread(io.BytesIO(orthanc.file(i["ID"])), stop_before_pixels=True)
                   .SOPClassUID) for i in stored]
    assert sorted(classes) == sorted([
        str(pydicom.dcmread(io.BytesIO(files[0])).SOPClassUID), "1.2.840.10008.5.1.4.1.1.11.1",
        "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"])
