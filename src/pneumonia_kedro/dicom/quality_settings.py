"""The input quality gate's one parameter group, ``params:quality``
(``conf/base/parameters_quality.yml``): a policy per check and use, the checks' thresholds,
and how the appearance check is calibrated. Every value lives there; this module only reads
and validates it, naming the key that is wrong.

Two uses: ``training`` (training images, when the cache decodes them) and ``inference`` (the
inference pipeline's test folder and the served model).
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from pneumonia_kedro.config import AT_LEAST_ONE, ConfigError, Range, from_params
from pneumonia_kedro.dicom.appearance import AppearanceError, AppearanceReference
from pneumonia_kedro.dicom.quality import QualityConfig

logger = logging.getLogger(__name__)

Use = Literal["training", "inference"]
USES = ("training", "inference")
THRESHOLDS = ("min_side", "max_aspect_ratio", "near_constant_levels")
THRESHOLD_RANGES = {"min_side": AT_LEAST_ONE, "max_aspect_ratio": Range(1),
                    "near_constant_levels": Range(0, 255)}
# The appearance reference is made from the training images: no training policy.
INFERENCE_ONLY = {"appearance"}


def checks() -> tuple[str, ...]:
    """The gate's checks, in the order of ``QualityConfig``."""
    return tuple(f.name for f in fields(QualityConfig)
                 if f.name not in THRESHOLDS and f.name != "reference")


@dataclass(frozen=True)
class AppearanceSettings:
    """How the appearance reference is calibrated on the training cache."""

    RANGES = {"components": AT_LEAST_ONE, "quantile": Range(0.5, 1),
              "margin": Range(1)}

    # None only marks a key that was not given (refused): the values are in conf/base.
    components: int | None = None  # main directions of the training images' appearance
    quantile: float | None = None  # of the training images' held-out distances ...
    margin: float | None = None    # ... times this: the threshold

    def __post_init__(self) -> None:
        _given(self, "quality.appearance")


def _given(settings: object, key: str) -> None:
    """Refuse a settings object built without some of its keys."""
    missing = [f.name for f in fields(settings) if getattr(settings, f.name) is None]
    if missing:
        raise ConfigError(f"params:{key}: missing key(s) {missing} (conf/base/"
                          "parameters_quality.yml has them all)")


def _mapping(value: Any, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(f"params:{key} must be a mapping, got {value!r}")
    return value


def _exact_keys(given: Mapping, expected: set[str], key: str) -> None:
    unknown = sorted(set(given) - expected)
    missing = sorted(expected - set(given))
    if unknown:
        raise ConfigError(f"params:{key}: unknown key(s) {unknown}; known: {sorted(expected)}")
    if missing:
        raise ConfigError(f"params:{key}: missing key(s) {missing} (conf/base/"
                          "parameters_quality.yml has them all)")


def _checked_policies(policies: Mapping) -> None:
    _exact_keys(policies, set(checks()), "quality.policies")
    hints = typing.get_type_hints(QualityConfig)
    for check in checks():
        key = f"quality.policies.{check}"
        entry = _mapping(policies[check], key)
        if check in INFERENCE_ONLY and "training" in entry:
            raise ConfigError(f"params:{key}.training: the {check} check has no training "
                              "policy (its reference is made from the training images); "
                              "remove it")
        _exact_keys(entry, {"inference"} if check in INFERENCE_ONLY else set(USES), key)
        allowed = typing.get_args(hints[check])
        for use, value in entry.items():
            if value not in allowed:
                raise ConfigError(f"params:{key}.{use} = {value!r}; allowed values: "
                                  f"{', '.join(allowed)}")


@dataclass(frozen=True)
class QualitySettings:
    """``params:quality``: every gate's policies (per check and use) and thresholds, and the
    appearance calibration. No defaults: conf/base/parameters_quality.yml holds them (None
    only marks a key that was not given, and is refused). The run's parameter check builds it
    with ``config.from_params`` before any node runs."""

    RANGES = THRESHOLD_RANGES

    policies: dict | None = None
    min_side: int | None = None
    max_aspect_ratio: float | None = None
    near_constant_levels: int | None = None
    appearance: AppearanceSettings = None  # type: ignore[assignment]  # (from_params nests it)

    def __post_init__(self) -> None:
        _given(self, "quality")
        _checked_policies(self.policies)

    def gate(self, use: Use, reference: AppearanceReference | None = None) -> QualityConfig:
        """The gate of one use; ``reference`` (inference only) turns on the appearance check."""
        policies = {check: entry.get(use, "warn") for check, entry in self.policies.items()}
        return QualityConfig(**policies, min_side=self.min_side,
                             max_aspect_ratio=self.max_aspect_ratio,
                             near_constant_levels=self.near_constant_levels,
                             reference=reference if use == "inference" else None)


def quality_settings(params: Mapping | QualitySettings) -> QualitySettings:
    """``params:quality`` read and validated, naming the key that is wrong or missing."""
    if isinstance(params, QualitySettings):
        return params
    return from_params(QualitySettings, params, "quality")


def training_gate(params: Mapping) -> QualityConfig:
    """The gate of training images (no appearance check: its reference is made from them)."""
    return quality_settings(params).gate("training")


def inference_gate(params: Mapping, calibration: Mapping | None) -> QualityConfig:
    """The gate of the inference pipeline and the served model, with the appearance reference
    the cache pipeline calibrated (``appearance_reference``); without a usable one the check
    is off, with a warning that says why."""
    settings = quality_settings(params)
    reference = None
    saved = (calibration or {}).get("reference")
    if saved:
        try:
            reference = AppearanceReference.from_dict(saved)
        except AppearanceError as exc:
            raise ConfigError(f"appearance_reference: {exc}") from None
    if reference is None:
        reason = (calibration or {}).get("reason") or "no appearance reference was calibrated"
        logger.warning("the quality gate's appearance check is off: %s", reason)
    return settings.gate("inference", reference)
