"""Exceptions raised by the engine. Host layers turn them into UI messages and HTTP errors."""

from __future__ import annotations


class DeltaSamplingError(RuntimeError):
    """Delta Sampling cannot produce a correct result; the message says why and what to change."""

    http_status = 500

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        # The webui's API error handler answers with the exception's own ``status_code`` attribute (else 500).
        self.status_code = self.http_status


class ParamError(DeltaSamplingError, ValueError):
    """A Delta Sampling setting is invalid. ``field`` names the setting (its API name)."""

    http_status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class OutOfMemory(DeltaSamplingError):
    """The GPU ran out of memory in Delta Sampling's part of a generation (loading the source pair, or a leg). It
    answers with the status the host gives its own out-of-memory errors (500), as one line without a traceback: the
    message says what was freed and what to change."""

    http_status = 500
