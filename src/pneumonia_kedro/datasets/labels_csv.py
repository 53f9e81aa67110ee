"""``LabelsCSVDataset``: the competition's CSV files, read as text with clear errors."""

from __future__ import annotations

import contextlib
import csv
from pathlib import PurePosixPath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from kedro.io.core import get_filepath_str
from kedro_datasets.pandas import CSVDataset
from pandas.errors import ParserError

from pneumonia_kedro.datasets.raw_data import refuse_if_read_only
from pneumonia_kedro.errors import LabelsError, MissingDataError


class LabelsCSVDataset(CSVDataset):
    """A competition CSV (labels, class info, submission) loaded with every cell as text.

    kedro-datasets' ``pandas.CSVDataset``, read by pandas' pyarrow engine into "str" columns,
    so that validation can quote the exact bad value and line. The loaded DataFrame carries
    its file name in ``attrs["source"]``. A UTF-8 BOM and Windows line endings are accepted;
    other encodings, binary files, repeated column names and rows with the wrong number of
    cells get a clear error. With ``optional: true`` a missing file loads as an empty
    DataFrame; with ``read_only: true`` saving is refused (raw data).
    """

    DEFAULT_LOAD_ARGS: dict[str, Any] = {"engine": "pyarrow", "dtype": str,
                                         "keep_default_na": False}

    def __init__(self, *, filepath: str, optional: bool = False, read_only: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(filepath=filepath, **kwargs)
        self.optional = optional
        self._read_only = read_only

    def load(self) -> pd.DataFrame:
        path = get_filepath_str(self._get_load_path(), self._protocol)
        if not self._fs.exists(path):
            if self.optional:
                return pd.DataFrame()
            raise MissingDataError(f"{self._filepath}: file not found")
        bad_rows: list[Any] = []

        def refuse(row: Any) -> str:  # pyarrow's InvalidRow: cell counts and text, no line
            bad_rows.append(row)
            return "error"

        with self._fs.open(path, "rb") as handle:
            header = self._header(handle.read(65536))
            handle.seek(0)
            try:
                frame = pd.read_csv(handle, on_bad_lines=refuse, **self._load_args)
            except (ParserError, UnicodeDecodeError) as exc:
                if bad_rows:
                    raise self._wrong_cell_count(path, bad_rows[0]) from None
                if isinstance(exc, UnicodeDecodeError) or "UTF8" in str(exc):
                    raise self._not_utf8(self._undecodable_column(path, header)) from None
                raise LabelsError(f"{self._filepath}: not a readable CSV ({exc})") from None
        frame.columns = [str(c).strip() for c in frame.columns]
        frame.attrs["source"] = PurePosixPath(path).name
        return frame

    def _header(self, head: bytes) -> list[str]:
        """The column names on the file's first line, after the checks that need no parse."""
        if b"\x00" in head:
            raise LabelsError(f"{self._filepath}: binary file, not a CSV")
        if not head.strip():
            raise LabelsError(f"{self._filepath}: empty file")
        # The reader skips blank lines before the header as well.
        first_line = next(line for line in head.splitlines() if line.strip())
        try:
            names = next(csv.reader([first_line.decode("utf-8-sig")]))
        except UnicodeDecodeError as exc:
            raise self._not_utf8(f"invalid UTF-8 in the header: {exc.reason}") from None
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise LabelsError(f"{self._filepath}: line 1: column(s) {repeated} appear twice")
        return names

    def _lines(self, path: str) -> list[bytes]:
        """The file's non-blank lines (the reader's numbering: the header is line 1)."""
        with self._fs.open(path, "rb") as handle:
            return [line.rstrip(b"\r\n") for line in handle if line.strip()]

    def _wrong_cell_count(self, path: str, row: Any) -> LabelsError:
        # pandas reads with threads, so its bad row has no number: on this error path only,
        # the file is read again by Arrow on one thread, which numbers the row (header = line
        # 1, blank lines not counted; a quoted line break stays inside its row).
        numbers: list[int] = []

        def note(bad: Any) -> str:
            numbers.append(bad.number)
            return "error"

        with self._fs.open(path, "rb") as handle, contextlib.suppress(pa.ArrowInvalid):
            pa_csv.read_csv(handle, read_options=pa_csv.ReadOptions(use_threads=False),
                            parse_options=pa_csv.ParseOptions(invalid_row_handler=note))
        number = numbers[0] if numbers and numbers[0] is not None else "?"
        return LabelsError(f"{self._filepath}: line {number}: {row.actual_columns} cell(s) "
                           f"where the header has {row.expected_columns}: {row.text!r}")

    def _undecodable_column(self, path: str, header: list[str]) -> str:
        """Where the first bytes that are not UTF-8 lie: which column."""
        for line in self._lines(path)[1:]:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                # undecodable bytes become lone surrogates (U+DC80..U+DCFF) in their cell
                cells = next(csv.reader([line.decode("utf-8", "surrogateescape")]))
                column = next(i for i, cell in enumerate(cells)
                              if any("\udc80" <= ch <= "\udcff" for ch in cell))
                if column < len(header):
                    return f"invalid UTF-8 in column {header[column]!r}"
                break
        return "invalid UTF-8 in a cell"

    def _not_utf8(self, reason: str) -> LabelsError:
        return LabelsError(f"{self._filepath}: not UTF-8 text ({reason}); save it as UTF-8")

    def save(self, data: pd.DataFrame) -> None:
        refuse_if_read_only(self._read_only, str(self._filepath))
        path = get_filepath_str(self._get_save_path(), self._protocol)
        self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        partial = f"{path}.partial"  # a killed write never leaves a half file under the name
        with self._fs.open(partial, "w", newline="") as handle:
            data.to_csv(handle, **self._save_args)
        self._fs.mv(partial, path)
        self._invalidate_cache()

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "read_only": self._read_only}
