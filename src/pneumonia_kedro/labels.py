"""The competition's label tables: schema, validation and the per-patient table.

Line numbers in messages are those of the CSV file itself: the header is line 1, so the first
data row is line 2. Checks are vectorised pandas over the text cells, so a message can quote
the exact value; a file of 3.9 M rows validates in well under a minute
(``benchmarks/labels_memory.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from pneumonia_kedro.errors import LabelsError

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
BOX_COLUMNS = ("x", "y", "width", "height")
OPACITY_CLASS = "Lung Opacity"
NEGATIVE_CLASSES = ("No Lung Opacity / Not Normal", "Normal")
DETAILED_CLASSES = (OPACITY_CLASS, *NEGATIVE_CLASSES)
TEXT = pd.StringDtype(na_value=np.nan)  # pandas' default "str"

# Competition ids are UUIDs; anything that could walk out of a folder is refused.
_SAFE_PATIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# A decimal number, as a CSV cell may hold it once trimmed ("nan" and "inf" are not numbers).
_NUMBER = r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"
_MAX_LISTED_PROBLEMS = 20


def is_safe_patient_id(patient_id: object) -> bool:
    """True when ``patient_id`` can be used as a file stem inside a data folder."""
    return (
        isinstance(patient_id, str)
        and bool(_SAFE_PATIENT_ID.fullmatch(patient_id))
        and ".." not in patient_id
    )


class _Problems:
    """Problems found so far: every one counted, the first few written out."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.count = 0
        self.listed: list[str] = []

    def add(self, items: Iterable, describe: Callable[[object], str]) -> None:
        """Count a problem for each item; describe only those that will be listed."""
        items = list(items)
        self.count += len(items)
        room = max(_MAX_LISTED_PROBLEMS - len(self.listed), 0)
        self.listed.extend(describe(item) for item in items[:room])

    def raise_any(self) -> None:
        if not self.count:
            return
        shown = "\n  ".join(self.listed)
        more = self.count - len(self.listed)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise LabelsError(f"{self.source}: {self.count} problem(s):\n  {shown}{tail}")


def _text_columns(table: pd.DataFrame, columns: tuple[str, ...], source: str) -> pd.DataFrame:
    """The ``columns`` of ``table`` as text; a missing one is an error, an extra one a warning."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise LabelsError(
            f"{source}: missing column(s) {missing}; expected header "
            f"{','.join(columns)}, found {','.join(map(str, table.columns))}"
        )
    extra = [c for c in table.columns if c not in columns]
    if extra:
        logger.warning("%s: ignoring extra column(s) %s", source, extra)
    return table.loc[:, list(columns)].astype(TEXT).reset_index(drop=True)


def _numbers(cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each cell as a float (NaN where it is blank or not a number), and where it is blank."""
    trimmed = cells.fillna("").str.strip()
    numeric = trimmed.str.fullmatch(_NUMBER).to_numpy(dtype=bool)
    numbers = np.full(len(cells), np.nan)
    numbers[numeric] = trimmed[numeric].astype(np.float64).to_numpy()
    return numbers, (trimmed == "").to_numpy(dtype=bool)


def _rows_of(ids: pd.Series, patient_id: str, kept: np.ndarray) -> list[int]:
    """The CSV lines of the kept rows of one patient."""
    return (np.flatnonzero(ids.eq(patient_id).to_numpy(dtype=bool) & kept) + 2).tolist()


