"""The PACS round trip against a real Orthanc (Debian's, started on 127.0.0.1 for these tests):
images in by QIDO-RS/WADO-RS (once per run, sessions closed), the Secondary Capture overlay,
delivery by STOW-RS and C-STORE, idempotent re-sends, unreadable objects failed by name, and
clear errors for a wrong password, a dead or a silent server."""

from __future__ import annotations

import io
import socket
import threading

import numpy as np
import pydicom
import pytest
from kedro.io import DatasetError

from pneumonia_kedro.datasets import DicomWebDataset, PacsServerDataset
from pneumonia_kedro.pacs.delivery import Outgoing, deliver, raise_if_incomplete
from pneumonia_kedro.pacs.overlay import (
    BOX_COLOUR,
    findings_from_sr,
    line_thickness,
    secondary_capture,
)
from pneumonia_kedro.pacs.presentation_state import presentation_state
from pneumonia_kedro.pacs.send import sender
from pneumonia_kedro.pacs.server import PacsError, PacsServer
from pneumonia_kedro.pacs.source import PacsQuery
from pneumonia_kedro.structured_report import report_bytes
from tests.demo_folder import one_demo_file
from tests.orthanc import AET, PASSWORD, USER, connections_to, running_orthanc

# A real Orthanc server per module: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

# Identification a hospital file carries; it must reach no message, log or report.
IDENTITY = {"PatientName": "Doe^Jane", "PatientID": "MRN-884421", "AccessionNumber": "ACC77123",
            "PatientBirthDate": "19520317"}


def hospital_file(seed: int, **attributes: str) -> bytes:
    """A demo radiograph with the identification a hospital's file would carry."""
    ds = pydicom.dcmread(io.BytesIO(one_demo_file(seed)))
    for keyword, value in {**IDENTITY, **attributes}.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from running_orthanc(tmp_path_factory.mktemp("orthanc"))


@pytest.fixture
def pacs(orthanc):
    orthanc.clear()
    return orthanc


def server_of(orthanc, password: str = PASSWORD, **values) -> PacsServer:
    return PacsServer(dicomweb_url=orthanc.dicomweb_url, username=USER, password=password,
                      dimse_host="127.0.0.1", dimse_port=orthanc.dicom_port, called_ae=AET,
                      **values)


