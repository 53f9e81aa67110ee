"""What each technique is worth, on several generated data sets, with intervals.

    .venv/bin/python benchmarks/quality.py [--datasets 7:0.3 11:0.6:ground_glass ...]
        [--out FILE] [--variants plain "+ TTA/fusion" ...] [--folds 3]
    .venv/bin/python benchmarks/quality.py --recipes demo mobilenet@192 ... [--datasets ...]
        [--out FILE] [--resume FILE] [--tiny]

With ``--recipes`` (the table in ``recipes.py``) each data set is generated once and its
classifier trained once (it does not depend on the detector's recipe); then per recipe the
cache is built and the detector trained from nothing (cache and checkpoints removed first)
and evaluated: held-out competition metric with interval, ROC AUCs, CPU minutes of the cache
and training (this process and its worker processes) and wall minutes. The JSON (``--out``)
is written after every recipe; ``--resume FILE`` skips the cells it holds. ``--tiny`` (either
mode): 20 positive and 20 negative patients, one epoch (a check that it runs, no figures).

For each data set (``seed:difficulty[:style]`` of the demo generator; style: its
``demo_data.style``, default classic) a scratch copy of the project
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
  k-fold ensemble every fold's model fused (weighted boxes fusion), the served model, with
                  the gating rule tuned out of fold as well, and the paired change (same
                  patients, same resamples) of that gating over the next row
  ensemble without gating (tuned out of fold)
                  the same ensemble and search with gating fixed to none: whether the
                  classifier's gating helps once it is tuned on every training patient
                  rather than on half the validation patients
  out of fold     (for reference) the out-of-fold metric on the training patients

The summary gives, per variant, the mean over data sets and the change against the first row
on each data set (the ensemble: against the best fold): a technique is a default only if it
helps on every one, beyond the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from pneumonia_kedro.ensemble import Ensemble

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import RECIPES, interval_cell, merged, pareto_table  # noqa: E402

from pneumonia_kedro.config import ConfigError, from_params  # noqa: E402
from pneumonia_kedro.demo.settings import DemoConfig  # noqa: E402

NO_GATING = "ensemble without gating (tuned out of fold)"
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
        tables = {name: catalog.load(name) for name in (
            "raw_out_of_fold_predictions", "out_of_fold_image_probabilities", "patient_folds",
            "raw_validation_predictions", "validation_image_probabilities",
            "validation_patients")}
    singles = []
    for name in ensemble.names:
        one = ensemble.select(name)
        single, _, _ = evaluate_delivered(
            predict_validation(one, cache, patients, evaluate), patients,
            predict_validation_probabilities(one, cache, patients, evaluate),
            postprocessing, evaluate)
        singles.append({"metric": single["overall"]["intervals"]["competition_metric"],
                        "roc_auc": single["overall"]["intervals"]["roc_auc"], "fold": name})
    ungated, delivered = without_gating(ensemble, tables, postprocessing, evaluate)
    return {
        "best fold": max(singles, key=lambda s: s["metric"]["value"]),
        # The served model: the post-processing, gating rule included, tuned out of fold.
        f"{folds}-fold ensemble": delivered,
        NO_GATING: ungated,
        "out of fold": {"metric": metrics["overall"]["intervals"]["competition_metric"],
                        "roc_auc": metrics["overall"]["intervals"]["roc_auc"]},
        "all folds": singles,
    }


def without_gating(ensemble: Ensemble, tables: dict[str, pd.DataFrame], postprocessing: dict,
                   evaluate: dict) -> tuple[dict, dict]:
    """The fold ensemble on the validation split with its post-processing tuned out of fold
    (every training patient) but gating fixed to none; and the paired change (same patients,
    same resamples) of the delivered post-processing, gating rule searched, over it."""
    from pneumonia_kedro.bootstrap import mean_difference_interval, resample_counts
    from pneumonia_kedro.evaluation import evaluate_config, patient_truth
    from pneumonia_kedro.metrics import competition_scores
    from pneumonia_kedro.pipelines.evaluate.nodes import evaluate_delivered, tune_postprocessing
    from pneumonia_kedro.postprocess import per_image

    config = evaluate_config(evaluate)
    patients = tables["validation_patients"]
    ids, truth = patient_truth(patients)
    ungated = {**evaluate, "search": {**evaluate["search"], "gating_rule": ["none"]}}
    tuned, _, _ = tune_postprocessing(ensemble, tables["raw_out_of_fold_predictions"],
                                      tables["patient_folds"],
                                      tables["out_of_fold_image_probabilities"], ungated)
    rows, per_image_scores = [], []
    for settings in (tuned, postprocessing):
        scored, _, final = evaluate_delivered(
            tables["raw_validation_predictions"], patients,
            tables["validation_image_probabilities"], settings, evaluate)
        overall = scored["overall"]["intervals"]
        rows.append({"metric": overall["competition_metric"], "roc_auc": overall["roc_auc"],
                     "gating": settings["gating"]})
        per_image_scores.append(competition_scores(truth, *per_image(final, ids),
                                                   config.inclusive_iou))
    counts = resample_counts(len(ids), config.bootstrap)
    change = mean_difference_interval(per_image_scores[1], per_image_scores[0], counts,
                                      config.bootstrap.confidence)
    return rows[0], {**rows[1], "against no gating": change}


def dataset_params(spec: str, tiny: bool = False) -> dict:
    """``seed:difficulty[:style]`` as ``demo_data`` params (no style given: the default)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--datasets {spec!r}: expected seed:difficulty[:style]")
    try:
        demo = {"seed": int(parts[0]), "difficulty": float(parts[1])}
    except ValueError:
        raise SystemExit(f"--datasets {spec!r}: the seed must be an integer and the "
                         "difficulty a number, as in 7:0.3:ground_glass") from None
    if len(parts) == 3:
        demo["style"] = parts[2]
    try:  # a typo fails here, not after the session has started
        from_params(DemoConfig, demo, "demo_data")
    except ConfigError as exc:
        raise SystemExit(f"--datasets {spec!r}: {exc}") from None
    if tiny:
        demo |= {"n_positive": 20, "n_negative": 20, "n_test": 2}
    return {"demo_data": demo}


