"""The CLIP vision tower IP-Adapters read, built from its file's own shapes, and the two hosts' preprocessing.

Host-free (torch; OpenCV only for sd-webui-controlnet's resize, which both hosts ship). The tower is
``CLIPVisionModelWithProjection`` re-stated in ~60 lines with transformers' key names (so the files both hosts read,
``clip_h.pth`` and ``CLIP-ViT-H-14.safetensors``, load strictly into it) and without transformers itself, whose versions
differ between the hosts. Everything except the head count is read off the tensors: every CLIP vision tower IP-Adapters
use (ViT-H/14, ViT-bigG/14; ViT-L/14 too) has 16 heads, and so must a test's small tower.

* :func:`read_clip_vision`: a strict, checked state dict -> :class:`ClipVision` (errors name the first bad tensor).
* :meth:`ClipVision.encode`: pixels -> ``image_embeds`` (the projected, normed class token: plain adapters) and the
  penultimate layer's hidden states (un-normed: plus and full-face adapters), as transformers' ``hidden_states[-2]``.
* :func:`pixels_a1111` / :func:`pixels_forge`: an RGB image as each host's IP-Adapter feeds the tower.
  sd-webui-controlnet squashes the image to the tower's square (OpenCV INTER_AREA), then normalises; Forge scales the
  short side (bicubic, antialiased) and centre-crops, rounds to 8 bits, then normalises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DeltaSamplingError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HEADS = 16
LAYER_NORM_EPS = 1e-5
_PREFIX = "vision_model."
_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")


class ClipVisionError(DeltaSamplingError, ValueError):
    """A CLIP vision file cannot be used: another layout, a missing or mis-shaped tensor."""

    http_status = 422


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden: int
    layers: int
    intermediate: int
    patch: int
    image_size: int
    projection: int
    heads: int = CLIP_HEADS

    @property
    def name(self) -> str:
        """What the tower is (the names users know), from its width."""
        return {1280: "ViT-H/14", 1664: "ViT-bigG/14", 1024: "ViT-L/14"}.get(self.hidden, f"CLIP vision {self.hidden}")


class _Layer(nn.Module):
    def __init__(self, c: ClipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden, eps=LAYER_NORM_EPS)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(c.hidden, c.hidden))
        self.layer_norm2 = nn.LayerNorm(c.hidden, eps=LAYER_NORM_EPS)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(c.hidden, c.intermediate)
        self.mlp.fc2 = nn.Linear(c.intermediate, c.hidden)
        self.heads = c.heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, width = x.shape
        h = self.layer_norm1(x)
        attn = self.self_attn
        q, k, v = (proj(h).view(b, n, self.heads, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)
        x = x + attn.out_proj(h)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x))))


class ClipVision(nn.Module):
    """transformers' ``CLIPVisionModelWithProjection`` (gelu, eps 1e-5), same parameter names."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        c = self.config = config
        tokens = (c.image_size // c.patch) ** 2 + 1
        self.vision_model = nn.Module()
        vm = self.vision_model
        vm.embeddings = nn.Module()
        vm.embeddings.class_embedding = nn.Parameter(torch.empty(c.hidden))
        vm.embeddings.patch_embedding = nn.Conv2d(3, c.hidden, c.patch, stride=c.patch, bias=False)
        vm.embeddings.position_embedding = nn.Embedding(tokens, c.hidden)
        vm.pre_layrnorm = nn.LayerNorm(c.hidden, eps=LAYER_NORM_EPS)  # sic: transformers' name
        vm.encoder = nn.Module()
        vm.encoder.layers = nn.ModuleList(_Layer(c) for _ in range(c.layers))
        vm.post_layernorm = nn.LayerNorm(c.hidden, eps=LAYER_NORM_EPS)
        self.visual_projection = nn.Linear(c.hidden, c.projection, bias=False)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(image_embeds (B, projection), penultimate hidden states (B, tokens, hidden)) of normalised ``pixels``
        (B, 3, S, S)."""
        vm = self.vision_model
        weight = vm.embeddings.patch_embedding.weight
        patches = vm.embeddings.patch_embedding(pixels.to(device=weight.device, dtype=weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = vm.embeddings.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + vm.embeddings.position_embedding.weight
        x = vm.pre_layrnorm(x)
        penultimate = x
        for layer in vm.encoder.layers:
            penultimate = x
            x = layer(x)
        image_embeds = self.visual_projection(vm.post_layernorm(x[:, 0]))
        return image_embeds, penultimate


def clip_vision_config(state_dict: Mapping[str, Tensor], name: str) -> ClipVisionConfig:
    """The tower's shapes read off its tensors; refuses other layouts (open_clip's ``visual.*``) by name."""
    try:
        patch = state_dict[_PREFIX + "embeddings.patch_embedding.weight"]
        positions = state_dict[_PREFIX + "embeddings.position_embedding.weight"]
        fc1 = state_dict[_PREFIX + "encoder.layers.0.mlp.fc1.weight"]
        projection = state_dict["visual_projection.weight"]
    except KeyError as exc:
        layout = "open_clip's (visual.*)" if any(k.startswith("visual.") for k in state_dict) else "an unknown"
        raise ClipVisionError(f"{name} is not a CLIP vision tower in transformers' layout ({exc.args[0]} is missing; "
                              f"the file has {layout} layout)") from None
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := _LAYER.match(k)))
    hidden, grid = int(patch.shape[0]), int(positions.shape[0]) - 1
    side = round(grid ** 0.5)
    if side * side != grid or hidden % CLIP_HEADS:
        raise ClipVisionError(f"{name}: {grid} patch positions and width {hidden} are not a square grid of "
                              f"{CLIP_HEADS}-head layers")
    return ClipVisionConfig(hidden=hidden, layers=layers, intermediate=int(fc1.shape[0]), patch=int(patch.shape[-1]),
                            image_size=side * int(patch.shape[-1]), projection=int(projection.shape[0]))


def read_clip_vision(state_dict: Mapping[str, Tensor], name: str, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> ClipVision:
    """A tower built strictly from ``state_dict`` (every tensor present and of its shape; ``position_ids`` and
    ``logit_scale``-like extras of other heads ignored)."""
    config = clip_vision_config(state_dict, name)
    with torch.device("meta"):
        model = ClipVision(config)
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state_dict:
            raise ClipVisionError(f"{name} lacks {key} (a {config.name} tower with {config.layers} layers has it)")
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise ClipVisionError(f"{name}: {key} is {tuple(state_dict[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict({k: state_dict[k].to(device=device, dtype=dtype) for k in expected}, strict=True,
                          assign=True)
    return model.eval().requires_grad_(False)


# --- preprocessing -------------------------------------------------------------------------------------------------


def _normalise(pixels01: Tensor) -> Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels01 - mean) / std


def pixels_a1111(image: np.ndarray, size: int) -> Tensor:
    """sd-webui-controlnet's ``ClipVisionDetector``: squash to ``size`` x ``size`` (INTER_AREA; its image processor's
    own resize and centre crop then change nothing), scale to [0, 1], normalise. (1, 3, size, size) float32."""
    import cv2

    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    pixels = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).float().permute(2, 0, 1).unsqueeze(0)
    return _normalise(pixels * (1.0 / 255.0))


def pixels_forge(image: np.ndarray, size: int) -> Tensor:
    """Forge's ``clip_preprocess``: the short side to ``size`` (bicubic, antialiased) and a centre crop where the image
    is not already that square, 8-bit rounding, normalise. (1, 3, size, size) float32."""
    pixels = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).float().div(255.0).permute(2, 0, 1).unsqueeze(0)
    h, w = pixels.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        pixels = F.interpolate(pixels, size=(round(scale * h), round(scale * w)), mode="bicubic", antialias=True)
        top, left = (pixels.shape[-2] - size) // 2, (pixels.shape[-1] - size) // 2
        pixels = pixels[:, :, top:top + size, left:left + size]
    pixels = torch.round(pixels.clamp(0, 1) * 255.0) / 255.0
    return _normalise(pixels)
