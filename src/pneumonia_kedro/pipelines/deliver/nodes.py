"""Nodes of the deliver pipeline: results into the PACS, where radiologists look."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

from pneumonia_kedro.config import from_params
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.dicom.folder import FolderChunk, folder_chunks
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.pacs.delivery import Outgoing, deliver, raise_if_incomplete
from pneumonia_kedro.pacs.overlay import Findings, findings_from_sr, secondary_capture
from pneumonia_kedro.pacs.presentation_state import presentation_state
from pneumonia_kedro.pacs.send import sender
from pneumonia_kedro.pacs.server import PacsError, PacsServer

logger = logging.getLogger(__name__)

OVERLAY_CHUNK = 64  # overlays held in memory before the dataset writes them


@dataclass(frozen=True)
class DeliverConfig:
    """What goes to the PACS, and how."""

    protocol: Literal["stow_rs", "c_store"] = "stow_rs"  # DICOMweb STOW-RS | DIMSE C-STORE
    structured_report: bool = True  # the TID 1500 SR (a record: few viewers draw its boxes)
    secondary_capture: bool = True  # the overlay every viewer shows (derived image)
    presentation_state: bool = False  # the boxes as a GSPS, for viewers that draw one


def _config(params: dict) -> DeliverConfig:
    return from_params(DeliverConfig, params, "deliver")


def build_secondary_captures(structured_reports: DicomFolder, test_dicoms: DicomFolder,
                             params: dict) -> Iterator[FolderChunk]:
    """One derived Secondary Capture per SR (its boxes and scores burned into the source
    image), yielded in chunks that the dataset writes aside and puts in place together with
    the last one (with overlays off, that is one empty chunk). An SR or source image that
    cannot be read gets no overlay and a warning naming the image; the delivery reports it
    failed."""
    if not _config(params).secondary_capture:
        yield FolderChunk(last=True)
        return
    missing = [pid for pid in structured_reports.patient_ids if pid not in test_dicoms]
    if missing:
        raise DicomError(f"{len(missing)} structured report(s) without their source image in "
                         f"test_dicoms ({test_dicoms.root}), e.g. {missing[0]}: run inference "
                         "on the same images first")

    def overlay_or_skip(patient_id: str) -> bytes | None:
        try:
            return _secondary_capture(structured_reports, test_dicoms, patient_id)
        except (DicomError, OSError) as exc:
            logger.warning("no overlay for image %s: %s", patient_id, exc)
            return None

    # The last chunk is marked: the folder becomes this run's overlays, whole.
    yield from folder_chunks(structured_reports.patient_ids, overlay_or_skip, OVERLAY_CHUNK)


def _findings(structured_reports: DicomFolder, patient_id: str) -> Findings:
    return findings_from_sr(structured_reports.read_bytes(patient_id),
                            structured_reports.display_name(patient_id))


def _secondary_capture(structured_reports: DicomFolder, test_dicoms: DicomFolder,
                       patient_id: str) -> bytes:
    return secondary_capture(test_dicoms.read_bytes(patient_id),
                             test_dicoms.display_name(patient_id),
                             _findings(structured_reports, patient_id))


def _presentation_state(structured_reports: DicomFolder, test_dicoms: DicomFolder,
                        patient_id: str) -> bytes:
    return presentation_state(test_dicoms.read_bytes(patient_id),
                              test_dicoms.display_name(patient_id),
                              _findings(structured_reports, patient_id))


def _no_overlay(patient_id: str) -> bytes:
    raise DicomError(f"no overlay was built for image {patient_id}: its SR or source image "
                     "cannot be read (see the warning of build_secondary_captures)")


def _outgoing(structured_reports: DicomFolder, secondary_captures: DicomFolder,
              test_dicoms: DicomFolder, config: DeliverConfig) -> list[Outgoing]:
    """Per SR: the SR, its overlay and its GSPS, as configured. The GSPS is built here, when
    sent: it is small, and derived from the SR and the source like the overlay on disk."""
    items = []
    for pid in structured_reports.patient_ids:
        if config.structured_report:
            items.append(Outgoing(pid, "structured_report",
                                  partial(structured_reports.read_bytes, pid)))
        if config.secondary_capture:
            read = partial(secondary_captures.read_bytes, pid) if pid in secondary_captures \
                else partial(_no_overlay, pid)
            items.append(Outgoing(pid, "secondary_capture", read))
        if config.presentation_state:
            items.append(Outgoing(pid, "presentation_state", partial(
                _presentation_state, structured_reports, test_dicoms, pid)))
    # Image by image: an SR and its overlays arrive together.
    return sorted(items, key=lambda item: item.image)


def deliver_results(structured_reports: DicomFolder, secondary_captures: DicomFolder,
                    test_dicoms: DicomFolder, pacs_server: PacsServer,
                    previous_delivery_report: dict, params: dict) -> dict:
    """Send what the PACS does not have yet (per the last report); the delivery report."""
    config = _config(params)
    objects = _outgoing(structured_reports, secondary_captures, test_dicoms, config)
    server_name = pacs_server.name(config.protocol)
    if not objects:
        logger.info("nothing to deliver: no structured reports (inference.dicom_sr: true "
                    "writes them)")
        return {"server": server_name, "protocol": config.protocol, "objects": 0,
                "complete": True, "deliveries": []}
    if not pacs_server.configured(config.protocol):
        raise PacsError(f"{len(objects)} object(s) to deliver but no PACS configured for "
                        f"{config.protocol}: see 'Hospital DICOMs and PACS' in the README")
    return deliver(objects, sender(pacs_server, config.protocol), server_name,
                   config.protocol, previous_delivery_report)


def check_delivery(delivery_report: dict) -> None:
    """Fail the run, naming the server and the objects, when anything did not arrive."""
    raise_if_incomplete(delivery_report)
