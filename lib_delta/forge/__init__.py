"""Forge (lllyasviel/stable-diffusion-webui-forge, the ``backend/`` Forge) as a second host.

Forge keeps the A1111 module API the webui layer uses (scripts, CFG denoiser callbacks, prompt parser, processing,
API, XYZ), so :mod:`lib_delta.webui` serves both hosts; this package holds what Forge does differently: source
checkpoints are Forge engines built by Forge's own loader (:mod:`.source_models`), and :func:`detect` tells the webui
layer (``hooks.host()``) which rules of the denoiser to mirror (Forge skips the uncond at CFG scale 1 and uses the
hires CFG scale in the hires pass; its callbacks always see x0).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    name: str  # "a1111" | "forge" | "forge-classic"
    supported: bool
    why: str = ""

    @property
    def forge(self) -> bool:
        return self.name == "forge"


def detect() -> Host:
    """Which webui this process is (called inside the webui; only looks for packages, imports nothing)."""
    found = importlib.util.find_spec
    if found("modules_forge") is None:
        return Host("a1111", True)
    if found("backend") is not None and found("backend.loader") is not None:
        return Host("forge", True)
    # reForge and Forge Classic keep the first Forge backend (ldm_patched/, modules_forge/forge_loader.py)
    return Host("forge-classic", False,
                "this is a Forge with the older ldm_patched backend (reForge / Forge Classic); Delta Sampling supports "
                "the AUTOMATIC1111 webui 1.10 and Forge main (the backend/ Forge) only")
