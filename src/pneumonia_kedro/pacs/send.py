"""Sending DICOM objects to a PACS: STOW-RS (dicomweb-client) or C-STORE (pynetdicom).

Each send gives an ``Answer``: stored or not, the server's answer in words, and whether the
failure concerns the server (down, slow, wrong login: stop, the rest would fail the same way)
or only this object (refused: go on with the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from pneumonia_kedro.pacs.server import (
    PacsError,
    PacsServer,
    dicomweb_client,
    http_failure,
    http_session,
    is_fatal,
    tls_context,
)

PROTOCOLS = ("stow_rs", "c_store")
SOP_CLASSES = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage,
               GrayscaleSoftcopyPresentationStateStorage)
# C-STORE statuses that still mean "stored" (PS3.4 B.2.3: coercion, elements discarded).
_STORED_WITH_WARNING = {0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Answer:
    stored: bool
    answer: str
    fatal: bool = False


class Sender(Protocol):
    def send(self, dataset: pydicom.Dataset, what: str) -> Answer: ...

    def close(self) -> None: ...


class StowSender:
    """STOW-RS: one request per object, so the answer is that object's."""

    def __init__(self, server: PacsServer) -> None:
        self.server = server
        self.session = http_session(server)  # ours: closed by close()
        self.client = dicomweb_client(server, self.session)

    def send(self, dataset: pydicom.Dataset, what: str) -> Answer:
        try:
            response = self.client.store_instances([dataset],
                                                   study_instance_uid=dataset.StudyInstanceUID)
        except Exception as exc:
            return Answer(False, str(http_failure(self.server, f"storing {what}", exc)),
                          fatal=is_fatal(exc))
        failed = [item for item in response.get("FailedSOPSequence", [])
                  if item.get("ReferencedSOPInstanceUID") == dataset.SOPInstanceUID]
        if failed:
            reason = failed[0].get("FailureReason")
            return Answer(False, f"refused by {self.server.dicomweb_name}: FailureReason "
                                 f"0x{int(reason or 0):04X}")
        stored = [item for item in response.get("ReferencedSOPSequence", [])
                  if item.get("ReferencedSOPInstanceUID") == dataset.SOPInstanceUID]
        if not stored:
            return Answer(False, f"{self.server.dicomweb_name} did not confirm the object")
        warning = stored[0].get("WarningReason")
        return Answer(True, "stored (STOW-RS)" + (f", WarningReason 0x{int(warning):04X}"
                                                  if warning is not None else ""))

    def close(self) -> None:
        self.session.close()


class CStoreSender:
    """C-STORE over one association, opened on the first object."""

    def __init__(self, server: PacsServer) -> None:
        if not server.dimse_host:
            raise PacsError("no DIMSE host configured: set dimse_host in "
                            "conf/local/credentials.yml or PACS_DIMSE_HOST")
        self.server = server
        self.association = None

    def _associate(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.server.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.server.timeout
        ae.connection_timeout = self.server.timeout
        for sop_class in SOP_CLASSES:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls = (tls_context(self.server), self.server.dimse_host) if self.server.dimse_tls \
            else None
        return ae.associate(self.server.dimse_host, self.server.dimse_port,
                            ae_title=self.server.called_ae, tls_args=tls)

    def send(self, dataset: pydicom.Dataset, what: str) -> Answer:
        name = self.server.dimse_name
        if self.association is None or not self.association.is_established:
            self.association = self._associate()
            if not self.association.is_established:
                state = "rejected the association" if self.association.is_rejected else \
                    "cannot be reached (no association: is it running, are host, port and AE " \
                    "titles right?)"
                return Answer(False, f"DICOM node {name} {state} while storing {what}",
                              fatal=True)
        try:
            status = self.association.send_c_store(dataset)
        except Exception as exc:  # pynetdicom raises on a context the server did not accept
            return Answer(False, f"DICOM node {name}: storing {what} failed "
                                 f"({type(exc).__name__}: {exc})")
        if not status or "Status" not in status:
            return Answer(False, f"DICOM node {name} closed the connection or did not answer "
                                 f"within {self.server.timeout} s while storing {what}",
                          fatal=True)
        code = int(status.Status)
        if code == 0 or code in _STORED_WITH_WARNING:
            return Answer(True, "stored (C-STORE)" + (f", warning 0x{code:04X}" if code else ""))
        comment = status.get("ErrorComment", "")
        return Answer(False, f"refused by {name}: C-STORE status 0x{code:04X}"
                             + (f" ({comment})" if comment else ""))

    def close(self) -> None:
        if self.association is not None and self.association.is_established:
            self.association.release()


def sender(server: PacsServer, protocol: str) -> Sender:
    if protocol == "stow_rs":
        return StowSender(server)
    if protocol == "c_store":
        return CStoreSender(server)
    raise PacsError(f"unknown delivery protocol {protocol!r}; use one of {list(PROTOCOLS)}")
