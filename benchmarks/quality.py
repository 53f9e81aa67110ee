"""What each technique is worth, on several generated data sets, with intervals.

    .venv/bin/python benchmarks/quality.py [--datasets 7:0.3 11:0.6 13:0.9] [--out FILE]
        [--variants plain "+ TTA/fusion" ...] [--folds 3]

For each data set (``seed:difficulty`` of the demo generator) a scratch copy of the project
generates it and runs the demo configuration end to end (ingest, split, cache, detector,
classifier, evaluate), then evaluates again with each variant below. Every number is the
held-out competition metric (post-processing tuned on the other half of the validation
patients) with its 95 % bootstrap interval over patients, and the image-level ROC AUC:

  plain           the detector alone: no TTA, no gating, boxes as predicted (threshold, NMS
                  and box cap still tuned)
  + gating        the classifier's probability gates the boxes (rule searched)
  + TTA/fusion    and the mirrored image, fused with weighted boxes fusion
  + fusion IoU    and the IoU of that fusion searched (0.4, 0.55, 0.7) with the rest
  + shrink        TTA/fusion with the box shrink factor searched
  notebook negs   the notebook's whole-image boxes on negatives, plain evaluation

With ``--folds k`` the same data set is also cross-validated (pipeline cross_validation, the
demo's evaluation settings), and the validation split is scored with the post-processing
tuned out of fold, by:

  best fold       each fold's model alone; the best of the k on the validation split (a
                  choice made on the very patients it is scored on: flattering the single model)
  k-fold ensemble every fold's model fused (weighted boxes fusion), the served model
  out of fold     (for reference) the out-of-fold metric on the training patients

The summary gives, per variant, the mean over data sets and the change against the first row
on each data set (the ensemble: against the best fold): a technique is a default only if it
helps on every one, beyond the noise.
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
    "+ fusion IoU": {"tta": {"hflip": True},
                     "search": {"shrink": [1.0], "fusion_iou": [0.4, 0.55, 0.7],
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


def fold_scores(project: Path, folds: int, quiet: dict) -> dict:
    """Cross-validate with ``folds`` folds; score each fold's model and their ensemble on the
    validation split with the post-processing tuned out of fold."""
    from kedro.framework.project import configure_project
    from kedro.framework.session import KedroSession

    from pneumonia_kedro.ensemble import Ensemble
    from pneumonia_kedro.pipelines.evaluate.nodes import (
        evaluate_delivered,
        predict_validation,
        predict_validation_probabilities,
    )
    from pneumonia_kedro.pipelines.folds import member_datasets

    # The fold count shapes the registered pipelines: it is read from FOLDS, not --params.
    os.environ["FOLDS"] = str(folds)
    configure_project("pneumonia_kedro")
    params = quiet
    try:
        _session_run(project, ["cross_validation"], params)
    finally:
        os.environ.pop("FOLDS")
        configure_project("pneumonia_kedro")
    metrics = json.loads((project / "data/08_reporting/demo/evaluation_metrics.json")
                         .read_text())
    with KedroSession.create(project_path=project, env="demo",
                             runtime_params=params) as session:
        catalog = session.load_context().catalog
        ensemble = Ensemble.of(*map(catalog.load, member_datasets(folds)))
        postprocessing = catalog.load("postprocessing")
        cache = catalog.load("validation_image_cache")
        patients = catalog.load("validation_patients")
        evaluate = catalog.load("params:evaluate")
    singles = []
    for name in ensemble.names:
        one = ensemble.select(name)
        single, _, _ = evaluate_delivered(
            predict_validation(one, cache, patients, evaluate), patients,
            predict_validation_probabilities(one, cache, patients, evaluate),
            postprocessing, evaluate)
        singles.append({"metric": single["overall"]["intervals"]["competition_metric"],
                        "roc_auc": single["overall"]["intervals"]["roc_auc"], "fold": name})
    ensemble_overall = metrics["validation_ensemble"]["overall"]["intervals"]
    return {
        "best fold": max(singles, key=lambda s: s["metric"]["value"]),
        f"{folds}-fold ensemble": {"metric": ensemble_overall["competition_metric"],
                                   "roc_auc": ensemble_overall["roc_auc"]},
        "out of fold": {"metric": metrics["overall"]["intervals"]["competition_metric"],
                        "roc_auc": metrics["overall"]["intervals"]["roc_auc"]},
        "all folds": singles,
    }


def run_dataset(seed: int, difficulty: float, scratch: Path, quiet: dict,
                variants: list[str], folds: int) -> dict:
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
    _session_run(project, ["ingest", "split", "cache"], quiet)
    results = {}
    if variants:
        _session_run(project, ["train", "classify"], quiet)
    for name in variants:
        if name == "notebook negs":
            continue
        _session_run(project, ["evaluate"], {**quiet, "evaluate": {**quiet["evaluate"],
                                                                    **VARIANTS[name]}})
        results[name] = _scores(project)
    if "notebook negs" in variants:
        _session_run(project, ["train", "evaluate"],
                     {**quiet, "train": {**quiet["train"], "negative_boxes": "whole_image"},
                      "evaluate": {**quiet["evaluate"], **VARIANTS["plain"]}})
        results["notebook negs"] = _scores(project)
    if folds > 1:
        results.update(fold_scores(project, folds, quiet))
    os.chdir(ROOT)
    return {"seed": seed, "difficulty": difficulty, "seconds": time.perf_counter() - started,
            "variants": results}


def _cell(interval: dict) -> str:
    return f"{interval['value']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def table(results: list[dict]) -> str:
    names = [name for name in results[0]["variants"] if name != "all folds"]
    lines = ["| variant | " + " | ".join(f"seed {r['seed']}, difficulty {r['difficulty']}"
                                         for r in results) + f" | mean | change vs {names[0]} |",
             "| --- |" + " --- |" * (len(results) + 2)]
    for name in names:
        # The ensemble is compared with the best single fold; the rest with the first row.
        reference = "best fold" if name.endswith("-fold ensemble") else names[0]
        values = [r["variants"][name]["metric"]["value"] for r in results]
        changes = [v - r["variants"][reference]["metric"]["value"]
                   for v, r in zip(values, results, strict=True)]
        cells = [f"{_cell(r['variants'][name]['metric'])}; AUC "
                 f"{r['variants'][name]['roc_auc']['value']:.3f}" for r in results]
        change = "" if name in (names[0], "out of fold") else \
            ", ".join(f"{c:+.3f}" for c in changes) + \
            (f" vs {reference}" if reference != names[0] else "") + \
            (" (all better)" if all(c > 0 for c in changes) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(values):.3f} | "
                     f"{change} |")
    if "+ gating" in names:
        lines.append("| classifier alone (ROC AUC) | " + " | ".join(
            _cell(r["variants"]["+ gating"]["classifier_roc_auc"]) for r in results) + " | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["7:0.3", "11:0.6", "13:0.9"],
                        help="seed:difficulty of each generated data set")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--variants", nargs="*", default=[*VARIANTS, "notebook negs"],
                        help="which single-model variants to run (none: only the folds)")
    parser.add_argument("--folds", type=int, default=0,
                        help="also cross-validate with this many folds (0: no)")
    args = parser.parse_args()
    quiet = {"cache": {"progress": False}, "train": {"progress": False},
             "classifier": {"progress": False}, "evaluate": {"progress": False}}
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for spec in args.datasets:
            seed, difficulty = spec.split(":")
            result = run_dataset(int(seed), float(difficulty), Path(scratch), quiet,
                                 args.variants, args.folds)
            results.append(result)
            print(f"seed {seed}, difficulty {difficulty}: {result['seconds']:.0f} s",
                  file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
