"""Checks and schema pieces shared by the settings table (:mod:`.params`) and the ControlNet unit fields
(:mod:`.control_units`): one number check, one JSON-schema fragment per value kind."""

from __future__ import annotations

import math
from typing import Any

from .errors import ParamError


def check_number(value: Any, *, where: str, label: str, minimum: float | None, maximum: float | None,
                 integer: bool = False) -> float:
    """``value`` as a finite number inside [minimum, maximum] (a whole one if ``integer``); ``ParamError(where)``
    whose message starts with ``label`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(where, f"{label}expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ParamError(where, f"{label}expected a finite number, got {value!r}")
    if integer and value != int(value):
        raise ParamError(where, f"{label}expected a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ParamError(where, f"{label}{value!r} is below the minimum {minimum:g}")
    if maximum is not None and value > maximum:
        raise ParamError(where, f"{label}{value!r} is above the maximum {maximum:g}")
    return int(value) if integer else float(value)


def scalar_schema(kind: str, minimum: float | None = None, maximum: float | None = None) -> dict[str, Any]:
    """The JSON-schema type of a bool / float / int / text value (empty for other kinds)."""
    if kind == "bool":
        return {"type": "boolean"}
    if kind in ("float", "int"):
        return {"type": "number" if kind == "float" else "integer", "minimum": minimum, "maximum": maximum}
    if kind in ("str", "checkpoint"):
        return {"type": "string"}
    return {}