def uids(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def test_a_study_is_searched_and_retrieved_into_a_folder_once(pacs, tmp_path, monkeypatch):
    files = [hospital_file(1), hospital_file(2), hospital_file(3, AccessionNumber="ACC99")]
    for data in files:
        pacs.upload(data)
    wanted = uids(files[0])
    monkeypatch.setenv("PACS_DICOMWEB_URL", pacs.dicomweb_url)  # credentials: environment
    monkeypatch.setenv("PACS_USERNAME", USER)
    monkeypatch.setenv("PACS_PASSWORD", PASSWORD)
    dataset = DicomWebDataset(path=str(tmp_path / "incoming"),
                              query={"study_instance_uids": [wanted.StudyInstanceUID]})
    folder = dataset.load()
    assert folder.patient_ids == [wanted.SOPInstanceUID]  # named by UID, not by patient
    assert folder.read_bytes(wanted.SOPInstanceUID) == files[0]  # as stored: JPEG stays JPEG
    written = (tmp_path / "incoming" / f"{wanted.SOPInstanceUID}.dcm").stat().st_mtime_ns
    assert dataset.load().patient_ids == folder.patient_ids
    assert (tmp_path / "incoming" / f"{wanted.SOPInstanceUID}.dcm").stat().st_mtime_ns == written

    by_accession = DicomWebDataset(path=str(tmp_path / "incoming"),
                                   query={"accession_numbers": ["ACC99"]}).load()
    assert by_accession.patient_ids == [uids(files[2]).SOPInstanceUID]  # not the earlier file
    by_date = DicomWebDataset(path=str(tmp_path / "incoming"),
                              query={"study_date": "19000101-20991231", "modalities": ["CR"]})
    assert len(by_date.load()) == 3
    assert "ACC99" not in str(by_accession) + repr(by_accession)


def test_search_errors_name_the_server_and_never_the_password_or_accession(pacs, tmp_path):
    server = server_of(pacs, password="wrong-password")
    query = {"accession_numbers": ["ACC77123"]}
    dataset = DicomWebDataset(path=str(tmp_path), query=query,
                              credentials={"url": pacs.dicomweb_url, "username": USER,
                                           "password": "wrong-password"})
    with pytest.raises(DatasetError, match="refused the credentials") as error:
        dataset.load()  # Kedro wraps the PacsError, keeping its message
    message = str(error.value)
    assert pacs.dicomweb_url in message and "HTTP 401" in message
    assert "wrong-password" not in message and "ACC77123" not in message
    assert "wrong-password" not in repr(server)
    with pytest.raises(DatasetError, match="no instance matches 1 accession number"):
        DicomWebDataset(path=str(tmp_path), query=query, credentials={
            "url": pacs.dicomweb_url, "username": USER, "password": PASSWORD}).load()
    with pytest.raises(PacsError, match="would fetch the whole archive"):
        PacsQuery.from_dict({"modalities": ["CR"]})
    with pytest.raises(DatasetError, match="belong in conf/local/credentials.yml"):
        PacsServerDataset(server={"password": "x"}).load()


def test_secondary_capture_draws_the_boxes_within_half_a_pixel():
    source = hospital_file(4)
    boxes = [[100.3, 200.6, 300.2, 250.4], [500.5, 480.49, 99.7, 80.2], [0.2, 3.0, 40.0, 30.0]]
    sr = report_bytes(source, "source", boxes, [0.91, 0.42, 0.3], 0.93, "model-v1")
    findings = findings_from_sr(sr, "sr")
    overlay = secondary_capture(source, "source", findings)
    assert secondary_capture(source, "source", findings) == overlay  # same SR, same bytes
    sc, original = pydicom.dcmread(io.BytesIO(overlay)), uids(source)
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES" and "NOT FOR PRIMARY DIAGNOSIS" in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert sc.StudyInstanceUID == original.StudyInstanceUID
    assert sc.PatientID == original.PatientID  # to file with the study
    assert (sc.Rows, sc.Columns) == (original.Rows, original.Columns)

    pixels = sc.pixel_array
    yellow = np.all(pixels == BOX_COLOUR, axis=2)
    expected = np.zeros_like(yellow)
    t = line_thickness(sc.Rows, sc.Columns)
    for x, y, width, height in boxes:
        # An independent rounding: each drawn edge within half a pixel of the float edge.
        x0, y0 = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        x1, y1 = int(np.floor(x + width + 0.5)), int(np.floor(y + height + 0.5))
        assert abs(x0 - x) <= 0.5 and abs(x1 - (x + width)) <= 0.5
        assert abs(y0 - y) <= 0.5 and abs(y1 - (y + height)) <= 0.5
        region = np.zeros_like(yellow)
        region[y0:y1, x0:x1] = True
        region[y0 + t:y1 - t, x0 + t:x1 - t] = False
        expected |= region
    np.testing.assert_array_equal(yellow, expected)


@pytest.mark.parametrize("protocol", ["stow_rs", "c_store"])
def test_delivery_is_idempotent_one_copy_in_the_pacs(pacs, protocol):
    source = hospital_file(5)
    pacs.upload(source)
    sr = report_bytes(source, "source", [[10.0, 20.0, 30.0, 40.0]], [0.8], 0.9, "model-v1")
    overlay = secondary_capture(source, "source", findings_from_sr(sr, "sr"))
    objects = [Outgoing("img", "structured_report", lambda: sr),
               Outgoing("img", "secondary_capture", lambda: overlay)]
    server = server_of(pacs)
    name = server.name(protocol)
    first = deliver(objects, sender(server, protocol), name, protocol, {})
    assert (first["stored"], first["complete"]) == (2, True)
    again = deliver(objects, sender(server, protocol), name, protocol, first)
    assert (again["stored"], again["already_delivered"]) == (0, 2)
    # Without the record the objects go again; the derived UIDs leave one copy in the PACS.
    blind = deliver(objects, sender(server, protocol), name, protocol, {})
    assert blind["stored"] == 2
    study = pacs.find("Study", {"StudyInstanceUID": uids(source).StudyInstanceUID})
    assert len(study) == 1
    instances = pacs.find("Instance", {"StudyInstanceUID": uids(source).StudyInstanceUID})
    assert len(instances) == 3  # the radiograph, its SR and its overlay, once each
    stored_sr = next(i for i in instances if i["MainDicomTags"]["SOPInstanceUID"]
                     == uids(sr).SOPInstanceUID)
    # The SR read back equals the file sent (a C-STORE receiver writes its own file meta).
    assert pydicom.dcmread(io.BytesIO(pacs.file(stored_sr["ID"]))) == pydicom.dcmread(
        io.BytesIO(sr))
    text = str(first) + str(again)
    assert all(value not in text for value in IDENTITY.values())


def test_a_wrong_password_stops_the_delivery_with_a_clear_error(pacs):
    source = hospital_file(6)
    sr = report_bytes(source, "source", [], [], None, "model-v1")
    objects = [Outgoing(f"img{i}", "structured_report", lambda: sr) for i in range(3)]
    server = server_of(pacs, password="wrong-password")
    report = deliver(objects, sender(server, "stow_rs"), server.dicomweb_name, "stow_rs", {})
    assert (report["failed"], report["not_sent"], report["complete"]) == (1, 2, False)
    with pytest.raises(PacsError) as error:
        raise_if_incomplete(report)
    message = str(error.value)
    assert pacs.dicomweb_url in message and "refused the credentials" in message
    assert uids(sr).SOPInstanceUID in message and "wrong-password" not in message
    assert "kedro run --pipelines deliver" in message


def test_a_silent_server_times_out_naming_server_and_object():
    """A real socket that accepts connections and never answers (a hung PACS)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    port = listener.getsockname()[1]
    sr = report_bytes(one_demo_file(7), "source", [], [], None, "model-v1")
    server = PacsServer(dicomweb_url=f"http://127.0.0.1:{port}/dicom-web", timeout=1.0)
    try:
        answer = sender(server, "stow_rs").send(uids(sr), "structured_report 1.2.3")
    finally:
        listener.close()
    assert answer.fatal and not answer.stored
    assert answer.answer == (f"DICOMweb server http://127.0.0.1:{port}/dicom-web did not "
                             "answer within 1.0 s while storing structured_report 1.2.3")


def test_pacs_server_comes_from_credentials_or_environment(monkeypatch):
    monkeypatch.setenv("PACS_DICOMWEB_URL", "https://pacs.example.org/dicom-web")
    monkeypatch.setenv("PACS_PASSWORD", "from-env")
    server = PacsServerDataset(server={"timeout": 5, "verify": "/etc/ssl/ca.pem"},
                               credentials={"username": "radiology"}).load()
    assert server.dicomweb_url == "https://pacs.example.org/dicom-web"
    assert (server.username, server.password, server.timeout) == ("radiology", "from-env", 5)
    assert server.verify == "/etc/ssl/ca.pem"
    assert "from-env" not in repr(server)
    assert not PacsServer().configured("stow_rs") and not PacsServer().configured("c_store")


def test_the_pacs_is_queried_once_per_run_and_leftovers_are_not_images(pacs, tmp_path):
    first = hospital_file(21)
    pacs.upload(first)
    study, sop = uids(first).StudyInstanceUID, uids(first).SOPInstanceUID
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    # A retrieval killed mid-write (its process, a pid above Linux's pid_max, is gone).
    leftover = incoming / f"{sop}.dcm.partial-4194305"
    leftover.write_bytes(b"half a file")
    dataset = DicomWebDataset(path=str(incoming), query={"study_instance_uids": [study]},
                              credentials={"url": pacs.dicomweb_url, "username": USER,
                                           "password": PASSWORD})
    folder = dataset.load()
    assert (folder.patient_ids, folder.rejected) == ([sop], {})
    assert not leftover.exists()
    assert connections_to(pacs.http_port) == 0  # the client's session is closed
    # An image arriving in the study mid-run: the run's nodes still see one image set.
    pacs.upload(hospital_file(22, StudyInstanceUID=study))
    assert dataset.load().patient_ids == [sop]
    dataset.release()  # after the run's last use: the next run queries again
    assert len(dataset.load()) == 2


@pytest.mark.parametrize("protocol", ["stow_rs", "c_store"])
def test_an_unreadable_object_fails_by_name_and_the_others_arrive(pacs, protocol, tmp_path):
    source = hospital_file(23)
    pacs.upload(source)
    sr = report_bytes(source, "source", [[10.0, 20.0, 30.0, 40.0]], [0.8], 0.9, "model-v1")
    overlay = secondary_capture(source, "source", findings_from_sr(sr, "sr"))
    deleted = tmp_path / "deleted.dcm"  # listed, then gone before it was sent
    objects = [Outgoing("img1", "structured_report", lambda: sr),
               Outgoing("img2", "secondary_capture", lambda: b"not a DICOM file"),
               Outgoing("img3", "structured_report", deleted.read_bytes),
               Outgoing("img4", "structured_report", lambda: sr[:200]),  # truncated
               Outgoing("img1", "secondary_capture", lambda: overlay)]
    server = server_of(pacs)
    report = deliver(objects, sender(server, protocol), server.name(protocol), protocol, {})
    assert (report["stored"], report["failed"], report["not_sent"]) == (2, 3, 0)
    failed = [e for e in report["deliveries"] if e["status"] == "failed"]
    for entry in failed:
        assert entry["answer"].startswith(f"{entry['kind']} of image {entry['image']} cannot "
                                          "be read (")
    assert [e["image"] for e in failed] == ["img2", "img3", "img4"]
    study = uids(source).StudyInstanceUID
    assert len(pacs.find("Instance", {"StudyInstanceUID": study})) == 3
    assert connections_to(pacs.http_port) == 0  # the sender's session is closed
    with pytest.raises(PacsError, match="secondary_capture of image img2 .unread") as error:
        raise_if_incomplete(report)
    assert "structured_report of image img4" in str(error.value)


@pytest.mark.parametrize("protocol", ["stow_rs", "c_store"])
def test_the_presentation_state_is_stored_with_the_study_and_draws_the_boxes(pacs, protocol):
    source = hospital_file(24)
    pacs.upload(source)
    boxes = [[100.3, 200.6, 300.2, 250.4], [500.5, 480.49, 99.7, 80.2]]
    sr = report_bytes(source, "source", boxes, [0.91, 0.42], 0.93, "model-v1")
    gsps = presentation_state(source, "source", findings_from_sr(sr, "sr"))
    assert presentation_state(source, "source", findings_from_sr(sr, "sr")) == gsps
    server = server_of(pacs)
    report = deliver([Outgoing("img", "presentation_state", lambda: gsps)],
                     sender(server, protocol), server.name(protocol), protocol, {})
    assert (report["stored"], report["complete"]) == (1, True)
    original = uids(source)
    found = pacs.find("Instance", {"StudyInstanceUID": original.StudyInstanceUID})
    assert len(found) == 2  # the radiograph and its presentation state
    stored = next(i for i in found if i["MainDicomTags"]["SOPInstanceUID"] == uids(gsps)
                  .SOPInstanceUID)
    ps = pydicom.dcmread(io.BytesIO(pacs.file(stored["ID"])))
    assert ps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and ps.Modality == "PR"
    assert "NOT FOR PRIMARY DIAGNOSIS" in ps.SeriesDescription
    assert ps.PatientID == original.PatientID  # to file with the study
    referenced = ps.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == original.SeriesInstanceUID
    assert referenced.ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        original.SOPInstanceUID
    annotation = ps.GraphicAnnotationSequence[0]
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        original.SOPInstanceUID
    drawn = [np.asarray(g.GraphicData, dtype=float).reshape(-1, 2)
             for g in annotation.GraphicObjectSequence]
    assert all(g.GraphicType == "POLYLINE" for g in annotation.GraphicObjectSequence)
    for points, (x, y, width, height) in zip(drawn, boxes, strict=True):
        np.testing.assert_allclose(points.min(axis=0), [x, y], atol=1e-4)
        np.testing.assert_allclose(points.max(axis=0), [x + width, y + height], atol=1e-4)
        np.testing.assert_allclose(points[0], points[-1])  # closed
    texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
    assert {"0.91", "0.42", "opacity probability 0.93"} <= set(texts)
    assert "AI RESULT - NOT FOR PRIMARY DIAGNOSIS" in texts
