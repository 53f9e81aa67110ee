"""The competition's label tables: schema, validation and the per-patient table.

Line numbers in messages are those of the CSV file itself: the header is line 1, so the first
data row is line 2.

A labels file can have millions of rows, so the checks work on Arrow's text columns and on
integer patient codes, hash the ids as few times as they can, and format a message only for the
problems that get listed (``benchmarks/labels_memory.py`` measures the memory).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pneumonia_kedro.errors import LabelsError
from pneumonia_kedro.text_columns import (
    TEXT,
    arrow_text,
    bools,
    codes_of,
    index_in,
    pandas_text,
    release_unused,
    sorted_codes,
    strictly_increasing,
)

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
BOX_COLUMNS = ("x", "y", "width", "height")
OPACITY_CLASS = "Lung Opacity"
NEGATIVE_CLASSES = ("No Lung Opacity / Not Normal", "Normal")
DETAILED_CLASSES = (OPACITY_CLASS, *NEGATIVE_CLASSES)
PATIENT_COLUMNS = ("patientId", "Target", "detailed_class", "n_boxes", "boxes")

# Competition ids are UUIDs; anything that could walk out of a folder is refused.
_SAFE_PATIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# A decimal number, as a CSV cell may hold it once trimmed ("nan" and "inf" are not numbers).
_NUMBER = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
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

    def add(self, indices: Iterable[int] | np.ndarray, describe: Callable[[int], str]) -> None:
        """Count a problem for each index; describe those that will be listed."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.count += len(indices)
        room = _MAX_LISTED_PROBLEMS - len(self.listed)
        self.listed.extend(describe(int(i)) for i in indices[:max(room, 0)])

    def raise_any(self) -> None:
        if not self.count:
            return
        shown = "\n  ".join(self.listed)
        more = self.count - len(self.listed)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise LabelsError(f"{self.source}: {self.count} problem(s):\n  {shown}{tail}")


