"""Images from a PACS: search with QIDO-RS, retrieve with WADO-RS into a local folder.

The folder is a download cache named by SOP Instance UID (``<SOPInstanceUID>.dcm``): a UID
identifies an image, not a person, so the submission, reports and logs that name images by
their file name carry no patient identification. Files already there are not fetched again,
and each file is written under a temporary name and renamed, so an interrupted retrieval
leaves no half-written image (a killed one's ``<sop>.dcm.partial-<pid>`` is removed by the
next retrieval once that process is gone, and is never listed). The result is the same
``DicomFolder`` a plain folder gives, holding exactly the images the query found.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pydicom

from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.pacs.server import PacsError, PacsServer, dicomweb, http_failure

logger = logging.getLogger(__name__)

_UIDS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E",
         "SOPInstanceUID": "00080018"}
# Ask for the stored transfer syntax: the JPEGs the model was trained on stay JPEGs.
_AS_STORED = (("application/dicom", "*"),)
PARTIAL = ".partial-"  # <sop>.dcm.partial-<pid>: a retrieval being written


@dataclass(frozen=True)
class PacsQuery:
    """Which images to fetch. Every criterion given must match; lists match any of their values.

    Accession numbers identify a patient's examination: they are used in the query only and
    never appear in a message or log line.
    """

    study_instance_uids: tuple[str, ...] = ()
    series_instance_uids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    study_date: str | None = None  # YYYYMMDD or a range YYYYMMDD-YYYYMMDD
    modalities: tuple[str, ...] = ()  # e.g. (CR, DX); empty: any

    @classmethod
    def from_dict(cls, values: dict | None) -> PacsQuery:
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise PacsError(f"unknown PACS query key(s) {unknown}; known: {sorted(known)}")
        for key in ("study_instance_uids", "series_instance_uids", "accession_numbers",
                    "modalities"):
            value = values.get(key) or ()
            values[key] = tuple(v for v in ((value,) if isinstance(value, str) else map(str, value))
                                if v)
        if values.get("study_date") is not None:
            values["study_date"] = str(values["study_date"])
        query = cls(**values)
        if not (query.study_instance_uids or query.series_instance_uids
                or query.accession_numbers or query.study_date):
            raise PacsError("a PACS query needs a study, series, accession number or study "
                            "date: an empty query would fetch the whole archive")
        return query

    def describe(self) -> str:
        """The query for messages: UIDs and dates, accession numbers only counted."""
        parts = [f"studies {list(self.study_instance_uids)}" if self.study_instance_uids else "",
                 f"series {list(self.series_instance_uids)}" if self.series_instance_uids
                 else "",
                 f"{len(self.accession_numbers)} accession number(s)"
                 if self.accession_numbers else "",
                 f"study date {self.study_date}" if self.study_date else "",
                 f"modalities {list(self.modalities)}" if self.modalities else ""]
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str


def _uid(result: dict, keyword: str) -> str:
    values = result.get(_UIDS[keyword], {}).get("Value") or [""]
    return str(values[0])


def search(server: PacsServer, query: PacsQuery, client) -> list[Instance]:
    """Every instance matching the query (QIDO-RS at instance level), sorted, each once."""
    found: dict[str, Instance] = {}
    combos = itertools.product(query.study_instance_uids or (None,),
                               query.series_instance_uids or (None,),
                               query.accession_numbers or (None,),
                               query.modalities or (None,))
    for study, series, accession, modality in combos:
        filters = {k: v for k, v in {
            "SeriesInstanceUID": series, "AccessionNumber": accession, "Modality": modality,
            "StudyDate": query.study_date}.items() if v}
        try:
            results = client.search_for_instances(
                study_instance_uid=study, search_filters=filters, get_remaining=True,
                fields=list(_UIDS))
        except Exception as exc:
            raise http_failure(server, f"searching ({query.describe()})", exc) from None
        for result in results:
            instance = Instance(*(_uid(result, k) for k in _UIDS))
            if instance.sop:
                found[instance.sop] = instance
    return [found[sop] for sop in sorted(found)]


def retrieve(server: PacsServer, instance: Instance, client) -> bytes:
    """One instance as a DICOM file (WADO-RS), in the transfer syntax it is stored in."""
    what = f"retrieving instance {instance.sop} of study {instance.study}"
    try:
        dataset = client.retrieve_instance(instance.study, instance.series, instance.sop,
                                           media_types=_AS_STORED)
    except Exception as exc:
        raise http_failure(server, what, exc) from None
    if str(dataset.get("SOPInstanceUID", "")) != instance.sop:
        raise PacsError(f"DICOMweb server {server.dicomweb_name}: {what} returned another "
                        "instance")
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_leftovers(root: Path) -> None:
    """Delete the half-written files of retrievals whose process is gone (killed mid-write)."""
    for leftover in root.glob(f"*.dcm{PARTIAL}*"):
        if not _running(leftover.name.rsplit(PARTIAL, 1)[1]):
            leftover.unlink(missing_ok=True)


def fetch_to_folder(server: PacsServer, query: PacsQuery, folder: str | Path) -> DicomFolder:
    """Search, retrieve what the local folder lacks, and return the query's images."""
    root = Path(folder)
    with dicomweb(server) as client:
        instances = search(server, query, client)
        if not instances:
            raise PacsError(f"DICOMweb server {server.dicomweb_name}: no instance matches "
                            f"{query.describe()}")
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
        fetched = 0
        for instance in instances:
            target = root / f"{instance.sop}.dcm"
            if target.exists():
                continue
            partial = root / f"{instance.sop}.dcm{PARTIAL}{os.getpid()}"
            try:
                partial.write_bytes(retrieve(server, instance, client))
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
            fetched += 1
    logger.info("DICOMweb %s: %d instance(s) match, %d retrieved, %d already in %s",
                server.dicomweb_name, len(instances), fetched, len(instances) - fetched, root)
    scanned = DicomFolder.scan(str(root))
    wanted = {instance.sop for instance in instances}
    # Only this query's images (the cache may hold earlier queries' files), and no other
    # process's retrieval in progress.
    return DicomFolder(root=scanned.root, protocol=scanned.protocol, suffix=scanned.suffix,
                       files={k: v for k, v in scanned.files.items() if k in wanted},
                       rejected={k: v for k, v in scanned.rejected.items()
                                 if k.split(".dcm")[0] in wanted and PARTIAL not in k})
