"""Latent formats and the exact affine map between two formats' scaled latent spaces.

A model works on *scaled* latents ``z = (real - shift) * scale``, where ``real`` is the VAE latent. Two formats that
share the real latent (same channel count) are related by an affine map ``z_s = r * z_t + c`` with
``r = scale_s / scale_t`` and ``c = scale_s * (shift_t - shift_s)``. Noise in k-diffusion form
(``x = z + sigma * eps``) maps linearly too, so the target's noisy sample ``x`` at ``sigma`` *is* an exact sample of
the source's forward process at ``x_s = r * x + c``, ``sigma_s = r * sigma``: no second trajectory is needed, whatever
the sampler.

The map assumes both families decode the same real latent to the same image. SD1 and SD2 share a VAE, so for them it
is the identity. SDXL's VAE is a retrained one with the same layout: the map matches the scales, and how well the
latents themselves agree is an empirical question the reference implementation answers the same way.

The 16-channel families are rectified flows: ``x = (1 - sigma) * z + sigma * eps``, sigma in (0, 1], and their
denoisers return x0 too. Within a flow family (SD3, SD3.5 M and L share one VAE and one normalisation; Flux and Chroma
another) the target's ``x`` and ``sigma`` are exactly the source's, and the map is the identity. Across them (the SD3
family against Flux: different VAEs) no exact map exists, and none is offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DeltaSamplingError


@dataclass(frozen=True)
class LatentFormat:
    """A model family's latent space: channel count, scale factor and shift (real latent = z / scale + shift)."""

    name: str
    channels: int
    scale: float
    shift: float = 0.0
    flow: bool = False  # rectified flow, x = (1 - sigma) * x0 + sigma * eps; else k-diffusion's x = x0 + sigma * eps
    vae: str = ""  # whose VAE the latents are: flow formats pair only with the same one
    grid_multiple: int = 8  # the denoiser's grid must divide by it: a UNet halves it 3 times; MMDiT / Flux patch by 2


LATENT_FORMATS: dict[str, LatentFormat] = {
    "sd1": LatentFormat("sd1", 4, 0.18215, vae="sd"),
    "sd2": LatentFormat("sd2", 4, 0.18215, vae="sd"),
    "sdxl": LatentFormat("sdxl", 4, 0.13025, vae="sdxl"),
    # SD3 Medium, SD3.5 Medium and Large: one VAE and normalisation (flow-families-facts.md section 1)
    "sd3": LatentFormat("sd3", 16, 1.5305, 0.0609, flow=True, vae="sd3", grid_multiple=2),
    "flux": LatentFormat("flux", 16, 0.3611, 0.1159, flow=True, vae="flux", grid_multiple=2),
    "chroma": LatentFormat("chroma", 16, 0.3611, 0.1159, flow=True, vae="flux", grid_multiple=2),  # Flux's VAE
}


def resolve_format(fmt: str | LatentFormat) -> LatentFormat:
    """Return the :class:`LatentFormat` for a name in :data:`LATENT_FORMATS` or pass a format object through."""
    if isinstance(fmt, LatentFormat):
        return fmt
    if isinstance(fmt, str) and fmt.lower() in LATENT_FORMATS:
        return LATENT_FORMATS[fmt.lower()]
    known = ", ".join(sorted(LATENT_FORMATS))
    raise DeltaSamplingError(f"unknown latent format {fmt!r}; known formats: {known}")


@dataclass(frozen=True)
class LatentMap:
    """The affine map from a target's scaled latent space into a source's: ``z_s = ratio * z_t + offset``."""

    ratio: float
    offset: float
    flow: bool = False  # both sides are rectified flows (then the map is the identity)
    grid_multiple: int = 8  # the source denoiser's grid constraint (pooled grids are rounded up to it)

    @classmethod
    def between(cls, target: str | LatentFormat, source: str | LatentFormat) -> LatentMap:
        """Map for a target/source pair; refuses formats whose channel counts differ (e.g. 4- vs 16-channel), and
        flow formats of different VAEs (the SD3 family against Flux)."""
        t, s = resolve_format(target), resolve_format(source)
        if t.channels != s.channels:
            raise DeltaSamplingError(
                f"cannot pair a {s.channels}-channel source ({s.name}) with a {t.channels}-channel target ({t.name}): "
                "their VAEs encode images into different latent spaces, so no exact map between them exists. "
                "Choose a source pair of the target's family or one with the same latent channel count."
            )
        if t.flow or s.flow:
            if t.flow != s.flow or t.vae != s.vae or (t.scale, t.shift) != (s.scale, s.shift):
                raise DeltaSamplingError(
                    f"cannot pair a {s.name} source ({s.vae} VAE) with a {t.name} target ({t.vae} VAE): the two "
                    "families were trained on different VAEs' latents, so no exact map between them exists. Choose "
                    f"a source pair of the target's family (the {t.name} family's models share its VAE)."
                )
            return cls(ratio=1.0, offset=0.0, flow=True, grid_multiple=s.grid_multiple)
        return cls(ratio=s.scale / t.scale, offset=s.scale * (t.shift - s.shift), grid_multiple=s.grid_multiple)

    @property
    def is_identity(self) -> bool:
        return self.ratio == 1.0 and self.offset == 0.0

    def sample_to_source(self, x: torch.Tensor) -> torch.Tensor:
        """Noisy sample (or clean latent) in target space -> source space."""
        if self.is_identity:
            return x
        return x * self.ratio + self.offset

    def sigma_to_source(self, sigma: torch.Tensor) -> torch.Tensor:
        """k-diffusion noise level in target space -> source space (noise scales with the linear part only)."""
        if self.ratio == 1.0:
            return sigma
        return sigma * self.ratio

    def delta_to_target(self, delta: torch.Tensor) -> torch.Tensor:
        """A *difference* of source-space latents -> target space (the offset cancels in a difference)."""
        if self.ratio == 1.0:
            return delta
        return delta / self.ratio
