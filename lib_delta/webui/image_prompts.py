"""IP-Adapter units inside the webui: where the CLIP vision encoders are found, and each unit's image tokens as the
host's own IP-Adapter makes them.

* Encoders are read from the folders the hosts already use, never downloaded: sd-webui-controlnet's annotator models
  folder (``clip_vision/clip_h.pth``, ``clip_g.pth``), Forge's preprocessor models folder
  (``CLIP-ViT-H-14.safetensors``, ``CLIP-ViT-bigG.safetensors``), and ``models/clip_vision``.
* Preprocessing and the uncond tokens follow the host: on A1111 sd-webui-controlnet's (squash, normalise; plus and
  full-face uncond from the hidden states it ships, ``clip_vision_h_uc.data``, and SDXL plus from its shipped tokens,
  ``clip_vision_vith_uc.data``, where that extension is installed and they fit the encoder); on Forge its own (resize
  and centre-crop; plus and full-face uncond from the encoder's output for a black image, which is also the rule on
  A1111 without sd-webui-controlnet's tensors).
* :func:`unit_tokens` encodes each reference image once per generation (one run per distinct image and encoder).
"""

from __future__ import annotations

import glob
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..clip_vision import ClipVision, pixels_a1111, pixels_forge
from ..control_units import ControlUnit
from ..errors import DeltaSamplingError
from ..ip_adapter import IPAdapter, check_encoder, uncond_tokens

ENCODER_FILES = {
    "ip-adapter_clip_h": ("clip_h.pth", "CLIP-ViT-H-14.safetensors", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                          "clip_vision_h.safetensors"),
    "ip-adapter_clip_g": ("clip_g.pth", "CLIP-ViT-bigG.safetensors", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
                          "clip_vision_g.safetensors"),
}


class EncoderMissing(DeltaSamplingError):
    http_status = 404


def encoder_dirs() -> list[str]:
    """The folders searched for CLIP vision files, in order."""
    from modules import paths, shared
    from modules.paths_internal import extensions_dir

    opts, cmd = shared.opts, shared.cmd_opts
    annotator = (getattr(opts, "control_net_modules_path", None) or getattr(cmd, "controlnet_annotator_models_path",
                                                                             None)
                 or os.path.join(extensions_dir, "sd-webui-controlnet", "annotator", "downloads"))
    candidates = [os.path.join(annotator, "clip_vision"),
                  getattr(cmd, "controlnet_preprocessor_models_dir", None)
                  or os.path.join(paths.models_path, "ControlNetPreprocessor"),
                  os.path.join(paths.models_path, "clip_vision")]
    out: list[str] = []
    for folder in map(os.path.abspath, candidates):
        if os.path.isdir(folder) and folder not in out:
            out.append(folder)
    return out


def encoder_module(unit: ControlUnit, adapter: IPAdapter) -> str:
    """The unit's encoder: as chosen, or for ip-adapter-auto the one the adapter's input width says (ViT-bigG's
    widths: 1280 projected, 1664 hidden; everything else ViT-H)."""
    if unit.module != "ip-adapter-auto":
        return unit.module
    big_g = adapter.clip_width == (1280 if adapter.clip_input == "image_embeds" else 1664)
    return "ip-adapter_clip_g" if big_g else "ip-adapter_clip_h"


def resolve_encoder(module: str) -> str:
    """The first file of the encoder's known names in :func:`encoder_dirs`; a 404 naming both where none is."""
    names = ENCODER_FILES[module]
    folders = encoder_dirs()
    for folder in folders:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    searched = ", ".join(folders) or "none of the encoder folders exists"
    raise EncoderMissing(f"ip-adapter: the {module} image encoder is missing: none of {', '.join(names)} in "
                         f"{searched} (sd-webui-controlnet's annotator models/clip_vision, Forge's "
                         "models/ControlNetPreprocessor or models/clip_vision); it is never downloaded")


