"""What each technique is worth, on several generated data sets, with intervals.

    .venv/bin/python benchmarks/quality.py [--datasets 7:0.3 11:0.6 13:0.9] [--out FILE]

For each data set (``seed:difficulty`` of the demo generator) a scratch copy of the project
generates it and runs the demo configuration end to end (ingest, split, cache, detector,
classifier, evaluate), then evaluates again with each variant below. Every number is the
held-out competition metric (post-processing tuned on the other half of the validation
patients) with its 95 % bootstrap interval over patients, and the image-level ROC AUC:

  plain           the detector alone: no TTA, no gating, boxes as predicted (threshold, NMS
                  and box cap still tuned)
  + gating        the classifier's probability gates the boxes (rule searched)
  + TTA/fusion    and the mirrored image, fused with weighted boxes fusion
  + shrink        and the box shrink factor searched (everything on: the demo's default)
  notebook negs   the notebook's whole-image boxes on negatives, plain evaluation

The summary gives, per variant, the mean over data sets and the change against ``plain`` on
each data set: a technique is a default only if it helps on every one, beyond the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

NO_SEARCH = {"shrink": [1.0], "gating_rule": ["none"]}
VARIANTS = {
    "plain": {"tta": {"hflip": False}, "search": NO_SEARCH},
    "+ gating": {"tta": {"hflip": False},
                 "search": {"shrink": [1.0],
                            "gating_rule": ["none", "product", "geometric", "drop_below"]}},
    "+ TTA/fusion": {"tta": {"hflip": True},
                     "search": {"shrink": [1.0],
                                "gating_rule": ["none", "product", "geometric",
                                                "drop_below"]}},
    "+ shrink": {"tta": {"hflip": True},
                 "search": {"shrink": [0.8, 0.85, 0.9, 0.95, 1.0],
                            "gating_rule": ["none", "product", "geometric", "drop_below"]}},
}


def _session_run(project: Path, pipelines: list[str], params: dict) -> None:
    import mlflow
    from kedro.framework.session import KedroSession

    try:
        with KedroSession.create(project_path=project, env="demo",
                                 runtime_params=params) as session:
            session.run(pipeline_names=pipelines)
    finally:
        while mlflow.active_run():
            mlflow.end_run()


def _scores(project: Path) -> dict:
    metrics = json.loads((project / "data/08_reporting/demo/evaluation_metrics.json")
                         .read_text())
    overall = metrics["overall"]["intervals"]
    return {"metric": overall["competition_metric"], "roc_auc": overall["roc_auc"],
            "classifier_roc_auc": metrics["classifier"]["intervals"]["roc_auc"],
            "postprocessing": metrics["postprocessing"]}


def run_dataset(seed: int, difficulty: float, scratch: Path, quiet: dict) -> dict:
    """Generate one data set in a project copy, train, and evaluate every variant."""
    from kedro.framework.startup import bootstrap_project

    project = scratch / f"seed{seed}-d{difficulty}"
    project.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf/local").mkdir()
    (project / "src").mkdir()
    os.chdir(project)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    bootstrap_project(project)
    started = time.perf_counter()
    demo = {"demo_data": {"seed": seed, "difficulty": difficulty}}
    _session_run(project, ["demo_data"], demo)
    _session_run(project, ["ingest", "split", "cache", "train", "classify"], quiet)
    results = {}
    for name, evaluate in VARIANTS.items():
        _session_run(project, ["evaluate"], {**quiet, "evaluate": {**quiet["evaluate"],
                                                                    **evaluate}})
        results[name] = _scores(project)
    _session_run(project, ["train", "evaluate"],
                 {**quiet, "train": {**quiet["train"], "negative_boxes": "whole_image"},
                  "evaluate": {**quiet["evaluate"], **VARIANTS["plain"]}})
    results["notebook negs"] = _scores(project)
    os.chdir(ROOT)
    return {"seed": seed, "difficulty": difficulty, "seconds": time.perf_counter() - started,
            "variants": results}


def _cell(interval: dict) -> str:
    return f"{interval['value']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def table(results: list[dict]) -> str:
    lines = ["| variant | " + " | ".join(f"seed {r['seed']}, difficulty {r['difficulty']}"
                                         for r in results) + " | mean | change vs plain |",
             "| --- |" + " --- |" * (len(results) + 2)]
    for name in [*VARIANTS, "notebook negs"]:
        values = [r["variants"][name]["metric"]["value"] for r in results]
        changes = [v - r["variants"]["plain"]["metric"]["value"]
                   for v, r in zip(values, results, strict=True)]
        cells = [f"{_cell(r['variants'][name]['metric'])}; AUC "
                 f"{r['variants'][name]['roc_auc']['value']:.3f}" for r in results]
        change = "" if name == "plain" else \
            ", ".join(f"{c:+.3f}" for c in changes) + \
            (" (all better)" if all(c > 0 for c in changes) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(values):.3f} | "
                     f"{change} |")
    lines.append("| classifier alone (ROC AUC) | " + " | ".join(
        _cell(r["variants"]["+ gating"]["classifier_roc_auc"]) for r in results) + " | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["7:0.3", "11:0.6", "13:0.9"],
                        help="seed:difficulty of each generated data set")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    quiet = {"cache": {"progress": False}, "train": {"progress": False},
             "classifier": {"progress": False}, "evaluate": {"progress": False}}
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for spec in args.datasets:
            seed, difficulty = spec.split(":")
            result = run_dataset(int(seed), float(difficulty), Path(scratch), quiet)
            results.append(result)
            print(f"seed {seed}, difficulty {difficulty}: {result['seconds']:.0f} s",
                  file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
