"""``DicomFolderDataset``: a folder of ``<patientId>.dcm`` files as one catalog entry."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import fsspec
from kedro.io import AbstractDataset, DatasetError

from pneumonia_kedro.datasets.raw_data import refuse_if_read_only
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.labels import is_safe_patient_id


class DicomFolderDataset(AbstractDataset[Mapping[str, bytes], DicomFolder]):
    """Loads a lazy, picklable ``DicomFolder`` (file index only; bytes are read on demand).

    Saving takes a mapping of patientId to file bytes and writes each file atomically
    (temporary name, then rename), so an interrupted save never leaves a half-written ``.dcm``.
    A generator node saves its chunks one after another; each adds its files. With
    ``overwrite: true`` (outputs such as structured reports, never raw data) the first save of
    a run removes the folder's earlier ``.dcm`` files, so it holds exactly what this run wrote.

    Example catalog entry::

        train_dicoms:
          type: pneumonia_kedro.datasets.DicomFolderDataset
          path: data/01_raw/rsna-pneumonia-detection-challenge/stage_2_train_images
    """

    def __init__(
        self,
        *,
        path: str,
        suffix: str = ".dcm",
        overwrite: bool = False,
        read_only: bool = False,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = str(path)
        self._suffix = suffix
        self._overwrite = overwrite
        self._storage_options = {**(credentials or {}), **(fs_args or {})}
        self.metadata = metadata
        self._read_only = read_only
        self._cleared = False  # by this run's first save (a run uses one instance)

    def load(self) -> DicomFolder:
        return DicomFolder.scan(self._path, self._suffix, self._storage_options)

    def save(self, data: Mapping[str, bytes]) -> None:
        refuse_if_read_only(self._read_only, self._path)
        fs, root = fsspec.core.url_to_fs(self._path, **self._storage_options)
        fs.makedirs(root, exist_ok=True)
        if self._overwrite and not self._cleared:
            for stale in fs.glob(f"{root}/*{self._suffix}"):
                fs.rm(stale)
            self._cleared = True
        for patient_id, content in data.items():
            if not is_safe_patient_id(patient_id):
                raise DatasetError(f"{self._path}: refusing to write unsafe patientId "
                                   f"{patient_id!r}")
            target = f"{root}/{patient_id}{self._suffix}"
            partial = f"{target}.partial-{os.getpid()}"
            with fs.open(partial, "wb") as handle:
                handle.write(content)
            fs.mv(partial, target)

    def _exists(self) -> bool:
        fs, root = fsspec.core.url_to_fs(self._path, **self._storage_options)
        return bool(fs.exists(root) and fs.glob(f"{root}/*{self._suffix}"))

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "suffix": self._suffix, "overwrite": self._overwrite,
                "read_only": self._read_only}
