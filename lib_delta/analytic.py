"""Data distributions whose denoisers are known in closed form: diagonal Gaussian mixtures.

For data ``z ~ sum_k pi_k N(mu_k, diag(v_k))`` and ``x = z + sigma * eps``, the exact x0 predictor is
``E[z | x] = sum_k w_k(x) (mu_k + v_k / (v_k + sigma^2) (x - mu_k))`` with posterior weights
``w_k ∝ pi_k N(x; mu_k, v_k + sigma^2)``. Tests prove Delta Sampling against them to float precision, the demo
samples from them, and the bench measures approximations against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Diagonal Gaussian mixture over flattened samples of dimension D (float64 parameters)."""

    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    variances: torch.Tensor  # (K, D)

    @classmethod
    def gaussian(cls, mean: torch.Tensor, variance: torch.Tensor) -> GaussianMixture:
        """A single diagonal Gaussian."""
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        variance = torch.as_tensor(variance, dtype=torch.float64).reshape(1, -1).expand_as(mean)
        return cls(torch.ones(1, dtype=torch.float64), mean, variance.clone())

    @classmethod
    def of(
        cls, weights: list[float], means: list[list[float]], stds: list[float] | list[list[float]]
    ) -> GaussianMixture:
        """A mixture from plain lists (weights are normalised; one std per component or per dimension)."""
        w = torch.tensor(weights, dtype=torch.float64)
        mu = torch.tensor(means, dtype=torch.float64)
        std = torch.tensor(stds, dtype=torch.float64)
        if std.ndim == 1:
            std = std[:, None].expand_as(mu)
        return cls(w / w.sum(), mu, std.pow(2).clone())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def variance(self) -> torch.Tensor:
        m = self.mean()
        second = (self.weights[:, None] * (self.variances + self.means.pow(2))).sum(0)
        return second - m.pow(2)

    def shifted(self, shift: torch.Tensor) -> GaussianMixture:
        """The same distribution translated by ``shift`` (D,)."""
        return GaussianMixture(self.weights, self.means + torch.as_tensor(shift, dtype=torch.float64), self.variances)

    def affine(self, ratio: float, offset: float) -> GaussianMixture:
        """The image of the distribution under ``z -> ratio * z + offset`` (e.g. into another latent format)."""
        return GaussianMixture(self.weights, self.means * ratio + offset, self.variances * ratio**2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples, shape (n, D), float64."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[idx] + noise * self.variances[idx].sqrt()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact E[z | x] for ``x = z + sigma * eps``; x of shape (B, ...) with prod(...) = D, sigma of shape (B,)."""
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], 1, -1).to(torch.float64)  # (B, 1, D)
        s2 = sigma.to(torch.float64).reshape(-1, 1, 1).pow(2)
        total = self.variances[None] + s2  # (B, K, D)
        diff = xf - self.means[None]
        log_n = -0.5 * (diff.pow(2) / total + total.log() + math.log(2 * math.pi)).sum(-1)  # (B, K)
        post = torch.softmax(self.weights.log()[None] + log_n, dim=1)  # (B, K)
        comp = self.means[None] + self.variances[None] / total * diff  # (B, K, D)
        return (post[:, :, None] * comp).sum(1).reshape(shape).to(dtype)
