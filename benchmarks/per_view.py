"""Post-processing tuned per view position (AP, PA) against one tuning for all images.

    .venv/bin/python benchmarks/per_view.py        # after `make demo`

AP films (portable, often sicker patients) and PA films look different, so the winners
sometimes tuned thresholds per view. On the demo run's own validation predictions and
classifier probabilities, both ways are scored held out from their tuning exactly as the
evaluation does (each half of the validation patients scored with values tuned on the other
half; per view: tuned on the other half's patients of the same view), over several seeds of
the halving, with the 95 % bootstrap interval over patients of each.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from pneumonia_kedro.bootstrap import BootstrapConfig, mean_interval, resample_counts
    from pneumonia_kedro.config import from_params
    from pneumonia_kedro.evaluation import EvaluateConfig, truth_by_patient
    from pneumonia_kedro.fusion import fuse_variants
    from pneumonia_kedro.metrics import competition_scores
    from pneumonia_kedro.postprocess import PostprocessConfig, per_image, postprocess
    from pneumonia_kedro.prediction import prediction_settings
    from pneumonia_kedro.tuning import halves, search

    bootstrap_project(ROOT)
    with KedroSession.create(project_path=ROOT, env="demo") as session:
        context = session.load_context()
        catalog = context.catalog
        # Fused at the IoU the evaluation chose (the table keeps the TTA variants apart).
        tta, _ = prediction_settings(catalog.load("postprocessing"))
        raw = fuse_variants(catalog.load("raw_validation_predictions"), tta.fusion_iou,
                            tta.skip_score)
        patients = catalog.load("validation_patients")
        probabilities = catalog.load("validation_image_probabilities") \
            .set_index("patientId")["probability"]
        config = from_params(EvaluateConfig, context.params["evaluate"], "evaluate")
    truth = truth_by_patient(patients)
    ids = patients["patientId"].tolist()
    counts = resample_counts(len(ids), BootstrapConfig())

    def tuned(tuning_ids: list[str]) -> PostprocessConfig:
        return search(raw, {pid: truth[pid] for pid in tuning_ids}, PostprocessConfig(),
                      config.search, probabilities)[0]

    def held_out(seed: int, per_view: bool) -> np.ndarray:
        finals = []
        first, second = halves(patients, seed)
        for reported, tuning in ((second, first), (first, second)):
            if not per_view:
                values = tuned(list(tuning))
                own = raw.loc[raw["patientId"].isin(set(reported))]
                finals.append(postprocess(own, values, probabilities=probabilities))
                continue
            for _, view in patients.groupby("view_position"):
                view_ids = set(view["patientId"])
                values = tuned([pid for pid in tuning if pid in view_ids])
                own = raw.loc[raw["patientId"].isin(set(reported) & view_ids)]
                finals.append(postprocess(own, values, probabilities=probabilities))
        boxes, scores = per_image(pd.concat(finals, ignore_index=True), ids)
        return competition_scores([truth[pid] for pid in ids], boxes, scores)

    print(f"{len(ids)} validation patients; views: "
          f"{patients['view_position'].value_counts().to_dict()}")
    print("| halving seed | one tuning | per view | change |\n| --- | --- | --- | --- |")
    changes = []
    for seed in range(5):
        joint = mean_interval(held_out(seed, False), counts)
        split = mean_interval(held_out(seed, True), counts)
        changes.append(split["value"] - joint["value"])
        print(f"| {seed} | {joint['value']:.3f} [{joint['low']:.3f}, {joint['high']:.3f}] | "
              f"{split['value']:.3f} [{split['low']:.3f}, {split['high']:.3f}] | "
              f"{changes[-1]:+.3f} |")
    print(f"mean change per view against one tuning: {np.mean(changes):+.3f}")


if __name__ == "__main__":
    main()
