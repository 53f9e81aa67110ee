"""Validation of the labels and class-info CSVs, each rule on a real malformed file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DatasetError

from pneumonia_kedro.datasets import LabelsCSVDataset
from pneumonia_kedro.errors import LabelsError
from pneumonia_kedro.labels import (
    build_patient_table,
    is_safe_patient_id,
    patient_targets,
    validate_class_info,
    validate_labels,
)

HEADER = "patientId,x,y,width,height,Target"
GOOD_ROWS = [
    "p-neg,,,,,0",
    "p-one,264.0,152.0,213.0,379.0,1",
    "p-two,562.0,152.0,256.0,453.0,1",
    "p-two,100.0,100.0,200.0,200.0,1",
]


def write_csv(tmp_path: Path, lines: list[str], name: str = "stage_2_train_labels.csv",
              encoding: str = "utf-8", newline: str = "\n") -> pd.DataFrame:
    path = tmp_path / name
    path.write_bytes(newline.join(lines).encode(encoding) + newline.encode())
    return LabelsCSVDataset(filepath=str(path)).load()


def check(tmp_path: Path, rows: list[str], header: str = HEADER) -> pd.DataFrame:
    table = write_csv(tmp_path, [header, *rows])
    labels, _ = validate_labels(table, table.attrs["source"])
    return labels


def test_good_file_gives_one_row_per_patient_with_all_boxes(tmp_path):
    labels = check(tmp_path, GOOD_ROWS)
    targets = labels.groupby("patientId")["Target"].first()
    classes = pd.Series({"p-neg": "Normal", "p-one": "Lung Opacity", "p-two": "Lung Opacity"})
    patients = build_patient_table(labels, classes).set_index("patientId")
    assert list(patients.index) == ["p-neg", "p-one", "p-two"]
    assert patients.loc["p-neg", "n_boxes"] == 0 and patients.loc["p-neg", "boxes"] == []
    assert patients.loc["p-two", "boxes"] == [[562.0, 152.0, 256.0, 453.0],
                                              [100.0, 100.0, 200.0, 200.0]]
    assert targets.to_dict() == {"p-neg": 0, "p-one": 1, "p-two": 1}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (["p1,abc,1,10,10,1"], r"line 2: x 'abc' is not a number"),
        (["p1,1,1,10,10,2"], r"line 2: Target '2' is not 0 or 1"),
        (["p1,1,1,10,10,yes"], r"line 2: Target 'yes' is not 0 or 1"),
        (["p-neg,,,,,0", "p1,,,,,1"], r"line 3: Target 1 row has no box"),
        (["p1,5,5,10,10,0"], r"line 2: Target 0 row has a box"),
        (["p1,5,5,,10,1"], r"line 2: box is incomplete"),
        (["p1,5,5,0,10,1"], r"line 2: box size 0x10 is not positive"),
        (["p1,5,5,10,-3,1"], r"line 2: box size 10x-3 is not positive"),
        (["p1,900,5,200,10,1"], r"line 2: box \(900, 5, 200, 10\) lies outside the 1024x1024"),
        (["p1,-1,5,20,10,1"], r"lies outside"),
        # infinite cells: each checked alone (inf + -inf is NaN, not a missing number)
        (["p1,1e999,5,-1e999,10,1"], r"line 2: box size -infx10 is not positive"),
        (["p1,1e308,5,1e308,10,1"], r"line 2: box \(1e\+308, 5, 1e\+308, 10\) lies outside"),
        (["../etc/passwd,,,,,0"], r"line 2: patientId '../etc/passwd' is not a safe file name"),
        (["a/b,,,,,0"], r"patientId 'a/b' is not a safe file name"),
        (["/abs,,,,,0"], r"patientId '/abs' is not a safe file name"),
        (["p1,,,,,0", "p1,5,5,10,10,1"], r"lines \[2, 3\]: patientId p1 has conflicting Target"),
    ],
)
def test_each_bad_row_is_named_with_file_line_and_problem(tmp_path, rows, expected):
    with pytest.raises(LabelsError, match=expected) as info:
        check(tmp_path, rows)
    assert str(info.value).startswith("stage_2_train_labels.csv:")


def test_renamed_column_is_reported_with_expected_header(tmp_path):
    with pytest.raises(LabelsError, match=r"missing column\(s\) \['Target'\]"):
        check(tmp_path, ["p1,,,,,0"], header="patientId,x,y,width,height,label")


def test_all_problems_are_listed_at_once(tmp_path):
    with pytest.raises(LabelsError, match="3 problem") as info:
        check(tmp_path, ["p1,abc,1,10,10,1", "p2,1,1,10,10,7", "p3,,,,,1"])
    message = str(info.value)
    assert "line 2" in message and "line 3" in message and "line 4" in message


def test_exact_duplicates_are_dropped_and_counted(tmp_path, caplog):
    table = write_csv(tmp_path, [HEADER, *GOOD_ROWS, GOOD_ROWS[1]])
    labels, n_duplicates = validate_labels(table, "x.csv")
    assert n_duplicates == 1
    assert len(labels) == len(GOOD_ROWS)
    assert "duplicate" in caplog.text


def test_extra_columns_are_ignored_with_a_warning(tmp_path, caplog):
    labels = check(tmp_path, ["p1,,,,,0,note"], header=HEADER + ",comment")
    assert list(labels.columns) == ["line", "patientId", "x", "y", "width", "height", "Target"]
    assert "extra column" in caplog.text


def test_bom_and_windows_line_endings_are_accepted(tmp_path):
    table = write_csv(tmp_path, [HEADER, *GOOD_ROWS], encoding="utf-8-sig", newline="\r\n")
    labels, _ = validate_labels(table, "x.csv")
    assert labels["patientId"].tolist() == ["p-neg", "p-one", "p-two", "p-two"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file, not a CSV"),
        ("patientId,x,y,width,height,Target\nJosé,,,,,0\n".encode("latin-1"),
         r"not UTF-8 text \(invalid UTF-8 in column 'patientId'\); save it as UTF-8"),
        ("patientId,Ré\n".encode("latin-1"), r"not UTF-8 text \(invalid UTF-8 in the header"),
    ],
)
def test_unreadable_files_get_a_clear_error(tmp_path, content, expected):
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    # Kedro wraps load errors in DatasetError; the project's error is the cause.
    with pytest.raises(DatasetError, match=expected) as info:
        LabelsCSVDataset(filepath=str(path)).load()
    assert isinstance(info.value.__cause__, LabelsError)
    assert str(path) in str(info.value.__cause__)


def test_cells_are_loaded_as_the_text_written(tmp_path):
    table = write_csv(tmp_path, [HEADER, 'p1, 5 ,1e1,"10",010,1', "p-neg,,,,,0"])
    assert all(str(dtype) == "str" for dtype in table.dtypes)
    assert table.iloc[0].tolist() == ["p1", " 5 ", "1e1", "10", "010", "1"]
    assert table.iloc[1].tolist() == ["p-neg", "", "", "", "", "0"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([HEADER, "p-neg,,,,,0", "p1,,,,,0,extra"],
         "line 3: 7 cell(s) where the header has 6: 'p1,,,,,0,extra'"),
        ([HEADER, "p1,,,,"], "line 2: 5 cell(s) where the header has 6: 'p1,,,,'"),
        # A quoted line break stays in its row and blank lines are not counted: rows are
        # numbered as validation numbers them (the text alone would have said line 4).
        ([HEADER, '"p,\nq",,,,,0', "", "p1,,,,,0,extra"],
         "line 3: 7 cell(s) where the header has 6: 'p1,,,,,0,extra'"),
        (["patientId,x,x,width,height,Target", "p1,,,,,0"],
         r"line 1: column(s) ['x'] appear twice"),
    ],
)
def test_rows_that_do_not_fit_the_header_are_named(tmp_path, lines, expected):
    with pytest.raises(DatasetError) as info:
        write_csv(tmp_path, lines)
    assert isinstance(info.value.__cause__, LabelsError)
    assert str(info.value.__cause__).endswith(expected)


def test_many_problems_are_counted_and_the_first_twenty_listed(tmp_path):
    with pytest.raises(LabelsError) as info:
        check(tmp_path, [f"p{i},abc,1,10,10,1" for i in range(25)])
    message = str(info.value)
    assert message.startswith("stage_2_train_labels.csv: 25 problem(s):")
    assert message.count("is not a number") == 20 and "line 21:" in message
    assert "line 22:" not in message and message.endswith("... and 5 more")


def test_header_only_file_has_no_rows(tmp_path):
    with pytest.raises(LabelsError, match="no label rows"):
        check(tmp_path, [])


def class_table(tmp_path: Path, rows: list[str]) -> pd.DataFrame:
    return write_csv(tmp_path, ["patientId,class", *rows],
                     name="stage_2_detailed_class_info.csv")


def targets() -> pd.Series:
    return pd.Series({"p-neg": 0, "p-one": 1})


def test_class_info_gives_one_class_per_patient(tmp_path):
    rows = ["p-neg,Normal", "p-one,Lung Opacity", "p-one,Lung Opacity"]
    classes = validate_class_info(class_table(tmp_path, rows), targets(), "c.csv")
    assert classes.to_dict() == {"p-neg": "Normal", "p-one": "Lung Opacity"}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (["p-neg,Lung Opacity", "p-one,Lung Opacity"],
         r"line 2: class 'Lung Opacity' disagrees with Target 0"),
        (["p-neg,Normal", "p-one,Normal"], r"line 3: class 'Normal' disagrees with Target 1"),
        (["p-neg,Healthy", "p-one,Lung Opacity"], r"line 2: class 'Healthy' is not one of"),
        (["p-neg,Normal"], r"patientId p-one has labels but no class row"),
        (["p-neg,Normal", "p-neg,No Lung Opacity / Not Normal", "p-one,Lung Opacity"],
         r"patientId p-neg has conflicting classes"),
        # a dropped duplicate row before the conflict: lines stay the file's
        (["p-one,Lung Opacity", "p-one,Lung Opacity", "p-neg,Normal",
          "p-neg,No Lung Opacity / Not Normal"],
         r"lines \[4, 5\]: patientId p-neg has conflicting classes"),
        (["p-neg,Normal", "p-one,Lung Opacity", "p-x,Normal"],
         r"line 4: patientId p-x has a class but no labels"),
    ],
)
def test_class_info_problems_are_named(tmp_path, rows, expected):
    with pytest.raises(LabelsError, match=expected):
        validate_class_info(class_table(tmp_path, rows), targets(), "c.csv")


@pytest.mark.parametrize(
    ("patient_id", "safe"),
    [("0004cfab-14fd-4e49-80ba-63a80b6bddd6", True), ("a.b", True), ("..", False),
     ("a..b", False), ("a/b", False), ("a\\b", False), ("", False), (".hidden", False),
     ("/etc/passwd", False), (None, False), ("x" * 200, False)],
)
def test_safe_patient_ids(patient_id, safe):
    assert is_safe_patient_id(patient_id) is safe


def test_a_hundred_thousand_valid_rows(tmp_path):
    # 60,000 negatives, 20,000 positives with two boxes each: 100,000 rows, 80,000 patients.
    negatives = [f"n{i:07d},,,,,0" for i in range(60_000)]
    positives = [f"p{i:07d},{100 + i % 400}.0,200.0,150.0,{200 + i % 300}.0,1"
                 for i in range(20_000) for _ in range(2)]
    positives[1::2] = [row.replace(",200.0,150.0,", ",500.0,120.0,") for row in positives[1::2]]
    table = write_csv(tmp_path, [HEADER, *negatives, *positives])
    assert len(table) == 100_000
    labels, duplicates = validate_labels(table, table.attrs["source"])
    targets = patient_targets(labels)
    classes = validate_class_info(
        pd.DataFrame({"patientId": labels["patientId"],
                      "class": labels["Target"].map({0: "Normal", 1: "Lung Opacity"})}),
        targets, "class info")
    patients = build_patient_table(labels, classes)
    assert targets.index.is_monotonic_increasing
    assert targets.index.tolist() == classes.index.tolist() == patients["patientId"].tolist()
    assert str(patients["patientId"].dtype) == str(patients["detailed_class"].dtype) == "str"
    assert duplicates == 0 and len(patients) == 80_000
    assert int(patients["n_boxes"].sum()) == 40_000
    assert patients.loc[patients["Target"] == 1, "n_boxes"].eq(2).all()
    first = patients.loc[patients["patientId"] == "p0000007"].iloc[0]
    assert first["boxes"] == [[107.0, 200.0, 150.0, 207.0], [107.0, 500.0, 120.0, 207.0]]


def test_patients_out_of_order_give_sorted_tables_and_messages(tmp_path):
    rows = [f"{pid},,,,,0" for pid in ("a1", "b2", "c1", "d3", "e2", "f9", "g1")]
    rows += ["h1,5,5,10,10,1", "h1,50,50,10,10,1"]
    labels, _ = validate_labels(write_csv(tmp_path, [HEADER, *rows]), "x.csv")
    targets = patient_targets(labels)
    assert targets.index.tolist() == ["a1", "b2", "c1", "d3", "e2", "f9", "g1", "h1"]
    assert targets.tolist() == [0] * 7 + [1]
    class_rows = [f"{pid},Normal" for pid in ("g1", "a1", "c1", "b2", "e2", "d3", "f9")]
    classes = validate_class_info(
        class_table(tmp_path, [*class_rows, "h1,Lung Opacity", "h1,Lung Opacity"]), targets, "c")
    assert classes.index.tolist() == targets.index.tolist()
    patients = build_patient_table(labels, classes)
    # Any order of the classes, and classes of patients without labels, give the same table.
    extra = pd.Series(["Normal"], index=["zz"])
    pd.testing.assert_frame_equal(build_patient_table(labels, pd.concat([classes.iloc[::-1],
                                                                         extra])), patients)
    assert patients.loc[7, "boxes"] == [[5.0, 5.0, 10.0, 10.0], [50.0, 50.0, 10.0, 10.0]]
    with pytest.raises(ValueError, match="patientId h1 has labels but no detailed class"):
        build_patient_table(labels, classes.iloc[:-1])

    bad_rows = ["z1,,,,,0", "z1,,,,,1", "x1,,,,,0", "x1,1,1,10,10,1", "../y2,,,,,0"]
    with pytest.raises(LabelsError) as bad_labels:
        check(tmp_path, bad_rows)
    assert str(bad_labels.value) == (
        "stage_2_train_labels.csv: 4 problem(s):\n"
        "  line 6: patientId '../y2' is not a safe file name\n"
        "  line 3: Target 1 row has no box\n"
        "  lines [4, 5]: patientId x1 has conflicting Target values\n"
        "  lines [2, 3]: patientId z1 has conflicting Target values")
    with pytest.raises(LabelsError) as bad_classes:
        validate_class_info(class_table(tmp_path, [*class_rows, "h1,Lung Opacity",
                                                   "x7,Normal"]), targets, "c")
    assert str(bad_classes.value) == (
        "c: 1 problem(s):\n  line 10: patientId x7 has a class but no labels")
