"""Patient-level sampling and split: no leakage, all boxes kept, reproducible."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.split import (
    SplitConfig,
    describe_split,
    fold_count,
    split_patients,
    training_patients_at_most,
)


@pytest.fixture
def patients() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 400
    target = (rng.random(n) < 0.3).astype(int)
    boxes = [[[float(i), 10.0, 50.0, 60.0]] * int(rng.integers(1, 4)) if t else []
             for i, t in enumerate(target)]
    return pd.DataFrame({
        "patientId": [f"p{i:04d}" for i in range(n)],
        "Target": target,
        "boxes": boxes,
        "n_boxes": [len(b) for b in boxes],
        "view_position": rng.choice(["AP", "PA"], size=n),
    })


def test_split_is_patient_level_and_keeps_every_box(patients):
    config = SplitConfig(n_per_class=50, validation_fraction=0.2, seed=1)
    train, validation = split_patients(patients, config)
    assert not set(train["patientId"]) & set(validation["patientId"])
    assert len(train) == 80 and len(validation) == 20
    assert (train["Target"] == 1).sum() == 40 and (validation["Target"] == 1).sum() == 10
    original = patients.set_index("patientId")
    for table in (train, validation):
        for pid, boxes in zip(table["patientId"], table["boxes"], strict=True):
            assert boxes == original.loc[pid, "boxes"]
    assert describe_split(train, validation)["patients_in_both"] == 0


def test_same_seed_same_split_other_seed_other_split(patients):
    config = SplitConfig(n_per_class=None, validation_fraction=0.25, seed=5)
    first = split_patients(patients, config)
    second = split_patients(patients, config)
    pd.testing.assert_frame_equal(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    other = split_patients(patients, SplitConfig(n_per_class=None, validation_fraction=0.25,
                                                 seed=6))
    assert set(other[1]["patientId"]) != set(first[1]["patientId"])
    assert len(first[0]) + len(first[1]) == len(patients)


def test_stratify_by_view_balances_views(patients):
    config = SplitConfig(n_per_class=None, validation_fraction=0.2, stratify_by_view=True,
                         seed=2)
    train, validation = split_patients(patients, config)
    for target in (0, 1):
        for view in ("AP", "PA"):
            total = ((patients["Target"] == target) & (patients["view_position"] == view)).sum()
            in_val = ((validation["Target"] == target)
                      & (validation["view_position"] == view)).sum()
            assert abs(in_val - 0.2 * total) <= 1


def test_fewer_patients_than_requested_keeps_all_with_warning(patients, caplog):
    train, validation = split_patients(patients, SplitConfig(n_per_class=1000, seed=0))
    assert len(train) + len(validation) == len(patients)
    assert "fewer than n_per_class" in caplog.text


def test_parameters_are_checked_by_name():
    assert from_params(SplitConfig, {"n_per_class": None, "seed": 3}, "split").seed == 3
    with pytest.raises(ConfigError, match=r"params:split: unknown key\(s\) \['n_per_klass'\]"):
        from_params(SplitConfig, {"n_per_klass": 3}, "split")
    with pytest.raises(ConfigError, match=r"params:split.validation_fraction = 'a lot'"):
        from_params(SplitConfig, {"validation_fraction": "a lot"}, "split")
    with pytest.raises(ValueError, match="validation_fraction must be between 0 and 1"):
        split_patients(pd.DataFrame({"patientId": [], "Target": []}),
                       SplitConfig(validation_fraction=1.5))


def test_nested_groups_keep_the_enclosing_defaults_for_keys_not_given():
    from pneumonia_kedro.pipelines.inference.nodes import InferenceConfig

    config = from_params(InferenceConfig, {"cache": {"workers": 0}}, "inference")
    assert config.cache.workers == 0 and config.cache.on_error == "skip"


def test_patients_with_the_same_image_stay_in_one_split():
    from pneumonia_kedro.split import SplitConfig, split_patients

    n = 40
    patients = pd.DataFrame({
        "patientId": [f"p{i:02d}" for i in range(n)], "Target": [i % 2 for i in range(n)],
        "n_boxes": [i % 2 for i in range(n)],
        # p00..p09 share one image, p10/p11 another; the rest are distinct or unknown ("").
        "pixel_hash": ["a"] * 10 + ["b"] * 2 + [f"h{i}" for i in range(12, 36)] + [""] * 4})
    for seed in range(10):
        train, validation = split_patients(
            patients, SplitConfig(n_per_class=None, validation_fraction=0.3, seed=seed))
        assert len(train) + len(validation) == n
        for group in (set(patients["patientId"][:10]), {"p10", "p11"}):
            assert group <= set(train["patientId"]) or group <= set(validation["patientId"])


def test_report_lists_are_capped_with_their_count():
    from pneumonia_kedro.reporting import capped

    ids = [f"p{i:05d}" for i in range(26_000)]
    assert capped(ids) == {"count": 26_000, "first": ids[:100]}
    reasons = dict.fromkeys(ids[:3], "no file")
    assert capped(reasons, limit=2) == {"count": 3, "first": {"p00000": "no file",
                                                              "p00001": "no file"}}


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_every_patient_is_in_exactly_one_fold_with_all_its_boxes(patients, folds):
    from pneumonia_kedro.split import assign_folds, fold_patients

    table = assign_folds(patients, folds, by_view=True, seed=3)
    assert sorted(table["patientId"]) == sorted(patients["patientId"])
    assert sorted(table["fold"].unique()) == list(range(folds))
    seen: list[str] = []
    original = patients.set_index("patientId")
    for fold in range(folds):
        train, validation = fold_patients(patients, table, fold)
        assert not set(train["patientId"]) & set(validation["patientId"])
        assert len(train) + len(validation) == len(patients)
        seen += validation["patientId"].tolist()
        for pid, boxes in zip(validation["patientId"], validation["boxes"], strict=True):
            assert boxes == original.loc[pid, "boxes"]
        # Stratified: each fold's share of positives is the whole set's, within one patient.
        positives = (patients["Target"] == 1).sum() / folds
        assert abs((validation["Target"] == 1).sum() - positives) <= 1
    assert sorted(seen) == sorted(patients["patientId"])  # each once: never in two folds
    again = assign_folds(patients, folds, by_view=True, seed=3)
    pd.testing.assert_frame_equal(table, again)
    assert not assign_folds(patients, folds, by_view=True, seed=4).equals(table)


def test_patients_with_the_same_image_share_a_fold():
    from pneumonia_kedro.split import assign_folds

    n = 40
    patients = pd.DataFrame({
        "patientId": [f"p{i:02d}" for i in range(n)], "Target": [i % 2 for i in range(n)],
        "pixel_hash": ["a"] * 6 + ["b"] * 2 + [f"h{i}" for i in range(8, 36)] + [""] * 4})
    for seed in range(5):
        fold = assign_folds(patients, 3, by_view=False, seed=seed).set_index("patientId")["fold"]
        assert fold[[f"p{i:02d}" for i in range(6)]].nunique() == 1
        assert fold["p06"] == fold["p07"]


def test_too_few_patients_for_the_folds_is_refused_by_name(patients):
    from pneumonia_kedro.split import assign_folds, fold_patients

    with pytest.raises(ValueError, match="split.folds = 5 but only 3 training patients"):
        assign_folds(patients.head(3), 5, by_view=False, seed=0)
    table = assign_folds(patients.head(20), 2, by_view=False, seed=0)
    with pytest.raises(ValueError, match="1 training patient.s. have no fold"):
        fold_patients(patients.head(21), table, 0)
    with pytest.raises(ConfigError, match="split.folds"):
        from_params(SplitConfig, {"folds": 0}, "split")


def test_a_fold_s_name_and_index_are_one_mapping():
    from pneumonia_kedro.split import fold_index, fold_name

    assert [fold_index(fold_name(i)) for i in (0, 3, 12)] == [0, 3, 12]
    assert fold_name(2) == "fold_2"
    for other in ("model", "fold_", "fold_x", "fold_2.sub", "my_fold_2", ""):
        assert fold_index(other) is None, other


@pytest.mark.parametrize(("fraction", "message"), [
    (0.01, r"params:split.validation_fraction = 0.01 leaves 1 of 16 patients \(distinct "
           r"images\) for validation and 15 for training, but each part needs one of each of "
           r"the 2 strata \(Target\): use a value from 0.125 to 0.875 with this data"),
    (0.99, r"params:split.validation_fraction = 0.99 leaves 16 of 16 .* use a value from "
           r"0.125 to 0.875"),
])
def test_a_validation_fraction_the_data_cannot_split_names_the_key_and_the_workable_values(
        patients, fraction, message):
    """0.01 and 0.99 gave scikit-learn's raw errors (test_size = 1 should be greater or
    equal to the number of classes = 2; the resulting train set will be empty)."""
    config = SplitConfig(n_per_class=8, validation_fraction=fraction, seed=1)
    with pytest.raises(ConfigError, match=message):
        split_patients(patients, config)


def test_every_validation_fraction_either_splits_or_names_the_key(patients):
    """No fraction reaches scikit-learn's own errors, and the advertised range works."""
    accepted, fractions = [], [float(f) for f in np.round(np.arange(0.01, 1.0, 0.01), 2)]
    for fraction in fractions:
        config = SplitConfig(n_per_class=8, validation_fraction=fraction,
                             stratify_by_view=True, seed=1)
        try:
            train, validation = split_patients(patients, config)
        except ConfigError as error:
            assert "params:split." in str(error)
            continue
        accepted.append(float(fraction))
        assert len(train) and len(validation)
    # One contiguous band, and a wide one: not a few lucky values.
    assert accepted == [f for f in fractions if accepted[0] <= f <= accepted[-1]]
    assert accepted[-1] - accepted[0] > 0.5


