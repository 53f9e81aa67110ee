"""Typed configuration: parameter dictionaries become dataclasses at the node boundary.

Nodes take the raw ``params:<group>`` dictionary (so kedro-mlflow logs it flattened, one MLflow
param per key) and convert it here; domain code only ever sees the dataclass. A class may
declare ``RANGES = {"key": Range(...)}``: numbers outside are refused here, naming the key,
before any node touches data.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pneumonia_kedro.errors import PneumoniaKedroError

T = TypeVar("T")


class ConfigError(PneumoniaKedroError, ValueError):
    """A parameter group does not match the dataclass it configures."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``low``/``high`` bounds, open (excluded) when asked."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)


def _check_type(value: Any, annotation: Any) -> bool:  # noqa: PLR0911
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, list | tuple)
    if origin is dict:
        return isinstance(value, Mapping)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _wants_tuple(annotation: Any) -> bool:
    if annotation is tuple or typing.get_origin(annotation) is tuple:
        return True
    return any(_wants_tuple(arg) for arg in typing.get_args(annotation)
               if typing.get_origin(annotation) in (typing.Union, types.UnionType))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def from_params(cls: type[T], params: Mapping[str, Any] | T, group: str) -> T:
    """Build dataclass ``cls`` from the parameter group ``group``, naming any bad key."""
    if isinstance(params, cls):
        return params
    if not isinstance(params, Mapping):
        raise ConfigError(f"params:{group} must be a mapping, got {type(params).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(f"params:{group}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, raw in params.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation) and isinstance(raw, Mapping):
            nested = from_params(annotation, raw, f"{group}.{name}")
            default = _default(fields[name])
            # Keys not given keep the enclosing class's default, not the nested class's own.
            values[name] = nested if default is None else dataclasses.replace(
                default, **{k: getattr(nested, k) for k in raw})
        elif not _check_type(raw, annotation):
            allowed = _allowed(annotation)
            raise ConfigError(
                f"params:{group}.{name} = {raw!r} does not match the expected type "
                f"{getattr(annotation, '__name__', annotation)}"
                + (f"; allowed values: {', '.join(map(repr, allowed))}" if allowed else "")
            )
        elif isinstance(raw, list) and _wants_tuple(annotation):
            values[name] = _as_tuple(raw)
        else:
            values[name] = raw
    for name, allowed in getattr(cls, "RANGES", {}).items():
        value = values.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and not allowed.contains(value):
            raise ConfigError(f"params:{group}.{name} = {value!r} is out of range: it must be "
                              f"{allowed}")
    return cls(**values)


def _allowed(annotation: Any) -> list:
    """The values a Literal (or an optional Literal) allows, else none."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [value for arg in typing.get_args(annotation) for value in _allowed(arg)]
    return []