def _project(scratch: Path, name: str, demo: dict) -> Path:
    """A scratch copy of the project (configuration only) with the data set generated."""
    from kedro.framework.startup import bootstrap_project

    project = scratch / name.replace(":", "-")
    project.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf/local").mkdir()
    (project / "src").mkdir()
    os.chdir(project)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    bootstrap_project(project)
    _session_run(project, ["demo_data"], demo)
    return project


def run_dataset(seed: int, difficulty: float, scratch: Path, quiet: dict,
                variants: list[str], folds: int, demo: dict | None = None) -> dict:
    """Generate one data set in a project copy, train, and evaluate every variant."""
    started = time.perf_counter()
    demo = demo or {"demo_data": {"seed": seed, "difficulty": difficulty}}
    project = _project(scratch, f"seed{seed}-d{difficulty}", demo)
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


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _recipe_cell(project: Path, params: dict) -> dict:
    """Cache and train from nothing with ``params`` (timed), then evaluate."""
    for built in ("data/04_feature/demo/image_cache", "data/06_models/demo/checkpoints"):
        shutil.rmtree(project / built, ignore_errors=True)
    cpu, wall = _cpu_seconds(), time.perf_counter()
    _session_run(project, ["cache", "train"], params)
    cell = {"cpu_minutes": (_cpu_seconds() - cpu) / 60,
            "wall_minutes": (time.perf_counter() - wall) / 60, "params": params}
    _session_run(project, ["evaluate"], params)
    return {**_scores(project), **cell}


def run_recipes(spec: str, recipes: list[str], scratch: Path, quiet: dict, tiny: bool,
                done: dict, save: Callable[[dict], None]) -> dict:
    """One data set: generated, its classifier trained once (at the demo's cache), then
    every recipe not in ``done``; ``save`` is called after each."""
    result = {"dataset": spec, **done, "recipes": dict(done.get("recipes", {}))}
    todo = [name for name in recipes if name not in result["recipes"]]
    if not todo:
        return result
    # --tiny's one epoch goes last: a recipe's own epochs must not undo it.
    tiny_epochs = {"train": {"epochs": 1}, "classifier": {"epochs": 1}} if tiny else {}
    project = _project(scratch, spec, dataset_params(spec, tiny))
    _session_run(project, ["ingest", "split", "cache", "classify"], merged(quiet, tiny_epochs))
    for name in todo:
        started = time.perf_counter()
        params = merged(merged(quiet, RECIPES[name]), tiny_epochs)
        result["recipes"][name] = _recipe_cell(project, params)
        print(f"{spec} {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr,
              flush=True)
        save(result)
    os.chdir(ROOT)
    return result


