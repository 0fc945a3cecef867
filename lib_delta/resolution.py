"""Source legs at a lower resolution: average-pool the noisy sample, query at ``sigma / k``, upsample the delta.

Pooling is exact for the noise: with ``x = x0 + sigma * eps`` and eps i.i.d. N(0, 1) per latent cell, the k x k mean
``pool(x) = pool(x0) + sigma * pool(eps)`` and ``pool(eps)`` is i.i.d. N(0, 1/k^2), so ``pool(x)`` is an exact sample
of the pooled clean latent at noise level ``sigma / k``. The source legs are asked there, and the delta they return,
a delta of ``pool(x0)``, is brought back to the target's grid by upsampling. What is lost is the delta's detail above
the coarse grid's Nyquist frequency; and a pooled latent is only approximately the latent of the downsized image.

Rules:

* **Factor.** ``target``: 1 (the legs see the target's grid, bit for bit as without this module). ``native``: the
  largest integer k whose pooled pixel area is still at least :data:`NATIVE_AREA_FRACTION` of the source family's
  trained area (:data:`NATIVE_PIXEL_AREA`: SD1 512², SD2 768², SDXL 1024²); 1 when the target is at or below it.
  ``"2"``/``"3"``/``"4"``: that factor. Either way the factor falls to the smallest one that gives the same legs'
  grid (next rule; less padding), and to 1 when that grid is not smaller than the target's (a 64 x 64 px target has
  an 8 x 8 latent: nothing to gain).
* **Sizes.** A UNet halves its grid at every level and adds the skips back, so the legs need a grid divisible by
  :data:`GRID_MULTIPLE` (8 latent cells for every SD family). The sample is padded at its bottom and right edges by
  replicating the last row/column, to ``k * 8 * ceil(H / (8k))`` (and likewise W), then pooled; the upsampled delta is
  cropped back. Only the padded border blocks mix in repeated cells (their noise is then not exactly ``sigma / k``);
  every size works, odd ones included.
* **Upsampling.** Bilinear (``align_corners=False``): the delta is, by construction, a field on the coarse grid, and
  bilinear interpolation reconstructs a smooth field without adding the k x k block edges that nearest-neighbour
  copies would put into the x0 prediction (high-frequency content that is not in the adaptation). Nearest is kept
  (``mode="nearest"``) because it preserves each block's mean exactly; both leave a constant (a mean change) exact.
  ``docs/native-resolution.md`` compares them on an exactly solvable model.
* **Masks** (inpainting) are applied by the caller after upsampling, at the target's resolution, so pixels outside the
  mask stay exactly as they were.
* **Flow families** (SD3, Flux: ``x = (1 - sigma) * x0 + sigma * eps``). ``pool(x) = (1 - sigma) * pool(x0) + (sigma /
  k) * eps'`` with eps' ~ N(0, 1): rescaled by ``c = k / (k - (k - 1) * sigma)`` it is ``(1 - s') * pool(x0) + s' *
  eps'``, an exact flow sample at ``s' = sigma / (k - (k - 1) * sigma)`` (the k-diffusion rule ``s / k`` for the flow's
  ``s = sigma / (1 - sigma)``; ``sigma = 1`` stays 1). The legs' delta, a delta of ``pool(x0)``, is upsampled as above
  and not rescaled. Their transformers patch the grid by 2, so a pooled grid is rounded to even cells, not to 8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DeltaSamplingError
from .latent import LATENT_FORMATS

RESOLUTION_CHOICES: tuple[str, ...] = ("target", "native", "2", "3", "4")
NATIVE_PIXEL_AREA: dict[str, int] = {"sd1": 512 * 512, "sd2": 768 * 768, "sdxl": 1024 * 1024,
                                     "sd3": 1024 * 1024, "flux": 1024 * 1024, "chroma": 1024 * 1024}
NATIVE_AREA_FRACTION = 0.8
GRID_MULTIPLE = 8
LATENT_CELL = 8  # pixels per latent cell (the VAE's downsampling) in every SD family
UPSAMPLE_MODES = ("bilinear", "nearest")


def pooling_factor(setting: str, width: int, height: int, source_family: str) -> int:
    """The integer pooling factor for a target of ``width`` x ``height`` pixels and a source of ``source_family``."""
    multiple = grid_multiple(source_family)
    if setting == "target":
        return 1
    if setting in ("2", "3", "4"):
        return _shrinking(int(setting), width, height, multiple)
    if setting != "native":
        raise DeltaSamplingError(f"source resolution must be one of {', '.join(RESOLUTION_CHOICES)}; got {setting!r}")
    native = NATIVE_PIXEL_AREA.get(source_family)
    if native is None:
        raise DeltaSamplingError(f"no native resolution is known for the source family {source_family!r}")
    area = int(width) * int(height)
    factor = 1
    while area / (factor + 1) ** 2 >= NATIVE_AREA_FRACTION * native:
        factor += 1
    return _shrinking(factor, width, height, multiple)


def grid_multiple(family: str) -> int:
    """What the ``family``'s denoiser needs its grid to divide by (8 for the UNets, 2 for the flow transformers)."""
    fmt = LATENT_FORMATS.get(family)
    return fmt.grid_multiple if fmt is not None else GRID_MULTIPLE


