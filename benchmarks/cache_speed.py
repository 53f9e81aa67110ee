"""Cache build and read speed, side by side in one run (issue: DICOM-to-tensor cache).

    .venv/bin/python benchmarks/cache_speed.py [--images 512] [--size 512]

(a) raw libjpeg-turbo decode (OpenCV) of the same JPEG frames held in memory, exactly as the
    cache decodes them (at half size in the DCT domain for a 512 px cache): the limit; the
    full-size decode is printed beside it;
(b) the notebook's path: dcmread + pixel_array with pydicom's default plugins, then a float
    3-channel tensor per item, through a DataLoader with 2 workers;
(c) this project's cache build: the cache pipeline's node run by Kedro's SequentialRunner,
    each yielded chunk saved through ``ImageCacheDataset`` (node and dataset, the runner's
    start excluded), in-process (what one worker does; best of three like (a)) and with two
    worker processes (start included); beside each, the former build inside the dataset
    (``imagecache.py`` at commit 6f361d4, ``--old-ref`` to pick another), interleaved run by
    run, and the bytes of both caches compared (the DICOM reader is today's in both);
(d) training batches from the cache through the project's dataset and DataLoader, in-process
    and with 2 workers.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import torch
from pydicom.encaps import generate_frames
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_dicoms  # noqa: E402

from pneumonia_kedro.dicom.reader import _REDUCED_READS, _reduction  # noqa: E402
from pneumonia_kedro.imagecache import ImageCache  # noqa: E402
from pneumonia_kedro.training import (  # noqa: E402
    CachedDetectionDataset,
    EpochBatchSampler,
    detection_collate,
)

BUILD_SCRIPT = """
import json, resource, sys, time
from pathlib import Path
import pandas as pd
from pneumonia_kedro.dicom import DicomFolder
folder, path, size, workers, implementation = sys.argv[1:6]
folder = DicomFolder.scan(folder)
params = {"image_size": int(size), "workers": int(workers), "progress": False}
if implementation == "old":  # the build inside ImageCacheDataset.save, as it was
    sys.path.insert(0, str(Path(sys.argv[6]).parent))  # importable by the spawned workers
    import old_imagecache as old
    config = old.CacheConfig(image_size=int(size), workers=int(workers), progress=False)
    started = time.perf_counter()
    old.build(old.plan(folder, folder.patient_ids, config), path)
else:  # the cache node under Kedro's runner, each chunk saved by ImageCacheDataset
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner
    from pneumonia_kedro.datasets import ImageCacheDataset, ImageCacheStateDataset
    from pneumonia_kedro.pipelines import cache
    catalog = DataCatalog(datasets={
        "train_patients": MemoryDataset(pd.DataFrame({"patientId": folder.patient_ids})),
        "train_dicoms": MemoryDataset(folder), "params:cache": MemoryDataset(params),
        "params:ingest": MemoryDataset({}), "train_image_cache": ImageCacheDataset(path=path),
        "train_image_cache_state": ImageCacheStateDataset(path=path)})
    pipeline = cache.create_pipeline().only_nodes("cache_train_images_node")
    started = time.perf_counter()
    SequentialRunner().run(pipeline, catalog)
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: the latter keeps the peak of the (torch-sized) parent across exec.
own = next(int(line.split()[1]) for line in open("/proc/self/status")
           if line.startswith("VmHWM"))
worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_mib": own / 1024,
                  "worker_peak_rss_mib": worker / 1024}))
"""


class NotebookDataset(Dataset):
    """The notebook's per-item read: dcmread + pixel_array, float 3 x H x W."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = pydicom.dcmread(self.files[index]).pixel_array
        return torch.from_numpy(pixels).float().div(255).expand(3, -1, -1).contiguous()


