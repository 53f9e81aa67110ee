"""GPU check: build a small cache, then time resnet50_fpn training steps at 512 and 1024 px,
in fp32 and with AMP + channels-last. Needs PyTorch, torchvision, pydicom, OpenCV, pandas.

    bash benchmarks/gpu_check.sh [--images 128] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_dicoms  # noqa: E402
from train_bench import measure, training_augmentation  # noqa: E402

from pneumonia_kedro.dicom import DicomFolder  # noqa: E402
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, plan  # noqa: E402
from pneumonia_kedro.models import ModelConfig  # noqa: E402
from pneumonia_kedro.training import CachedDetectionDataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    results = {"device": name, "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dicoms"
        started = time.perf_counter()
        patients = write_dicoms(folder, arguments.images, arguments.workers)
        print(f"wrote {len(patients)} DICOMs in {time.perf_counter() - started:.1f} s",
              flush=True)
        dicoms = DicomFolder.scan(str(folder))
        model = ModelConfig(architecture="resnet50_fpn", pretrained="none", trainable="all")
        for size, batch in ((512, 8), (1024, 4)):
            cache_path = Path(tmp) / f"cache{size}"
            started = time.perf_counter()
            build(plan(dicoms, dicoms.patient_ids,
                       CacheConfig(image_size=size, workers=arguments.workers,
                                   progress=False)), cache_path)
            build_seconds = time.perf_counter() - started
            dataset = CachedDetectionDataset(ImageCache(cache_path), patients,
                                             augment=training_augmentation())
            for label, amp in (("fp32", False), ("amp+channels_last", True)):
                run = measure(model, dataset, batch, arguments.steps, arguments.warmup, device,
                              amp=amp, channels_last=amp, num_workers=4)
                run.update(size=size, precision=label, cache_build_images_per_second=(
                    len(patients) / build_seconds))
                results["runs"].append(run)
                print(f"resnet50_fpn@{size} batch {batch} {label}: "
                      f"{run['images_per_second']:.1f} images/s, peak "
                      f"{run['peak_gpu_memory_gib']:.2f} GiB, data wait "
                      f"{100 * run['data_wait_share']:.1f} %", flush=True)
                torch.cuda.empty_cache()
    for size in (512, 1024):
        fp32, amp = (r for r in results["runs"] if r["size"] == size)
        ratio = amp["images_per_second"] / fp32["images_per_second"]
        results[f"amp_over_fp32_{size}"] = ratio
        print(f"AMP+channels_last / fp32 at {size}: {ratio:.2f}x")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
