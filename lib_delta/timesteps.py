"""The discrete DDPM schedule shared by SD1, SD2 and SDXL, and the maps between its timesteps and k-diffusion sigmas.

Samplers that work in epsilon space (the webui's DDIM, PLMS and UniPC) hand over VP latents ``x_t = sqrt(a) z +
sqrt(1 - a) eps`` and (possibly fractional) timesteps ``t``. The same point in k-diffusion's VE form is ``x = x_t /
sqrt(a)`` at ``sigma = sqrt((1 - a) / a)``, which is how a delta computed on x0 predictions is brought to such samplers.
The interpolation rules match k-diffusion's ``DiscreteSchedule`` (log-sigma interpolation between integer timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def scaled_linear_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """alphas_cumprod of the "scaled linear" beta schedule (float64), as in ldm and sgm's legacy discretisation."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class DiscreteSchedule:
    """Timestep <-> sigma maps for a discrete schedule given by its ``alphas_cumprod``."""

    alphas_cumprod: torch.Tensor = field(default_factory=scaled_linear_alphas_cumprod)

    @property
    def sigmas(self) -> torch.Tensor:
        a = self.alphas_cumprod
        return ((1 - a) / a) ** 0.5

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Fractional timesteps -> sigma, interpolating log-sigma between neighbouring integer steps."""
        log_sigmas = self.log_sigmas.to(t.device)
        tf = t.to(torch.float64).clamp(0, len(log_sigmas) - 1)
        low, high, w = tf.floor().long(), tf.ceil().long(), tf.frac()
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().to(out_dtype)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma -> fractional timestep (the inverse of :meth:`t_to_sigma` inside the schedule's range)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).log()
        dists = log_sigma - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * high
        return t.view(sigma.shape).to(sigma.dtype)

    def alpha_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at fractional t, consistent with :meth:`t_to_sigma` (a = 1 / (1 + sigma^2))."""
        sigma = self.t_to_sigma(t).to(torch.float64)
        return 1.0 / (1.0 + sigma**2)


def vp_to_ve(x_t: torch.Tensor, t: torch.Tensor, schedule: DiscreteSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """A VP latent at timestep ``t`` (shape (B,)) -> the same point as k-diffusion ``(x, sigma)``."""
    sigma = schedule.t_to_sigma(t).to(torch.float64)
    scale = (1.0 + sigma**2) ** 0.5  # 1 / sqrt(alphas_cumprod)
    x = x_t * scale.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    return x, sigma.to(x_t.dtype)


def x0_delta_to_eps(delta_x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A change of the x0 prediction at noise level ``sigma`` expressed as the change of the eps prediction.

    With ``x0 = x - sigma * eps`` at fixed ``x`` (VE form; the VP form gives the same ratio), ``d_eps = -d_x0 / sigma``.
    """
    return -delta_x0 / sigma.to(delta_x0.dtype).view(-1, *([1] * (delta_x0.ndim - 1)))
