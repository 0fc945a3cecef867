"""HTTP routes under ``/delta-sampling/v1/``: version, schema, status, unload.

Routes added to the app directly bypass the webui's ``--api-auth``; these check it exactly as ``Api.auth`` does.

No ``from __future__ import annotations`` here: FastAPI reads the dependency's annotations at registration, and string
annotations would be resolved in this module's globals, where the lazily imported FastAPI names are not.
"""

import os
from secrets import compare_digest
from typing import Any

from .. import __version__
from ..params import DeltaParams
from .source_models import CACHE

PREFIX = "/delta-sampling/v1"


def _credentials() -> dict[str, str]:
    from modules import shared

    credentials = {}
    for item in (shared.cmd_opts.api_auth or "").split(","):
        if item:
            user, password = item.split(":")
            credentials[user] = password
    return credentials


def process_memory() -> dict[str, Any]:
    """Resident memory of the webui process and, on CUDA, the GPU memory torch holds."""
    import torch

    rss = None
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
        except ImportError:
            pass
    out: dict[str, Any] = {"process_rss_bytes": rss}
    if torch.cuda.is_available():
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        out["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
    return out


def register(app: Any) -> None:
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from modules import shared
    from modules.call_queue import queue_lock

    def auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008 - FastAPI's idiom
        known = _credentials()
        if credentials.username in known and compare_digest(credentials.password, known[credentials.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    dependencies = [Depends(auth)] if shared.cmd_opts.api_auth else []

    def version() -> dict[str, Any]:
        return {"version": __version__}

    def schema() -> dict[str, Any]:
        return DeltaParams.json_schema()

    def status() -> dict[str, Any]:
        return {**CACHE.status(), **process_memory()}

    def unload() -> dict[str, Any]:
        with queue_lock:  # never while a generation is using the models
            freed = CACHE.unload()
        return {"unloaded": freed, **process_memory()}

    for path, endpoint, methods in (("version", version, ["GET"]), ("schema", schema, ["GET"]),
                                    ("status", status, ["GET"]), ("unload", unload, ["POST"])):
        app.add_api_route(f"{PREFIX}/{path}", endpoint, methods=methods, dependencies=dependencies)
