"""Training recipes for ``quality.py --recipes``, and the Pareto table of their results.

A recipe is a named set of ``--params`` overrides on top of ``conf/demo`` (merged key by key;
lists replace): its cache size, detector and epochs. Anchor sizes are given for 128 px with
``model.anchor_reference_size: 128``, so they scale with ``cache.image_size``
(``benchmarks/anchors.py`` measured them).
"""

from __future__ import annotations

import numpy as np

# Per-map anchors of the 5-map ResNet FPN Faster R-CNNs, at 128 px (anchors.py: 99 % of the
# RSNA boxes overlap one at IoU >= 0.5 at 128..256 px; torchvision's 32..512 px: 79 % at 128).
RESNET_FPN_ANCHORS = [[12, 20], [24, 32], [40, 56], [64, 80], [96, 128]]
STRONG_AUGMENT = {"horizontal_flip": 0.5, "scale": [0.8, 1.25], "translate": 0.1,
                  "brightness": 0.2, "contrast": 0.2}

# The mobilenet's measured anchors (anchors.py), given for 128 px and scaled to the cache.
MEASURED_ANCHORS = {"anchor_sizes": [[12, 20, 32, 48, 72]] * 3, "anchor_reference_size": 128}


# Every recipe names its cache size, detector and epochs, so those mean the same whatever
# conf/demo names; the rest (RPN sampling, box head, learning rate, schedule) is conf/demo's.
def _recipe(image_size: int, model: dict, epochs: int, **train: object) -> dict:
    return {"cache": {"image_size": image_size}, "model": model,
            "train": {"epochs": epochs, **train}}


def _mobilenet(image_size: int, epochs: int = 10, **train: object) -> dict:
    return _recipe(image_size, {"architecture": "mobilenet_v3_large_fpn", **MEASURED_ANCHORS},
                   epochs, **train)


def _resnet_fpn(architecture: str, image_size: int, epochs: int = 10) -> dict:
    return _recipe(image_size, {"architecture": architecture, "anchor_sizes": RESNET_FPN_ANCHORS,
                                "anchor_reference_size": 128}, epochs)


def _fcos(image_size: int, epochs: int = 10) -> dict:
    # Anchor-free: anchor and RPN settings do not apply (models/config.py).
    return _recipe(image_size, {"architecture": "fcos_resnet18_fpn"}, epochs)


RECIPES: dict[str, dict] = {
    # conf/demo as it is now: since 2026-12-02 (second change) `resnet18_fpn@128, 5 epochs`.
    "demo": {},
    # conf/demo until 2026-12-02: mobilenet_v3_large_fpn from scratch, 128 px, 10 epochs,
    # anchors 16..128 px whatever the cache size.
    "mobilenet@128 (old demo)": _recipe(128, {
        "architecture": "mobilenet_v3_large_fpn", "anchor_sizes": [[16, 32, 64, 128]] * 3,
        "anchor_reference_size": None}, 10),
    "mobilenet@128, measured anchors": _mobilenet(128),
    # conf/demo for part of 2026-12-02.
    "mobilenet@192": _mobilenet(192),
    "mobilenet@256": _mobilenet(256),
    "resnet18_fpn@192": _resnet_fpn("resnet18_fpn", 192),
    "resnet34_fpn@192": _resnet_fpn("resnet34_fpn", 192),
    # At 128 px: on CPU a ResNet-18 FPN step costs 2-2.6x the old demo's (5x at 192 px).
    "resnet18_fpn@128": _resnet_fpn("resnet18_fpn", 128),
    "fcos_resnet18_fpn@128": _fcos(128),
    # The two above cut to make demo's budget by their 2-thread step time (recipe_steps.py:
    # 1.8x and 1.3x the 192 px MobileNet's): fewer epochs, the same cosine schedule. The first
    # is the demo's recipe (benchmarks/README.md, "Recipes").
    "resnet18_fpn@128, 5 epochs": _resnet_fpn("resnet18_fpn", 128, epochs=5),
    "fcos_resnet18_fpn@128, 7 epochs": _fcos(128, epochs=7),
    "fcos_resnet18_fpn@192": _fcos(192),
    "mobilenet@192, strong augment": _mobilenet(192, augment=STRONG_AUGMENT),
    "mobilenet@192, 20 epochs": _mobilenet(192, epochs=20),
    "mobilenet@192, 20 epochs, lr 0.02 step": _mobilenet(
        192, epochs=20, learning_rate=0.02, scheduler="step", step_size=14, gamma=0.1),
}


def merged(base: dict, override: dict) -> dict:
    """``override`` on ``base``, nested mappings merged key by key (what --params does)."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def frontier(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names of the (minutes, metric) points no other point beats: no more minutes and no
    lower metric, one of them strictly."""
    return {name for name, (minutes, metric) in points.items()
            if not any((m <= minutes and v >= metric) and (m < minutes or v > metric)
                       for other, (m, v) in points.items() if other != name)}


def interval_cell(interval: dict) -> str:
    return f"{interval['value']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def pareto_table(datasets: list[dict]) -> str:
    """Recipes by mean CPU minutes: held-out metric per data set with its interval, the mean,
    ROC AUCs and minutes; ``*`` marks the frontier of mean metric against mean CPU minutes."""
    names = list(dict.fromkeys(name for d in datasets for name in d["recipes"]))
    done = [n for n in names if all(n in d["recipes"] for d in datasets)]
    rows = {}
    for name in done:
        cells = [d["recipes"][name] for d in datasets]
        rows[name] = (float(np.mean([c["cpu_minutes"] for c in cells])),
                      float(np.mean([c["metric"]["value"] for c in cells])), cells)
    best = frontier({name: row[:2] for name, row in rows.items()})
    lines = ["| frontier | recipe | CPU min (wall) | " + " | ".join(
        f"metric, {d['dataset']}" for d in datasets) + " | mean metric | detector ROC AUC "
        "(mean) | classifier ROC AUC (mean) |", "|" + " --- |" * (len(datasets) + 6)]
    for name, (minutes, metric, cells) in sorted(rows.items(), key=lambda item: item[1][0]):
        wall = np.mean([c["wall_minutes"] for c in cells])
        lines.append(
            f"| {'*' if name in best else ''} | {name} | {minutes:.1f} ({wall:.1f}) | "
            + " | ".join(interval_cell(c["metric"]) for c in cells)
            + f" | {metric:.3f} | {np.mean([c['roc_auc']['value'] for c in cells]):.3f} | "
            f"{np.mean([c['classifier_roc_auc']['value'] for c in cells]):.3f} |")
    missing = [n for n in names if n not in done]
    if missing:
        lines.append(f"\n(not on every data set yet: {', '.join(missing)})")
    return "\n".join(lines)
