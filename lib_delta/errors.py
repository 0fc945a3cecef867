"""Exceptions raised by the engine. Host layers turn them into UI messages and HTTP errors."""

from __future__ import annotations


class DeltaSamplingError(RuntimeError):
    """Delta Sampling cannot produce a correct result; the message says why and what to change."""


class ParamError(DeltaSamplingError, ValueError):
    """A Delta Sampling setting is invalid. ``field`` names the setting (its API name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
