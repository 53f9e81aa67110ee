"""The post-processing search, gating rules, label shift, and the held-out (cross-fitted)
report: the tuning never sees the patients it is then scored on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from pneumonia_kedro import tuning
from pneumonia_kedro.config import ConfigError
from pneumonia_kedro.evaluation import EvaluateConfig, held_out_postprocessing, truth_by_patient
from pneumonia_kedro.pipelines.evaluate import nodes as evaluate_nodes
from pneumonia_kedro.postprocess import GatingConfig, PostprocessConfig, gate, postprocess
from pneumonia_kedro.prediction import TTAConfig, postprocessed
from pneumonia_kedro.tuning import SearchSpace, cross_fit, halves, search


def _case(n_patients: int = 40, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Positives whose one predicted box is the truth box enlarged to 1/0.85 of its sides
    (score 0.9); every patient also gets a stray box of score 0.3."""
    rng = np.random.default_rng(seed)
    patients, raw = [], []
    for i in range(n_patients):
        pid = f"p{i:03d}"
        positive = i % 2 == 0
        x, y = rng.uniform(100, 400, 2)
        truth = [[x, y, 200.0, 200.0]] if positive else []
        patients.append({"patientId": pid, "Target": int(positive), "boxes": truth})
        if positive:
            side = 200.0 / 0.85
            raw.append((pid, x + 100 - side / 2, y + 100 - side / 2, side, side, 0.9))
        raw.append((pid, 700.0, 700.0, 150.0, 150.0, 0.3))
    return (pd.DataFrame(patients),
            pd.DataFrame(raw, columns=["patientId", "x", "y", "width", "height", "score"]))


def _truth(patients: pd.DataFrame) -> dict[str, np.ndarray]:
    return truth_by_patient(patients)


SPACE = SearchSpace(score_threshold=(0.2, 0.5), nms_iou=(0.1,), shrink=(0.8, 0.85, 1.0),
                    max_boxes=(4,))


def test_search_finds_the_threshold_and_shrink_that_make_every_box_right():
    patients, raw = _case()
    chosen, table = search(raw, _truth(patients), PostprocessConfig(), SPACE)
    assert (chosen.score_threshold, chosen.shrink) == (0.5, 0.85)
    assert table["competition_metric"].max() == pytest.approx(1.0)
    assert len(table) == 2 * 3
    # Unshrunk boxes overlap their truth by IoU 0.72: right only at IoU thresholds below it.
    unshrunk = table.loc[(table["shrink"] == 1.0) & (table["score_threshold"] == 0.5)]
    assert unshrunk["competition_metric"].iloc[0] == pytest.approx(7 / 8)


def test_search_looks_only_at_the_patients_it_is_given():
    patients, raw = _case()
    ids = patients["patientId"].iloc[:20]
    truth = {pid: boxes for pid, boxes in _truth(patients).items() if pid in set(ids)}
    # Other patients' rows would change the optimum if they were read.
    others = raw.loc[~raw["patientId"].isin(set(ids))].assign(score=0.95)
    chosen, table = search(pd.concat([raw, others]), truth, PostprocessConfig(), SPACE)
    alone, alone_table = search(raw.loc[raw["patientId"].isin(set(ids))], truth,
                                PostprocessConfig(), SPACE)
    assert chosen == alone
    pd.testing.assert_frame_equal(table, alone_table)


def test_halves_are_disjoint_cover_everyone_and_split_positives_evenly():
    patients, _ = _case(41)
    first, second = halves(patients, seed=3)
    assert not set(first) & set(second)
    assert set(first) | set(second) == set(patients["patientId"])
    positives = set(patients.loc[patients["Target"] == 1, "patientId"])
    assert abs(len(positives & set(first)) - len(positives & set(second))) <= 1


def test_the_tuning_never_sees_the_patients_it_is_reported_on(monkeypatch):
    patients, raw = _case()
    seen: list[set[str]] = []
    real_search = tuning.search

    def spy(raw_predictions, truth, *args, **kwargs):
        seen.append(set(truth))
        return real_search(raw_predictions, truth, *args, **kwargs)

    monkeypatch.setattr(tuning, "search", spy)
    config = EvaluateConfig(search=SPACE)
    final, candidates, chosen = held_out_postprocessing(raw, patients, None, config)
    assert len(seen) == 2 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(patients["patientId"])
    reported = [set(ids) for ids, _ in cross_fit(patients, lambda ids: None, seed=0)]
    # The first half reported was tuned on the other: never on itself.
    assert reported[0] == seen[1] and reported[1] == seen[0]
    assert [c["patients"] for c in chosen] == [20, 20]
    assert set(final["patientId"]) <= set(patients["patientId"])
    assert set(candidates["patientId"]) == set(patients["patientId"])


def test_gating_rules_change_scores_as_documented():
    predictions = pd.DataFrame({"patientId": ["a", "a", "b"], "x": 0.0, "y": 0.0,
                                "width": 10.0, "height": 10.0, "score": [0.8, 0.4, 0.9]})
    probabilities = pd.Series({"a": 0.5, "b": 0.1})
    product = gate(predictions, probabilities, GatingConfig("product"))
    np.testing.assert_allclose(product["score"], [0.4, 0.2, 0.09])
    geometric = gate(predictions, probabilities, GatingConfig("geometric"))
    np.testing.assert_allclose(geometric["score"], np.sqrt([0.4, 0.2, 0.09]))
    dropped = gate(predictions, probabilities, GatingConfig("drop_below", threshold=0.3))
    assert dropped["patientId"].tolist() == ["a", "a"]
    assert gate(predictions, None, GatingConfig()).equals(predictions)
    with pytest.raises(ValueError, match="needs image-level probabilities"):
        gate(predictions, None, GatingConfig("product"))
    with pytest.raises(ValueError, match="no image-level probability for b"):
        gate(predictions, probabilities.drop("b"), GatingConfig("product"))


