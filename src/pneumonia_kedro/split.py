"""Patient-level stratified sampling and train/validation split.

Rows of the per-patient table are patients, so a patient is never split across sets and always
keeps every one of its boxes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.utils import shuffle

from pneumonia_kedro.config import AT_LEAST_ONE, ConfigError, Range

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitConfig:
    """How many patients to keep per Target and how to split them."""

    RANGES = {"n_per_class": AT_LEAST_ONE,
              "validation_fraction": Range(0, 1, low_open=True, high_open=True),
              "folds": AT_LEAST_ONE}

    n_per_class: int | None = 500
    validation_fraction: float = 0.2
    stratify_by_view: bool = False
    seed: int = 42
    # k > 1: the training patients are also cut into k cross-validation folds; every one of
    # them is in exactly one fold's validation part.
    folds: int = 1


def sample_patients(patients: pd.DataFrame, n_per_class: int | None, seed: int
                    ) -> pd.DataFrame:
    """Up to ``n_per_class`` patients of each Target (``None`` keeps all), sorted by patientId."""
    if n_per_class is None:
        return patients.sort_values("patientId").reset_index(drop=True)
    chosen = []
    for target, group in patients.groupby("Target", sort=True):
        if len(group) < n_per_class:
            logger.warning("only %d patients with Target %s, fewer than n_per_class=%d; "
                           "keeping all of them", len(group), target, n_per_class)
        chosen.append(shuffle(group, random_state=seed).head(n_per_class))
    return pd.concat(chosen).sort_values("patientId").reset_index(drop=True)


def strata(patients: pd.DataFrame, by_view: bool) -> pd.Series:
    """The label each patient is stratified by: Target, optionally with view position."""
    labels = patients["Target"].astype(str)
    if by_view:
        labels = labels + "_" + patients["view_position"].fillna("unknown").astype(str)
    return labels


def split_patients(patients: pd.DataFrame, config: SplitConfig
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sample, then split into train and validation patients, stratified and seeded."""
    if not 0 < config.validation_fraction < 1:
        raise ValueError(
            f"validation_fraction must be between 0 and 1, got {config.validation_fraction}"
        )
    sampled = sample_patients(patients, config.n_per_class, config.seed)
    if "view_position" not in sampled and config.stratify_by_view:
        raise ValueError("stratify_by_view needs a view_position column in the patient table")
    # Patients with byte-identical images (a copied file) go to one split together: their
    # group is split as one, represented by its first patient.
    groups = image_groups(sampled)
    representatives = sampled.loc[~groups.duplicated()]
    labels = strata(representatives, config.stratify_by_view)
    check_split_sizes(labels, config)
    _, validation_groups = train_test_split(
        representatives,
        test_size=config.validation_fraction,
        stratify=labels,
        random_state=config.seed,
    )
    in_validation = groups.isin(set(groups[validation_groups.index]))
    return (sampled.loc[~in_validation].sort_values("patientId").reset_index(drop=True),
            sampled.loc[in_validation].sort_values("patientId").reset_index(drop=True))


def check_split_sizes(labels: pd.Series, config: SplitConfig) -> None:
    """Refuse, naming the key and the workable values, a split scikit-learn cannot make:
    each part needs a patient of every stratum (``labels``: one per distinct image), every
    stratum two patients, and k folds at least k training patients."""
    n, counts = len(labels), labels.value_counts()
    strata_named = "Target and view" if config.stratify_by_view else "Target"
    if counts.min() < 2:
        raise ConfigError(
            f"the split is stratified by {strata_named}, and stratum {counts.idxmin()!r} has "
            f"only {counts.min()} patient (distinct image) of {n}: every stratum needs 2"
            + ("; set params:split.stratify_by_view: false" if config.stratify_by_view
               else "; sample more patients (params:split.n_per_class)"))
    # scikit-learn puts ceil(fraction * n) in the validation part, the rest in training.
    n_validation = math.ceil(config.validation_fraction * n)
    lowest = math.ceil(len(counts) / n * 1000) / 1000
    highest = math.floor((n - len(counts)) / n * 1000) / 1000
    if not len(counts) <= n_validation <= n - len(counts):
        raise ConfigError(
            f"params:split.validation_fraction = {config.validation_fraction:g} leaves "
            f"{n_validation} of {n} patients (distinct images) for validation and "
            f"{n - n_validation} for training, but each part needs one of each of the "
            f"{len(counts)} strata ({strata_named}): use a value from {lowest:g} to "
            f"{highest:g} with this data")
    if config.folds > 1 and n - n_validation < config.folds:
        raise ConfigError(
            f"params:split.folds = {config.folds}, but the split leaves {n - n_validation} "
            f"training patients (distinct images; {n} sampled, validation_fraction "
            f"{config.validation_fraction:g}): every fold needs one; use at most "
            f"{n - n_validation} folds")