def _shipped_uncond(name: str) -> torch.Tensor | None:
    """sd-webui-controlnet's fixed uncond tensor ``name`` (its ``annotator/clipvision/<name>``), if installed."""
    from modules.paths_internal import extensions_dir

    for path in sorted(glob.glob(os.path.join(extensions_dir, "*", "annotator", "clipvision", name))):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["uc"].float()
        except Exception as exc:
            print(f"Delta Sampling: cannot read {path} ({type(exc).__name__}); using the black-image uncond")
    return None


@dataclass
class TokenMaker:
    """One generation's image encodings: each (encoder, image) encoded once, sd-webui-controlnet's shipped uncond
    tensors read once; counts and times the encodes."""

    forge: bool
    runs: int = 0
    seconds: float = 0.0
    _encoded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _shipped: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def encode(self, encoder: ClipVision, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(encoder), image.shape, hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest())
        found = self._encoded.get(key)
        if found is None:
            size = encoder.config.image_size
            pixels = pixels_forge(image, size) if self.forge else pixels_a1111(image, size)
            started = time.perf_counter()
            found = self._encoded[key] = encoder.encode(pixels)
            self.seconds += time.perf_counter() - started
            self.runs += 1
        return found

    def tokens(self, adapter: IPAdapter, encoder: ClipVision, image: np.ndarray | list[np.ndarray]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) tokens of one unit, each (1, T, context), by the host's rules. Several reference images:
        the mean of their tokens, cond and uncond alike (sd-webui-controlnet's ``ImageEmbed.average_of``)."""
        if isinstance(image, list):
            pairs = [self.tokens(adapter, encoder, one) for one in image]
            return tuple(torch.stack(side).sum(dim=0) / len(pairs) for side in zip(*pairs, strict=True))
        embeds, hidden = self.encode(encoder, image)
        if adapter.clip_input == "image_embeds":
            return adapter.tokens(embeds), uncond_tokens(adapter, image_embeds=embeds)
        cond = adapter.tokens(hidden)
        return cond, self._hidden_uncond(adapter, encoder, hidden, cond)

    def _hidden_uncond(self, adapter: IPAdapter, encoder: ClipVision, hidden: torch.Tensor,
                       cond: torch.Tensor) -> torch.Tensor:
        """Plus and full-face: sd-webui-controlnet's shipped tensors on A1111 where they fit, else the black image."""
        if not self.forge:
            if adapter.family == "sdxl" and adapter.variant == "plus":
                shipped = self._shipped_tensor("clip_vision_vith_uc.data")
                if shipped is not None and shipped.shape == cond.shape:
                    return uncond_tokens(adapter, fixed_tokens=shipped.to(cond))
            else:
                shipped = self._shipped_tensor("clip_vision_h_uc.data")
                if shipped is not None and shipped.shape == hidden.shape:
                    return uncond_tokens(adapter, fixed_hidden=shipped)
        black = np.zeros((encoder.config.image_size,) * 2 + (3,), dtype=np.uint8)
        return uncond_tokens(adapter, black_hidden=self.encode(encoder, black)[1])

    def _shipped_tensor(self, name: str) -> torch.Tensor | None:
        if name not in self._shipped:
            self._shipped[name] = _shipped_uncond(name)
        return self._shipped[name]


def unit_tokens(units: list[tuple[ControlUnit, Any, np.ndarray]], maker: TokenMaker, encoder_for: Any
                ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Index -> (cond, uncond) tokens for the IP-Adapter units among ``units`` ((unit, network, image) each);
    ``encoder_for(module)`` loads an encoder (the cache's)."""
    out = {}
    for index, (unit, adapter, image) in enumerate(units):
        if not unit.is_image_prompt or unit.weight == 0:
            continue  # a unit at weight 0 runs nothing, its encoder included
        module = encoder_module(unit, adapter)
        encoder = encoder_for(module)
        width = encoder.config.projection if adapter.clip_input == "image_embeds" else encoder.config.hidden
        check_encoder(adapter, width, f"{encoder.config.name} ({module})", getattr(encoder, "filename", module))
        out[index] = maker.tokens(adapter, encoder, image)
    return out