def validate_labels(
    labels: pd.DataFrame, source: str = "labels CSV", image_size: int = 1024
) -> tuple[pd.DataFrame, int]:
    """Check a ``stage_2_train_labels.csv`` table row by row.

    Returns the rows with numeric boxes and an int ``Target``, exact duplicate rows dropped,
    and a ``line`` column holding each row's CSV line number; plus the number of duplicates.
    Raises ``LabelsError`` listing the problems with their lines (the first 20, and a count).
    """
    cells = _text_columns(labels, LABEL_COLUMNS, source)
    if cells.empty:
        raise LabelsError(f"{source}: no label rows after the header")
    kept = ~cells.duplicated().to_numpy()
    n_duplicates = int((~kept).sum())
    if n_duplicates:
        logger.warning("%s: dropped %d exact duplicate row(s), first at line %d",
                       source, n_duplicates, np.argmin(kept) + 2)
    ids = cells["patientId"]

    def rows(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask & kept)

    problems = _Problems(source)
    safe = (ids.str.fullmatch(_SAFE_PATIENT_ID.pattern).to_numpy(dtype=bool)
            & ~ids.str.contains("..", regex=False).to_numpy(dtype=bool))
    problems.add(rows(~safe), lambda i: (
        f"line {i + 2}: patientId {ids[i]!r} is not a safe file name"))
    target, _ = _numbers(cells["Target"])
    valid_target = (target == 0) | (target == 1)
    problems.add(rows(~valid_target), lambda i: (
        f"line {i + 2}: Target {cells.at[i, 'Target']!r} is not 0 or 1"))
    numbers = _check_boxes(cells, target, rows, problems, image_size)

    # A patient whose valid Targets are not all equal, listed in patientId order.
    patient, patient_ids = pd.factorize(ids, use_na_sentinel=False)
    n_valid = np.bincount(patient[valid_target & kept], minlength=len(patient_ids))
    n_positive = np.bincount(patient[(target == 1) & kept], minlength=len(patient_ids))
    conflicting = patient_ids[(n_positive > 0) & (n_positive < n_valid)].sort_values()
    problems.add(conflicting, lambda pid: (
        f"lines {_rows_of(ids, pid, kept)}: patientId {pid} has conflicting Target values"))
    problems.raise_any()

    return pd.DataFrame({
        "line": np.flatnonzero(kept) + 2,
        "patientId": ids[kept].reset_index(drop=True),
        **{c: numbers[c][kept] for c in BOX_COLUMNS},
        "Target": target[kept].astype(np.int64),
    }), n_duplicates


def _check_boxes(
    cells: pd.DataFrame, target: np.ndarray, rows: Callable[[np.ndarray], np.ndarray],
    problems: _Problems, image_size: int,
) -> dict[str, np.ndarray]:
    """Each box column as numbers; a box must be complete on Target 1 rows only, have a
    positive size and lie inside the image. ``rows`` picks the kept rows of a mask."""
    numbers, blank = {}, {}
    for column in BOX_COLUMNS:
        numbers[column], blank[column] = _numbers(cells[column])
        problems.add(rows(~blank[column] & np.isnan(numbers[column])), lambda i, c=column: (
            f"line {i + 2}: {c} {cells.at[i, c]!r} is not a number"))
    no_box = np.logical_and.reduce(list(blank.values()))
    some_blank = np.logical_or.reduce(list(blank.values()))
    problems.add(rows(some_blank & ~no_box), lambda i: (
        f"line {i + 2}: box is incomplete (x, y, width, height must all be set)"))
    problems.add(rows((target == 1) & no_box), lambda i: f"line {i + 2}: Target 1 row has no box")
    problems.add(rows((target == 0) & ~no_box), lambda i: f"line {i + 2}: Target 0 row has a box")

    x, y, w, h = numbers.values()
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and 1e308-sized cells
        has_box = (target == 1) & ~(np.isnan(x) | np.isnan(y) | np.isnan(w) | np.isnan(h))
        not_positive = (w <= 0) | (h <= 0)
        outside = (x < 0) | (y < 0) | (x + w > image_size) | (y + h > image_size)

    def box_problem(i: int) -> str:
        if not_positive[i]:
            return f"line {i + 2}: box size {w[i]:g}x{h[i]:g} is not positive"
        return (f"line {i + 2}: box ({x[i]:g}, {y[i]:g}, {w[i]:g}, {h[i]:g}) lies outside the "
                f"{image_size}x{image_size} image")

    problems.add(rows(has_box & (not_positive | outside)), box_problem)
    return numbers


def patient_targets(labels: pd.DataFrame) -> pd.Series:
    """The Target of each patient in validated labels, indexed by patientId in sorted order."""
    targets = labels.groupby("patientId", sort=True)["Target"].first()
    targets.index = targets.index.astype(TEXT)
    return targets


