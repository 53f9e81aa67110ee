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


def validate_labels(
    labels: pd.DataFrame, source: str = "labels CSV", image_size: int = 1024
) -> tuple[pd.DataFrame, int]:
    """Check a ``stage_2_train_labels.csv`` table row by row.

    Returns the rows with numeric boxes and an int ``Target``, exact duplicate rows dropped,
    and a ``line`` column holding each row's CSV line number; plus the number of duplicates.
    Raises ``LabelsError`` listing every problem with its line.
    """
    _require_columns(labels, LABEL_COLUMNS, source)
    table = labels.loc[:, list(LABEL_COLUMNS)].copy()
    table.insert(0, "line", np.arange(len(table)) + 2)  # the header is line 1
    if table.empty:
        raise LabelsError(f"{source}: no label rows after the header")

    duplicated = table.duplicated(subset=list(LABEL_COLUMNS), keep="first")
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
    table = class_info.loc[:, list(CLASS_COLUMNS)].copy()
    table.insert(0, "line", np.arange(len(table)) + 2)
    table = table.drop_duplicates(subset=list(CLASS_COLUMNS))
    problems: list[str] = []
    unknown = ~table["class"].isin(DETAILED_CLASSES)
    for line, value in zip(table.loc[unknown, "line"], table.loc[unknown, "class"], strict=True):
        problems.append(f"line {line}: class {value!r} is not one of {list(DETAILED_CLASSES)}")
    per_patient = table.groupby("patientId", sort=True)
    conflicting = per_patient["class"].nunique()
    for pid in conflicting[conflicting > 1].index:
        lines = table.loc[table["patientId"] == pid, "line"].tolist()
        problems.append(f"lines {lines}: patientId {pid} has conflicting classes")
    classes, first_line = per_patient["class"].first(), per_patient["line"].first()
    for pid in sorted(set(targets.index) - set(classes.index)):
        problems.append(f"patientId {pid} has labels but no class row")
    for pid in sorted(set(classes.index) - set(targets.index)):
        problems.append(f"line {first_line[pid]}: patientId {pid} has a class but no labels")
    common = classes.index.intersection(targets.index)
    cls, target = classes[common], targets[common]
    disagree = cls.isin(DETAILED_CLASSES) & ((cls == OPACITY_CLASS) != (target == 1))
    for pid in cls.index[disagree.to_numpy()]:
        problems.append(f"line {first_line[pid]}: class {cls[pid]!r} disagrees with Target "
                        f"{target[pid]}")
    _raise_problems(source, problems)
    return classes


def build_patient_table(labels: pd.DataFrame, classes: pd.Series) -> pd.DataFrame:
    """One row per patient: Target, detailed class, number of boxes and the ``xywh`` boxes."""
    # Boxes of each positive patient in file order: one sort, one split (a groupby-apply
    # took minutes on millions of rows).
    positive = labels.loc[labels["Target"] == 1]
    order = np.argsort(positive["patientId"].to_numpy(dtype=object), kind="stable")
    box_ids = positive["patientId"].to_numpy(dtype=object)[order]
    values = positive.loc[:, list(BOX_COLUMNS)].to_numpy(dtype=float)[order]
    starts = np.flatnonzero(np.r_[True, box_ids[1:] != box_ids[:-1]]) if len(box_ids) else []
    boxes = dict(zip(box_ids[starts], (block.tolist() for block in
                                       np.split(values, starts[1:])), strict=True)) \
        if len(box_ids) else {}
    patients = labels.groupby("patientId", sort=True)["Target"].first().to_frame()
    patients["detailed_class"] = classes.reindex(patients.index)
    patients["boxes"] = [boxes.get(pid, []) for pid in patients.index]
    patients["n_boxes"] = patients["boxes"].map(len).astype(int)
    return patients.reset_index().loc[:, list(PATIENT_COLUMNS)]


def boxes_array(boxes: object) -> np.ndarray:
    """The ``boxes`` cell of a patient table as a float array of shape (N, 4) in ``xywh``."""
    rows = [list(map(float, box)) for box in (boxes if boxes is not None else [])]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)
