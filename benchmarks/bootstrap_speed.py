"""Bootstrap intervals of every headline metric: 1,000 resamples of 5,000 images.

    .venv/bin/python benchmarks/bootstrap_speed.py [--images 5000] [--resamples 1000]

Generated predictions (RSNA's mix: 22.5 % positive images, 1-2 truth boxes, 0-6 predicted
boxes each) are scored as the evaluation does: competition metric, COCO AP, ROC AUC,
sensitivity and specificity, each with its interval; prints the seconds of each.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pneumonia_kedro.bootstrap import (
    BootstrapConfig,
    coco_ap_interval,
    mean_interval,
    proportion_interval,
    resample_counts,
    roc_auc_interval,
)
from pneumonia_kedro.boxes import xywh_to_xyxy
from pneumonia_kedro.metrics import competition_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    truth, boxes, scores = [], [], []
    for _ in range(args.images):
        n_truth = rng.choice([0, 1, 2], p=[0.775, 0.1, 0.125])
        image_truth = xywh_to_xyxy(rng.uniform([100, 100, 100, 150], [600, 500, 300, 400],
                                               (n_truth, 4)))
        near = image_truth + rng.normal(0, 20, image_truth.shape)
        far = xywh_to_xyxy(rng.uniform([0, 0, 60, 60], [700, 700, 300, 300],
                                       (rng.integers(0, 5), 4)))
        truth.append(image_truth)
        boxes.append(np.vstack([near, far]))
        scores.append(rng.uniform(0, 1, len(boxes[-1])))
    targets = np.array([len(t) > 0 for t in truth])
    probability = np.array([s.max() if len(s) else 0.0 for s in scores])
    started = time.perf_counter()
    counts = resample_counts(args.images, BootstrapConfig(resamples=args.resamples))
    timings = {"resample counts": time.perf_counter() - started}
    steps = {
        "competition metric": lambda: mean_interval(
            competition_scores(truth, boxes, scores), counts),
        "COCO AP": lambda: coco_ap_interval(truth, boxes, scores, counts),
        "ROC AUC": lambda: roc_auc_interval(targets, probability, counts),
        "sensitivity": lambda: proportion_interval(probability >= 0.5, targets, counts),
        "specificity": lambda: proportion_interval(probability < 0.5, ~targets, counts),
    }
    for name, step in steps.items():
        started = time.perf_counter()
        interval = step()
        timings[name] = time.perf_counter() - started
        print(f"{name:20s} {interval['value']:.4f} [{interval['low']:.4f}, "
              f"{interval['high']:.4f}]  {timings[name]:6.2f} s")
    print(f"all, {args.resamples} resamples of {args.images} images: "
          f"{sum(timings.values()):.1f} s")


if __name__ == "__main__":
    main()
