"""Nodes of the report pipeline."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from pneumonia_kedro.figures import image_grid, line_figure
from pneumonia_kedro.fusion import fuse_variants
from pneumonia_kedro.imagecache import ImageCache
from pneumonia_kedro.postprocess import image_probabilities
from pneumonia_kedro.prediction import prediction_settings

FIGURE_FILES = {
    "samples": "samples_with_truth.png",
    "gallery": "prediction_gallery.png",
    "precision_recall": "precision_recall_curve.png",
    "roc": "roc_curve.png",
    "froc": "froc_curve.png",
    "threshold": "threshold_curve.png",
    "training": "training_curves.png",
}


def sample_figure(train_image_cache: ImageCache, train_patients: pd.DataFrame) -> plt.Figure:
    """The notebook's figure: training images with their ground-truth boxes."""
    positives = train_patients.loc[train_patients["Target"] == 1].head(6)
    negatives = train_patients.loc[train_patients["Target"] == 0].head(2)
    chosen = pd.concat([positives, negatives])
    chosen = chosen.loc[chosen["patientId"].isin(set(train_image_cache.usable["patientId"]))]
    return image_grid(train_image_cache, chosen, None)


def prediction_gallery(validation_image_cache: ImageCache, validation_patients: pd.DataFrame,
                       validation_predictions: pd.DataFrame) -> plt.Figure:
    """Predictions (red) against truth (green): hits, false alarms on negatives, misses."""
    with_boxes = set(validation_predictions["patientId"])
    usable = set(validation_image_cache.usable["patientId"])
    patients = validation_patients.loc[validation_patients["patientId"].isin(usable)]
    positive = patients["Target"] == 1
    groups = [
        ("true positive", patients.loc[positive & patients["patientId"].isin(with_boxes)]),
        ("false positive", patients.loc[~positive & patients["patientId"].isin(with_boxes)]),
        ("missed", patients.loc[positive & ~patients["patientId"].isin(with_boxes)]),
    ]
    chosen, titles = [], []
    for label, group in groups:
        for record in group.head(4).to_dict("records"):
            chosen.append(record)
            titles.append(f"{label}: {record['patientId'][:8]}")
    return image_grid(validation_image_cache, pd.DataFrame(chosen, columns=patients.columns),
                      validation_predictions, titles)


def curve_figures(raw_validation_predictions: pd.DataFrame, validation_patients: pd.DataFrame,
                  evaluation_metrics: dict, threshold_curve: pd.DataFrame,
                  training_history: pd.DataFrame) -> dict[str, plt.Figure]:
    """Precision-recall, ROC, FROC, threshold-versus-metric and training curves."""
    targets = validation_patients["Target"].to_numpy(int)
    tta, _ = prediction_settings(evaluation_metrics["postprocessing"])
    probabilities = image_probabilities(
        fuse_variants(raw_validation_predictions, tta.fusion_iou, tta.skip_score),
        validation_patients["patientId"].tolist())
    figures = {}
    if len(np.unique(targets)) == 2:
        precision, recall, _ = precision_recall_curve(targets, probabilities)
        figures[FIGURE_FILES["precision_recall"]] = line_figure(
            recall, {"image level": precision}, "recall", "precision",
            "Image-level precision-recall")
        fpr, tpr, _ = roc_curve(targets, probabilities)
        auc = evaluation_metrics["overall"]["image_level"]["roc_auc"]
        figures[FIGURE_FILES["roc"]] = line_figure(
            fpr, {"image level": tpr}, "false positive rate", "true positive rate",
            f"Image-level ROC (AUC {auc:.3f})", diagonal=True)
    froc = evaluation_metrics["froc_curve"]
    figures[FIGURE_FILES["froc"]] = line_figure(
        froc["fp_per_image"], {"FROC": froc["sensitivity"]}, "false positives per image",
        "lesion sensitivity", "FROC (IoU > 0.4)")
    chosen = evaluation_metrics["postprocessing"]["score_threshold"]
    figures[FIGURE_FILES["threshold"]] = line_figure(
        threshold_curve["score_threshold"],
        {"competition metric": threshold_curve["competition_metric"]},
        "score threshold", "competition metric (validation)",
        f"Score threshold: {chosen:.2f} chosen", mark_x=chosen)
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for fold, history in _by_fold(training_history):
        label = f"{fold} " if fold else ""
        loss_axis.plot(history["epoch"], history["train_loss"], label=f"{label}train")
        loss_axis.plot(history["epoch"], history["validation_loss"], "--",
                       label=f"{label}validation")
        metric_axis.plot(history["epoch"], history["validation_competition_metric"],
                         label=fold or None)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    if "fold" in training_history:
        metric_axis.legend()
    metric_axis.set_xlabel("epoch")
    metric_axis.set_ylabel("competition metric (validation)")
    figure.tight_layout()
    figures[FIGURE_FILES["training"]] = figure
    return figures


