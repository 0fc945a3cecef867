"""The Delta Sampling step: the target's x0 prediction plus the scaled, mapped difference of the source pair's.

    D_final = D_target(x, sigma) + lambda * convert( D_adapted(x_s, sigma_s) - D_base(x_s, sigma_s) )

``base`` and ``adapted`` are x0 denoisers of the source space (each applying its own CFG with its own conditioning);
``x_s, sigma_s`` is the target's noisy sample mapped exactly into the source space (:class:`LatentMap`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import DeltaSamplingError
from .latent import LatentFormat, LatentMap, resolve_format
from .resolution import pool_sample, upsample_delta
from .timesteps import DiscreteSchedule, vp_to_ve, x0_delta_to_eps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x, sigma) -> x0``: x of shape (B, C, H, W), sigma of shape (B,), result shaped like x."""

PairDenoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(x, sigma) -> (x0_base, x0_adapted)``: both legs at once, e.g. in one batched forward."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`DeltaSamplingError` naming ``what`` if ``tensor`` holds NaN or infinity."""
    if not bool(torch.isfinite(tensor).all()):
        raise DeltaSamplingError(
            f"the {what} returned non-finite values (NaN or infinity); Delta Sampling stopped instead of producing "
            "a broken image. Check that model's weights and precision (try fp32 / --no-half) and the source CFG scale."
        )


def _check_shapes(x: torch.Tensor, sigma: torch.Tensor, target_denoised: torch.Tensor, target: LatentFormat) -> None:
    if x.ndim != 4:
        raise DeltaSamplingError(f"x must have shape (B, C, H, W); got {tuple(x.shape)}")
    if x.shape[1] != target.channels:
        raise DeltaSamplingError(
            f"x has {x.shape[1]} channels but the target format {target.name!r} has {target.channels}"
        )
    if target_denoised.shape != x.shape:
        raise DeltaSamplingError(
            f"target_denoised has shape {tuple(target_denoised.shape)}, expected x's shape {tuple(x.shape)}"
        )
    if sigma.shape != (x.shape[0],):
        raise DeltaSamplingError(f"sigma must have shape ({x.shape[0]},); got {tuple(sigma.shape)}")


def source_delta(
    x: torch.Tensor,
    sigma: torch.Tensor,
    legs: PairDenoiser,
    latent_map: LatentMap,
    *,
    factor: int = 1,
    upsample: str = "bilinear",
) -> torch.Tensor:
    """``convert(D_adapted(x_s, sigma_s) - D_base(x_s, sigma_s))`` in the target's space (unscaled by lambda).

    With ``factor`` k > 1 the legs are asked on a k times coarser grid: ``x_s`` average-pooled at ``sigma_s / k``
    (after the latent map, with which pooling commutes; a flow family's pooled sample is rescaled to an exact flow
    sample), and their delta is upsampled back (:mod:`.resolution`).
    ``factor == 1`` is exactly the full-resolution delta."""
    x_s = latent_map.sample_to_source(x)
    sigma_s = latent_map.sigma_to_source(sigma)
    x_s, sigma_s = pool_sample(x_s, sigma_s, factor, flow=latent_map.flow, multiple=latent_map.grid_multiple)
    d_base, d_adapted = legs(x_s, sigma_s)
    check_finite(d_base, "source base model")
    check_finite(d_adapted, "source adapted model")
    if d_base.shape != x_s.shape or d_adapted.shape != x_s.shape:
        raise DeltaSamplingError(
            f"source legs returned shapes {tuple(d_base.shape)} and {tuple(d_adapted.shape)}; "
            f"expected {tuple(x_s.shape)}"
        )
    delta = latent_map.delta_to_target(d_adapted.to(x.dtype) - d_base.to(x.dtype))
    return upsample_delta(delta, factor, (x.shape[-2], x.shape[-1]), upsample)


def pair_of(base: Denoiser, adapted: Denoiser) -> PairDenoiser:
    """Two separate denoisers as one :data:`PairDenoiser` (base first, so a failing base is named first)."""

    def legs(x_s: torch.Tensor, sigma_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_base = base(x_s, sigma_s)
        check_finite(d_base, "source base model")
        return d_base, adapted(x_s, sigma_s)

    return legs


def delta_denoised(
    x: torch.Tensor,
    sigma: torch.Tensor,
    target_denoised: torch.Tensor,
    base: Denoiser,
    adapted: Denoiser,
    *,
    scale: float,
    source: str | LatentFormat,
    target: str | LatentFormat,
    factor: int = 1,
    upsample: str = "bilinear",
) -> torch.Tensor:
    """Delta Sampling on x0 predictions for one denoiser call.

    ``x``, ``target_denoised``: (B, C, H, W) in the target's scaled latent space (k-diffusion form ``x = x0 + sigma *
    eps``); ``sigma``: (B,); ``base``/``adapted``: source-space x0 denoisers; ``scale``: lambda;
    ``factor``/``upsample``: the legs' grid (:func:`source_delta`). Returns
    ``target_denoised`` itself when ``scale == 0`` or ``base is adapted`` (no source call is made); raises
    :class:`DeltaSamplingError` for incompatible formats, bad shapes and non-finite source outputs.
    """
    target_format, source_format = resolve_format(target), resolve_format(source)
    latent_map = LatentMap.between(target_format, source_format)
    if scale == 0 or base is adapted:
        return target_denoised
    _check_scale(scale)
    _check_shapes(x, sigma, target_denoised, target_format)
    delta = source_delta(x, sigma, pair_of(base, adapted), latent_map, factor=factor, upsample=upsample)
    return target_denoised + scale * delta


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise DeltaSamplingError(f"scale must be a finite number; got {scale!r}")


def delta_eps(
    x_t: torch.Tensor,
    t: torch.Tensor,
    target_eps: torch.Tensor,
    base: Denoiser,
    adapted: Denoiser,
    *,
    scale: float,
    source: str | LatentFormat,
    target: str | LatentFormat,
    schedule: DiscreteSchedule | None = None,
    factor: int = 1,
) -> torch.Tensor:
    """Delta Sampling for epsilon-space samplers (DDIM, PLMS, UniPC): the same delta as :func:`delta_denoised`.

    ``x_t``: VP latents (B, C, H, W) at (possibly fractional) timesteps ``t`` (B,) of ``schedule`` (default: the SD
    scaled-linear schedule); ``target_eps``: the target's CFG-combined noise prediction. The source legs are still x0
    denoisers, called at the equivalent k-diffusion point; the x0 delta comes back as ``-delta / sigma``.
    """
    target_format, source_format = resolve_format(target), resolve_format(source)
    latent_map = LatentMap.between(target_format, source_format)
    if scale == 0 or base is adapted:
        return target_eps
    _check_scale(scale)
    x, sigma = vp_to_ve(x_t, t, schedule or DiscreteSchedule())
    _check_shapes(x, sigma, target_eps, target_format)
    delta = source_delta(x, sigma, pair_of(base, adapted), latent_map, factor=factor)
    return target_eps + scale * x0_delta_to_eps(delta, sigma)
