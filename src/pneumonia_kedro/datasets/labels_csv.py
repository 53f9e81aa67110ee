"""``LabelsCSVDataset``: the competition's CSV files, read as text and checked for encoding."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import fsspec
import pandas as pd
from kedro.io import AbstractDataset

from pneumonia_kedro.datasets.raw_data import refuse_if_read_only
from pneumonia_kedro.errors import LabelsError, MissingDataError


class LabelsCSVDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """A competition CSV (labels, class info, submission) loaded with every cell as text.

    Keeping cells as text lets validation report the exact bad value and line. The loaded
    DataFrame carries its file path in ``attrs["source"]`` so messages can name it. A UTF-8 BOM
    and Windows line endings are accepted; other encodings and binary files get a clear error.
    With ``optional: true`` a missing file loads as an empty DataFrame.
    """

    def __init__(
        self,
        *,
        filepath: str,
        optional: bool = False,
        read_only: bool = False,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = str(filepath)
        self.optional = optional
        self._storage_options = {**(credentials or {}), **(fs_args or {})}
        self.metadata = metadata
        self._read_only = read_only

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(self._filepath, **self._storage_options)

    def load(self) -> pd.DataFrame:
        fs, path = self._fs()
        if not fs.exists(path):
            if self.optional:
                return pd.DataFrame()
            raise MissingDataError(f"{self._filepath}: file not found")
        # pandas reads the file itself: holding its bytes, their decoded text and a copy of
        # that as well took eight times the file's size before parsing began.
        with fs.open(path, "rb") as handle:
            head = handle.read(65536)
            if b"\x00" in head:
                raise LabelsError(f"{self._filepath}: binary file, not a CSV")
            if not head.strip():
                raise LabelsError(f"{self._filepath}: empty file")
            handle.seek(0)
            try:
                table = pd.read_csv(handle, dtype=str, keep_default_na=False,
                                    encoding="utf-8-sig")
            except UnicodeDecodeError as exc:
                raise LabelsError(
                    f"{self._filepath}: not UTF-8 text ({exc.reason}); save it as UTF-8"
                ) from None
        table.columns = [str(c).strip() for c in table.columns]
        table.attrs["source"] = PurePosixPath(path).name
        return table

    def save(self, data: pd.DataFrame) -> None:
        refuse_if_read_only(self._read_only, self._filepath)
        fs, path = self._fs()
        fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        partial = f"{path}.partial"
        with fs.open(partial, "w", newline="") as handle:
            data.to_csv(handle, index=False)
        fs.mv(partial, path)

    def _exists(self) -> bool:
        fs, path = self._fs()
        return bool(fs.exists(path))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "read_only": self._read_only}