def _by_fold(history: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Each cross-validation fold's history (one unnamed history without folds)."""
    if "fold" not in history:
        return [("", history)]
    return [(str(fold), rows) for fold, rows in history.groupby("fold", sort=True)]


def _best_epochs(history: pd.DataFrame) -> str:
    parts = []
    for fold, rows in _by_fold(history):
        best = rows.loc[rows["validation_competition_metric"].idxmax()]
        parts.append(f"{fold + ': ' if fold else ''}{int(best['epoch'])} of {len(rows)}")
    return ", ".join(parts)


def _cross_validation_lines(metrics: dict) -> list[str]:
    """What the folds were."""
    folds = metrics["cross_validation"]
    return [
        f"Cross-validation: {folds['folds']} folds of the {folds['training_patients']} "
        "training patients (" + ", ".join(f"{k}: {v}" for k, v in
                                           folds["patients_per_fold"].items()) + "). Each "
        "training patient is scored by the one fold model that never saw it (out of fold), "
        "and the post-processing is tuned on those scores: the table leads with them.",
        "",
    ]


def _ensemble_lines(metrics: dict, split_report: dict) -> list[str]:
    """The fold ensemble on the validation split, with the out-of-fold post-processing."""
    ensemble = metrics["validation_ensemble"]["overall"]
    return [
        f"## The fold ensemble on the validation split ({split_report['validation']['patients']}"
        " patients, never trained or tuned on)",
        "",
        "| metric | value [95 % interval] |",
        "| --- | --- |",
        f"| competition metric | {_with_interval(ensemble, 'competition_metric')} |",
        f"| COCO AP | {_with_interval(ensemble, 'coco_ap')} |",
        f"| image-level ROC AUC | {_with_interval(ensemble, 'roc_auc')} |",
        f"| sensitivity / specificity | {_with_interval(ensemble, 'sensitivity')} / "
        f"{_with_interval(ensemble, 'specificity')} |",
        "",
    ]


def _format(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _classifier_rows(classifier: dict | None) -> list[str]:
    if classifier is None:
        return []
    return [
        f"| image-level classifier ROC AUC | {_with_interval(classifier, 'roc_auc')} |",
        f"| classifier sensitivity / specificity at {classifier['threshold']:.2f} | "
        f"{_with_interval(classifier, 'sensitivity')} / "
        f"{_with_interval(classifier, 'specificity')} |",
    ]


def _tuned(values: dict) -> str:
    gating = values.get("gating", {"rule": "none"})
    rule = gating["rule"] + (f" {gating['threshold']:.2f}" if gating["rule"] == "drop_below"
                             else "")
    fusion = values.get("tta", {})
    fused = f", variants fused at IoU {fusion['fusion_iou']:g}" \
        if fusion.get("hflip") or len(fusion.get("scales", [1.0])) > 1 else ""
    return (f"score threshold {values['score_threshold']:.2f}, NMS IoU {values['nms_iou']:g}, "
            f"shrink {values['shrink']:g}, at most {values['max_boxes']} boxes, gating {rule}"
            f"{fused}")


def _with_interval(values: dict, name: str) -> str:
    """``0.2615 [0.21, 0.31]``: the value and its 95 % bootstrap interval over patients."""
    interval = values.get("intervals", {}).get(name)
    if interval is None:
        return _format(values[name] if name in values else values["image_level"][name])
    if np.isnan(interval["low"]):
        return _format(interval["value"])
    return f"{interval['value']:.4f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def write_report(evaluation_metrics: dict, split_report: dict, cache_report: dict,
                 training_history: pd.DataFrame) -> str:
    """A one-page Markdown report: headline numbers, breakdowns and the figures."""
    overall = evaluation_metrics["overall"]
    image = overall["image_level"]
    cross_validated = "cross_validation" in evaluation_metrics
    scored = "training patients out of fold" if cross_validated else "validation patients"
    lines = [
        "# Evaluation report",
        "",
        f"Validation split: {split_report['validation']['patients']} patients "
        f"({split_report['validation']['positive']} with opacity); training: "
        f"{split_report['train']['patients']}. Images cached at "
        f"{cache_report['image_size']} px.",
        "",
        *(_cross_validation_lines(evaluation_metrics) if cross_validated else []),
        "Values with their 95 % bootstrap interval over patients: a difference inside the "
        f"interval is noise. Held out from tuning: each half of the {scored} is "
        "scored with the post-processing tuned on the other half.",
        "",
        "| metric | value [95 % interval] |",
        "| --- | --- |",
        f"| competition metric (mean over IoU 0.40-0.75) | "
        f"{_with_interval(overall, 'competition_metric')} |",
        f"| post-processing (tuned on all {scored}) | "
        f"{_tuned(evaluation_metrics['postprocessing'])} |",
        f"| COCO AP | {_with_interval(overall, 'coco_ap')} |",
        f"| COCO AP50 / AP75 | {overall['coco_ap50']:.4f} / {overall['coco_ap75']:.4f} |",
        f"| image-level ROC AUC | {_with_interval(overall, 'roc_auc')} |",
        f"| sensitivity | {_with_interval(overall, 'sensitivity')} |",
        f"| specificity | {_with_interval(overall, 'specificity')} |",
        f"| F1 | {_format(image['f1'])} |",
        f"| best epoch | {_best_epochs(training_history)} |",
        *_classifier_rows(evaluation_metrics.get("classifier")),
        "",
        "FROC sensitivity at false positives per image: " + ", ".join(
            f"{k}: {v:.3f}" for k, v in overall["froc"].items()),
        "",
        *(_ensemble_lines(evaluation_metrics, split_report) if cross_validated else []),
    ]
    for breakdown in (key for key in evaluation_metrics if key.startswith("by_")):
        lines += [f"## {breakdown.replace('_', ' ').capitalize()}", "",
                  "| group | images | competition metric | ROC AUC | sensitivity | "
                  "specificity |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for group, values in evaluation_metrics[breakdown].items():
            lines.append(f"| {group} | {values['images']} | "
                         + " | ".join(_with_interval(values, name) for name in
                                      ("competition_metric", "roc_auc", "sensitivity",
                                       "specificity")) + " |")
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{name}](figures/{file})" for name, file in FIGURE_FILES.items()]
    return "\n".join(lines) + "\n"
