"""engine: ray on one machine: cache build and inference throughput with one and two Ray
workers, scaling efficiency, and Ray's start-up cost, beside the local engine.

    .venv/bin/python benchmarks/ray_scaling.py [--images 256] [--size 256] [--predict 64]

For each worker count W (1, 2) a local Ray with W CPUs is started (object store 200 MB, no
dashboard) and timed: ``ray.init`` alone, then the first task's round trip (its worker process
starts). Then, on that Ray:
(a) the cache build (``imagecache.build`` with ``engine: ray``: decoding tasks, the driver
    writes each chunk), images per second, start-up excluded, and the bytes compared with the
    local build;
(b) prediction (``engines.ray_engine.predict_on_ray``: Ray Data ``map_batches`` over the
    batch indexes, a pool of W actors, each building the networks once and reading the
    memory-mapped cache) with an untrained mobilenet_v3_large_fpn at the cache size, images
    per second, the actors' start-up included.
The local engine is measured in the same run: cache build in-process and with W worker
processes, and ``prediction.predict`` in-process. Scaling efficiency = throughput(2) / (2 x
throughput(1)).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_dicoms  # noqa: E402

from pneumonia_kedro.dicom import DicomFolder  # noqa: E402
from pneumonia_kedro.engines import EngineConfig, RayInferenceSettings  # noqa: E402
from pneumonia_kedro.engines.ray_engine import predict_on_ray  # noqa: E402
from pneumonia_kedro.ensemble import Ensemble  # noqa: E402
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, plan  # noqa: E402
from pneumonia_kedro.inference import cached_squares  # noqa: E402
from pneumonia_kedro.models import ModelConfig, TrainedModel, build_model  # noqa: E402
from pneumonia_kedro.postprocess import PostprocessConfig  # noqa: E402
from pneumonia_kedro.prediction import TTAConfig, predict  # noqa: E402

OBJECT_STORE = 200 * 1024**2


@ray.remote
def _ping() -> int:
    return 1


def _cache(folder: DicomFolder, size: int, workers: int, target: Path,
           engine: EngineConfig | None = None) -> float:
    config = CacheConfig(image_size=size, workers=workers, chunk_size=16, progress=False)
    started = time.perf_counter()
    build(plan(folder, folder.patient_ids, config), target, engine)
    return len(folder.patient_ids) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--predict", type=int, default=64, help="images predicted")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per worker on both engines
    results: dict = {"images": args.images, "size": args.size, "predicted": args.predict}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dicoms(root / "dicoms", args.images)
        folder = DicomFolder.scan(str(root / "dicoms"))
        results["local_cache_in_process"] = round(_cache(folder, args.size, 0,
                                                         root / "local0"), 1)
        reference = (root / "local0" / "images.npy").read_bytes()
        cache = ImageCache(root / "local0")
        model = ModelConfig(architecture="mobilenet_v3_large_fpn", pretrained="none",
                            trainable="all", image_size=args.size)
        ensemble = Ensemble.of(TrainedModel(config=model,
                                            state_dict=build_model(model).state_dict(),
                                            info={}), None)
        ids = cache.usable["patientId"].tolist()[:args.predict]
        sample = ImageCache(root / "sample")
        config = CacheConfig(image_size=args.size, workers=0, chunk_size=16, progress=False)
        build(plan(folder, ids, config), sample.path)
        started = time.perf_counter()
        predict(ensemble.build("cpu"), cached_squares(sample), TTAConfig(), PostprocessConfig(),
                batch_size=8)
        results["local_predict_in_process"] = round(len(ids) / (time.perf_counter() - started),
                                                    2)
        for workers in (1, 2):
            row: dict = {}
            row["local_cache_processes"] = round(_cache(folder, args.size, workers,
                                                        root / f"local{workers}p"), 1)
            started = time.perf_counter()
            ray.init(num_cpus=workers, object_store_memory=OBJECT_STORE,
                     include_dashboard=False, log_to_driver=False)
            row["ray_init_s"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
            ray.get([_ping.remote() for _ in range(workers)])
            row["first_tasks_s"] = round(time.perf_counter() - started, 2)
            engine = EngineConfig(backend="ray",
                                  inference=RayInferenceSettings(actors=workers))
            row["ray_cache"] = round(_cache(folder, args.size, 0, root / f"ray{workers}",
                                            engine), 1)
            row["ray_cache_same_bytes"] = \
                (root / f"ray{workers}" / "images.npy").read_bytes() == reference
            started = time.perf_counter()
            predict_on_ray(ensemble, sample, TTAConfig(), PostprocessConfig(), 8, "cpu",
                           engine)
            row["ray_predict"] = round(len(ids) / (time.perf_counter() - started), 2)
            ray.shutdown()
            results[f"workers_{workers}"] = row
            print(workers, json.dumps(row), flush=True)
    one, two = results["workers_1"], results["workers_2"]
    results["scaling_efficiency"] = {
        key: round(two[key] / (2 * one[key]), 2)
        for key in ("local_cache_processes", "ray_cache", "ray_predict")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
