"""Inference images/s on the CPU: the pipeline's path (cache, batched prediction, post-processing)
beside the MLflow pyfunc model answering base64 DICOMs, for the demo model and resnet50_fpn@512.

    .venv/bin/python benchmarks/inference_speed.py [--images 32]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_model, write_dicoms  # noqa: E402

import pneumonia_kedro  # noqa: E402
from pneumonia_kedro.dicom import DicomFolder  # noqa: E402
from pneumonia_kedro.ensemble import Networks  # noqa: E402
from pneumonia_kedro.imagecache import CacheConfig, ImageCache, build, plan  # noqa: E402
from pneumonia_kedro.inference import cached_squares  # noqa: E402
from pneumonia_kedro.models import ModelConfig, build_model  # noqa: E402
from pneumonia_kedro.postprocess import PostprocessConfig  # noqa: E402
from pneumonia_kedro.prediction import predict  # noqa: E402

PACKAGE = Path(pneumonia_kedro.__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    arguments = parser.parse_args()
    demo_label, demo = demo_model()
    resnet = ModelConfig(architecture="resnet50_fpn", pretrained="none", trainable="all",
                         image_size=512)
    post = PostprocessConfig(score_threshold=0.3)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dicoms"
        write_dicoms(folder, arguments.images)
        dicoms = DicomFolder.scan(str(folder))
        request = pd.DataFrame({
            "patientId": dicoms.patient_ids,
            "dicom": [base64.b64encode(dicoms.read_bytes(p)).decode()
                      for p in dicoms.patient_ids]})
        print(f"{'model':<34}{'path':<34}{'images/s':>10}")
        for label, config in ((demo_label, demo),
                              ("resnet50_fpn@512", resnet)):
            torch.manual_seed(0)
            model = build_model(config).eval()
            started = time.perf_counter()
            cache_path = Path(tmp) / f"cache{config.image_size}"
            build(plan(dicoms, dicoms.patient_ids,
                       CacheConfig(image_size=config.image_size, workers=2, progress=False)),
                  cache_path)
            # The inference node's one call: detection, fusion, post-processing.
            predict(Networks([model], [], [], cpu), cached_squares(ImageCache(cache_path)),
                    None, post, batch_size=8)
            pipeline_rate = arguments.images / (time.perf_counter() - started)
            print(f"{label:<34}{'pipeline (cache + batches)':<34}{pipeline_rate:>10.2f}",
                  flush=True)

            weights = Path(tmp) / "weights.pt"
            torch.save({"model_config": replace(config).to_dict(),
                        "state_dict": model.state_dict()}, weights)
            settings = Path(tmp) / "settings.json"
            settings.write_text(json.dumps({"image_size": config.image_size,
                                            "postprocess": asdict(post)}))
            saved = Path(tmp) / f"model{config.image_size}"
            mlflow.pyfunc.save_model(saved, python_model=str(PACKAGE / "serving.py"),
                                     artifacts={"weights": str(weights),
                                                "settings": str(settings)})
            served = mlflow.pyfunc.load_model(str(saved))
            started = time.perf_counter()
            for start in range(0, len(request), 8):
                served.predict(request.iloc[start:start + 8])
            served_rate = arguments.images / (time.perf_counter() - started)
            print(f"{label:<34}{'MLflow pyfunc (base64, 8/request)':<34}{served_rate:>10.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