def _require_columns(table: pd.DataFrame, columns: Iterable[str], source: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise LabelsError(
            f"{source}: missing column(s) {missing}; expected header "
            f"{','.join(columns)}, found {','.join(map(str, table.columns))}"
        )
    extra = [c for c in table.columns if c not in columns]
    if extra:
        logger.warning("%s: ignoring extra column(s) %s", source, extra)


def _duplicated(patient_codes: np.ndarray, columns: Iterable[pa.ChunkedArray]) -> np.ndarray:
    """Rows equal to an earlier row: the same patient and the same text in ``columns``.

    Only patients with several rows can repeat one, so only their rows are compared.
    """
    duplicated = np.zeros(len(patient_codes), dtype=bool)
    shared = np.bincount(patient_codes)[patient_codes] > 1
    if shared.any():
        # filter, not take: Arrow's take first joins a column's chunks into one copy
        mask = pa.array(shared)
        rows = pd.DataFrame({"patient": patient_codes[shared]}
                            | {str(i): codes_of(column.filter(mask))[0]
                               for i, column in enumerate(columns)})
        duplicated[shared] = rows.duplicated().to_numpy()
    return duplicated


def _numbers(values: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Each cell as a float (NaN where it is blank or not a number), and where it is blank."""
    trimmed = pc.utf8_trim_whitespace(values)
    blank = bools(pc.equal(trimmed, ""), null=True)
    numeric = pc.fill_null(pc.match_substring_regex(trimmed, _NUMBER), False)
    numbers = pc.cast(pc.if_else(numeric, trimmed, pa.scalar(None, pa.string())), pa.float64())
    numbers = pc.fill_null(numbers, np.nan).to_numpy(zero_copy_only=False)
    # numpy's own memory (a one-chunk column comes back as a read-only view of Arrow's), so
    # the validated table can be changed in place like any DataFrame
    return numbers if numbers.flags.writeable else numbers.copy(), blank


def _safe_ids(ids: pa.Array) -> np.ndarray:
    """``is_safe_patient_id`` for many ids at once."""
    pattern = f"^{_SAFE_PATIENT_ID.pattern}$"
    return (bools(pc.match_substring_regex(ids, pattern))
            & ~bools(pc.match_substring(ids, "..")))


def validate_labels(
    labels: pd.DataFrame, source: str = "labels CSV", image_size: int = 1024
) -> tuple[pd.DataFrame, int]:
    """Check a ``stage_2_train_labels.csv`` table row by row.

    Returns the rows with numeric boxes and an int ``Target``, exact duplicate rows dropped,
    and a ``line`` column holding each row's CSV line number; plus the number of duplicates.
    Raises ``LabelsError`` listing the problems with their lines (the first 20, and a count).
    """
    _require_columns(labels, LABEL_COLUMNS, source)
    if labels.empty:
        raise LabelsError(f"{source}: no label rows after the header")
    ids = arrow_text(labels["patientId"])
    # Sorted although only codes are needed here: unsorted codes were 20 % faster but the
    # node then peaked at 7.4x the labels file instead of 7.1x (labels_memory.py, 3.9 M rows).
    codes, patient_ids = sorted_codes(ids)
    unsafe = ~_safe_ids(patient_ids)[codes]
    n_patients = len(patient_ids)
    del patient_ids  # as large as the id column: messages take ids from rows instead
    release_unused()
    text = {c: arrow_text(labels[c]) for c in (*BOX_COLUMNS, "Target")}

    duplicated = _duplicated(codes, text.values())
    n_duplicates = int(duplicated.sum())
    if n_duplicates:
        logger.warning("%s: dropped %d exact duplicate row(s), first at line %d",
                       source, n_duplicates, np.argmax(duplicated) + 2)
    kept = ~duplicated

    def rows(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask & kept)

    def cell(column: str, row: int) -> str | None:
        return (ids if column == "patientId" else text[column])[row].as_py()

    problems = _Problems(source)
    problems.add(rows(unsafe), lambda i: (
        f"line {i + 2}: patientId {cell('patientId', i)!r} is not a safe file name"))

    target, _ = _numbers(text["Target"])
    valid_target = (target == 0) | (target == 1)
    problems.add(rows(~valid_target), lambda i: (
        f"line {i + 2}: Target {cell('Target', i)!r} is not 0 or 1"))

    numbers, blank = {}, {}
    for column in BOX_COLUMNS:
        numbers[column], blank[column] = _numbers(text[column])
        problems.add(rows(~blank[column] & np.isnan(numbers[column])), lambda i, c=column: (
            f"line {i + 2}: {c} {cell(c, i)!r} is not a number"))
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

    # A patient whose valid Targets are not all equal.
    counted = valid_target & kept
    n_valid = np.bincount(codes[counted], minlength=n_patients)
    n_positive = np.bincount(codes[counted & (target == 1)], minlength=n_patients)
    conflicting = np.flatnonzero((n_positive > 0) & (n_positive < n_valid))
    if len(conflicting):
        first_row = np.full(n_patients, len(codes))
        np.minimum.at(first_row, codes, np.arange(len(codes)))
        conflicting_ids = [cell("patientId", row) for row in first_row[conflicting]]
        by_id = sorted(range(len(conflicting)), key=lambda i: str(conflicting_ids[i]))
        problems.add(by_id, lambda i: (
            f"lines {(rows(codes == conflicting[i]) + 2).tolist()}: patientId "
            f"{conflicting_ids[i]} has conflicting Target values"))
    problems.raise_any()

    keep = slice(None) if not n_duplicates else np.flatnonzero(kept)
    clean = pd.DataFrame({
        "line": (np.arange(len(labels)) + 2)[keep],
        "patientId": labels["patientId"].iloc[keep].reset_index(drop=True),
        **{c: numbers[c][keep] for c in BOX_COLUMNS},
        "Target": target[keep].astype(np.int64),
    }, copy=False)  # the arrays are this function's own: a copy would double them
    return clean, n_duplicates


def patient_targets(labels: pd.DataFrame) -> tuple[pd.Series, np.ndarray]:
    """The Target of each patient in validated labels, indexed by patientId in sorted order,
    and each label row's position in that index."""
    patient_of_row, patient_ids = sorted_codes(arrow_text(labels["patientId"]))
    release_unused()
    targets = np.zeros(len(patient_ids), dtype=np.int64)
    targets[patient_of_row] = labels["Target"].to_numpy()  # validated: one per patient
    index = pd.Index(pandas_text(patient_ids), name="patientId")
    return pd.Series(targets, index=index, name="Target"), patient_of_row


def validate_class_info(
    class_info: pd.DataFrame, targets: pd.Series, source: str = "class info CSV"
) -> pd.Series:
    """Check ``stage_2_detailed_class_info.csv`` against per-patient ``targets``.

    Returns the detailed class of each patient, indexed like ``targets``. Every patient needs
    exactly one known class, and "Lung Opacity" must coincide with Target 1.
    """
    _require_columns(class_info, CLASS_COLUMNS, source)
    ids, classes = arrow_text(class_info["patientId"]), arrow_text(class_info["class"])
    labelled_ids = arrow_text(targets.index)
    n_labelled = len(labelled_ids)
    # Each row's patient as its position in ``targets``; patients without labels follow them.
    codes = index_in(ids, labelled_ids)
    unlabelled = codes < 0
    unlabelled_codes, unlabelled_ids = codes_of(ids.filter(pa.array(unlabelled)))
    codes[unlabelled] = n_labelled + unlabelled_codes

    def patient_id(code: int) -> str:
        return (labelled_ids[code] if code < n_labelled
                else unlabelled_ids[code - n_labelled]).as_py()

    class_codes = pc.fill_null(pc.index_in(classes, value_set=pa.array(DETAILED_CLASSES)),
                               -1).to_numpy(zero_copy_only=False)
    kept = ~_duplicated(codes, [classes])
    kept_rows = np.flatnonzero(kept)
    n_patients = n_labelled + len(unlabelled_ids)
    first_row = np.full(n_patients, len(codes))
    np.minimum.at(first_row, codes[kept_rows], kept_rows)
    n_rows = np.bincount(codes[kept_rows], minlength=n_patients)

    problems = _Problems(source)
    problems.add(np.flatnonzero(kept & (class_codes < 0)), lambda i: (
        f"line {i + 2}: class {classes[i].as_py()!r} is not one of {list(DETAILED_CLASSES)}"))
    # After dropping duplicates, a patient's second row means a second class.
    problems.add(np.flatnonzero(n_rows > 1), lambda code: (
        f"lines {(np.flatnonzero(kept & (codes == code)) + 2).tolist()}: patientId "
        f"{patient_id(code)} has conflicting classes"))
    problems.add(np.flatnonzero(n_rows[:n_labelled] == 0), lambda code: (
        f"patientId {patient_id(code)} has labels but no class row"))
    problems.add(np.arange(n_labelled, n_patients), lambda code: (
        f"line {first_row[code] + 2}: patientId {patient_id(code)} has a class but no labels"))
    # Each labelled patient's first class row against its Target.
    target = targets.to_numpy()
    classified = np.flatnonzero(n_rows[:n_labelled] > 0)
    first_class = class_codes[first_row[classified]]
    disagree = (first_class >= 0) & ((first_class == 0) != (target[classified] == 1))
    problems.add(first_row[classified[disagree]], lambda i: (
        f"line {i + 2}: class {classes[i].as_py()!r} disagrees with Target "
        f"{target[codes[i]]}"))
    problems.raise_any()

    names = pa.DictionaryArray.from_arrays(pa.array(first_class, type=pa.int32()),
                                           pa.array(DETAILED_CLASSES)).cast(pa.string())
    return pd.Series(pandas_text(names).array, index=targets.index, name="class")


def _positions(labels: pd.DataFrame, classes: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """``classes`` sorted and limited to the labels' patients, and each row's position in it."""
    patient_ids = arrow_text(classes.index)
    if not strictly_increasing(patient_ids):
        classes = classes[~classes.index.duplicated()].sort_index()
        patient_ids = arrow_text(classes.index)
    codes = index_in(arrow_text(labels["patientId"]), patient_ids)
    if (codes < 0).any():
        missing = labels["patientId"].iloc[int(np.argmax(codes < 0))]
        raise ValueError(f"patientId {missing} has labels but no detailed class")
    if (np.bincount(codes, minlength=len(classes)) == 0).any():
        return _positions(labels, classes[classes.index.isin(labels["patientId"])])
    return classes, codes


def build_patient_table(
    labels: pd.DataFrame, classes: pd.Series, patient_of_row: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per patient, sorted by patientId: Target, detailed class, number of boxes and
    the ``xywh`` boxes. ``classes`` holds the detailed class of every patient in ``labels``.

    ``patient_of_row``, each label row's position in ``classes``, saves hashing every
    patientId again; ``patient_targets`` gives it for the index ``validate_class_info`` keeps.
    """
    if patient_of_row is None:
        classes, codes = _positions(labels, classes)
    elif len(patient_of_row) != len(labels):
        raise ValueError(f"patient_of_row has {len(patient_of_row)} positions for "
                         f"{len(labels)} label rows")
    else:
        codes = patient_of_row
    targets = np.zeros(len(classes), dtype=np.int64)
    targets[codes] = labels["Target"].to_numpy()  # validated: one Target per patient
    positive = labels["Target"].to_numpy() == 1
    # Boxes of each patient in file order: a stable sort by patient, then one split.
    order = np.argsort(codes[positive], kind="stable")
    corners = labels.loc[positive, list(BOX_COLUMNS)].to_numpy(dtype=np.float64)[order]
    # One float object per distinct coordinate (whole pixels on the competition's data): a
    # float of its own for each corner took a third of the table's memory.
    values, which = np.unique(corners, return_inverse=True)
    shared = np.empty(len(values), dtype=object)
    shared[:] = values.tolist()
    rows = shared[which.reshape(corners.shape)].tolist()
    del corners, values, which, shared
    release_unused()
    n_boxes = np.bincount(codes[positive], minlength=len(classes))
    ends = np.cumsum(n_boxes)
    # Patients without a box share one empty list: an own list each took more memory than
    # the labels file on millions of patients. (An Arrow list column would be smaller still,
    # but pandas cannot read its own Parquet metadata for nested Arrow types back.)
    no_boxes: list = []
    boxes = np.empty(len(classes), dtype=object)
    boxes.fill(no_boxes)
    for index in np.flatnonzero(n_boxes):
        boxes[index] = rows[ends[index] - n_boxes[index]:ends[index]]
    return pd.DataFrame({
        "patientId": pd.Series(classes.index.array).astype(TEXT),
        "Target": targets,
        "detailed_class": pd.Series(classes.array).astype(TEXT),
        "n_boxes": n_boxes.astype(int),
        "boxes": boxes,
    }, copy=False).loc[:, list(PATIENT_COLUMNS)]


def boxes_array(boxes: object) -> np.ndarray:
    """The ``boxes`` cell of a patient table as a float array of shape (N, 4) in ``xywh``."""
    rows = [list(map(float, box)) for box in (boxes if boxes is not None else [])]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)
