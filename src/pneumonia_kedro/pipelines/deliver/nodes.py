"""Nodes of the deliver pipeline: results into the PACS, where radiologists look."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from pneumonia_kedro.config import from_params
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.pacs.delivery import Outgoing, deliver, raise_if_incomplete
from pneumonia_kedro.pacs.overlay import findings_from_sr, secondary_capture
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


def _config(params: dict) -> DeliverConfig:
    return from_params(DeliverConfig, params, "deliver")


def build_secondary_captures(structured_reports: DicomFolder, test_dicoms: DicomFolder,
                             params: dict) -> Iterator[dict[str, bytes]]:
    """One derived Secondary Capture per SR (its boxes and scores burned into the source
    image), yielded in chunks that the dataset writes as they come (the first clears the
    folder; with overlays off, one empty chunk does)."""
    if not _config(params).secondary_capture:
        yield {}
        return
    missing = [pid for pid in structured_reports.patient_ids if pid not in test_dicoms]
    if missing:
        raise DicomError(f"{len(missing)} structured report(s) without their source image in "
                         f"test_dicoms ({test_dicoms.root}), e.g. {missing[0]}: run inference "
                         "on the same images first")
    chunk: dict[str, bytes] = {}
    for patient_id in structured_reports.patient_ids:
        findings = findings_from_sr(structured_reports.read_bytes(patient_id),
                                    structured_reports.display_name(patient_id))
        chunk[patient_id] = secondary_capture(test_dicoms.read_bytes(patient_id),
                                              test_dicoms.display_name(patient_id), findings)
        if len(chunk) == OVERLAY_CHUNK:
            yield chunk
            chunk = {}
    if chunk or not structured_reports.patient_ids:
        yield chunk


def _outgoing(structured_reports: DicomFolder, secondary_captures: DicomFolder,
              config: DeliverConfig) -> list[Outgoing]:
    folders = [("structured_report", structured_reports, config.structured_report),
               ("secondary_capture", secondary_captures, config.secondary_capture)]
    items = []
    for kind, folder, wanted in folders:
        if wanted:
            items += [Outgoing(pid, kind, lambda f=folder, p=pid: f.read_bytes(p))
                      for pid in folder.patient_ids]
    # Image by image: an SR and its overlay arrive together.
    return sorted(items, key=lambda item: item.image)


def deliver_results(structured_reports: DicomFolder, secondary_captures: DicomFolder,
                    pacs_server: PacsServer, previous_delivery_report: dict,
                    params: dict) -> dict:
    """Send what the PACS does not have yet (per the last report); the delivery report."""
    config = _config(params)
    objects = _outgoing(structured_reports, secondary_captures, config)
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
