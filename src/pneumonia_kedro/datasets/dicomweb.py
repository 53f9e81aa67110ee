"""A PACS in the catalog: its images (QIDO-RS + WADO-RS), its address, and the delivery record.

The server's URL, user and password come from the entry's ``credentials`` (in
``conf/local/credentials.yml``) or from the environment (``PACS_DICOMWEB_URL``,
``PACS_USERNAME``, ``PACS_PASSWORD``, ``PACS_DIMSE_HOST``, ``PACS_DIMSE_PORT``,
``PACS_CALLED_AE``), never from ``conf/base``. Nothing here logs or describes the password.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.pacs.server import PacsServer
from pneumonia_kedro.pacs.source import PacsQuery, fetch_to_folder

ENVIRONMENT = {"dicomweb_url": "PACS_DICOMWEB_URL", "username": "PACS_USERNAME",
               "password": "PACS_PASSWORD", "dimse_host": "PACS_DIMSE_HOST",
               "dimse_port": "PACS_DIMSE_PORT", "called_ae": "PACS_CALLED_AE"}
# Settings that may sit in the catalog (not secret, not an address).
CATALOG_KEYS = {"verify", "client_cert", "timeout", "dimse_port", "called_ae", "calling_ae",
                "dimse_tls"}


def resolve_server(server: dict[str, Any] | None, credentials: dict[str, Any] | None
                   ) -> PacsServer:
    """A ``PacsServer`` from the catalog's settings, the credentials, then the environment."""
    settings = dict(server or {})
    misplaced = sorted(set(settings) - CATALOG_KEYS)
    if misplaced:
        raise DatasetError(f"PACS setting(s) {misplaced} belong in conf/local/credentials.yml "
                           "or the environment, not the catalog (catalog keys: "
                           f"{sorted(CATALOG_KEYS)})")
    given = {("dicomweb_url" if k == "url" else k): v for k, v in (credentials or {}).items()}
    unknown = sorted(set(given) - set(PacsServer.__dataclass_fields__))
    if unknown:
        raise DatasetError(f"unknown PACS credential key(s) {unknown}")
    values = {**settings, **given}
    for key, variable in ENVIRONMENT.items():
        if values.get(key) in (None, "") and os.environ.get(variable):
            values[key] = os.environ[variable]
    if "dimse_port" in values:
        values["dimse_port"] = int(values["dimse_port"])
    return PacsServer(**values)


class PacsServerDataset(AbstractDataset[None, PacsServer]):
    """Loads the ``PacsServer`` the deliver pipeline sends to (read-only).

    Example catalog entry (the address and login in conf/local/credentials.yml)::

        pacs_server:
          type: pneumonia_kedro.datasets.PacsServerDataset
          credentials: pacs
          server: {timeout: 30, calling_ae: PNEUMONIA}
    """

    def __init__(self, *, server: dict[str, Any] | None = None,
                 credentials: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._server = server
        self._credentials = credentials
        self.metadata = metadata

    def load(self) -> PacsServer:
        return resolve_server(self._server, self._credentials)

    def save(self, data: None) -> None:
        raise DatasetError("PacsServerDataset is read-only: it describes a server")

    def _describe(self) -> dict[str, Any]:
        return {"settings": self._server}


class DicomWebDataset(AbstractDataset[None, DicomFolder]):
    """Loads the images a QIDO-RS query finds, retrieved by WADO-RS into ``path`` (a cache),
    as the same ``DicomFolder`` a ``DicomFolderDataset`` gives: swap it for ``test_dicoms``
    and the inference pipeline reads from the PACS.

    The query runs once per dataset instance (Kedro makes one per run) and every later load
    gets the same images, so the nodes of one run see one image set even if the PACS changes
    meanwhile; ``release()`` (after the run's last use) forgets it.

    Example catalog entry::

        test_dicoms:
          type: pneumonia_kedro.datasets.DicomWebDataset
          path: data/01_raw/pacs_incoming
          query: {study_instance_uids: [1.2.3...], modalities: [CR, DX]}
          credentials: pacs
    """

    def __init__(self, *, path: str, query: dict[str, Any],
                 server: dict[str, Any] | None = None,
                 credentials: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._path = str(path)
        self._query = PacsQuery.from_dict(query)
        self._server = server
        self._credentials = credentials
        self.metadata = metadata
        self._found: DicomFolder | None = None

    def load(self) -> DicomFolder:
        if self._found is None:
            self._found = fetch_to_folder(resolve_server(self._server, self._credentials),
                                          self._query, self._path)
        return self._found

    def _release(self) -> None:
        super()._release()
        self._found = None

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._path}: DicomWebDataset is read-only (deliver results with "
                           "the deliver pipeline)")

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "query": self._query.describe()}


class DeliveryRecordDataset(AbstractDataset[dict, dict]):
    """The last delivery report, read back to know what the PACS already has; an empty
    record when there was none (the first delivery)."""

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> dict:
        if not self._filepath.exists():
            return {}
        try:
            return json.loads(self._filepath.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DatasetError(f"{self._filepath}: not a delivery report ({exc}); delete it to "
                               "deliver everything again") from None

    def save(self, data: dict) -> None:
        raise DatasetError(f"{self._filepath}: read-only here; delivery_report writes it")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
