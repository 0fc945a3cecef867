"""The 16-channel flow families (SD3/SD3.5, Flux/Chroma) in the host-free engine: formats, the legs' sample, and
source resolution for a rectified flow, on exactly solvable models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_delta.analytic_field import StationaryField, band, ds_native, natural_spectrum, transfer_error
from lib_delta.delta import source_delta
from lib_delta.latent import LATENT_FORMATS, LatentMap
from lib_delta.resolution import pool_sample, pooled_size, pooling_factor

DT = torch.float64
N = 32
CHANNELS = 16


def test_flow_formats():
    for name, vae in (("sd3", "sd3"), ("flux", "flux"), ("chroma", "flux")):
        fmt = LATENT_FORMATS[name]
        assert (fmt.channels, fmt.flow, fmt.vae, fmt.grid_multiple) == (16, True, vae, 2)
    assert (LATENT_FORMATS["chroma"].scale, LATENT_FORMATS["chroma"].shift) == (0.3611, 0.1159)  # Flux's VAE
    assert not any(LATENT_FORMATS[name].flow for name in ("sd1", "sd2", "sdxl"))


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.7, 1.0])
def test_pooled_flow_sample_is_exact_at_its_own_noise_level(factor, sigma):
    # x = (1 - s) x0 + s eps  =>  c pool(x) = (1 - s') pool(x0) + s' eps', eps' i.i.d. N(0, 1),
    # with d = k - (k - 1) s, c = k / d, s' = s / d
    generator = torch.Generator().manual_seed(5)
    x0 = torch.randn(8, CHANNELS, 48, 48, dtype=DT, generator=generator) * 2 + 1  # 48: no padding for k = 2, 3, 4
    s = torch.full((8,), sigma, dtype=DT)
    x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, dtype=DT, generator=generator)
    pooled_x, pooled_sigma = pool_sample(x, s, factor, flow=True, multiple=2)
    spread = factor - (factor - 1) * sigma
    torch.testing.assert_close(pooled_sigma, s / spread, rtol=0, atol=0)
    if sigma == 1.0:
        assert torch.equal(pooled_sigma, s)  # pure noise stays pure noise
    clean = F.avg_pool2d(x0, factor)
    noise = pooled_x - (1 - pooled_sigma.view(-1, 1, 1, 1)) * clean
    n = noise.numel()
    # mean: the clean part is (1 - s') pool(x0) exactly in expectation; std: s', within the sampling error of n draws
    assert abs(noise.mean().item()) < 4 * sigma / spread / n**0.5
    assert abs(noise.std().item() / (sigma / spread) - 1) < 4 / (2 * n) ** 0.5
    corr = (noise[..., :-1] * noise[..., 1:]).mean() / noise.var()
    assert abs(corr.item()) < 4 / n**0.5


def test_flow_factor_one_is_the_unpooled_path_bitwise():
    x = torch.randn(2, CHANNELS, 12, 10, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.2])
    seen = []

    def legs(x_s, sigma_s):
        seen.append((x_s, sigma_s))
        return x_s * 0.5, x_s * 0.25 + sigma_s.view(-1, 1, 1, 1)

    latent_map = LatentMap.between("sd3", "sd3")
    delta = source_delta(x, sigma, legs, latent_map, factor=1)
    assert seen[0][0] is x and seen[0][1] is sigma  # the target's own x and sigma, untouched
    assert torch.equal(delta, (x * 0.25 + sigma.view(-1, 1, 1, 1)) - x * 0.5)


def test_flow_grids_round_to_even_cells_and_the_factor_rule_uses_them():
    assert pooled_size(13, 2, 2) == 8 and pooled_size(13, 2) == 8  # 7 cells: even 8; the UNet's multiple also 8
    assert pooled_size(36, 2, 2) == 18 and pooled_size(36, 2) == 24  # an MMDiT takes 18; a UNet needs 24
    x = torch.randn(1, CHANNELS, 36, 36)
    pooled, _ = pool_sample(x, torch.tensor([0.5]), 2, flow=True, multiple=2)
    assert pooled.shape[-2:] == (18, 18)  # no padding
    # SD3 at 2048 x 2048 px (256 x 256 cells) against its 1024² native: factor 2
    assert pooling_factor("native", 2048, 2048, "sd3") == 2
    # a 72 x 72 px SD3 target (9 x 9 cells): factor 2 gives 6 x 6 legs (a UNet's multiple would give 8 x 8)
    assert pooling_factor("2", 72, 72, "sd3") == 2 and pooling_factor("2", 72, 72, "sd1") == 2


def fields(adaptation: str) -> tuple[StationaryField, StationaryField]:
    psd = natural_spectrum(N, channels=CHANNELS)
    base = StationaryField(torch.zeros(CHANNELS, dtype=DT), psd)
    if adaptation == "mean":
        shift = torch.linspace(-0.5, 0.5, CHANNELS, dtype=DT)
        return base, StationaryField(shift, psd)
    low, high = {"low": (0.0, 0.0625), "high": (0.3, 0.75)}[adaptation]
    return base, StationaryField(base.mean.clone(), psd + 2.0 * band(N, low, high))


def test_flow_field_denoiser_is_the_posterior_mean():
    # A Monte Carlo check of denoise_flow itself: E[x0 | x] over samples that share one x is not available, but the
    # denoiser's error must be uncorrelated with x (orthogonality of the posterior mean), and smaller than x's.
    base, _ = fields("low")
    generator = torch.Generator().manual_seed(7)
    x0 = base.sample(64, generator)
    sigma = torch.full((64,), 0.6, dtype=DT)
    x = 0.4 * x0 + 0.6 * torch.randn(x0.shape, dtype=DT, generator=generator)
    error = base.denoise_flow(x, sigma) - x0
    corr = (error * x).mean() / (error.std() * x.std())
    assert abs(corr.item()) < 0.02
    assert error.pow(2).mean() < (x / 0.4 - x0).pow(2).mean()


def test_flow_full_resolution_legs_give_the_exact_adapted_denoiser():
    base, adapted = fields("low")
    generator = torch.Generator().manual_seed(4)
    sigma = torch.tensor([0.9, 0.3, 0.05], dtype=DT)
    x = (1 - sigma.view(-1, 1, 1, 1)) * adapted.sample(3, generator) + sigma.view(-1, 1, 1, 1) * torch.randn(
        3, CHANNELS, N, N, dtype=DT, generator=generator)
    torch.testing.assert_close(ds_native(x, sigma, base, base, adapted, factor=1, flow=True),
                               adapted.denoise_flow(x, sigma), rtol=0, atol=1e-10)


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.9, 0.99])
def test_flow_mean_change_transfers_exactly_at_any_factor(upsample, sigma):
    # As for k-diffusion legs: the pooled sample is an exact flow sample of the pooled field, whose DC keeps its
    # signal-to-noise ratio, so the pooled legs' delta is the full-resolution one, a constant.
    base, adapted = fields("mean")
    for factor in (2, 4):
        error, share = transfer_error(base, adapted, sigma, factor, upsample=upsample, count=4, flow=True)
        assert error < 1e-10 and abs(share - 1) < 1e-10, (factor, error, share)


@pytest.mark.parametrize("sigma", [0.5, 0.9])
def test_flow_low_frequencies_transfer_high_ones_are_lost(sigma):
    low_base, low = fields("low")
    high_base, high = fields("high")
    _, low_share = transfer_error(low_base, low, sigma, 2, flow=True)
    _, high_share = transfer_error(high_base, high, sigma, 2, flow=True)
    assert low_share > 0.8 and high_share < 0.2, (low_share, high_share)