def table(results: list[dict]) -> str:
    names = [name for name in results[0]["variants"] if name != "all folds"]
    columns = [r.get("dataset") or f"seed {r['seed']}, difficulty {r['difficulty']}"
               for r in results]
    lines = ["| variant | " + " | ".join(columns) + f" | mean | change vs {names[0]} |",
             "| --- |" + " --- |" * (len(results) + 2)]
    for name in names:
        # The ensemble is compared with the best single fold; the rest with the first row.
        reference = "best fold" if name.endswith("-fold ensemble") else names[0]
        values = [r["variants"][name]["metric"]["value"] for r in results]
        changes = [v - r["variants"][reference]["metric"]["value"]
                   for v, r in zip(values, results, strict=True)]
        cells = [f"{interval_cell(r['variants'][name]['metric'])}; AUC "
                 f"{r['variants'][name]['roc_auc']['value']:.3f}" for r in results]
        change = "" if name in (names[0], "out of fold") else \
            ", ".join(f"{c:+.3f}" for c in changes) + \
            (f" vs {reference}" if reference != names[0] else "") + \
            (" (all better)" if all(c > 0 for c in changes) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(values):.3f} | "
                     f"{change} |")
    gated = next((name for name in names if name.endswith("-fold ensemble")), None)
    if gated and NO_GATING in names:
        lines.append(f"| {gated}, paired change of its gating (rule tuned out of fold) | "
                     + " | ".join(f"{interval_cell(r['variants'][gated]['against no gating'])}"
                                  f"; rule {r['variants'][gated]['gating']['rule']}"
                                  for r in results) + " | | |")
    if "+ gating" in names:
        lines.append("| classifier alone (ROC AUC) | " + " | ".join(
            interval_cell(r["variants"]["+ gating"]["classifier_roc_auc"])
            for r in results) + " | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    quoted = "; ".join(f'"{name}"' for name in RECIPES)
    parser.add_argument("--datasets", nargs="+", default=["7:0.3", "11:0.6", "13:0.9"],
                        help="seed:difficulty[:style] of each generated data set "
                        "(default: %(default)s; hours on 2 cores)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    variants = [*VARIANTS, "notebook negs"]
    parser.add_argument("--variants", nargs="*", default=variants, choices=variants,
                        metavar="NAME", help="which single-model variants to run (default: "
                        "all; none: only the folds): " + "; ".join(f'"{v}"' for v in variants))
    parser.add_argument("--folds", type=int, default=0,
                        help="also cross-validate with this many folds (0: no; else at least 2)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), metavar="NAME",
                        help="compare these training recipes (recipes.py) instead; names "
                        f"with spaces or commas quoted: {quoted}")
    parser.add_argument("--resume", type=Path, help="recipes: skip the cells this JSON holds")
    parser.add_argument("--tiny", action="store_true",
                        help="40 patients, one epoch (checks that it runs; no figures)")
    args = parser.parse_args()
    if args.resume and not args.recipes:
        parser.error("--resume skips recipe cells: it needs --recipes")
    if args.folds < 0 or args.folds == 1:
        parser.error(f"--folds {args.folds}: 0 (no cross-validation) or at least 2")
    if args.out and not args.out.parent.is_dir():  # found now, not after the first hour
        parser.error(f"--out {args.out}: no folder {args.out.parent}")
    previous: list[dict] = []
    if args.resume:
        try:
            previous = json.loads(args.resume.read_text())
            if not isinstance(previous, list) or not all(
                    isinstance(r, dict) and "dataset" in r
                    and isinstance(r.get("recipes", {}), dict) for r in previous):
                raise ValueError("expected a list of data sets, as --out writes it")
        except (OSError, ValueError) as exc:
            parser.error(f"--resume {args.resume}: {exc}")
    for spec in args.datasets:  # a typo fails now, not after the first data set's hour
        dataset_params(spec)
    quiet = {"cache": {"progress": False}, "train": {"progress": False},
             "classifier": {"progress": False}, "evaluate": {"progress": False}}
    with tempfile.TemporaryDirectory() as scratch:
        if args.recipes:
            main_recipes(args, previous, quiet, Path(scratch))
            return
        results = []
        if args.tiny:
            quiet = merged(quiet, {"train": {"epochs": 1}, "classifier": {"epochs": 1}})
        for spec in args.datasets:
            demo = dataset_params(spec, args.tiny)
            seed, difficulty = demo["demo_data"]["seed"], demo["demo_data"]["difficulty"]
            result = {"dataset": spec, **run_dataset(seed, difficulty, Path(scratch), quiet,
                                                     args.variants, args.folds, demo)}
            results.append(result)
            print(f"{spec}: {result['seconds']:.0f} s", file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


def main_recipes(args: argparse.Namespace, previous: list[dict], quiet: dict,
                 scratch: Path) -> None:
    """Every recipe on every data set, the cells in ``previous`` (``--resume``) skipped."""
    out = args.out or args.resume
    results = {r["dataset"]: r for r in previous}

    def save(result: dict) -> None:
        results[result["dataset"]] = result
        if out:
            out.write_text(json.dumps(list(results.values()), indent=2))

    for spec in args.datasets:
        run_recipes(spec, args.recipes, scratch, quiet, args.tiny, results.get(spec, {}), save)
    print(pareto_table([results[spec] for spec in args.datasets]))


if __name__ == "__main__":
    main()
