"""CPU training-step throughput and data-wait share over the cache (issue: train pipeline).

    .venv/bin/python benchmarks/train_speed.py [--images 48] [--steps 6]

Measures the demo's detector (conf/demo, at its cache size) and resnet50_fpn at 512 px, with
the DataLoader in-process and with 2 workers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_model, write_dicoms  # noqa: E402
from train_bench import measure, training_augmentation  # noqa: E402

from pneumonia_kedro.dicom import DicomFolder  # noqa: E402
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, plan  # noqa: E402
from pneumonia_kedro.models import ModelConfig  # noqa: E402
from pneumonia_kedro.training import CachedDetectionDataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=6)
    arguments = parser.parse_args()
    demo_label, demo_config = demo_model()
    resnet = ModelConfig(architecture="resnet50_fpn", pretrained="none", trainable="all")
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        patients = write_dicoms(Path(tmp) / "dicoms", arguments.images)
        dicoms = DicomFolder.scan(str(Path(tmp) / "dicoms"))
        print(f"{'model':<34}{'loader':<12}{'images/s':>10}{'data wait':>11}")
        for label, model, size, batch, steps in (
            (demo_label, demo_config, demo_config.image_size, 8, arguments.steps * 2),
            ("resnet50_fpn@512", resnet, 512, 2, arguments.steps),
        ):
            path = Path(tmp) / f"cache{size}"
            build(plan(dicoms, dicoms.patient_ids,
                       CacheConfig(image_size=size, workers=2, progress=False)), path)
            dataset = CachedDetectionDataset(ImageCache(path), patients,
                                             augment=training_augmentation())
            for workers in (0, 2):
                run = measure(replace(model, image_size=size), dataset, batch, steps, 2, cpu,
                              num_workers=workers)
                print(f"{label:<34}{f'{workers} workers':<12}"
                      f"{run['images_per_second']:>10.2f}"
                      f"{100 * run['data_wait_share']:>10.1f}%", flush=True)


if __name__ == "__main__":
    main()
