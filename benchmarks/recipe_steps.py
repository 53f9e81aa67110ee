"""Seconds per training step of each recipe's detector, at 1 and 2 threads (issue 24).

    .venv/bin/python benchmarks/recipe_steps.py [--recipes demo mobilenet@192 ...] [--threads 1 2]

A cheap forecast before the frontier run (``quality.py --recipes``): one step is a forward
and backward pass and an SGD update on 8 random images with one box each, at the recipe's
cache size, the detector built from ``conf/demo`` with the recipe's overrides (as the train
node builds it). The minimum of 3 steps after one warm-up step is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import RECIPES, merged  # noqa: E402

from pneumonia_kedro.models import build_model, model_config_from_dict  # noqa: E402


def demo_settings(file: str, key: str) -> dict:
    """``conf/demo``'s ``key`` of ``parameters_<file>.yml`` merged onto ``conf/base``'s."""
    def read(env: str) -> dict:
        path = ROOT / f"conf/{env}/parameters_{file}.yml"
        return yaml.safe_load(path.read_text()).get(key, {}) if path.exists() else {}

    return merged(read("base"), read("demo"))


def seconds_per_step(recipe: dict, batch: int = 8) -> tuple[int, float]:
    """The recipe's cache size and its detector's seconds per training step."""
    size = merged(demo_settings("cache", "cache"), recipe.get("cache", {}))["image_size"]
    model_settings = merged(demo_settings("train", "model"), recipe.get("model", {}))
    torch.manual_seed(0)
    model = build_model(model_config_from_dict({**model_settings, "image_size": size}))
    model.train()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images = [torch.rand(3, size, size) for _ in range(batch)]
    box = torch.tensor([[0.2, 0.2, 0.45, 0.6]]) * size
    targets = [{"boxes": box, "labels": torch.tensor([1])} for _ in range(batch)]
    times = []
    for _ in range(4):
        started = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        times.append(time.perf_counter() - started)
    return size, min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES),
                        default=["mobilenet@128 (old demo)", "mobilenet@192", "mobilenet@256",
                                 "resnet18_fpn@128", "fcos_resnet18_fpn@128"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    print("| recipe | cache px | " + " | ".join(f"s/step, {t} thread(s)" for t in args.threads)
          + " |\n| --- | --- |" + " --- |" * len(args.threads))
    for name in args.recipes:
        cells = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            size, seconds = seconds_per_step(RECIPES[name])
            cells.append(f"{seconds:.2f}")
        print(f"| {name} | {size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
