"""Cache build and read speed, side by side in one run (issue: DICOM-to-tensor cache).

    .venv/bin/python benchmarks/cache_speed.py [--images 512] [--size 512]

(a) raw libjpeg-turbo decode (OpenCV) of the same JPEG frames held in memory, exactly as the
    cache decodes them (at half size in the DCT domain for a 512 px cache): the limit; the
    full-size decode is printed beside it;
(b) the notebook's path: dcmread + pixel_array with pydicom's default plugins, then a float
    3-channel tensor per item, through a DataLoader with 2 workers;
(c) this project's cache build in-process (what one worker does, without the seconds a
    worker process takes to start; best of three like (a)) and with two worker processes
    (start included); and in-process with pydicom parsing every file instead of the
    project's small reader of competition files (``--without-reader`` ablation, best of 3);
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
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.imagecache import CacheConfig, build, plan
folder = DicomFolder.scan(sys.argv[1])
config = CacheConfig(image_size=int(sys.argv[3]), workers=int(sys.argv[4]), progress=False)
if sys.argv[5] == "pydicom":  # no fast reader: pydicom parses, the same decode follows
    from pneumonia_kedro.dicom import reader
    def _no_fast_path(*args):
        raise reader._NotFastPath
    reader._decode_fast = _no_fast_path
started = time.perf_counter()
build(plan(folder, folder.patient_ids, config), sys.argv[2])
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

        for workers, repeats, parser in ((0, 3, "project"), (2, 1, "project"),
                                         (0, 3, "pydicom")):
            builds = []
            for repeat in range(repeats):
                out = subprocess.run(
                    [sys.executable, "-c", BUILD_SCRIPT, str(folder),
                     f"{tmp}/cache{workers}_{parser}_{repeat}", str(arguments.size),
                     str(workers), parser],
                    check=True, capture_output=True, text=True)
                builds.append(json.loads(out.stdout.strip().splitlines()[-1]))
            build = min(builds, key=lambda b: b["seconds"])
            key = f"c_cache_build_{workers}_workers" + ("_pydicom_parse" * (parser == "pydicom"))
            results[key] = rate(n, build["seconds"])
            results[f"{key}_main_peak_rss_mib"] = build["peak_rss_mib"]
            results[f"{key}_worker_peak_rss_mib"] = build["worker_peak_rss_mib"]

        dataset = CachedDetectionDataset(ImageCache(f"{tmp}/cache2_project_0"), patients)
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
    print(f"  {'  the same, pydicom parsing every file':<44}"
          f"{results['c_cache_build_0_workers_pydicom_parse'] / raw:>10.2f}x  "
          "(>= 0.8: the project's reader can go)")
    print(f"  {'cache read (2 workers) / notebook (2 workers)':<44}"
          f"{results['d_cache_read_2_workers'] / notebook:>10.1f}x  (target >= 20)")
    print(f"  {'cache read (in-process) / notebook (2 workers)':<44}"
          f"{results['d_cache_read_0_workers'] / notebook:>10.1f}x")


if __name__ == "__main__":
    main()
