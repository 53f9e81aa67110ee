"""Small helpers for the JSON reports: lists stay short on 26,000-file folders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

REPORT_LIMIT = 100


def capped(items: Sequence | Mapping, limit: int = REPORT_LIMIT) -> dict:
    """``{"count": n, "first": ...}``: how many there are and the first ``limit`` of them
    (a list stays a list, a mapping of id to reason stays a mapping)."""
    if isinstance(items, Mapping):
        first: list | dict = dict(list(items.items())[:limit])
    else:
        first = list(items)[:limit]
    return {"count": len(items), "first": first}