def training_patients_at_most(config: SplitConfig, targets: int = 2) -> int | None:
    """The most training patients the split can leave, from the settings alone (None: no
    bound without the data, ``n_per_class`` null), so that a fold count too large for
    them is refused before any node runs."""
    if config.n_per_class is None:
        return None
    sampled = config.n_per_class * targets
    return sampled - math.ceil(config.validation_fraction * sampled)


def fold_count(value: object, source: str = "params:split.folds") -> int:
    """``split.folds`` as a whole number of at least 1; the one check, wherever the fold
    count is read (the pipeline registry, the run's parameter check)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source} = {value!r}: the number of cross-validation folds, a "
                          "whole number (1: one train/validation split)")
    return value


FOLD_PREFIX = "fold_"


def fold_name(index: int) -> str:
    """A fold's name: its Kedro namespace, its MLflow child run and its ensemble member."""
    return f"{FOLD_PREFIX}{index}"


def fold_index(name: str) -> int | None:
    """The index of a fold's name (``fold_2`` -> 2); None for any other name."""
    suffix = name.removeprefix(FOLD_PREFIX)
    return int(suffix) if suffix != name and suffix.isdigit() else None


def assign_folds(patients: pd.DataFrame, folds: int, by_view: bool, seed: int
                 ) -> pd.DataFrame:
    """``patientId`` and ``fold`` (0..folds-1) of every patient: stratified like the split
    (Target, optionally view), seeded; patients with byte-identical images share a fold.

    A patient's fold is the one whose model never saw it: its out-of-fold predictions come
    from that fold's model.
    """
    if folds < 2:
        raise ValueError(f"assign_folds needs at least 2 folds, got {folds}")
    groups = image_groups(patients)
    first_of_group = ~groups.duplicated()
    representatives = patients.loc[first_of_group].reset_index(drop=True)
    representative_groups = groups.loc[first_of_group].to_numpy()
    if len(representatives) < folds:
        raise ValueError(f"split.folds = {folds} but only {len(representatives)} training "
                         "patients (distinct images): lower split.folds")
    labels = strata(representatives, by_view)
    smallest = labels.value_counts().min()
    if smallest < folds:
        # A stratum smaller than k cannot be in every fold: fall back to Target alone.
        logger.warning("a stratum has only %d patients, fewer than split.folds=%d; folds are "
                       "stratified by Target only", smallest, folds)
        labels = strata(representatives, False)
        if labels.value_counts().min() < folds:
            labels = pd.Series("all", index=representatives.index)
    fold_of_group = {}
    cutter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(cutter.split(representatives, labels)):
        fold_of_group.update(dict.fromkeys(representative_groups[held_out], fold))
    return pd.DataFrame({"patientId": patients["patientId"].to_numpy(),
                         "fold": groups.map(fold_of_group).to_numpy(int)}
                        ).sort_values("patientId").reset_index(drop=True)


def fold_patients(patients: pd.DataFrame, patient_folds: pd.DataFrame, fold: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The patients a fold trains on (every other fold) and those it validates on (its own)."""
    fold_of = patients["patientId"].map(patient_folds.set_index("patientId")["fold"])
    if fold_of.isna().any():
        missing = patients.loc[fold_of.isna(), "patientId"].head(5).tolist()
        raise ValueError(f"{int(fold_of.isna().sum())} training patient(s) have no fold "
                         f"(e.g. {missing}): the fold table is from another split; rerun "
                         "the split pipeline")
    own = fold_of.to_numpy(int) == fold
    return (patients.loc[~own].reset_index(drop=True),
            patients.loc[own].reset_index(drop=True))


def image_groups(patients: pd.DataFrame) -> pd.Series:
    """One group per distinct image: the pixel data's digest, or the patient without one."""
    if "pixel_hash" not in patients:
        return patients["patientId"]
    digest = patients["pixel_hash"].fillna("").astype(str)
    return digest.where(digest != "", "patient:" + patients["patientId"])


def describe_split(train: pd.DataFrame, validation: pd.DataFrame) -> dict:
    """Counts per split, Target and view, and the overlap check, for the split report."""
    def summary(table: pd.DataFrame) -> dict:
        result = {
            "patients": len(table),
            "positive": int((table["Target"] == 1).sum()),
            "negative": int((table["Target"] == 0).sum()),
            "boxes": int(table["n_boxes"].sum()),
        }
        if "view_position" in table:
            result["view_position"] = {str(k): int(v) for k, v in
                                       table["view_position"].value_counts().sort_index().items()}
        return result

    overlap = set(train["patientId"]) & set(validation["patientId"])
    return {"train": summary(train), "validation": summary(validation),
            "patients_in_both": len(overlap)}