def rate(n: int, seconds: float) -> float:
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--old-ref", default="6f361d4")  # the last build inside the dataset
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dicoms"
        patients = write_dicoms(folder, arguments.images)
        files = sorted(folder.glob("*.dcm"))
        n = len(files)

        frames = [next(generate_frames(pydicom.dcmread(f).PixelData, number_of_frames=1))
                  for f in files]
        as_cache = _REDUCED_READS[_reduction(1024, 1024, arguments.size)]
        for key, mode in (("a_raw_decode_as_cache_per_core", as_cache),
                          ("a_raw_decode_full_size_per_core", cv2.IMREAD_GRAYSCALE)):
            best = float("inf")
            for _ in range(3):  # best of three, like the cache build below: the CPU is noisy
                started = time.perf_counter()
                for frame in frames:
                    cv2.imdecode(np.frombuffer(frame, np.uint8), mode)
                best = min(best, time.perf_counter() - started)
            results[key] = rate(n, best)

        started = time.perf_counter()
        for file in files[: max(n // 4, 16)]:
            pixels = pydicom.dcmread(io.BytesIO(file.read_bytes())).pixel_array
            torch.from_numpy(pixels).float().div(255).expand(3, -1, -1).contiguous()
        results["b_notebook_per_core"] = rate(max(n // 4, 16), time.perf_counter() - started)
        loader = DataLoader(NotebookDataset(files), batch_size=8, num_workers=2)
        started = time.perf_counter()
        for _ in loader:
            pass
        results["b_notebook_dataloader_2_workers"] = rate(n, time.perf_counter() - started)

        old_module = Path(tmp) / "old_imagecache.py"
        old_module.write_bytes(subprocess.run(
            ["git", "show", f"{arguments.old_ref}:src/pneumonia_kedro/imagecache.py"],
            check=True, capture_output=True).stdout)
        same_bytes = {}
        for workers, repeats in ((0, 3), (2, 1)):
            implementations = ("old", "new")
            builds: dict[str, list] = {name: [] for name in implementations}
            for repeat in range(repeats):
                for name in implementations:  # interleaved: the machine's drift hits both
                    out = subprocess.run(
                        [sys.executable, "-c", BUILD_SCRIPT, str(folder),
                         f"{tmp}/cache{workers}_{name}_{repeat}", str(arguments.size),
                         str(workers), name, str(old_module)],
                        check=True, capture_output=True, text=True)
                    builds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            for name in implementations:
                build = min(builds[name], key=lambda b: b["seconds"])
                key = f"c_cache_build_{workers}_workers" + ("_old" * (name == "old"))
                results[key] = rate(n, build["seconds"])
                results[f"{key}_main_peak_rss_mib"] = build["peak_rss_mib"]
                results[f"{key}_worker_peak_rss_mib"] = build["worker_peak_rss_mib"]
            old, new = (Path(f"{tmp}/cache{workers}_{name}_0") for name in ("old", "new"))
            same_bytes[workers] = all((old / f).read_bytes() == (new / f).read_bytes()
                                      for f in ("images.npy", "index.parquet"))

        dataset = CachedDetectionDataset(ImageCache(f"{tmp}/cache2_new_0"), patients)
        for workers in (0, 2):
            sampler = EpochBatchSampler(len(dataset), 8, seed=0)
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=detection_collate,
                                num_workers=workers, persistent_workers=workers > 0)
            started = time.perf_counter()
            read = sum(len(images) for _ in range(5) for images, _ in loader)
            results[f"d_cache_read_{workers}_workers"] = rate(read, time.perf_counter() - started)

    raw = results["a_raw_decode_as_cache_per_core"]
    print(f"{n} images, 1024x1024 JPEG Baseline DICOMs, cache at {arguments.size} px")
    for key, value in results.items():
        unit = "MiB" if key.endswith("mib") else "images/s"
        print(f"  {key:<44}{value:>10.1f} {unit}")
    notebook = results["b_notebook_dataloader_2_workers"]
    print(f"  {'cache build per worker / raw decode as cache':<44}"
          f"{results['c_cache_build_0_workers'] / raw:>10.2f}x  (target >= 0.8)")
    for workers in (0, 2):
        key = f"c_cache_build_{workers}_workers"
        print(f"  {f'new / old build, {workers} workers':<44}"
              f"{results[key] / results[f'{key}_old']:>10.2f}x  "
              f"(identical bytes: {same_bytes[workers]})")
    print(f"  {'cache read (2 workers) / notebook (2 workers)':<44}"
          f"{results['d_cache_read_2_workers'] / notebook:>10.1f}x  (target >= 20)")
    print(f"  {'cache read (in-process) / notebook (2 workers)':<44}"
          f"{results['d_cache_read_0_workers'] / notebook:>10.1f}x")


if __name__ == "__main__":
    main()
