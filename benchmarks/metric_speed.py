"""Competition metric speed: the vectorised implementation on the whole training set size
(26,684 images, up to 10 predictions each) beside the plain-loop reference.

    .venv/bin/python benchmarks/metric_speed.py [--images 26684] [--reference-images 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from pneumonia_kedro.boxes import xywh_to_xyxy
from pneumonia_kedro.metrics import competition_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.metric_reference import image_score_reference  # noqa: E402


def _boxes_near(rng: np.random.Generator, centre: np.ndarray, k: int) -> np.ndarray:
    xywh = np.column_stack([centre + rng.normal(0, 60, (k, 2)), rng.uniform(40, 400, (k, 2))])
    return xywh_to_xyxy(xywh) if k else np.zeros((0, 4))


def random_images(n: int, seed: int = 0) -> tuple[list, list, list]:
    """RSNA-like: 22.5 % positive with 1-4 boxes; 0-10 predictions near them."""
    rng = np.random.default_rng(seed)
    truth, predictions, scores = [], [], []
    for _ in range(n):
        n_truth = rng.choice([1, 2, 3, 4], p=[0.435, 0.543, 0.02, 0.002]) \
            if rng.random() < 0.225 else 0
        n_pred = int(rng.integers(0, 11))
        centre = rng.uniform(200, 800, size=2)
        truth.append(_boxes_near(rng, centre, n_truth))
        predictions.append(_boxes_near(rng, centre, n_pred))
        scores.append(rng.random(n_pred))
    return truth, predictions, scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=26_684)
    parser.add_argument("--reference-images", type=int, default=2_000)
    arguments = parser.parse_args()
    truth, predictions, scores = random_images(arguments.images)
    started = time.perf_counter()
    fast = competition_scores(truth, predictions, scores)
    fast_seconds = time.perf_counter() - started
    n_ref = min(arguments.reference_images, arguments.images)
    started = time.perf_counter()
    reference = [image_score_reference(truth[i], predictions[i], scores[i]) for i in range(n_ref)]
    reference_seconds = (time.perf_counter() - started) * arguments.images / n_ref
    same = all((r is None and np.isnan(f)) or abs(r - f) < 1e-12
               for r, f in zip(reference, fast[:n_ref], strict=True))
    print(f"{arguments.images} images, up to 10 predictions each")
    print(f"  vectorised            {fast_seconds:8.2f} s")
    print(f"  plain loops           {reference_seconds:8.2f} s (timed on {n_ref} images, scaled)")
    print(f"  speed-up              {reference_seconds / fast_seconds:8.1f}x; "
          f"identical scores: {same}")


if __name__ == "__main__":
    main()
