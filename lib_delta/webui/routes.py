"""HTTP routes under ``/delta-sampling/v1/``: version, schema, status, unload, and the ControlNet model list and
preprocessor (``controlnet/models``, ``controlnet/preprocess``: a map can be checked, and reused with module "none").

Routes added to the app directly bypass the webui's ``--api-auth``; these check it exactly as ``Api.auth`` does.

No ``from __future__ import annotations`` here: FastAPI reads the dependency's annotations at registration, and string
annotations would be resolved in this module's globals, where the lazily imported FastAPI names are not.
"""

import os
from secrets import compare_digest
from typing import Any

from .. import __version__
from ..errors import ParamError
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
    from fastapi import Body, Depends, HTTPException
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

    def controlnet_models() -> dict[str, Any]:
        from .source_models import list_controlnets

        return {"models": list(list_controlnets())}

    def controlnet_preprocess(payload: dict = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        """The control map of ``image`` with a unit's preprocessor fields; with ``width`` and ``height`` also fitted
        by ``resize_mode`` to that generation size, as a generation would use it."""
        from ..control_units import control_map, decode_image, encode_png, parse_unit, preprocess

        try:
            fields = dict(payload)
            size = [fields.pop(k, None) for k in ("width", "height")]
            unit = parse_unit({"model": "preprocess", **fields}, "controlnet/preprocess")
            image = decode_image(unit.image, "controlnet/preprocess")
            if all(isinstance(n, int) and not isinstance(n, bool) and 8 <= n <= 8192 for n in size):
                result = control_map(unit, image, size[0], size[1])
            elif size == [None, None]:
                result = preprocess(unit, image, image.shape[1], image.shape[0])
            else:
                raise ParamError("controlnet/preprocess", f"width and height must be whole numbers 8..8192, got {size}")
        except ParamError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return {"image": encode_png(result), "width": int(result.shape[1]), "height": int(result.shape[0])}

    def unload() -> dict[str, Any]:
        with queue_lock:  # never while a generation is using the models
            freed = CACHE.unload()
        return {"unloaded": freed, **process_memory()}

    for path, endpoint, methods in (("version", version, ["GET"]), ("schema", schema, ["GET"]),
                                    ("status", status, ["GET"]), ("unload", unload, ["POST"]),
                                    ("controlnet/models", controlnet_models, ["GET"]),
                                    ("controlnet/preprocess", controlnet_preprocess, ["POST"])):
        app.add_api_route(f"{PREFIX}/{path}", endpoint, methods=methods, dependencies=dependencies)
