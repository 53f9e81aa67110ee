"""Image-level gating: a separate classifier against a head on the detector's own backbone.

    .venv/bin/python benchmarks/gating_head.py        # after `make demo`

The issue asked for both to be measured on the demo data and the winner kept. This trains the
demo's detector again, on the demo run's own split and image cache and with the demo's
settings, with one addition: a linear image-level head on the FPN's coarsest level whose
binary cross-entropy joins the detector's losses (the joint alternative). On the validation
patients it prints, with 95 % bootstrap intervals over patients, the image-level ROC AUC of:

  joint head        the head trained with the detector
  classifier        the project's separate classifier (the demo run's
                    validation_image_probabilities)
  detector alone    the highest box score of the demo run's detector

and the detector's training speed with and without the head (the demo run's history).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parents[1]


class JointImageHead(nn.Module):
    """A Faster R-CNN whose backbone also feeds an image-level opacity logit."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.transform = detector.transform
        self.head = nn.Linear(detector.backbone.out_channels, 1)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        detector = self.detector
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = detector.transform(images, targets)
        features = detector.backbone(batch.tensors)
        logits = self.head(features["pool"].float().mean(dim=(2, 3))).squeeze(1)
        proposals, rpn_losses = detector.rpn(batch, features, targets)
        detections, roi_losses = detector.roi_heads(features, proposals, batch.image_sizes,
                                                    targets)
        if self.training:
            has_box = torch.tensor([float(len(t["boxes"]) > 0) for t in targets],
                                   device=logits.device)
            return {**rpn_losses, **roi_losses,
                    "loss_image": F.binary_cross_entropy_with_logits(logits, has_box)}
        detections = detector.transform.postprocess(detections, batch.image_sizes,
                                                    original_sizes)
        for detection, probability in zip(detections, torch.sigmoid(logits), strict=True):
            detection["image_score"] = probability
        return detections


def main() -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from pneumonia_kedro.bootstrap import BootstrapConfig, resample_counts, roc_auc_interval
    from pneumonia_kedro.config import from_params
    from pneumonia_kedro.models import ModelConfig, build_model, to_model_input
    from pneumonia_kedro.postprocess import image_probabilities
    from pneumonia_kedro.prediction import fuse_variants, prediction_settings
    from pneumonia_kedro.training import CachedDetectionDataset, TrainConfig, detector, train_model

    bootstrap_project(ROOT)
    with KedroSession.create(project_path=ROOT, env="demo") as session:
        context = session.load_context()
        catalog, params = context.catalog, context.params
        caches = {split: catalog.load(f"{split}_image_cache")
                  for split in ("train", "validation")}
        train_patients = catalog.load("train_patients")
        validation_patients = catalog.load("validation_patients")
        classifier_p = catalog.load("validation_image_probabilities")
        # Fused at the IoU the evaluation chose (the table keeps the TTA variants apart).
        tta, _ = prediction_settings(catalog.load("postprocessing"))
        raw = fuse_variants(catalog.load("raw_validation_predictions"), tta.fusion_iou,
                            tta.skip_score)
        history = catalog.load("training_history")
    model_config = from_params(ModelConfig, {**params["model"],
                                             "image_size": caches["train"].image_size}, "model")
    config = from_params(TrainConfig, {**params["train"], "progress": False, "resume": False},
                         "train")
    train_data = CachedDetectionDataset(caches["train"], train_patients, config.negative_boxes,
                                        config.augment)
    validation_data = CachedDetectionDataset(caches["validation"], validation_patients)
    detector.build_model = lambda cfg: JointImageHead(build_model(cfg))  # the one change
    started = time.perf_counter()
    result = train_model(model_config, config, train_data, validation_data)
    seconds = time.perf_counter() - started
    model = JointImageHead(build_model(model_config))
    model.load_state_dict(result.best_state)
    model.eval()
    usable = caches["validation"].usable
    scores = []
    with torch.inference_mode():
        for start in range(0, len(usable), 16):
            rows = usable["row"].to_numpy()[start:start + 16]
            images = torch.from_numpy(np.array(caches["validation"].images[rows]))[:, None]
            outputs = model(to_model_input(images, torch.device("cpu")))
            scores.extend(float(o["image_score"]) for o in outputs)
    joint = pd.Series(scores, index=usable["patientId"])
    ids = validation_patients["patientId"].tolist()
    targets = validation_patients["Target"].to_numpy(int) == 1
    counts = resample_counts(len(ids), BootstrapConfig())
    rows = {
        "joint head": joint.reindex(ids).to_numpy(float),
        "classifier": classifier_p.set_index("patientId")["probability"].reindex(ids)
        .to_numpy(float),
        "detector alone": image_probabilities(raw, ids),
    }
    print(f"{len(ids)} validation patients ({targets.sum()} with opacity)")
    print("| image-level probability | ROC AUC [95 % interval] |\n| --- | --- |")
    for name, probabilities in rows.items():
        auc = roc_auc_interval(targets, probabilities, counts)
        print(f"| {name} | {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}] |")
    with_head = np.mean([epoch["images_per_second"] for epoch in result.history])
    print(f"detector training: {with_head:.1f} images/s with the joint head ({seconds:.0f} s), "
          f"{history['images_per_second'].mean():.1f} without (the demo run)")

if __name__ == "__main__":
    main()
