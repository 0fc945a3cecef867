"""Small reference samplers, written like k-diffusion's ``sampling.py``, for the demo, the tests and the bench.

Each k-diffusion-style sampler takes ``model(x, sigma) -> x0`` with sigma of shape (B,) and a decreasing sigma
schedule ending in 0. :func:`sample_ddim` works in the VP/epsilon form the webui's DDIM, PLMS and UniPC use.
Schedules stay float64 tensors on the CPU (they steer the loops); every value taken from them meets ``x`` on its
device and in its dtype (:func:`_on`), so the samplers run on any device (tests/fakecuda runs them on fake CUDA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .timesteps import DiscreteSchedule

X0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(n: int, sigma_min: float = 0.0292, sigma_max: float = 14.6146, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels, followed by a final 0 (float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _on(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A schedule value (a CPU scalar) as a scalar tensor on ``x``'s device, in its dtype (read on the host: no
    device synchronisation)."""
    return x.new_full((), float(value))


def _batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _on(sigma, x).expand(x.shape[0])


def _bcast(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if value.device != x.device or value.dtype != x.dtype:
        value = value.to(device=x.device, dtype=x.dtype)
    return value.view(-1, *([1] * (x.ndim - 1)))


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma."""
    return (x - denoised) / _bcast(sigma, x)


def sample_euler(model: X0Model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        s = _batch(sigmas[i], x)
        d = to_d(x, s, model(x, s))
        x = x + d * _on(sigmas[i + 1] - sigmas[i], x)
    return x


def sample_heun(model: X0Model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        s = _batch(sigmas[i], x)
        d = to_d(x, s, model(x, s))
        dt = _on(sigmas[i + 1] - sigmas[i], x)
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            s2 = _batch(sigmas[i + 1], x)
            d_2 = to_d(x_2, s2, model(x_2, s2))
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpmpp_2m(model: X0Model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M), as k-diffusion's ``sample_dpmpp_2m``."""

    def t_fn(sigma: torch.Tensor) -> torch.Tensor:
        return -sigma.log()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch(sigmas[i], x))
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        ratio = _on(sigmas[i + 1] / sigmas[i], x)
        if old_denoised is None or sigmas[i + 1] == 0:
            x = ratio * x - _on(torch.expm1(-h), x) * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = _on(1 + 1 / (2 * r), x) * denoised - _on(1 / (2 * r), x) * old_denoised
            x = ratio * x - _on(torch.expm1(-h), x) * denoised_d
        old_denoised = denoised
    return x


def sample_euler_ancestral(
    model: X0Model, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator, eta: float = 1.0
) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        s = _batch(sigmas[i], x)
        denoised = model(x, s)
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        d = to_d(x, s, denoised)
        x = x + d * _on(sigma_down - sigma_from, x)
        if sigma_to > 0:
            noise = x.new_empty(x.shape).copy_(torch.randn(x.shape, dtype=x.dtype, generator=generator))  # CPU rng
            x = x + noise * _on(sigma_up, x)
    return x


def ddim_timesteps(steps: int, total: int = 1000) -> torch.Tensor:
    """Decreasing integer timesteps as the webui's DDIM uses them (``range(0, total, total // steps) + 1``)."""
    return (torch.arange(0, total, total // steps) + 1).flip(0)


def sample_ddim(
    eps_model: EpsModel, x_t: torch.Tensor, timesteps: torch.Tensor, schedule: DiscreteSchedule
) -> torch.Tensor:
    """Deterministic DDIM in VP form: ``eps_model(x_t, t)`` with t of shape (B,); returns the final x0."""
    for i, t in enumerate(timesteps):
        tb = x_t.new_full((x_t.shape[0],), float(t), dtype=torch.float64)
        a_t = schedule.alpha_cumprod_at(t.reshape(1).to(torch.float64))  # on the CPU, with the schedule
        eps = eps_model(x_t, tb)
        x0 = (x_t - _on((1 - a_t).sqrt(), x_t) * eps) / _on(a_t.sqrt(), x_t)
        if i + 1 == len(timesteps):
            return x0
        a_prev = schedule.alpha_cumprod_at(timesteps[i + 1 : i + 2].to(torch.float64))
        x_t = _on(a_prev.sqrt(), x_t) * x0 + _on((1 - a_prev).sqrt(), x_t) * eps
    return x_t
