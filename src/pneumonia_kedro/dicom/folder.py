"""A folder of ``<patientId>.dcm`` files on any fsspec filesystem, and its header table."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import fsspec
import pandas as pd
from tqdm.auto import tqdm

from pneumonia_kedro.dicom.reader import HEADER_FIELDS, read_header
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.labels import is_safe_patient_id


class FolderChunk(dict[str, bytes]):
    """Files a generator node yields to a folder dataset, ``{patientId: bytes}``.

    ``last`` marks the run's final chunk: a dataset that replaces its folder (``overwrite``)
    writes a run's chunks aside and puts them in place, all together, when it saves this one.
    """

    def __init__(self, files: Iterable[tuple[str, bytes]] | dict[str, bytes] = (), *,
                 last: bool = False) -> None:
        super().__init__(files)
        self.last = last


def folder_chunks(patient_ids: Sequence[str], make: Callable[[str], bytes | None],
                  size: int) -> Iterator[FolderChunk]:
    """The files ``make`` makes for ``patient_ids`` (``None``: that patient is skipped), in
    ``FolderChunk`` s of ``size`` patients, each yielded when made (saved before the next
    file is), the last one marked; one empty last chunk when there are no patients, so a
    generator node that yields them always finishes its folder."""
    for start in range(0, max(len(patient_ids), 1), size):
        chunk = FolderChunk(last=start + size >= len(patient_ids))
        for patient_id in patient_ids[start:start + size]:
            content = make(patient_id)
            if content is not None:
                chunk[patient_id] = content
        yield chunk


@dataclass
class DicomFolder:
    """A folder of ``<patientId>.dcm`` files on any fsspec filesystem; picklable, read-only.

    Entries that cannot be patients are kept apart in ``rejected`` with the reason:
    unsafe names, directories named like files, symlinks that leave the folder.
    """

    root: str
    protocol: str = "file"
    storage_options: dict = field(default_factory=dict)
    suffix: str = ".dcm"
    files: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: str, suffix: str = ".dcm", storage_options: dict | None = None
             ) -> DicomFolder:
        fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        folder = cls(root=path, protocol=protocol, storage_options=storage_options or {},
                     suffix=suffix)
        if not fs.exists(path):
            return folder
        local_root = os.path.realpath(path) if protocol == "file" else None
        for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
            name = PurePosixPath(entry["name"]).name
            kind = entry.get("type")
            if not name.endswith(suffix):
                # Say why near misses are not read: a user looking for a patient's image
                # would otherwise only hear "no file".
                if name.lower().endswith(suffix.lower()):
                    folder.rejected[name] = (f"file name ends in {name[-len(suffix):]!r}, not "
                                             f"{suffix!r} (names are case-sensitive)")
                elif kind == "directory":
                    folder.rejected[name] = ("a subfolder: images must lie directly in the "
                                             "folder")
                continue
            stem = name[: -len(suffix)]
            if local_root is not None and entry.get("islink"):
                # A link may stay inside the folder (a dataset of links); its target decides.
                target = os.path.realpath(entry["name"])
                if not target.startswith(local_root + os.sep):
                    folder.rejected[name] = "symlink pointing outside the data folder"
                    continue
                kind = "file" if os.path.isfile(target) else \
                    "directory" if os.path.isdir(target) else "broken symlink"
            if kind != "file":
                folder.rejected[name] = f"not a regular file ({kind})"
            elif not is_safe_patient_id(stem):
                folder.rejected[name] = "file name is not a safe patientId"
            else:
                folder.files[stem] = entry["name"]
        return folder

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem(self.protocol, **self.storage_options)

    @property
    def patient_ids(self) -> list[str]:
        return sorted(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, patient_id: object) -> bool:
        return patient_id in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.patient_ids)

    def read_bytes(self, patient_id: str) -> bytes:
        if patient_id not in self.files:
            raise DicomError(f"{self.root}: no file for patientId {patient_id!r}")
        if self.protocol == "file":  # the common case, without fsspec's per-file overhead
            with open(self.files[patient_id], "rb") as handle:
                return handle.read()
        with self.filesystem.open(self.files[patient_id], "rb") as handle:
            return handle.read()

    def display_name(self, patient_id: str) -> str:
        return self.files.get(patient_id, f"{self.root}/{patient_id}{self.suffix}")

    def not_used(self) -> str:
        """What the folder holds but does not read, counted by reason ("" when nothing)."""
        counts = Counter(self.rejected.values())
        return "; ".join(f"{count} x {reason}" for reason, count in sorted(counts.items()))

    def absence_reason(self, patient_id: str) -> str:
        """Why a patient has no usable file: none, or the reason it was rejected."""
        name = f"{patient_id}{self.suffix}"
        # The exact name first, else a near miss: other case, or a subfolder of that name.
        matches = [n for n in self.rejected if n.lower() in (name.lower(), patient_id.lower())]
        if matches:
            found = name if name in matches else matches[0]
            return f"{self.root}/{found}: {self.rejected[found]}"
        return f"no file {self.display_name(patient_id)}"


def header_table(folder: DicomFolder, patient_ids: list[str], progress: bool = True
                 ) -> pd.DataFrame:
    """Header values of each patient's file; unreadable files get their reason in ``error``."""
    rows = []
    for patient_id in tqdm(patient_ids, desc="DICOM headers", unit="file", disable=not progress):
        row: dict[str, object] = {"patientId": patient_id, "error": ""}
        try:
            row.update(read_header(folder.read_bytes(patient_id), folder.display_name(patient_id),
                                   patient_id))
        except DicomError as exc:
            row["error"] = str(exc)
        rows.append(row)
    columns = ["patientId", *HEADER_FIELDS, "pixel_spacing", "rows", "columns", "pixel_hash",
               "patient_id_matches", "error"]
    return pd.DataFrame(rows).reindex(columns=columns)
