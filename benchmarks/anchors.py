"""Anchors against the RSNA boxes at the cache's scale.

    .venv/bin/python benchmarks/anchors.py [--sizes 128 192 256]

Reads the real stage-2 boxes (``stage_2_train_labels.csv`` as torchxrayvision ships it; without
it, the demo generator's fitted distributions), scales them from 1024 px to each cache size
(the images are square: the letterbox is a plain resize), and prints their width, height and
aspect (height / width) quantiles, then for each anchor set the share of boxes that some
anchor overlaps at IoU >= 0.5 and >= 0.7 (the RPN's positive threshold; below 0.7 a box has
only its best anchor as a positive) and the median best IoU. Anchors are laid out exactly as
torchvision's ``AnchorGenerator`` lays them on the architecture's real feature maps.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

from pneumonia_kedro.datasets import PackageTableDataset  # noqa: E402
from pneumonia_kedro.demo import DemoConfig, sample_demo_patients  # noqa: E402
from pneumonia_kedro.models import ModelConfig, build_model  # noqa: E402

SOURCE_SIZE = 1024
PAIRS_PER_CHUNK = 20_000_000  # box-anchor IoUs at once: a few GiB of box_iou temporaries
# name: (architecture, sizes per feature map at REFERENCE px, ratios, scaled with the cache)
REFERENCE = 128
ANCHOR_SETS = {
    "demo until now (fixed px)": ("mobilenet_v3_large_fpn", ((16, 32, 64, 128),) * 3,
                                  (1.0, 1.5, 2.0), False),
    "torchvision default": ("mobilenet_v3_large_fpn", ((32, 64, 128, 256, 512),) * 3,
                            (0.5, 1.0, 2.0), False),
    "proposed mobilenet (scaled)": ("mobilenet_v3_large_fpn", ((12, 20, 32, 48, 72),) * 3,
                                    (1.0, 1.5, 2.0), True),
    "resnet FPN default": ("resnet18_fpn", ((32,), (64,), (128,), (256,), (512,)),
                           (0.5, 1.0, 2.0), False),
    # The RPN has one head for every map: each level needs the same anchor count.
    "proposed resnet FPN (scaled)": ("resnet18_fpn",
                                     ((12, 20), (24, 32), (40, 56), (64, 80), (96, 128)),
                                     (1.0, 1.5, 2.0), True),
}


def rsna_boxes() -> tuple[pd.DataFrame, str]:
    """Width and height of every positive box at 1024 px, and where they came from."""
    labels = PackageTableDataset(package="torchxrayvision",
                                 resource="data/kaggle_stage_2_train_labels.csv.zip").load()
    if not labels.empty:
        boxes = labels.loc[labels["Target"] == 1, ["width", "height"]].astype(float)
        return boxes.reset_index(drop=True), "stage_2_train_labels.csv (torchxrayvision)"
    labels, _, _ = sample_demo_patients(None, None, DemoConfig(n_positive=5000, n_negative=0,
                                                               n_test=0))
    boxes = labels.loc[labels["Target"] == 1, ["width", "height"]].astype(float)
    return boxes.reset_index(drop=True), "the demo generator's fitted distributions"


def quantile_table(boxes: pd.DataFrame, sizes: list[int]) -> str:
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    lines = ["| cache px | quantity | " + " | ".join(f"q{int(q * 100)}" for q in qs) + " |",
             "| --- | --- |" + " --- |" * len(qs)]
    aspect = boxes["height"] / boxes["width"]
    for size in sizes:
        scale = size / SOURCE_SIZE
        for name, values in (("width", boxes["width"] * scale),
                             ("height", boxes["height"] * scale),
                             ("sqrt(w*h)", np.sqrt(boxes["width"] * boxes["height"]) * scale)):
            lines.append(f"| {size} | {name} | " + " | ".join(
                f"{values.quantile(q):.1f}" for q in qs) + " |")
    lines.append("| any | aspect h/w | " + " | ".join(f"{aspect.quantile(q):.2f}" for q in qs)
                 + " |")
    return "\n".join(lines)


def placed_anchors(architecture: str, sizes: tuple, ratios: tuple, image_size: int
                   ) -> torch.Tensor:
    """Every anchor (``xyxy``) torchvision places on this architecture's feature maps."""
    config = ModelConfig(architecture=architecture, pretrained="none", trainable="all",
                         image_size=image_size, anchor_sizes=sizes, anchor_ratios=ratios)
    model = build_model(replace(config, anchor_sizes=None)).eval()
    with torch.no_grad():
        features = list(model.backbone(torch.zeros(1, 3, image_size, image_size)).values())
    generator = AnchorGenerator(sizes, (ratios,) * len(sizes))
    images = ImageList(torch.zeros(1, 3, image_size, image_size), [(image_size, image_size)])
    return generator(images, features)[0]


def best_iou(boxes: pd.DataFrame, anchors: torch.Tensor, image_size: int) -> np.ndarray:
    """Each box's best IoU with any anchor, the box at a random centre in the image's middle
    half (where the lungs are): its offset from the anchors' grid matters."""
    scale = image_size / SOURCE_SIZE
    w = torch.tensor(boxes["width"].to_numpy() * scale)
    h = torch.tensor(boxes["height"].to_numpy() * scale)
    rng = np.random.default_rng(0)
    cx = torch.tensor(rng.uniform(0.25, 0.75, len(w)) * image_size)
    cy = torch.tensor(rng.uniform(0.25, 0.75, len(w)) * image_size)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).float()
    # A 1024 px ResNet FPN places 262k anchors: 1000 boxes against them at once took 16 GiB.
    per_chunk = max(1, PAIRS_PER_CHUNK // max(1, len(anchors)))
    return np.concatenate([box_iou(chunk, anchors).max(1).values.numpy()
                           for chunk in xyxy.split(per_chunk)])


def match_table(boxes: pd.DataFrame, sizes: list[int]) -> str:
    lines = ["| anchor set | architecture | cache px | sizes | ratios | anchors / location "
             "| IoU >= 0.5 | IoU >= 0.7 | median best IoU |", "| --- |" + " --- |" * 8]
    for name, (architecture, base, ratios, scaled) in ANCHOR_SETS.items():
        for size in sizes:
            factor = size / REFERENCE if scaled else 1.0
            levels = tuple(tuple(max(1, round(s * factor)) for s in level) for level in base)
            best = best_iou(boxes, placed_anchors(architecture, levels, ratios, size), size)
            shown = str([list(level) for level in levels]) if len(set(levels)) > 1 else \
                f"{list(levels[0])} x{len(levels)}"
            lines.append(f"| {name} | {architecture} | {size} | {shown} | {list(ratios)} | "
                         f"{len(levels[0]) * len(ratios)} | {np.mean(best >= 0.5):.1%} | "
                         f"{np.mean(best >= 0.7):.1%} | {np.median(best):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 192, 256])
    args = parser.parse_args()
    boxes, source = rsna_boxes()
    print(f"{len(boxes)} boxes from {source}\n")
    print(quantile_table(boxes, args.sizes) + "\n")
    print(match_table(boxes, args.sizes))


if __name__ == "__main__":
    main()
