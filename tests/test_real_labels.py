"""The real stage-2 labels (shipped in torchxrayvision) pass validation with the known counts."""

from __future__ import annotations

import pandas as pd

from pneumonia_kedro.datasets import PackageTableDataset
from pneumonia_kedro.labels import build_patient_table, validate_class_info, validate_labels


def test_real_competition_labels_give_the_published_counts():
    raw = PackageTableDataset(package="torchxrayvision",
                              resource="data/kaggle_stage_2_train_labels.csv.zip",
                              load_args={"dtype": str, "keep_default_na": False}).load()
    assert len(raw) == 30_227
    labels, duplicates = validate_labels(raw, "stage_2_train_labels.csv")
    assert duplicates == 0
    targets = labels.groupby("patientId")["Target"].first()
    # The detailed class file is not shipped; "Lung Opacity" must match Target exactly.
    class_info = pd.DataFrame({
        "patientId": labels["patientId"],
        "class": labels["Target"].map({1: "Lung Opacity", 0: "Normal"}),
    })
    classes = validate_class_info(class_info, targets, "class info")
    patients = build_patient_table(labels, classes)
    assert len(patients) == 26_684
    assert int((patients["Target"] == 1).sum()) == 6_012
    assert int(patients["n_boxes"].sum()) == 9_555
    assert patients["n_boxes"].value_counts().to_dict() == {0: 20_672, 2: 3_266, 1: 2_614,
                                                            3: 119, 4: 13}
