"""``LabelsCSVDataset``: the competition's CSV files, read as text and checked for encoding."""

from __future__ import annotations

import csv
import re
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from kedro.io import AbstractDataset

from pneumonia_kedro.datasets.raw_data import refuse_if_read_only
from pneumonia_kedro.errors import LabelsError, MissingDataError

# Arrow strings as pandas holds them: the reader's columns become DataFrame columns without a
# copy. (pandas' default "str" dtype would convert every column to 64-bit offsets, a copy that
# cost a third more than the strings themselves.)
_ARROW_STRING = pd.ArrowDtype(pa.string())


class LabelsCSVDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """A competition CSV (labels, class info, submission) loaded with every cell as text.

    Keeping cells as text lets validation report the exact bad value and line. Arrow's CSV
    reader parses the file into ``string[pyarrow]`` columns: a cell costs its bytes plus a
    4-byte offset, not a Python object. The loaded DataFrame carries its file name in
    ``attrs["source"]`` so messages can name it. A UTF-8 BOM and Windows line endings are
    accepted; other encodings, binary files and rows with the wrong number of cells get a clear
    error. With ``optional: true`` a missing file loads as an empty DataFrame.
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
        with fs.open(path, "rb") as handle:
            header = self._header(handle.read(65536))
            handle.seek(0)
            table = self._read(handle, header)
        frame = table.to_pandas(types_mapper={pa.string(): _ARROW_STRING}.get)
        frame.columns = [str(c).strip() for c in frame.columns]
        frame.attrs["source"] = PurePosixPath(path).name
        return frame

    def _header(self, head: bytes) -> list[str]:
        """The column names on the file's first line, after the checks that need no parse."""
        if b"\x00" in head:
            raise LabelsError(f"{self._filepath}: binary file, not a CSV")
        if not head.strip():
            raise LabelsError(f"{self._filepath}: empty file")
        # Arrow's reader skips blank lines before the header as well.
        first_line = next(line for line in head.splitlines() if line.strip())
        try:
            names = next(csv.reader([first_line.decode("utf-8-sig")]))
        except UnicodeDecodeError as exc:
            raise self._not_utf8(f"invalid UTF-8 in the header: {exc.reason}") from None
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise LabelsError(f"{self._filepath}: line 1: column(s) {repeated} appear twice")
        return names

    def _read(self, handle: Any, header: list[str]) -> pa.Table:
        bad_rows: list[str] = []

        def refuse(row: Any) -> str:
            # Single-threaded reading knows each row's number (header = line 1, blank lines
            # not counted, the same numbering as validation's).
            bad_rows.append(f"line {row.number}: {row.actual_columns} cell(s) where the header "
                            f"has {row.expected_columns}: {row.text!r}")
            return "error"

        try:
            return pa_csv.read_csv(
                handle,
                read_options=pa_csv.ReadOptions(use_threads=False),
                parse_options=pa_csv.ParseOptions(invalid_row_handler=refuse),
                convert_options=pa_csv.ConvertOptions(
                    column_types=dict.fromkeys(header, pa.string()),
                    strings_can_be_null=False, quoted_strings_can_be_null=False),
                # Arrow's default allocator kept ~80 MiB of the reader's scratch memory per
                # file of 3.9 M rows; the system allocator hands it back.
                memory_pool=pa.system_memory_pool(),
            )
        except pa.ArrowInvalid as exc:
            if bad_rows:
                raise LabelsError(f"{self._filepath}: {bad_rows[0]}") from None
            if "UTF8" in str(exc):
                column = re.search(r"column #(\d+)", str(exc))
                where = (f"column {header[int(column[1])]!r}"
                         if column and int(column[1]) < len(header) else "a cell")
                raise self._not_utf8(f"invalid UTF-8 in {where}") from None
            raise LabelsError(f"{self._filepath}: not a readable CSV ({exc})") from None

    def _not_utf8(self, reason: str) -> LabelsError:
        return LabelsError(f"{self._filepath}: not UTF-8 text ({reason}); save it as UTF-8")

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
