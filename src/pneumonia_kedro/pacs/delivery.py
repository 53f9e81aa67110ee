"""Delivery bookkeeping: send what the PACS does not have yet, record every answer.

The record is the last delivery report. An object it lists as stored on the same server (by
SOP Instance UID: the UIDs are derived from the source image and the model, so a rerun makes
the same ones) is not sent again; everything else is. A server-level failure (down, slow,
wrong login) stops the delivery and marks the rest ``not_sent``; an object the server refuses
is ``failed`` and the others go on, and so is an object that cannot be read (a missing or
corrupt file: the entry names its kind and image). Either way the report is written, the files
stay on disk, and the next delivery sends exactly what is missing. The report names images by
file name and objects by UID, never a patient.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError

from pneumonia_kedro.errors import PneumoniaKedroError
from pneumonia_kedro.pacs.send import Sender
from pneumonia_kedro.pacs.server import PacsError

logger = logging.getLogger(__name__)

DELIVERED = ("stored", "already_delivered")
_LISTED = 10  # failures named in the error message


@dataclass(frozen=True)
class Outgoing:
    """One object to deliver: the image it belongs to, its kind (``structured_report``,
    ``secondary_capture`` or ``presentation_state``) and its bytes, read when it is sent."""

    image: str
    kind: str
    read: Callable[[], bytes]


_UIDS = ("sop_instance_uid", "study_instance_uid", "series_instance_uid")


def _read(item: Outgoing) -> tuple[pydicom.Dataset | None, dict[str, str]]:
    """The object and its UIDs, or ``None`` and a ``failed`` entry naming kind and image."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(item.read()))
        uids = dict(zip(_UIDS, (str(dataset.SOPInstanceUID), str(dataset.StudyInstanceUID),
                                str(dataset.SeriesInstanceUID)), strict=True))
    except Exception as exc:  # pydicom's errors name no file: say which object it was
        # Only messages that cannot quote a value (a name, a birth date) from the file.
        readable = (OSError, InvalidDicomError, AttributeError, PneumoniaKedroError)
        detail = f": {exc}" if isinstance(exc, readable) else ""
        reason = f"{item.kind} of image {item.image} cannot be read ({type(exc).__name__}{detail})"
        logger.error("%s", reason)
        return None, {**dict.fromkeys(_UIDS, ""), "status": "failed", "answer": reason}
    return dataset, uids


def delivered_before(record: dict, server_name: str) -> dict[str, dict]:
    """The objects the last report says this server stored, by SOP Instance UID."""
    if not record or record.get("server") != server_name:
        return {}  # another PACS (or none yet): it has nothing of ours
    return {entry["sop_instance_uid"]: entry for entry in record.get("deliveries", [])
            if entry.get("status") in DELIVERED and entry.get("sop_instance_uid")}


def deliver(objects: Iterable[Outgoing], send: Sender, server_name: str, protocol: str,
            record: dict) -> dict:
    """Send each object the record does not list as stored; the delivery report."""
    earlier = delivered_before(record, server_name)
    entries: list[dict] = []
    stop_reason = None
    try:
        for item in objects:
            dataset, entry = _read(item)
            entry = {"image": item.image, "kind": item.kind, **entry}
            if dataset is None:
                pass  # unreadable: failed, the others go on
            elif entry["sop_instance_uid"] in earlier:
                entry.update(status="already_delivered",
                             answer=earlier[entry["sop_instance_uid"]].get("answer", ""))
            elif stop_reason is not None:
                entry.update(status="not_sent", answer=stop_reason)
            else:
                answer = send.send(dataset, f"{item.kind} {entry['sop_instance_uid']} (image "
                                            f"{item.image}, study {entry['study_instance_uid']})")
                entry.update(status="stored" if answer.stored else "failed",
                             answer=answer.answer)
                if answer.fatal:
                    stop_reason = f"not sent: delivery stopped after {answer.answer}"
                    logger.error("%s", answer.answer)
            entries.append(entry)
    finally:
        send.close()
    counts = {status: sum(e["status"] == status for e in entries)
              for status in ("stored", "already_delivered", "failed", "not_sent")}
    report = {"server": server_name, "protocol": protocol, "objects": len(entries), **counts,
              "complete": counts["failed"] + counts["not_sent"] == 0, "deliveries": entries}
    logger.info("delivery to %s (%s): %d stored now, %d already there, %d failed, %d not sent",
                server_name, protocol, counts["stored"], counts["already_delivered"],
                counts["failed"], counts["not_sent"])
    return report


def raise_if_incomplete(report: dict) -> None:
    """A ``PacsError`` naming the server and the objects that did not arrive."""
    if report.get("complete", True):
        return
    missing = [e for e in report["deliveries"] if e["status"] not in DELIVERED]
    lines = [f"  {e['kind']} of image {e['image']} ({e['sop_instance_uid'] or 'unread'}, study "
             f"{e['study_instance_uid'] or 'unknown'}): {e['status']}: {e['answer']}"
             for e in missing[:_LISTED]]
    if len(missing) > _LISTED:
        lines.append(f"  ... and {len(missing) - _LISTED} more")
    raise PacsError(
        f"delivery to {report['server']} ({report['protocol']}) is incomplete: "
        f"{len(missing)} of {report['objects']} object(s) did not arrive:\n" + "\n".join(lines)
        + "\nThe results stay on disk and the delivery report lists what arrived: "
        "`kedro run --pipelines deliver` sends exactly what is missing.")
