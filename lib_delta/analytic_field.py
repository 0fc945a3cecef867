"""An exactly solvable *spatial* model for the native-resolution legs: stationary Gaussian fields on a latent grid.

A field on an N x N periodic grid (per channel) with mean ``mu`` and power spectral density ``S(f)`` has the exact
denoiser, diagonal in Fourier space,

    D(x, sigma) = mu + F^-1[ S(f) / (S(f) + sigma^2) * F(x - mu) ],

and its k x k average-pooled field is again stationary Gaussian on the (N/k)² grid, with the same mean and the aliased
spectrum ``S_k(g) = k^-2 * sum over the k² aliases f of g of |H(f)|² S(f)`` (H: the box filter's response). So for a
source pair of fields (base A, adapted A'), the legs of DS with ``source_resolution`` k can be the exact denoisers of
the *pooled* fields — what a model trained at the coarse size would ideally be — and DS's answer can be compared with
the exact adapted denoiser at full resolution, as a function of where in frequency the adaptation lives.

Host-free (torch only); float64 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DT = torch.float64


def frequency_radius(n: int) -> torch.Tensor:
    """|f| in cycles per cell (0 .. 0.707) for every bin of an n x n DFT."""
    f = torch.fft.fftfreq(n, dtype=DT)
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


def natural_spectrum(n: int, channels: int = 4, corner: float = 0.05, power: float = 2.0) -> torch.Tensor:
    """An image-like spectrum ``(1 + (|f| / corner)²) ** (-power / 2)``, normalised to unit variance per cell."""
    psd = (1 + (frequency_radius(n) / corner) ** 2) ** (-power / 2)
    psd = psd / psd.mean()
    return psd.expand(channels, n, n).clone()


def band(n: int, low: float, high: float) -> torch.Tensor:
    """Indicator of the radial band ``low <= |f| < high`` (cycles per cell)."""
    r = frequency_radius(n)
    return ((r >= low) & (r < high)).to(DT)


@dataclass(frozen=True)
class StationaryField:
    """A stationary Gaussian field: ``mean`` (C,) and ``psd`` (C, N, N), symmetric under f -> -f."""

    mean: torch.Tensor
    psd: torch.Tensor

    @property
    def size(self) -> int:
        return self.psd.shape[-1]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The exact x0 denoiser for ``x = x0 + sigma * eps`` (x: (B, C, N, N), sigma: (B,))."""
        mu = self.mean.view(1, -1, 1, 1)
        s2 = (sigma.to(DT) ** 2).view(-1, 1, 1, 1)
        gain = self.psd.unsqueeze(0) / (self.psd.unsqueeze(0) + s2)
        return mu + torch.fft.ifft2(gain * torch.fft.fft2(x.to(DT) - mu)).real

    def denoise_flow(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The exact x0 denoiser for a rectified flow, ``x = (1 - sigma) * x0 + sigma * eps`` (sigma < 1): the same
        posterior as the k-diffusion one at ``x / (1 - sigma)``, noise level ``sigma / (1 - sigma)``."""
        s = sigma.to(DT)
        return self.denoise(x.to(DT) / (1 - s).view(-1, 1, 1, 1), s / (1 - s))

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` clean samples (count, C, N, N)."""
        white = torch.randn(count, *self.psd.shape, dtype=DT, generator=generator)
        return self.mean.view(1, -1, 1, 1) + torch.fft.ifft2(torch.sqrt(self.psd) * torch.fft.fft2(white)).real

    def pooled(self, factor: int) -> StationaryField:
        """The field of ``avg_pool2d(x0, factor)`` (same mean, aliased and box-filtered spectrum)."""
        n = self.size
        if n % factor:
            raise ValueError(f"grid {n} is not divisible by {factor}")
        m = n // factor
        f = torch.fft.fftfreq(n, dtype=DT) * n  # integer frequency index, signed
        # box filter response along one axis: (1/k) sum_r exp(2 pi i f r / n); |.|² is all that enters
        r = torch.arange(factor, dtype=DT)
        h = torch.exp(2j * math.pi * f[:, None] * r[None, :] / n).mean(dim=1).abs() ** 2
        weighted = self.psd * h[:, None] * h[None, :]
        folded = weighted.reshape(-1, factor, m, factor, m).sum(dim=(1, 3)) / factor**2
        return StationaryField(self.mean.clone(), folded)


def ds_native(
    x: torch.Tensor, sigma: torch.Tensor, target: StationaryField, base: StationaryField, adapted: StationaryField,
    *, factor: int, upsample: str = "bilinear", flow: bool = False,
) -> torch.Tensor:
    """DS at lambda 1 with exact legs on the ``factor`` times coarser grid (factor 1: the full-resolution legs),
    through the engine's own :func:`lib_delta.delta.delta_denoised`; ``flow``: the fields as a rectified flow's data
    (SD3's format), k-diffusion's SD1 otherwise."""
    from .delta import delta_denoised

    legs = (base, adapted) if factor == 1 else (base.pooled(factor), adapted.pooled(factor))
    legs_base, legs_adapted = ((leg.denoise_flow if flow else leg.denoise) for leg in legs)
    family = "sd3" if flow else "sd1"
    own = target.denoise_flow(x, sigma) if flow else target.denoise(x, sigma)
    return delta_denoised(x, sigma, own, legs_base, legs_adapted, scale=1.0, source=family, target=family,
                          factor=factor, upsample=upsample)


def transfer_error(
    base: StationaryField, adapted: StationaryField, sigma: float, factor: int, *, upsample: str = "bilinear",
    count: int = 16, seed: int = 0, flow: bool = False,
) -> tuple[float, float]:
    """``(relative RMS error, share transferred)`` of DS with target = base and legs at ``factor``, against the exact
    adapted denoiser, over noisy samples of the adapted field (a rectified flow's, with ``flow``):
    ``||DS - D_A'|| / ||D_A' - D_A||`` and
    ``<DS - D_A, D_A' - D_A> / ||D_A' - D_A||²`` (1 = all of the adaptation, 0 = none)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = adapted.sample(count, generator)
    s = torch.full((count,), float(sigma), dtype=DT)
    eps = torch.randn(x0.shape, dtype=DT, generator=generator)
    if flow:
        x = (1 - sigma) * x0 + sigma * eps
        exact, target = adapted.denoise_flow(x, s), base.denoise_flow(x, s)
    else:
        x = x0 + sigma * eps
        exact, target = adapted.denoise(x, s), base.denoise(x, s)
    ds = ds_native(x, s, base, base, adapted, factor=factor, upsample=upsample, flow=flow)
    wanted = exact - target
    error = torch.linalg.vector_norm(ds - exact) / torch.linalg.vector_norm(wanted)
    share = ((ds - target) * wanted).sum() / (wanted * wanted).sum()
    return float(error), float(share)
