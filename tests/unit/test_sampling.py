"""Sampling with DS at lambda = 1 lands on the adapted target distribution, for several samplers.

Two checks per sampler: (1) the whole trajectory equals the same sampler run on the exact denoiser of the shifted
target with the same noise (DS is exact at every call, so any sampler, ancestral included, must agree to float
precision); (2) the samples' mean and variance match the shifted target's within sampling error.
"""

import pytest
import torch

from lib_delta import delta_denoised, delta_eps
from lib_delta.samplers import (
    ddim_timesteps,
    karras_sigmas,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from lib_delta.timesteps import DiscreteSchedule

from conftest import DIM, SHAPE, Case, random_gaussian

N = 4000
# First-order samplers need more steps before their own discretisation bias (variance too low by O(1/steps)) falls
# below the sampling error; that bias is the sampler's, and the trajectory check shows DS adds none.
STEPS = {"euler": 200, "heun": 40, "dpmpp_2m": 40, "euler_ancestral": 400}
SIGMA_MAX = 80.0  # a prior of pure noise at sigma 80 is the data's marginal to within 1% of its spread


def make_case():
    return Case("sd1", "sdxl", random_gaussian(21, mean_scale=0.7), seed=5)


def ds_model(case: Case, scale=1.0):
    def model(x, sigma):
        return delta_denoised(x, sigma, case.target.denoise(x, sigma), case.base.denoise, case.adapted.denoise,
                              scale=scale, source=case.source_fmt, target=case.target_fmt)

    return model


def run(name, model, noise, seed):
    sigmas = karras_sigmas(STEPS[name], sigma_max=SIGMA_MAX)
    x = noise * sigmas[0]
    if name == "euler":
        return sample_euler(model, x, sigmas)
    if name == "heun":
        return sample_heun(model, x, sigmas)
    if name == "dpmpp_2m":
        return sample_dpmpp_2m(model, x, sigmas)
    if name == "euler_ancestral":
        return sample_euler_ancestral(model, x, sigmas, torch.Generator().manual_seed(seed))
    raise AssertionError(name)


def check_moments(samples, dist, tolerance_sd=5.0, discretisation=0.04):
    flat = samples.reshape(samples.shape[0], -1)
    mean, var = flat.mean(0), flat.var(0)
    want_mean, want_var = dist.mean(), dist.variance()
    mean_err = (mean - want_mean).abs() / (want_var / N).sqrt()
    var_err = (var / want_var - 1).abs()
    assert float(mean_err.max()) < tolerance_sd, f"mean off by {float(mean_err.max()):.2f} standard errors"
    limit = tolerance_sd * (2 / N) ** 0.5 + discretisation
    assert float(var_err.max()) < limit, f"variance off by {100 * float(var_err.max()):.1f}%"


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_k_samplers_land_on_the_adapted_target(sampler):
    case = make_case()
    noise = torch.randn(N, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with_ds = run(sampler, ds_model(case), noise, seed=2)
    exact = run(sampler, case.expected.denoise, noise, seed=2)
    torch.testing.assert_close(with_ds, exact, rtol=0, atol=1e-8)
    check_moments(with_ds, case.expected)
    # And the delta did something: the target alone lands elsewhere.
    without = run(sampler, case.target.denoise, noise, seed=2)
    assert float((without.mean(0) - with_ds.mean(0)).abs().max()) > 0.5


def test_ddim_eps_space_loop_lands_on_the_adapted_target():
    case = make_case()
    schedule = DiscreteSchedule()
    timesteps = ddim_timesteps(50)
    g = torch.Generator().manual_seed(4)
    # Start from the exact marginal at the first timestep (the SD schedule's largest sigma is only 14.6).
    a_T = schedule.alpha_cumprod_at(timesteps[:1].double())
    x_T = a_T.sqrt() * case.expected.sample(N, g) + (1 - a_T).sqrt() * torch.randn(N, DIM, dtype=torch.float64,
                                                                                    generator=g)
    x_T = x_T.reshape(N, *SHAPE)

    def eps_of(dist):
        def eps(x_t, t):
            sigma = schedule.t_to_sigma(t)
            x = x_t * (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
            return (x - dist.denoise(x, sigma)) / sigma.view(-1, 1, 1, 1)

        return eps

    target_eps = eps_of(case.target)

    def ds_eps(x_t, t):
        return delta_eps(x_t, t, target_eps(x_t, t), case.base.denoise, case.adapted.denoise, scale=1.0,
                         source=case.source_fmt, target=case.target_fmt)

    with_ds = sample_ddim(ds_eps, x_T, timesteps, schedule)
    exact = sample_ddim(eps_of(case.expected), x_T, timesteps, schedule)
    torch.testing.assert_close(with_ds, exact, rtol=0, atol=1e-8)
    check_moments(with_ds, case.expected)


def test_half_lambda_moves_the_mean_halfway_for_a_gaussian():
    # For a Gaussian and a shift, D_t + 0.5 * delta is the exact denoiser of the target shifted by half the offset.
    case = make_case()
    noise = torch.randn(N, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    half = run("euler", ds_model(case, scale=0.5), noise, seed=0)
    halfway = case.target.shifted((case.expected.mean() - case.target.mean()) / 2)
    torch.testing.assert_close(half, run("euler", halfway.denoise, noise, seed=0), rtol=0, atol=1e-8)