def validate_class_info(
    class_info: pd.DataFrame, targets: pd.Series, source: str = "class info CSV"
) -> pd.Series:
    """Check ``stage_2_detailed_class_info.csv`` against per-patient ``targets``.

    Returns the detailed class of each patient, indexed like ``targets``. Every patient needs
    exactly one known class, and "Lung Opacity" must coincide with Target 1.
    """
    cells = _text_columns(class_info, CLASS_COLUMNS, source)
    kept = ~cells.duplicated().to_numpy()
    ids, classes = cells["patientId"], cells["class"]
    labelled = targets.index
    # Each row's patient as a number: the labelled patients (unique) come first, so their
    # numbers are their positions in ``targets``; patients without labels follow them.
    patient, patient_ids = pd.factorize(pd.concat([labelled.to_series(), ids],
                                                  ignore_index=True), use_na_sentinel=False)
    patient = patient[len(labelled):]
    n_rows = np.bincount(patient[kept], minlength=len(patient_ids))
    first = pd.Series(patient).drop_duplicates()  # each patient's first row
    first_row = np.full(len(patient_ids), -1)
    first_row[first.to_numpy()] = first.index.to_numpy()
    class_code = np.select([classes.eq(name).to_numpy(dtype=bool) for name in DETAILED_CLASSES],
                           range(len(DETAILED_CLASSES)), -1)

    problems = _Problems(source)
    problems.add(np.flatnonzero(kept & (class_code < 0)), lambda i: (
        f"line {i + 2}: class {classes[i]!r} is not one of {list(DETAILED_CLASSES)}"))
    # After dropping exact duplicates, a patient's second row means a second class.
    problems.add(np.flatnonzero(n_rows > 1), lambda code: (
        f"lines {_rows_of(ids, patient_ids[code], kept)}: patientId {patient_ids[code]} has "
        "conflicting classes"))
    problems.add(np.flatnonzero(n_rows[:len(labelled)] == 0), lambda code: (
        f"patientId {patient_ids[code]} has labels but no class row"))
    problems.add(range(len(labelled), len(patient_ids)), lambda code: (
        f"line {first_row[code] + 2}: patientId {patient_ids[code]} has a class but no labels"))
    # Each labelled patient's first class row against its Target.
    rows = first_row[:len(labelled)]
    classified = rows >= 0
    first_class = np.full(len(labelled), -1)
    first_class[classified] = class_code[rows[classified]]
    target = targets.to_numpy()
    disagree = (first_class >= 0) & ((first_class == 0) != (target == 1))
    problems.add(rows[disagree], lambda i: (
        f"line {i + 2}: class {classes[i]!r} disagrees with Target {target[patient[i]]}"))
    problems.raise_any()

    return pd.Series(classes.iloc[rows].array, index=labelled, name="class")


def build_patient_table(labels: pd.DataFrame, classes: pd.Series) -> pd.DataFrame:
    """One row per patient, sorted by patientId: Target, detailed class, number of boxes and
    the ``xywh`` boxes in file order. ``classes`` holds the detailed class of every patient
    in ``labels`` (others are left out)."""
    patient, patient_ids = pd.factorize(labels["patientId"], sort=True)
    if not classes.index.equals(patient_ids):  # the ingest node passes them in this order
        classes = classes[~classes.index.duplicated()].reindex(patient_ids)
    missing = classes.isna().to_numpy()[patient]
    if missing.any():
        raise ValueError(f"patientId {labels['patientId'].iloc[int(np.argmax(missing))]} has "
                         "labels but no detailed class")
    targets = np.zeros(len(patient_ids), dtype=np.int64)
    targets[patient] = labels["Target"].to_numpy()  # validated: one Target per patient
    positive = labels["Target"].to_numpy() == 1
    n_boxes = np.bincount(patient[positive], minlength=len(patient_ids))
    # Boxes grouped by patient, in file order within each: a stable sort, then slices.
    order = np.argsort(patient[positive], kind="stable")
    corners = labels.loc[positive, list(BOX_COLUMNS)].to_numpy(dtype=np.float64)[order]
    corners = corners.tolist()
    ends = np.cumsum(n_boxes).tolist()
    boxes = [corners[end - n:end] for end, n in zip(ends, n_boxes.tolist(), strict=True)]
    return pd.DataFrame({
        "patientId": patient_ids.astype(TEXT).array,
        "Target": targets,
        "detailed_class": classes.astype(TEXT).array,
        "n_boxes": n_boxes.astype(int),
        "boxes": pd.Series(boxes, dtype=object),
    })


def boxes_array(boxes: object) -> np.ndarray:
    """The ``boxes`` cell of a patient table as a float array of shape (N, 4) in ``xywh``."""
    rows = [list(map(float, box)) for box in (boxes if boxes is not None else [])]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)