def test_a_stratum_of_one_patient_names_the_setting(patients):
    one_lateral = patients.head(40).assign(view_position="AP")
    one_lateral.loc[0, "view_position"] = "LL"
    with pytest.raises(ConfigError, match="stratum '.*_LL' has only 1 patient .* set "
                                          "params:split.stratify_by_view: false"):
        split_patients(one_lateral, SplitConfig(n_per_class=None, stratify_by_view=True))


def test_more_folds_than_training_patients_is_refused_by_the_split_with_the_numbers(patients):
    config = SplitConfig(n_per_class=8, validation_fraction=0.25, folds=13, seed=1)
    with pytest.raises(ConfigError, match=r"params:split.folds = 13, but the split leaves 12 "
                                          r"training patients .* use at most 12 folds"):
        split_patients(patients, config)
    train, _ = split_patients(patients, SplitConfig(n_per_class=8, validation_fraction=0.25,
                                                    folds=12, seed=1))
    assert len(train) == 12


def test_the_most_training_patients_follow_from_the_settings():
    assert training_patients_at_most(SplitConfig(n_per_class=500)) == 800
    assert training_patients_at_most(SplitConfig(n_per_class=10, validation_fraction=0.25)) \
        == 15
    assert training_patients_at_most(SplitConfig(n_per_class=None)) is None


@pytest.mark.parametrize("value", ["two", 0, -1, 2.5, True, None])
def test_a_fold_count_that_is_not_a_whole_number_is_refused_in_one_place(value):
    with pytest.raises(ConfigError, match=rf"params:split.folds = {value!r}: the number of "
                                          "cross-validation folds, a whole number"):
        fold_count(value)
    assert fold_count(3) == 3
