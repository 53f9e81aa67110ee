"""The competition's label tables: schema, validation and the per-patient table.

Line numbers in messages are those of the CSV file itself: the header is line 1, so the first
data row is line 2.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pneumonia_kedro.errors import LabelsError

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
BOX_COLUMNS = ("x", "y", "width", "height")
OPACITY_CLASS = "Lung Opacity"
NEGATIVE_CLASSES = ("No Lung Opacity / Not Normal", "Normal")
DETAILED_CLASSES = (OPACITY_CLASS, *NEGATIVE_CLASSES)
PATIENT_COLUMNS = ("patientId", "Target", "detailed_class", "n_boxes", "boxes")

# Competition ids are UUIDs; anything that could walk out of a folder is refused.
_SAFE_PATIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_MAX_LISTED_PROBLEMS = 20


def is_safe_patient_id(patient_id: object) -> bool:
    """True when ``patient_id`` can be used as a file stem inside a data folder."""
    return (
        isinstance(patient_id, str)
        and bool(_SAFE_PATIENT_ID.match(patient_id))
        and ".." not in patient_id
    )


def _safe_ids(ids: pd.Series) -> pd.Series:
    """``is_safe_patient_id`` for a whole column at once."""
    text = ids.astype("string")
    return (text.str.fullmatch(_SAFE_PATIENT_ID.pattern).fillna(False).astype(bool)
            & ~text.str.contains("..", regex=False).fillna(False).astype(bool))


def _raise_problems(source: str, problems: list[str]) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise LabelsError(f"{source}: {len(problems)} problem(s):\n  {shown}{tail}")


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


def _blank(values: pd.Series) -> pd.Series:
    return values.isna() | (values.astype("string").str.strip() == "")


def _arrow(values: pd.Series | pd.Index) -> pa.ChunkedArray:
    """The Arrow strings behind a text column, without a copy."""
    return pa.chunked_array(pa.array(values.array))


def _encoded(values: pd.Series) -> pa.DictionaryArray:
    # Arrow's dictionary encoding: pandas' hashing of millions of strings went through
    # Python objects and took several times the column's size.
    return pc.dictionary_encode(_arrow(values), null_encoding="encode").combine_chunks()


def _codes(values: pd.Series) -> np.ndarray:
    """Integer codes of a text column, in order of first appearance, nulls included."""
    return _encoded(values).indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _sorted_codes(values: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """``pd.factorize(values, sort=True)`` for a text column without nulls."""
    encoded = _encoded(values)
    order = pc.array_sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    uniques = pd.Index(pd.array(encoded.dictionary.take(order), dtype=values.dtype))
    return codes, uniques


def _not_in(values: pd.Index, others: pd.Index) -> pd.Index:
    """The values that ``others`` lacks, sorted (``Index.difference`` with Arrow's hashing)."""
    missing = pc.invert(pc.is_in(_arrow(values), value_set=_arrow(others).combine_chunks()))
    return values[missing.to_numpy(zero_copy_only=False)].sort_values()


def _duplicated_rows(table: pd.DataFrame, columns: Iterable[str]) -> np.ndarray:
    """``DataFrame.duplicated(keep="first")`` over text columns, computed on their codes."""
    return pd.DataFrame({c: _codes(table[c]) for c in columns}).duplicated().to_numpy()


def validate_labels(
    labels: pd.DataFrame, source: str = "labels CSV", image_size: int = 1024
) -> tuple[pd.DataFrame, int]:
    """Check a ``stage_2_train_labels.csv`` table row by row.

    Returns the rows with numeric boxes and an int ``Target``, exact duplicate rows dropped,
    and a ``line`` column holding each row's CSV line number; plus the number of duplicates.
    Raises ``LabelsError`` listing every problem with its line.
    """
    _require_columns(labels, LABEL_COLUMNS, source)
    table = labels.loc[:, list(LABEL_COLUMNS)]  # copy-on-write: no copy until changed
    table.insert(0, "line", np.arange(len(table)) + 2)  # the header is line 1
    if table.empty:
        raise LabelsError(f"{source}: no label rows after the header")

    duplicated = _duplicated_rows(table, LABEL_COLUMNS)
    n_duplicates = int(duplicated.sum())
    if n_duplicates:
        logger.warning(
            "%s: dropped %d exact duplicate row(s), first at line %d",
            source, n_duplicates, table.loc[duplicated, "line"].iloc[0],
        )
        table = table.loc[~duplicated]

    problems: list[str] = []
    ids = table["patientId"]
    unsafe = ~_safe_ids(ids)
    for line, pid in zip(table.loc[unsafe, "line"], ids[unsafe], strict=True):
        problems.append(f"line {line}: patientId {pid!r} is not a safe file name")

    target = pd.to_numeric(table["Target"], errors="coerce")
    bad_target = ~target.isin([0, 1])
    for line, raw in zip(table.loc[bad_target, "line"], table.loc[bad_target, "Target"],
                         strict=True):
        problems.append(f"line {line}: Target {raw!r} is not 0 or 1")

    blank = pd.concat([_blank(table[c]) for c in BOX_COLUMNS], axis=1)
    numeric = table.loc[:, list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    for column in BOX_COLUMNS:
        non_numeric = ~blank[column] & numeric[column].isna()
        for line, raw in zip(table.loc[non_numeric, "line"], table.loc[non_numeric, column],
                             strict=True):
            problems.append(f"line {line}: {column} {raw!r} is not a number")

    no_box = blank.all(axis=1)
    partial_box = blank.any(axis=1) & ~no_box
    for line in table.loc[partial_box, "line"]:
        problems.append(f"line {line}: box is incomplete (x, y, width, height must all be set)")
    for line in table.loc[(target == 1) & no_box, "line"]:
        problems.append(f"line {line}: Target 1 row has no box")
    for line in table.loc[(target == 0) & ~blank.all(axis=1), "line"]:
        problems.append(f"line {line}: Target 0 row has a box")

    has_box = (target == 1) & ~blank.any(axis=1) & numeric.notna().all(axis=1)
    x, y, w, h = (numeric[c] for c in BOX_COLUMNS)
    for line, bx, by, bw, bh in zip(table.loc[has_box, "line"], x[has_box], y[has_box],
                                    w[has_box], h[has_box], strict=True):
        if bw <= 0 or bh <= 0:
            problems.append(f"line {line}: box size {bw:g}x{bh:g} is not positive")
        elif bx < 0 or by < 0 or bx + bw > image_size or by + bh > image_size:
            problems.append(
                f"line {line}: box ({bx:g}, {by:g}, {bw:g}, {bh:g}) lies outside the "
                f"{image_size}x{image_size} image"
            )

    valid_target = target.where(~bad_target)
    conflicting = valid_target.groupby(ids).nunique() > 1
    for pid in conflicting[conflicting].index:
        lines = table.loc[ids == pid, "line"].tolist()
        problems.append(f"lines {lines}: patientId {pid} has conflicting Target values")
    _raise_problems(source, problems)

    clean = table.assign(Target=target.astype(int))
    for column in BOX_COLUMNS:
        clean[column] = numeric[column].astype(float)
    return clean.reset_index(drop=True), n_duplicates


def validate_class_info(
    class_info: pd.DataFrame, targets: pd.Series, source: str = "class info CSV"
) -> pd.Series:
    """Check ``stage_2_detailed_class_info.csv`` against per-patient ``targets``.

    Returns the detailed class per patientId. Every patient needs exactly one known class, and
    "Lung Opacity" must coincide with Target 1.
    """
    _require_columns(class_info, CLASS_COLUMNS, source)
    table = class_info.loc[:, list(CLASS_COLUMNS)]
    table.insert(0, "line", np.arange(len(table)) + 2)
    duplicated = _duplicated_rows(table, CLASS_COLUMNS)
    if duplicated.any():
        table = table.loc[~duplicated]
    problems: list[str] = []
    unknown = ~table["class"].isin(DETAILED_CLASSES)
    for line, value in zip(table.loc[unknown, "line"], table.loc[unknown, "class"], strict=True):
        problems.append(f"line {line}: class {value!r} is not one of {list(DETAILED_CLASSES)}")
    # Patients by integer code: after dropping duplicates, a second row means a second class.
    codes = _codes(table["patientId"])
    first = np.unique(codes, return_index=True)[1]  # codes count from 0 in order of appearance
    for code in np.flatnonzero(np.bincount(codes) > 1):
        lines = table["line"].to_numpy()[codes == code].tolist()
        patient_id = table["patientId"].to_numpy()[codes == code][0]
        problems.append(f"lines {lines}: patientId {patient_id} has conflicting classes")
    patient_ids = pd.Index(table["patientId"].iloc[first], name="patientId")
    classes = pd.Series(table["class"].to_numpy()[first], index=patient_ids, name="class")
    first_line = pd.Series(table["line"].to_numpy()[first], index=patient_ids)
    for pid in _not_in(targets.index, classes.index):
        problems.append(f"patientId {pid} has labels but no class row")
    # Each class row's Target, looked up with Arrow's hashing (pandas' took 4x the file).
    position = pc.index_in(_arrow(classes.index), value_set=_arrow(targets.index).combine_chunks())
    labelled = position.is_valid().to_numpy(zero_copy_only=False)
    for pid in classes.index[~labelled]:
        problems.append(f"line {first_line[pid]}: patientId {pid} has a class but no labels")
    target = targets.to_numpy()[position.fill_null(0).to_numpy(zero_copy_only=False)]
    is_opacity = (classes == OPACITY_CLASS).to_numpy()
    disagree = labelled & classes.isin(DETAILED_CLASSES).to_numpy() & (is_opacity != (target == 1))
    for index in np.flatnonzero(disagree):
        problems.append(f"line {first_line.iloc[index]}: class {classes.iloc[index]!r} "
                        f"disagrees with Target {target[index]}")
    _raise_problems(source, problems)
    return classes


def build_patient_table(labels: pd.DataFrame, classes: pd.Series) -> pd.DataFrame:
    """One row per patient: Target, detailed class, number of boxes and the ``xywh`` boxes."""
    codes, patient_ids = _sorted_codes(labels["patientId"])
    targets = np.zeros(len(patient_ids), dtype=np.int64)
    targets[codes] = labels["Target"].to_numpy()  # validated: one Target per patient
    positive = labels["Target"].to_numpy() == 1
    # Boxes of each patient in file order: a stable sort by patient, then one split.
    order = np.argsort(codes[positive], kind="stable")
    rows = labels.loc[positive, list(BOX_COLUMNS)].to_numpy(dtype=np.float64)[order].tolist()
    n_boxes = np.bincount(codes[positive], minlength=len(patient_ids))
    ends = np.cumsum(n_boxes)
    # Patients without a box share one empty list: an own list each took more memory than
    # the labels file on millions of patients.
    no_boxes: list = []
    boxes = np.empty(len(patient_ids), dtype=object)
    boxes.fill(no_boxes)
    for index in np.flatnonzero(n_boxes):
        boxes[index] = rows[ends[index] - n_boxes[index]:ends[index]]
    return pd.DataFrame({
        "patientId": pd.Series(patient_ids),
        "Target": targets,
        "detailed_class": classes.reindex(patient_ids).to_numpy(),
        "n_boxes": n_boxes.astype(int),
        "boxes": boxes,
    }).loc[:, list(PATIENT_COLUMNS)]


def boxes_array(boxes: object) -> np.ndarray:
    """The ``boxes`` cell of a patient table as a float array of shape (N, 4) in ``xywh``."""
    rows = [list(map(float, box)) for box in (boxes if boxes is not None else [])]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)