def _shrinking(factor: int, width: int, height: int, multiple: int = GRID_MULTIPLE) -> int:
    """``factor``, lowered to the smallest one that gives the same legs' grid (less padding), and to 1 when that grid
    (padded to the UNet multiple) is not smaller than the target's."""
    rows, cols = int(height) // LATENT_CELL, int(width) // LATENT_CELL

    def cells(k: int) -> int:
        return pooled_size(rows, k, multiple) * pooled_size(cols, k, multiple)

    while factor > 1 and cells(factor - 1) <= cells(factor):
        factor -= 1
    return factor if cells(factor) < rows * cols else 1


def pooled_size(size: int, factor: int, multiple: int = GRID_MULTIPLE) -> int:
    """Grid size of the legs for a target grid of ``size`` cells: ``m * ceil(size / (m * factor))``, m the grid
    multiple (8 for the UNets)."""
    return multiple * math.ceil(size / (multiple * factor))


def pool_sample(x: torch.Tensor, sigma: torch.Tensor, factor: int, *, flow: bool = False,
                multiple: int = GRID_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy sample on the legs' grid (see the module rules) and its noise level: ``(pool(x), sigma / k)``, or for
    a flow family ``(c * pool(x), sigma')`` with ``d = k - (k - 1) * sigma``, ``c = k / d``, ``sigma' = sigma / d``."""
    if factor == 1:
        return x, sigma
    _check_factor(factor)
    height, width = x.shape[-2:]
    pad_h = pooled_size(height, factor, multiple) * factor - height
    pad_w = pooled_size(width, factor, multiple) * factor - width
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    pooled = F.avg_pool2d(x, factor)
    if not flow:
        return pooled, sigma / factor
    spread = factor - (factor - 1) * sigma
    return pooled * (factor / spread).to(pooled.dtype).view(-1, 1, 1, 1), sigma / spread


def upsample_delta(delta: torch.Tensor, factor: int, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """A delta from the legs' grid back on the target's grid of ``size`` = (H, W): upsampled by ``factor``, cropped."""
    if factor == 1:
        return delta
    _check_factor(factor)
    if mode not in UPSAMPLE_MODES:
        raise DeltaSamplingError(f"upsample mode must be one of {', '.join(UPSAMPLE_MODES)}; got {mode!r}")
    scaled = (delta.shape[-2] * factor, delta.shape[-1] * factor)
    if mode == "nearest":
        up = F.interpolate(delta, size=scaled, mode="nearest")
    else:
        up = F.interpolate(delta, size=scaled, mode="bilinear", align_corners=False)
    return up[..., : size[0], : size[1]]


def _check_factor(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise DeltaSamplingError(f"pooling factor must be a positive integer; got {factor!r}")
