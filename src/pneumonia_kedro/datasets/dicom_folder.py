"""``DicomFolderDataset``: a folder of ``<patientId>.dcm`` files as one catalog entry."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io import AbstractDataset, DatasetError

from pneumonia_kedro.datasets.raw_data import refuse_if_read_only
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.dicom.folder import FolderChunk
from pneumonia_kedro.labels import is_safe_patient_id


class DicomFolderDataset(AbstractDataset[Mapping[str, bytes], DicomFolder]):
    """Loads a lazy, picklable ``DicomFolder`` (file index only; bytes are read on demand).

    Saving takes a mapping of patientId to file bytes and writes each file atomically
    (temporary name, then rename), so an interrupted save never leaves a half-written ``.dcm``.
    A generator node saves its chunks one after another; each adds its files.

    With ``overwrite: true`` (outputs such as structured reports; raw data only where a
    generator writes it, the demo's; ``read_only`` refuses a save before it touches a file)
    the folder holds one run's files, all of them or none: the run's ``FolderChunk`` s are
    written aside, into ``.<name>.partial-<pid>-<id>`` beside the folder, and the save of the
    chunk marked ``last`` swaps that folder in for the old one. A run that stops before (an
    error, Ctrl-C) leaves the earlier run's files as they were; the next run removes its
    leftover. The one state kept between saves is the folder being written (``None``: no run
    is writing).
    Plain mappings (producers that do not mark their last chunk) are written into the folder
    itself, which the run's first save clears. ``mlflow_artifact_path`` logs the folder to the
    active MLflow run once, when a run's set is in place.

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
        mlflow_artifact_path: str | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = str(path)
        self._suffix = suffix
        self._overwrite = overwrite
        self._mlflow_artifact_path = mlflow_artifact_path
        self._storage_options = {**(credentials or {}), **(fs_args or {})}
        self.metadata = metadata
        self._read_only = read_only
        self._writing: str | None = None  # the folder this run's files go to (overwrite)

    def load(self) -> DicomFolder:
        return DicomFolder.scan(self._path, self._suffix, self._storage_options)

    def save(self, data: Mapping[str, bytes]) -> None:
        refuse_if_read_only(self._read_only, self._path)
        fs, root = fsspec.core.url_to_fs(self._path, **self._storage_options)
        if not self._overwrite:
            fs.makedirs(root, exist_ok=True)
            self._write(fs, root, data)
            return
        if self._writing is None:
            self._writing = self._begin(fs, root, staged=isinstance(data, FolderChunk))
        self._write(fs, self._writing, data)
        if isinstance(data, FolderChunk) and data.last:
            staged, self._writing = self._writing, None
            _swap(fs, staged, root)
            self._log_to_mlflow(root)

    def _begin(self, fs: fsspec.AbstractFileSystem, root: str, staged: bool) -> str:
        """The folder a run's first save writes into: a fresh one beside ``root`` for marked
        chunks, else ``root`` itself, emptied of earlier ``.dcm`` files."""
        parent, name = str(PurePosixPath(root).parent), PurePosixPath(root).name
        _remove_leftovers(fs, parent, name)
        if staged:
            folder = f"{parent}/.{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            fs.makedirs(folder, exist_ok=False)
            return folder
        fs.makedirs(root, exist_ok=True)
        for stale in fs.glob(f"{root}/*{self._suffix}"):
            fs.rm(stale)
        return root

    def _write(self, fs: fsspec.AbstractFileSystem, folder: str, data: Mapping[str, bytes]
               ) -> None:
        for patient_id, content in data.items():
            if not is_safe_patient_id(patient_id):
                raise DatasetError(f"{self._path}: refusing to write unsafe patientId "
                                   f"{patient_id!r}")
            target = f"{folder}/{patient_id}{self._suffix}"
            partial = f"{target}.partial-{os.getpid()}"
            with fs.open(partial, "wb") as handle:
                handle.write(content)
            fs.mv(partial, target)

    def _log_to_mlflow(self, root: str) -> None:
        if self._mlflow_artifact_path is None:
            return
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_artifacts(root, self._mlflow_artifact_path)

    def _exists(self) -> bool:
        fs, root = fsspec.core.url_to_fs(self._path, **self._storage_options)
        return bool(fs.exists(root) and fs.glob(f"{root}/*{self._suffix}"))

    def unusable_entries(self) -> str:
        """What a folder without any ``<patientId>.dcm`` holds instead (other-case suffixes,
        subfolders), so a message can say what to fix; "" when it holds nothing or is
        absent."""
        folder = self.load()
        if folder.files or not folder.rejected:
            return ""
        return f"{self._path} holds no {self._suffix} file it can read: {folder.not_used()}"

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "suffix": self._suffix, "overwrite": self._overwrite,
                "read_only": self._read_only}


def _swap(fs: fsspec.AbstractFileSystem, staged: str, root: str) -> None:
    """Put the folder ``staged`` in the place of ``root`` (two renames; the old one is
    deleted only once the new one is in place)."""
    replaced = f"{root}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if fs.exists(root):
        fs.mv(root, replaced, recursive=True)
    fs.mv(staged, root, recursive=True)
    if fs.exists(replaced):
        fs.rm(replaced, recursive=True)


def _remove_leftovers(fs: fsspec.AbstractFileSystem, parent: str, name: str) -> None:
    """Folders a stopped run left beside ``name``; those of another process still running (a
    run writing the same output) are left alone. A run killed between the swap's two renames
    left the earlier set as ``<name>.replaced-*`` and no ``name``: that set is put back."""
    root = f"{parent}/{name}"
    for leftover in sorted(fs.glob(f"{root}.replaced-*")) + fs.glob(f"{parent}/.{name}.partial-*"):
        owner = PurePosixPath(leftover).name.rsplit("-", 2)[-2]
        if owner.isdigit() and _running(int(owner)):
            continue
        if ".replaced-" in PurePosixPath(leftover).name and not fs.exists(root):
            fs.mv(leftover, root, recursive=True)
        else:
            fs.rm(leftover, recursive=True)


def _running(pid: int) -> bool:
    """Whether another process ``pid`` runs; this process's leftovers are of a run that
    stopped (a run's own folder is made after they are removed)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