def test_label_shift_scales_delivered_boxes_only():
    _, raw = _case(2)
    config = PostprocessConfig(score_threshold=0.5, shrink=0.85, label_shift=0.9)
    evaluated = postprocess(raw, config)
    delivered, _, probability = postprocessed(raw, TTAConfig(), config, None, ["p000", "p001"])
    np.testing.assert_allclose(evaluated["width"], [200.0])
    np.testing.assert_allclose(delivered["width"], [180.0])
    np.testing.assert_allclose(delivered["x"] + delivered["width"] / 2,
                               evaluated["x"] + evaluated["width"] / 2)
    # The image probability is the best candidate's score, whatever the threshold keeps.
    assert probability.to_dict() == {"p000": 0.9, "p001": 0.3}


def test_search_space_is_checked_by_name():
    with pytest.raises(ConfigError, match="search.shrink: 0 is not"):
        SearchSpace(shrink=(0, 1.0))
    with pytest.raises(ConfigError, match="search.max_boxes lists no value"):
        SearchSpace(max_boxes=())
    with pytest.raises(ConfigError, match="'sum' is not one of"):
        SearchSpace(gating_rule=("sum",))
    with pytest.raises(ConfigError, match="need image-level probabilities"):
        patients, raw = _case(4)
        search(raw, _truth(patients), PostprocessConfig(),
               SearchSpace(gating_rule=("product",)))
    with pytest.raises(ConfigError, match="evaluate.search.score_threshold"):
        evaluate_nodes._config({"threshold_grid": [0.1, 0.9, 0.1]})


def test_every_combination_searched_scores_as_post_processing_it_would():
    """The search keeps prefixes of one matching pass; each row must equal post-processing
    with those values, then the competition metric, done the plain way."""
    from pneumonia_kedro.metrics import competition_metric
    from pneumonia_kedro.postprocess import per_image

    rng = np.random.default_rng(7)
    n = 300
    ids = [f"p{i:02d}" for i in range(30)]
    raw = pd.DataFrame({"patientId": rng.choice(ids, n), "x": rng.uniform(0, 600, n),
                        "y": rng.uniform(0, 600, n), "width": rng.uniform(80, 300, n),
                        "height": rng.uniform(80, 300, n), "score": rng.uniform(0, 1, n)})
    truth = {pid: (np.array([[x, y, x + 200.0, y + 220.0]]) if i % 3 else np.zeros((0, 4)))
             for i, (pid, x, y) in enumerate(zip(ids, rng.uniform(0, 500, 30),
                                                 rng.uniform(0, 500, 30), strict=True))}
    probabilities = pd.Series(rng.uniform(0, 1, 30), index=ids)
    space = SearchSpace(score_threshold=(0.1, 0.3, 0.6), nms_iou=(0.2, 0.5), shrink=(0.85, 1.0),
                        max_boxes=(1, 3), gating_rule=("none", "product", "geometric",
                                                        "drop_below"),
                        gating_threshold=(0.3, 0.7))
    _, table = search(raw, truth, PostprocessConfig(), space, probabilities)
    assert len(table) == 3 * 2 * 2 * 2 * 5
    for row in table.to_dict("records"):
        config = PostprocessConfig(
            score_threshold=row["score_threshold"], nms_iou=row["nms_iou"],
            shrink=row["shrink"], max_boxes=row["max_boxes"],
            gating=GatingConfig(row["gating_rule"], row["gating_threshold"]))
        boxes, scores = per_image(postprocess(raw, config, probabilities=probabilities), ids)
        expected = competition_metric([truth[pid] for pid in ids], boxes, scores)
        assert row["competition_metric"] == pytest.approx(expected, abs=1e-12), row


def test_the_fusion_iou_is_searched_over_the_variants_kept_apart():
    from pneumonia_kedro.fusion import fuse_variants
    from pneumonia_kedro.tuning import search_with_fusion

    patients, raw = _case()
    # A second variant: every box shifted a little and scored a little lower.
    other = raw.assign(x=raw["x"] + 3.0, score=raw["score"] * 0.9)
    apart = pd.concat([raw.assign(variant=0), other.assign(variant=1)],
                      ignore_index=True).assign(variants=2)
    truth = _truth(patients)
    space = SearchSpace(score_threshold=(0.1, 0.3, 0.5), nms_iou=(0.3,), shrink=(1.0,),
                        max_boxes=(2,), fusion_iou=(0.3, 0.9))
    chosen, iou, table = search_with_fusion(apart, truth, PostprocessConfig(), space,
                                            TTAConfig(hflip=True))
    assert sorted(table["fusion_iou"].unique()) == [0.3, 0.9]
    best = table.loc[table["competition_metric"].idxmax()]
    assert iou == best["fusion_iou"] and chosen.score_threshold == best["score_threshold"]
    for each in (0.3, 0.9):
        alone, alone_table = search(fuse_variants(apart, each), truth, PostprocessConfig(),
                                    space)
        np.testing.assert_allclose(
            table.loc[table["fusion_iou"] == each, "competition_metric"],
            alone_table["competition_metric"])
    # Without a list the TTA's own fusion IoU is used.
    _, default_iou, default_table = search_with_fusion(
        apart, truth, PostprocessConfig(), dataclasses.replace(space, fusion_iou=()),
        TTAConfig(hflip=True, fusion_iou=0.6))
    assert default_iou == 0.6 and set(default_table["fusion_iou"]) == {0.6}
    with pytest.raises(ConfigError, match="search.fusion_iou: 0"):
        SearchSpace(fusion_iou=(0.0,))
